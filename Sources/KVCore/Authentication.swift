/// The cluster's proof of a shared token (master and segment servers): a challenge-response
/// with HMAC-SHA256 (RFC 2104, FIPS 180-4), so the token itself never travels.
///
///   client -> server  hello(..., client nonce)
///   server -> client  challenge(server nonce, HMAC(token, "kvstore server" | cn | sn))
///   client            checks the server's proof (a server without the token cannot make it)
///   client -> server  prove(HMAC(token, "kvstore client" | cn | sn))
///   server            checks it in constant time, then welcomes
///
/// The two labels differ, so one side's proof is never valid as the other's. Nonces are 32
/// random bytes from the kernel (`getrandom`).
public enum Authentication {
    public static let nonceSize = 32
    public static let proofSize = 32

    public enum Role: String, Sendable {
        case server = "kvstore server"
        case client = "kvstore client"
    }

    /// The proof of `role` for the nonces of one handshake.
    public static func proof(token: [UInt8], role: Role, clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        HMACSHA256.mac(key: token, message: Array(role.rawValue.utf8) + clientNonce + serverNonce)
    }

    /// The data plane's secret (segment and KV servers), derived from the cluster's token:
    /// every member, tenant or not, needs it to reach the segments objects live in.
    public static func dataKey(clusterToken: [UInt8]) -> [UInt8] {
        HMACSHA256.mac(key: clusterToken, message: Array("kvstore data plane".utf8))
    }

    /// `secret` (32 bytes) masked for one handshake: XOR with a pad only the holder of `token`
    /// can derive from the nonces, so it travels in the welcome without being readable on the
    /// wire. The same call unmasks it.
    public static func mask(_ secret: [UInt8], token: [UInt8], clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        let pad = HMACSHA256.mac(key: token, message: Array("kvstore wrap".utf8) + clientNonce + serverNonce)
        return zip(secret, pad).map { $0 ^ $1 }
    }

    /// Compares in time that depends on the lengths only, not on where the bytes differ.
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<a.count { diff |= a[i] ^ b[i] }
        return diff == 0
    }

    /// `count` random bytes from the kernel's generator.
    public static func randomBytes(_ count: Int) -> [UInt8] {
        var g = SystemRandomNumberGenerator() // getrandom(2) on Linux
        return (0..<count).map { _ in UInt8.random(in: 0...255, using: &g) }
    }

    /// A new token: 32 random bytes as 64 lowercase hex digits.
    public static func newToken() -> String {
        randomBytes(32).map { b in (b < 16 ? "0" : "") + String(b, radix: 16) }.joined()
    }

    /// Shortest token accepted from an operator (a generated one has 64 characters).
    public static let minTokenLength = 16
}

/// The server side of one handshake: checks the client's nonce, picks its own, proves the
/// token and checks the client's proof. The master and the segment servers both use it.
public struct ServerHandshake: Sendable {
    public let clientNonce: [UInt8]
    public let serverNonce: [UInt8]

    /// `invalidArgument` unless the client's nonce has `Authentication.nonceSize` bytes.
    public init(clientNonce: [UInt8]) throws(KVError) {
        guard clientNonce.count == Authentication.nonceSize else {
            throw .invalidArgument("hello needs a \(Authentication.nonceSize)-byte nonce, got \(clientNonce.count) bytes")
        }
        self.clientNonce = clientNonce
        serverNonce = Authentication.randomBytes(Authentication.nonceSize)
    }

    /// This side's proof of `token`, sent with `serverNonce`.
    public func serverProof(token: [UInt8]) -> [UInt8] {
        Authentication.proof(token: token, role: .server, clientNonce: clientNonce, serverNonce: serverNonce)
    }

    /// Whether the client proved `token` (constant time).
    public func accepts(clientProof: [UInt8], token: [UInt8]) -> Bool {
        Authentication.constantTimeEqual(
            clientProof,
            Authentication.proof(
                token: token, role: .client, clientNonce: clientNonce,
                serverNonce: serverNonce))
    }
}

