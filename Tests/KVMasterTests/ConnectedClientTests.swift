import XCTest
import KVAccelerator
import KVCore
import KVSystem
import KVStore
import KVTestSupport
@testable import KVTransfer
@testable import KVMaster
#if canImport(Glibc)
import Glibc
#endif

/// `StoreClient(connecting:)` against an in-process `MasterServer`: same-host mapping, TCP
/// peers (a client with another host identity), concurrent writers and readers on several
/// clients (run under the thread sanitizer by ./dev.sh test), and a peer's segment server
/// refusing bad requests.
final class ConnectedClientTests: XCTestCase {
    var server: MasterServer!
    var thread: BackgroundThread!
    var url: String { "kvstore://127.0.0.1:\(server.port)" }

    override func setUpWithError() throws {
        var o = MasterServer.Options()
        o.port = 0
        o.metricsPort = nil
        server = try MasterServer(options: o, log: { _ in })
        let s = server!
        thread = try BackgroundThread { s.run() }
    }

    override func tearDown() {
        server.stop()
        thread.join()
    }

    static func put(_ c: StoreClient, _ key: ObjectKey, _ bytes: [UInt8], replicas: Int = 1) throws {
        try bytes.withUnsafeBytes { b in
            var r = MemoryRegion(b.baseAddress!, length: b.count)
            try withUnsafePointer(to: &r) { p in
                try c.put(
                    key: key, parts: UnsafeBufferPointer(start: p, count: 1), mode: .put,
                    options: WriteOptions(replicas: replicas), memory: .host)
            }
        }
    }

    static func get(_ c: StoreClient, _ key: ObjectKey, _ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { b in
            var r = MemoryRegion(address: UInt(bitPattern: b.baseAddress!), length: b.count)
            return try withUnsafePointer(to: &r) { p in
                try c.get(key: key, into: UnsafeBufferPointer(start: p, count: 1), memory: .host)
            }
        }
        return Array(out[0..<n])
    }

