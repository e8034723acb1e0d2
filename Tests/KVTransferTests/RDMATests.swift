import XCTest
import KVAccelerator
import KVCore
import KVSystem
@testable import KVTransfer
#if canImport(Glibc)
import Glibc
#endif

/// RDMA as far as a machine without an RDMA device allows: discovery (library loaded at run
/// time, zero devices), refusal to open a device that is not there, the queue-pair address
/// codec, the segment server's answer to a queue-pair request when it has no RDMA (TCP goes
/// on, on the same connection), and the staging gather/scatter that RDMA transfers use.
/// The queue-pair and one-sided READ/WRITE paths need a device and are not exercised here.
final class RDMATests: XCTestCase {
    /// Data-plane kinds are numbered once (`DataFrame.Kind`); the numbers are the wire format.
    func testDataPlaneKindNumbersAreStable() {
        XCTAssertEqual(DataFrame.Kind.allCases.map(\.rawValue), Array(200...208) + Array(210...213))
        XCTAssertEqual([DataFrame.hello, DataFrame.segmentFD, DataFrame.diskRead, DataFrame.ok, DataFrame.challenge], [200, 207, 208, 210, 213])
        XCTAssertTrue(DataFrame.isKnown(205) && DataFrame.isKnown(212))
        XCTAssertFalse(DataFrame.isKnown(209) || DataFrame.isKnown(214) || DataFrame.isKnown(116))
    }