/// The client side of one handshake: the nonce to send, then (once the server proved the
/// token) the proof to answer with. The master link and the peer links both use it.
public struct ClientHandshake: Sendable {
    public let clientNonce = Authentication.randomBytes(Authentication.nonceSize)

    public init() {}

    /// The proof to send, or nil when the server did not prove `token` (then it is not this
    /// cluster's, or the tokens differ: nothing of ours must reach it).
    public func answer(serverNonce: [UInt8], serverProof: [UInt8], token: [UInt8]) -> [UInt8]? {
        guard serverNonce.count == Authentication.nonceSize,
            Authentication.constantTimeEqual(
                serverProof,
                Authentication.proof(
                    token: token, role: .server, clientNonce: clientNonce,
                    serverNonce: serverNonce))
        else { return nil }
        return Authentication.proof(token: token, role: .client, clientNonce: clientNonce, serverNonce: serverNonce)
    }
}

/// HMAC with SHA-256 (RFC 2104).
public enum HMACSHA256 {
    public static func mac(key: [UInt8], message: [UInt8]) -> [UInt8] {
        var k = key.count > 64 ? SHA256.hash(key) : key
        k += [UInt8](repeating: 0, count: 64 - k.count)
        var inner = SHA256()
        inner.update(k.map { $0 ^ 0x36 })
        inner.update(message)
        var outer = SHA256()
        outer.update(k.map { $0 ^ 0x5c })
        outer.update(inner.finish())
        return outer.finish()
    }
}

/// SHA-256 (FIPS 180-4), incremental.
public struct SHA256: Sendable {
    private static let k: [UInt32] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
    ]

    private var h: [UInt32] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]
    private var pending: [UInt8] = []
    private var length: UInt64 = 0

    public init() {}

    public static func hash(_ bytes: [UInt8]) -> [UInt8] {
        var s = SHA256()
        s.update(bytes)
        return s.finish()
    }

    public mutating func update(_ bytes: [UInt8]) {
        length &+= UInt64(bytes.count)
        pending += bytes
        var at = 0
        while pending.count - at >= 64 {
            block(pending[at..<at + 64])
            at += 64
        }
        pending.removeFirst(at)
    }

    public mutating func finish() -> [UInt8] {
        let bits = length &* 8
        var tail: [UInt8] = [0x80]
        while (pending.count + tail.count) % 64 != 56 { tail.append(0) }
        for i in (0..<8).reversed() { tail.append(UInt8(truncatingIfNeeded: bits >> (UInt64(i) * 8))) }
        let saved = length
        update(tail)
        length = saved
        var out: [UInt8] = []
        out.reserveCapacity(32)
        for word in h { for i in (0..<4).reversed() { out.append(UInt8(truncatingIfNeeded: word >> (UInt32(i) * 8))) } }
        return out
    }

    private mutating func block(_ b: ArraySlice<UInt8>) {
        var w = [UInt32](repeating: 0, count: 64)
        let base = b.startIndex
        for i in 0..<16 {
            w[i] = UInt32(b[base + 4 * i]) << 24 | UInt32(b[base + 4 * i + 1]) << 16 | UInt32(b[base + 4 * i + 2]) << 8 | UInt32(b[base + 4 * i + 3])
        }
        func rotr(_ x: UInt32, _ n: UInt32) -> UInt32 { x >> n | x << (32 - n) }
        for i in 16..<64 {
            let s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
            let s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
            w[i] = w[i - 16] &+ s0 &+ w[i - 7] &+ s1
        }
        var (a, bb, c, d, e, f, g, hh) = (h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7])
        for i in 0..<64 {
            let s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)
            let ch = (e & f) ^ (~e & g)
            let t1 = hh &+ s1 &+ ch &+ Self.k[i] &+ w[i]
            let s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)
            let maj = (a & bb) ^ (a & c) ^ (bb & c)
            let t2 = s0 &+ maj
            (hh, g, f, e, d, c, bb, a) = (g, f, e, d &+ t1, c, bb, a, t1 &+ t2)
        }
        h[0] &+= a; h[1] &+= bb; h[2] &+= c; h[3] &+= d; h[4] &+= e; h[5] &+= f; h[6] &+= g; h[7] &+= hh
    }
}
