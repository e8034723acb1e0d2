import XCTest
import KVAccelerator
import KVCore
import KVSystem
@testable import KVTransfer
#if canImport(Glibc)
import Glibc
#endif

/// Block copies over each route and executor, the transfer counts that show aggregation, and
/// the segment server's checks of KV ranges.
final class KVBlockMoverTests: XCTestCase {
    static let bpb = 256, blocks = 32

    /// Two buffers (source, destination) of `blocks` blocks each; the source's block b is all b+1.
    final class Buffers {
        let src = UnsafeMutableRawPointer.allocate(byteCount: blocks * bpb, alignment: 64)
        let dst = UnsafeMutableRawPointer.allocate(byteCount: blocks * bpb, alignment: 64)
        init() {
            for b in 0..<blocks { memset(src + b * bpb, Int32(b + 1), bpb) }
            memset(dst, 0, blocks * bpb)
        }
        deinit { src.deallocate(); dst.deallocate() }
        var srcRegion: MemoryRegion { MemoryRegion(src, length: blocks * bpb) }
        func block(_ b: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: dst + b * bpb, count: bpb)) }
        func copies(_ s: [Int], _ d: [Int]) -> [KVBlockCopy] {
            KVBlockPlan.runs(s, d).map { r in
                KVBlockCopy(
                    source: UInt(bitPattern: src) + UInt(r.source * bpb), destination: UInt(bitPattern: dst) + UInt(r.destination * bpb),
                    length: r.count * bpb, sourceDescriptor: 0, destinationDescriptor: 0)
            }
        }
        func check(_ s: [Int], _ d: [Int], file: StaticString = #filePath, line: UInt = #line) {
            for (a, b) in zip(s, d) { XCTAssertEqual(block(b), [UInt8](repeating: UInt8(a + 1), count: bpb), file: file, line: line) }
        }
    }

    let s = [3, 4, 5, 9, 0, 1], d = [10, 11, 12, 2, 30, 31] // three runs

    func testSameProcessIsOneMemcpyPerRun() throws {
        let b = Buffers(), counters = TransferCounters()
        let n = try KVBlockMover(counters: counters).run(b.copies(s, d), pull: true, route: .sameProcess, executor: .aggregated)
        XCTAssertEqual(n, 3)
        b.check(s, d)
        XCTAssertEqual(counters.bytesCopied.load(ordering: .relaxed), s.count * Self.bpb)
    }

    /// process_vm_readv on this very process: one call per run, or one call in all.
    func testSameHostBatchesRunsIntoOneSystemCall() throws {
        for (executor, calls) in [(KVCopyExecutor.perBlock, 3), (.aggregated, 1)] {
            let b = Buffers()
            let n = try KVBlockMover(counters: TransferCounters()).run(
                b.copies(s, d), pull: true, route: .sameHost(pid: getpid(), link: nil),
                executor: executor)
            XCTAssertEqual(n, calls)
            b.check(s, d)
        }
        // A process that does not exist: a transfer error, nothing half-reported.
        let b = Buffers()
        XCTAssertThrowsError(
            try KVBlockMover(counters: TransferCounters()).run(
                b.copies(s, d), pull: true, route: .sameHost(pid: Int32.max, link: nil),
                executor: .aggregated)
        ) {
            XCTAssertEqual(($0 as? KVError)?.code, .transfer)
        }
    }

    func testNetworkSendsOneRequestPerRunOrPerBatch() throws {
        let b = Buffers()
        let server = try SegmentServer(region: MemoryRegion(address: 0, length: 0), host: "127.0.0.1", token: "t")
        defer { server.stop() }
        server.serveKV([b.srcRegion, MemoryRegion(b.dst, length: Self.blocks * Self.bpb)])
        let link = try PeerLink(endpoint: server.endpoint, token: "t")
        defer { link.closeIdle() }
        for (executor, requests) in [(KVCopyExecutor.perBlock, 3), (.aggregated, 1)] {
            memset(b.dst, 0, Self.blocks * Self.bpb)
            XCTAssertEqual(try KVBlockMover(counters: TransferCounters()).run(b.copies(s, d), pull: true, route: .network(link), executor: executor), requests)
            b.check(s, d)
        }
        // Push: the "remote" side is the destination.
        memset(b.dst, 0, Self.blocks * Self.bpb)
        XCTAssertEqual(try KVBlockMover(counters: TransferCounters()).run(b.copies(s, d), pull: false, route: .network(link), executor: .aggregated), 1)
        b.check(s, d)
    }

    func testServerRefusesRangesOutsideItsKVBuffersAndKeepsServing() throws {
        let b = Buffers()
        let server = try SegmentServer(region: MemoryRegion(address: 0, length: 0), host: "127.0.0.1", token: "t")
        defer { server.stop() }
        let link = try PeerLink(endpoint: server.endpoint, token: "t")
        defer { link.closeIdle() }
        let local = [MemoryRegion(b.dst, length: Self.bpb)]
        let base = UInt(bitPattern: b.src)
        func refused(_ remote: MemoryRegion, line: UInt = #line) {
            XCTAssertThrowsError(try link.kvTransfer(write: false, remote: [remote], local: [MemoryRegion(b.dst, length: remote.length)]), line: line) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument, "\($0)", line: line)
            }
        }
        refused(MemoryRegion(address: base, length: Self.bpb)) // nothing served yet
        server.serveKV([b.srcRegion])
        XCTAssertNoThrow(try link.kvTransfer(write: false, remote: [MemoryRegion(address: base, length: Self.bpb)], local: local))
        refused(MemoryRegion(address: base - 1, length: Self.bpb))
        refused(MemoryRegion(address: base + UInt(Self.blocks * Self.bpb - 10), length: Self.bpb))
        refused(MemoryRegion(address: base + UInt(Self.blocks * Self.bpb), length: 1))
        // Writes outside are refused too, and the buffer is unchanged.
        let before = Array(UnsafeRawBufferPointer(start: b.src, count: Self.blocks * Self.bpb))
        XCTAssertThrowsError(
            try link.kvTransfer(write: true, remote: [MemoryRegion(address: base - 64, length: 128)], local: [MemoryRegion(b.dst, length: 128)]))
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: b.src, count: Self.blocks * Self.bpb)), before)
        // Mismatched lengths and too many ranges never leave this process.
        XCTAssertThrowsError(try link.kvTransfer(write: false, remote: [MemoryRegion(address: base, length: 8)], local: [MemoryRegion(b.dst, length: 4)]))
        let many = [MemoryRegion](repeating: MemoryRegion(address: base, length: 1), count: DataFrame.maxKVRanges + 1)
        XCTAssertThrowsError(try link.kvTransfer(write: false, remote: many, local: many))
        // Withdrawn: refused.
        server.serveKV([])
        refused(MemoryRegion(address: base, length: Self.bpb))
    }

    /// Raw frames: a kvRead before hello closes the connection, a range list that does not decode
    /// closes the connection.
    func testServerChecksKVFrames() throws {
        let b = Buffers()
        let server = try SegmentServer(region: MemoryRegion(address: 0, length: 0), host: "127.0.0.1", token: "t")
        defer { server.stop() }
        server.serveKV([b.srcRegion])
        var w = WireWriter()
        KVRanges.encode([MemoryRegion(address: UInt(bitPattern: b.src), length: 16)], into: &w)
        let early = try Socket.connect(host: "127.0.0.1", port: server.port)
        defer { early.close() }
        try early.writeFrame(kind: DataFrame.kvRead, payload: w.bytes)
        XCTAssertTrue(RDMATests.isClosedUnread(early), "nothing but the handshake before authentication")
        let s = try RDMATests.welcomed(server.port, token: "t")
        defer { s.close() }
        try s.writeFrame(kind: DataFrame.kvRead, payload: Array(w.bytes.dropLast())) // truncated
        XCTAssertEqual(try RDMATests.errorCode(s), .invalidArgument)
    }
}
