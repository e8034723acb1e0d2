#if canImport(Glibc)
import Glibc
#endif
import KVCore
import Synchronization
import KVSystem

/// The data plane's handshake (segment and KV servers): the peer proves the cluster token and
/// the server proves it back (`Authentication`).
enum PeerHandshake {
    /// Client side on a fresh connection; throws `invalidArgument` when either side refuses.
    static func authenticate(_ s: Socket, token: [UInt8]) throws(KVError) {
        let handshake = ClientHandshake()
        var w = WireWriter()
        w.bytes(handshake.clientNonce)
        try s.writeFrame(kind: DataFrame.hello, payload: w.bytes)
        let (h, payload) = try s.readFrame(maxPayload: 4096, isKnown: DataFrame.isKnown)
        if h.kind == DataFrame.error { throw PeerLink.errorOf(payload) }
        guard h.kind == DataFrame.challenge else { throw .invalidArgument("expected a challenge, got frame kind \(h.kind)") }
        let (sn, proof) = try WireReader.parse(payload, "challenge") { (r) throws(KVError) in
            (Array(try r.bytes(max: 64, "nonce")), Array(try r.bytes(max: 64, "proof")))
        }
        guard let answer = handshake.answer(serverNonce: sn, serverProof: proof, token: token) else {
            throw .invalidArgument("the peer could not prove the cluster token: it is not a member of this cluster")
        }
        var p = WireWriter()
        p.bytes(answer)
        try s.writeFrame(kind: DataFrame.prove, payload: p.bytes)
        try PeerLink.expectOK(s)
    }
}

/// Same-host segments travel as open files: a member connects to the owner's segment server
/// on its local socket and receives the descriptor (SCM_RIGHTS).
public enum SegmentShare {
    /// The descriptor of the segment served at the abstract socket `name` (the caller owns
    /// it). Throws unless the process listening there is `pid` (the kernel's word, checked
    /// with SO_PEERCRED), proves the cluster token and hands over a descriptor.
    public static func receive(name: String, pid: Int, token: ClusterToken) throws(KVError) -> Int32 {
        let s = try Socket.connectLocal(name: name)
        defer { s.close() }
        s.setTimeout(5)
        guard let cred = s.peerCredentials, Int(cred.pid) == pid else {
            throw .invalidArgument("the process at local socket \(name) is not the segment's owner (pid \(pid))")
        }
        try PeerHandshake.authenticate(s, token: token.bytes)
        try s.writeFrame(kind: DataFrame.segmentFD, payload: [])
        var frame = [UInt8](repeating: 0, count: WireFrameHeader.size + 64)
        var fd: Int32 = -1
        var n = -1 // stays -1 on a failure or (a blocking socket) when its timeout passed
        do {
            n = try frame.withUnsafeMutableBytes { try s.readAvailable(into: $0, descriptor: &fd) } ?? -1
        } catch {}
        guard n >= WireFrameHeader.size else {
            if fd >= 0 { close(fd) }
            throw KVError(.transfer, "no segment descriptor from \(name)")
        }
        let h = try rethrowingKVError { try frame.withUnsafeBytes { try WireFrameHeader.decode($0, maxPayload: 64, isKnown: DataFrame.isKnown) } }
        guard h.kind == DataFrame.ok, fd >= 0 else {
            if fd >= 0 { close(fd) }
            throw h.kind == DataFrame.error
                ? PeerLink.errorOf(Array(frame[WireFrameHeader.size..<min(n, WireFrameHeader.size + h.length)]))
                : KVError(.transfer, "no segment descriptor from \(name)")
        }
        return fd
    }
}