    func testDiscoveryMatchesTheMachine() {
        let d = RDMA.discover()
        let libraryPresent =
            dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL).map {
                dlclose($0); return true
            } ?? false
        XCTAssertEqual(d.loaded, libraryPresent, d.reason)
        let sysDevices = (try? FileManagerless.entries("/sys/class/infiniband")) ?? []
        XCTAssertEqual(d.devices.map(\.name).sorted(), sysDevices.sorted())
        if d.usable == nil {
            XCTAssertFalse(d.reason.isEmpty, "discovery says why RDMA is not used")
            XCTAssertNil(RDMA.shared.context)
        }
    }

    func testTurnedOffByEnvironment() {
        setenv("KVSTORE_RDMA", "0", 1)
        defer { unsetenv("KVSTORE_RDMA") }
        let d = RDMA.discover()
        XCTAssertFalse(d.loaded)
        XCTAssertTrue(d.reason.contains("KVSTORE_RDMA"), d.reason)
    }

    func testOpeningAMissingDeviceIsATypedError() {
        guard RDMA.discover().loaded else { return } // without the library every open fails the same way
        XCTAssertThrowsError(try RDMAContext(device: "no-such-rdma-device", port: 1)) {
            XCTAssertEqual(($0 as? KVError)?.code, .unsupported)
        }
        XCTAssertThrowsError(try RDMAContext(device: "x", port: 0)) { XCTAssertEqual(($0 as? KVError)?.code, .unsupported) }
    }

    func testAddressCodec() throws {
        let a = RDMAAddress(qpn: 0x12345, psn: 0xABCDEF, lid: 7, gid: (0..<16).map { UInt8($0 * 3) }, mtu: 5, gidType: 2, linkLayer: 2)
        var w = WireWriter()
        a.encode(into: &w)
        let back = try WireReader.parse(w.bytes, "address") { (r) throws(KVError) in try RDMAAddress.decode(&r) }
        XCTAssertEqual(back, a)
        var bad = w.bytes
        bad[bad.count - 6] = 9 // MTU enum out of range
        XCTAssertThrowsError(
            try bad.withUnsafeBytes { b in
                var r = WireReader(b); return try RDMAAddress.decode(&r)
            })
        bad = w.bytes
        bad[bad.count - 2] = 3 // no such GID type
        XCTAssertThrowsError(
            try bad.withUnsafeBytes { b in
                var r = WireReader(b); return try RDMAAddress.decode(&r)
            })
        bad = w.bytes
        bad[bad.count - 1] = 0 // no such link layer
        XCTAssertThrowsError(
            try bad.withUnsafeBytes { b in
                var r = WireReader(b); return try RDMAAddress.decode(&r)
            })
        XCTAssertThrowsError(
            try w.bytes.dropLast().withUnsafeBytes { b in
                var r = WireReader(b); return try RDMAAddress.decode(&r)
            })
    }

    /// A segment server without RDMA answers a queue-pair request with `unsupported` and keeps
    /// serving the same connection over TCP; before hello the request is refused.
    func testServerWithoutRDMAFallsBackToTCP() throws {
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
        defer { memory.deallocate() }
        for i in 0..<4096 { memory.storeBytes(of: UInt8(truncatingIfNeeded: i * 7), toByteOffset: i, as: UInt8.self) }
        let server = try SegmentServer(region: MemoryRegion(memory, length: 4096), host: "127.0.0.1", token: "t")
        defer { server.stop() }
        server.serve(segment: 5)
        XCTAssertFalse(server.servesRDMA)
        var address = WireWriter()
        RDMAAddress(qpn: 1, psn: 2, lid: 3, gid: [UInt8](repeating: 0, count: 16), mtu: 3).encode(into: &address)

        let early = try Socket.connect(host: "127.0.0.1", port: server.port)
        defer { early.close() }
        try early.writeFrame(kind: DataFrame.rdmaConnect, payload: address.bytes)
        XCTAssertTrue(Self.isClosedUnread(early), "hello first")

        let s = try Self.welcomed(server.port, token: "t")
        defer { s.close() }
        try s.writeFrame(kind: DataFrame.rdmaConnect, payload: address.bytes)
        XCTAssertEqual(try Self.errorCode(s), .unsupported)
        try s.writeFrame(kind: DataFrame.rdmaConnect, payload: [1, 2, 3])
        XCTAssertEqual(try Self.errorCode(s), .invalidArgument, "a malformed address")
        var read = WireWriter()
        read.u32(5); read.u64(100); read.u64(8)
        try s.writeFrame(kind: DataFrame.read, payload: read.bytes)
        XCTAssertEqual(try s.readFrame(maxPayload: 8192, isKnown: DataFrame.isKnown).0.kind, DataFrame.ok)
        var bytes = [UInt8](repeating: 0, count: 8)
        try bytes.withUnsafeMutableBytes { try s.readExactly(into: $0) }
        XCTAssertEqual(bytes, (100..<108).map { UInt8(truncatingIfNeeded: $0 * 7) })

        // A PeerLink without an RDMA context never asks, and moves bytes over TCP.
        let counters = TransferCounters()
        let peer = try PeerLink(endpoint: server.endpoint, token: "t", counters: counters)
        XCTAssertTrue(peer.rdmaRefused)
        var out = [UInt8](repeating: 0, count: 16)
        try out.withUnsafeMutableBytes { b in
            var r = MemoryRegion(address: UInt(bitPattern: b.baseAddress!), length: 16)
            try withUnsafePointer(to: &r) { try peer.read(segment: 5, offset: 0, length: 16, into: UnsafeBufferPointer(start: $0, count: 1)) }
        }
        XCTAssertEqual(out, (0..<16).map { UInt8(truncatingIfNeeded: $0 * 7) })
        XCTAssertEqual(counters.networkBytes.load(ordering: .relaxed), 16)
        XCTAssertEqual(counters.rdmaBytes.load(ordering: .relaxed), 0)
        XCTAssertEqual(counters.bytesStaged.load(ordering: .relaxed), 0)
    }

    /// The staging copies of RDMA transfers: a piece of the byte stream of several regions,
    /// starting anywhere, lands in (or comes from) the right bytes.
    func testStagingGatherAndScatter() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let sizes = (0..<Int.random(in: 1...5, using: &rng)).map { _ in Int.random(in: 0...40, using: &rng) }
            let total = sizes.reduce(0, +)
            guard total > 0 else { continue }
            let skip = Int.random(in: 0..<total, using: &rng)
            let n = Int.random(in: 1...(total - skip), using: &rng)
            let stream = (0..<total).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
            let buffers = sizes.map { UnsafeMutableRawBufferPointer.allocate(byteCount: max($0, 1), alignment: 1) }
            defer { buffers.forEach { $0.deallocate() } }
            var at = 0
            for (b, size) in zip(buffers, sizes) {
                for i in 0..<size { b[i] = stream[at + i] }
                at += size
            }
            let regions = zip(buffers, sizes).map { MemoryRegion(address: UInt(bitPattern: $0.0.baseAddress!), length: $0.1) }
            let piece = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 1)
            defer { piece.deallocate() }
            regions.withUnsafeBufferPointer {
                PeerLink.gather($0, skipping: skip, into: MemoryRegion(address: UInt(bitPattern: piece.baseAddress!), length: n))
            }
            XCTAssertEqual(Array(piece), Array(stream[skip..<skip + n]))
            for b in buffers { b.initializeMemory(as: UInt8.self, repeating: 0) }
            regions.withUnsafeBufferPointer {
                PeerLink.scatter(MemoryRegion(address: UInt(bitPattern: piece.baseAddress!), length: n), skipping: skip, into: $0)
            }
            var back: [UInt8] = []
            for (b, size) in zip(buffers, sizes) { back += b.prefix(size) }
            XCTAssertEqual(Array(back[skip..<skip + n]), Array(stream[skip..<skip + n]))
            XCTAssertEqual(back.filter { $0 != 0 }.count, stream[skip..<skip + n].filter { $0 != 0 }.count, "nothing outside the piece written")
        }
    }

    /// A raw connection to a segment server that said hello with `token` and was welcomed.
    static func welcomed(_ port: Int, token: String) throws -> Socket {
        let s = try Socket.connect(host: "127.0.0.1", port: port)
        try PeerHandshake.authenticate(s, token: Array(token.utf8))
        return s
    }

    /// Whether the server closed `s` without answering.
    static func isClosedUnread(_ s: Socket) -> Bool {
        do throws(KVError) {
            _ = try s.readFrame(maxPayload: 8192, isKnown: DataFrame.isKnown)
            return false
        } catch {
            return error.code == .transfer
        }
    }

    static func errorCode(_ s: Socket) throws -> KVError.Code? {
        let (h, payload) = try s.readFrame(maxPayload: 8192, isKnown: DataFrame.isKnown)
        guard h.kind == DataFrame.error else { return nil }
        guard case .error(let e) = try payload.withUnsafeBytes({ try MasterResponse.decode(kind: MasterResponse.errorKind, $0) }) else { return nil }
        return e.code
    }
}

/// Directory entries without Foundation.
enum FileManagerless {
    static func entries(_ path: String) throws -> [String] {
        guard let d = opendir(path) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }
}