    static func pattern(_ seed: Int, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed) } }

    func testAReadersDeadlineIsInsideTheMastersLease() {
        // The master's lease starts after the request left; the reader keeps a margin for the clocks.
        XCTAssertEqual(RemoteMaster.leaseEnd(sentAt: 1_000, ttl: 5_000_000_000), 1_000 + 5_000_000_000 - 5_000_000_000 / 32)
        XCTAssertEqual(RemoteMaster.leaseEnd(sentAt: 1_000, ttl: 10_000_000), 1_000 + 9_000_000, "at least 1 ms")
        XCTAssertEqual(RemoteMaster.leaseEnd(sentAt: 1_000, ttl: 1_000_000), 1_000, "no time left: every copy is stale")
    }

    func testSameHostClientsMapEachOther() throws {
        let a = try StoreClient(connecting: url, segmentSize: 1 << 20)
        let b = try StoreClient(connecting: url, segmentSize: 0)
        defer { a.close(); b.close() }
        try Self.put(b, "k", Self.pattern(1, 5000)) // into a's segment (b has none)
        XCTAssertEqual(try Self.get(a, "k", 5000), Self.pattern(1, 5000))
        XCTAssertEqual(try Self.get(b, "k", 5000), Self.pattern(1, 5000))
        XCTAssertEqual(b.counters.networkBytes.load(ordering: .relaxed), 0)
        XCTAssertTrue(try a.exists(key: "k"))
        XCTAssertEqual(try b.size(key: "k"), 5000)
        XCTAssertThrowsError(try Self.get(b, "nope", 10)) { XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound) }
    }

    func testPeerOverTCPAndReplicas() throws {
        let a = try StoreClient(connecting: url, segmentSize: 1 << 20)
        setenv("KVSTORE_HOST_ID", "another-host", 1)
        let far = try StoreClient(connecting: url, segmentSize: 1 << 20)
        unsetenv("KVSTORE_HOST_ID")
        defer { a.close(); far.close() }
        try Self.put(far, "two", Self.pattern(2, 70_000), replicas: 2)
        try Self.put(a, "one", Self.pattern(3, 40_000))
        XCTAssertEqual(try Self.get(far, "one", 40_000), Self.pattern(3, 40_000)) // a's segment, over TCP
        XCTAssertGreaterThan(far.counters.networkBytes.load(ordering: .relaxed), 0)
        XCTAssertEqual(try Self.get(a, "two", 70_000), Self.pattern(2, 70_000))
        XCTAssertGreaterThanOrEqual(statistic(a, "bytes_used"), 2 * 70_000 + 40_000)
    }

    func testConcurrentWritersAndReadersOnThreeClients() throws {
        let clients = [
            try StoreClient(connecting: url, segmentSize: 4 << 20),
            try StoreClient(connecting: url, segmentSize: 4 << 20),
            try StoreClient(connecting: url, segmentSize: 0)
        ]
        defer { clients.forEach { $0.close() } }
        let failures = Locked([String]())
        runThreads(6) { t in
            let c = clients[t % 3]
            for i in 0..<150 {
                let key: ObjectKey = "t\(t)-\(i)"
                do {
                    try Self.put(c, key, Self.pattern(t * 1000 + i, 3000))
                    let other: ObjectKey = "t\((t + 1) % 6)-\(i / 2)"
                    if let got = try? Self.get(clients[(t + 1) % 3], other, 3000), got != Self.pattern(((t + 1) % 6) * 1000 + i / 2, 3000) {
                        failures.withLock { $0.append("corrupt read of \(other)") }
                    }
                } catch {
                    failures.withLock { $0.append("\(key): \(error)") }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual(statistic(clients[2], "objects"), 900)
    }

    /// Batches through the master (one request for the batch): objects in a same-host
    /// segment and in a far one, bad items refused one by one, a missing key, replicas.
    func testBatchesAcrossHosts() throws {
        let a = try StoreClient(connecting: url, segmentSize: 1 << 20)
        setenv("KVSTORE_HOST_ID", "another-host", 1)
        let far = try StoreClient(connecting: url, segmentSize: 1 << 20)
        unsetenv("KVSTORE_HOST_ID")
        defer { a.close(); far.close() }
        let values = (0..<40).map { Self.pattern($0, 1000 + 97 * $0) }
        var storage = values.map { v in UnsafeMutableRawBufferPointer.allocate(byteCount: v.count, alignment: 8) }
        defer { storage.forEach { $0.deallocate() } }
        for (b, v) in zip(storage, values) { b.copyBytes(from: v) }
        var parts = storage.map { MemoryRegion(address: UInt(bitPattern: $0.baseAddress!), length: $0.count) }
        parts.append(MemoryRegion(address: 0, length: 0))
        var items = (0..<40).map { StoreClient.BatchItem(key: "b\($0)", regions: $0..<$0 + 1) }
        items.append(.init(key: "empty", regions: 40..<41))
        items.append(.init(key: "outside", regions: 41..<43))
        let results = try parts.withUnsafeBufferPointer { p in
            try a.putBatch(items, parts: p, mode: .put, options: WriteOptions(replicas: 2), memory: .host)
        }
        XCTAssertEqual(results.prefix(40).compactMap { $0 }, [])
        XCTAssertEqual(results[40]?.code, .invalidArgument)
        XCTAssertEqual(results[41]?.code, .invalidArgument)
        XCTAssertFalse(try a.exists(key: "empty"))

        for reader in [a, far] {
            var out = values.map { v in UnsafeMutableRawBufferPointer.allocate(byteCount: v.count, alignment: 8) }
            defer { out.forEach { $0.deallocate() } }
            var dests = out.map { MemoryRegion(address: UInt(bitPattern: $0.baseAddress!), length: $0.count) }
            dests.append(dests[0])
            var gets = (0..<40).map { StoreClient.BatchItem(key: "b\($0)", regions: $0..<$0 + 1) }
            gets.append(.init(key: "missing", regions: 40..<41))
            gets.append(.init(key: "b1", regions: 0..<1)) // too small for b1
            let got = try dests.withUnsafeBufferPointer { d in try reader.getBatch(gets, destinations: d, memory: .host) }
            for i in 0..<40 {
                XCTAssertEqual(try got[i].get(), values[i].count)
                XCTAssertEqual(Array(out[i]), values[i], "b\(i)")
            }
            guard case .failure(let missing) = got[40], case .failure(let small) = got[41] else { return XCTFail() }
            XCTAssertEqual(missing.code, .objectNotFound)
            XCTAssertEqual(small.code, .invalidArgument)
        }
        XCTAssertGreaterThan(a.counters.networkBytes.load(ordering: .relaxed), 40 * 1000, "second replicas went to far over TCP")
        XCTAssertEqual(far.counters.networkBytes.load(ordering: .relaxed), 0, "far reads its own replicas")
        XCTAssertEqual(statistic(a, "objects"), 40)

        // far's objects (one replica, in far's segment) batch-read by a over TCP.
        let farItems = (0..<3).map { StoreClient.BatchItem(key: "f\($0)", regions: $0..<$0 + 1) }
        XCTAssertEqual(try parts.withUnsafeBufferPointer { try far.putBatch(farItems, parts: $0, mode: .put, memory: .host) }.compactMap { $0 }, [])
        let before = a.counters.networkBytes.load(ordering: .relaxed)
        var out = (0..<3).map { UnsafeMutableRawBufferPointer.allocate(byteCount: values[$0].count, alignment: 8) }
        defer { out.forEach { $0.deallocate() } }
        let dests = out.map { MemoryRegion(address: UInt(bitPattern: $0.baseAddress!), length: $0.count) }
        let got = try dests.withUnsafeBufferPointer { try a.getBatch(farItems, destinations: $0, memory: .host) }
        for i in 0..<3 {
            XCTAssertEqual(try got[i].get(), values[i].count)
            XCTAssertEqual(Array(out[i]), values[i])
        }
        XCTAssertEqual(a.counters.networkBytes.load(ordering: .relaxed) - before, values[0..<3].reduce(0) { $0 + $1.count })
    }

    /// Streamed batches share one master connection with single calls of other threads (an
    /// answer meant for a batch is then read, and parked, by another call): every byte checks.
    func testStreamedBatchesBesideSingleCalls() throws {
        let holder = try StoreClient(connecting: url, segmentSize: 8 << 20)
        setenv("KVSTORE_HOST_ID", "far", 1)
        let far = try StoreClient(connecting: url, segmentSize: 8 << 20)
        unsetenv("KVSTORE_HOST_ID")
        let c = try StoreClient(connecting: url, segmentSize: 0)
        defer { c.close(); far.close(); holder.close() }
        let failures = Locked([String]())
        runThreads(4) { t in
            for round in 0..<6 {
                let n = 70, size = 700
                let values = (0..<n).map { Self.pattern(t * 100 + round * 7 + $0, size) }
                if t < 2 {
                    let src = UnsafeMutableRawBufferPointer.allocate(byteCount: n * size, alignment: 8)
                    let dst = UnsafeMutableRawBufferPointer.allocate(byteCount: n * size, alignment: 8)
                    defer { src.deallocate(); dst.deallocate() }
                    for (i, v) in values.enumerated() { UnsafeMutableRawBufferPointer(rebasing: src[i * size..<(i + 1) * size]).copyBytes(from: v) }
                    let parts = (0..<n).map { MemoryRegion(address: UInt(bitPattern: src.baseAddress!) + UInt($0 * size), length: size) }
                    let dests = (0..<n).map { MemoryRegion(address: UInt(bitPattern: dst.baseAddress!) + UInt($0 * size), length: size) }
                    let items = (0..<n).map { StoreClient.BatchItem(key: "s\(t)-\(round)-\($0)", regions: $0..<$0 + 1) }
                    do {
                        let put = try parts.withUnsafeBufferPointer {
                            try c.putBatch(items, parts: $0, mode: .put, options: WriteOptions(replicas: 2), memory: .host)
                        }
                        if let e = put.compactMap({ $0 }).first { failures.withLock { $0.append("putBatch: \(e)") } }
                        let got = try dests.withUnsafeBufferPointer { try c.getBatch(items, destinations: $0, memory: .host) }
                        for i in 0..<n where (try? got[i].get()) != size || Array(dst[i * size..<(i + 1) * size]) != values[i] {
                            failures.withLock { $0.append("batch item \(i) of thread \(t) round \(round)") }
                        }
                    } catch {
                        failures.withLock { $0.append("batch: \(error)") }
                    }
                } else {
                    for (i, v) in values.enumerated() {
                        let key: ObjectKey = "s\(t)-\(round)-\(i)"
                        do {
                            try Self.put(c, key, v)
                            if try Self.get(c, key, size) != v { failures.withLock { $0.append("single \(key)") } }
                        } catch {
                            failures.withLock { $0.append("\(key): \(error)") }
                        }
                    }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual(statistic(c, "commit_failures"), 0)
        XCTAssertEqual(statistic(c, "objects"), 4 * 6 * 70)
    }

    /// `length` bytes at `offset` of the peer's segment `seg` into `buf`.
    static func read(_ peer: PeerLink, _ seg: SegmentID, _ offset: Int, _ length: Int, into buf: inout [UInt8]) throws {
        try buf.withUnsafeMutableBytes { b in
            var r = MemoryRegion(address: UInt(bitPattern: b.baseAddress!), length: b.count)
            try withUnsafePointer(to: &r) { try peer.read(segment: seg, offset: offset, length: length, into: UnsafeBufferPointer(start: $0, count: 1)) }
        }
    }

    func testAPooledConnectionTheServerClosedIsRedialled() throws {
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
        defer { memory.deallocate() }
        for i in 0..<4096 { memory.storeBytes(of: UInt8(truncatingIfNeeded: i), toByteOffset: i, as: UInt8.self) }
        let s = try SegmentServer(region: MemoryRegion(memory, length: 4096), host: "127.0.0.1", token: "t", idleTimeout: 0.2)
        defer { s.stop() }
        s.serve(segment: 3)
        let peer = try PeerLink(endpoint: s.endpoint, token: "t")
        var buf = [UInt8](repeating: 0, count: 16)
        try Self.read(peer, 3, 100, 16, into: &buf)
        usleep(500_000) // the server closes the pooled connection meanwhile
        buf = [UInt8](repeating: 0, count: 16)
        try Self.read(peer, 3, 200, 16, into: &buf)
        XCTAssertEqual(buf, (200..<216).map { UInt8(truncatingIfNeeded: $0) })
    }

    func testSegmentDescriptorsGoOnlyToMembersFromTheVerifiedOwner() throws {
        let seg = try HostSegment(size: 1 << 20, shared: true)
        defer { seg.unmap() }
        let s = try SegmentServer(region: seg.region(offset: 0, length: 1 << 20), host: "127.0.0.1", token: "the-cluster-token", shareFD: seg.fd)
        defer { s.stop() }
        XCTAssertTrue(s.localName.hasPrefix("kvstore-segment."))
        XCTAssertThrowsError(try SegmentShare.receive(name: s.localName, pid: Int(getpid()), token: "the-cluster-token")) {
            XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound, "not mounted yet: nothing handed out")
        }
        s.serve(segment: 9)
        // The master said another process owns it: this listener is not that process.
        XCTAssertThrowsError(try SegmentShare.receive(name: s.localName, pid: Int(getpid()) + 1, token: "the-cluster-token")) {
            XCTAssertTrue(($0 as? KVError)?.message.contains("not the segment's owner") ?? false)
        }
        XCTAssertThrowsError(try SegmentShare.receive(name: s.localName, pid: Int(getpid()), token: "another-token-entirely")) {
            XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
        }
        let fd = try SegmentShare.receive(name: s.localName, pid: Int(getpid()), token: "the-cluster-token")
        let peer = try HostSegment(attaching: fd, size: 1 << 20)
        defer { peer.unmap() }
        UnsafeMutableRawPointer(bitPattern: seg.region(offset: 100, length: 1).address)!.storeBytes(of: 77, as: UInt8.self)
        XCTAssertEqual(UnsafeRawPointer(bitPattern: peer.region(offset: 100, length: 1).address)!.load(as: UInt8.self), 77)
        // Over TCP the same request is refused: descriptors travel on the local socket only.
        let tcp = try Socket.connect(host: "127.0.0.1", port: s.port)
        try PeerHandshake.authenticate(tcp, token: Array("the-cluster-token".utf8))
        try tcp.writeFrame(kind: DataFrame.segmentFD, payload: [])
        let (h, _) = try tcp.readFrame(maxPayload: 8192, isKnown: DataFrame.isKnown)
        XCTAssertEqual(h.kind, DataFrame.error)
    }

    func testSegmentServerRefusesBadRequests() throws {
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
        defer { memory.deallocate() }
        let lock = SharedLock()
        let s = try SegmentServer(region: MemoryRegion(memory, length: 4096), host: "127.0.0.1", token: "t", dataLock: lock)
        defer { s.stop() }
        s.serve(segment: 7)
        var buf = [UInt8](repeating: 0, count: 16)
        let wrongToken = try PeerLink(endpoint: s.endpoint, token: "x")
        XCTAssertThrowsError(try Self.read(wrongToken, 7, 0, 16, into: &buf))
        let peer = try PeerLink(endpoint: s.endpoint, token: "t")
        for (seg, offset, length) in [(8 as SegmentID, 0, 16), (7, 4090, 16), (7, Int(1) << 40, 16)] {
            XCTAssertThrowsError(try Self.read(peer, seg, offset, length, into: &buf), "segment \(seg) offset \(offset)")
        }
        // While the owner remounts (its data lock held exclusively) requests are refused, not queued.
        lock.lockExclusive()
        XCTAssertThrowsError(try Self.read(peer, 7, 0, 16, into: &buf)) { XCTAssertEqual(($0 as? KVError)?.code, .transfer) }
        lock.unlock()
        memory.storeBytes(of: 0xAB, toByteOffset: 100, as: UInt8.self)
        try Self.read(peer, 7, 100, 16, into: &buf)
        XCTAssertEqual(buf[0], 0xAB)

        // Caller memory shorter than the transfer, or a negative length: refused before
        // anything is sent; the segment is unchanged and the link keeps working.
        let before = Array(UnsafeRawBufferPointer(start: memory, count: 4096))
        for length in [32, -1] {
            XCTAssertThrowsError(try Self.read(peer, 7, 0, length, into: &buf)) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
            XCTAssertThrowsError(
                try buf.withUnsafeBytes { b in
                    var r = MemoryRegion(address: UInt(bitPattern: b.baseAddress!), length: b.count)
                    try withUnsafePointer(to: &r) { try peer.write(segment: 7, offset: 0, length: length, from: UnsafeBufferPointer(start: $0, count: 1)) }
                }
            ) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        }
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: memory, count: 4096)), before)
        try Self.read(peer, 7, 100, 16, into: &buf)
        XCTAssertEqual(buf[0], 0xAB)
    }

    func testUnreachableMasterAndBadURLs() {
        XCTAssertThrowsError(try StoreClient(connecting: "kvstore://127.0.0.1:1", segmentSize: 0)) {
            XCTAssertEqual(($0 as? KVError)?.code, .transfer)
        }
        for e in ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:x", "host:1", ""] {
            XCTAssertThrowsError(try PeerLink(endpoint: e, token: "")) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument, e) }
        }
        for u in ["http://x:1", "kvstore://host:1", "kvstore://127.0.0.1:0", "kvstore://127.0.0.1:abc"] {
            XCTAssertThrowsError(try StoreClient(connecting: u, segmentSize: 0)) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument, u)
            }
        }
    }
}

/// A statistic of `c` by name (the cluster's table for a connected client).
func statistic(_ c: StoreClient, _ name: String) -> Int {
    c.statistics().first { "\($0.name)" == name }?.value ?? -1
}
