import Synchronization
import XCTest
import KVAccelerator
import KVCore
@testable import KVSystem
@testable import KVTransfer

final class TransferPlanTests: XCTestCase {
    func r(_ a: UInt, _ n: Int) -> MemoryRegion { MemoryRegion(address: a, length: n) }

    func testLargeCopiesAreSlicedBelowTheLimit() {
        let n = 3 * TransferPlan.maxSliceSize + 5
        let ops = TransferPlan.slices(sources: [r(0x1000, n)], destinations: [r(0x9000_0000, n)])
        XCTAssertEqual(ops.count, 4)
        XCTAssertTrue(ops.allSatisfy { $0.length <= TransferPlan.maxSliceSize })
        XCTAssertEqual(TransferPlan.maxSliceSize, 16 * 1024 * 1024 - 16)
        XCTAssertEqual(ops.reduce(0) { $0 + $1.length }, n)
        XCTAssertEqual(ops[1].source, 0x1000 + UInt(TransferPlan.maxSliceSize))
        XCTAssertEqual(ops[1].destination, 0x9000_0000 + UInt(TransferPlan.maxSliceSize))
    }

    func testGatherPlacesEachPartOnceInOrder() {
        let ops = TransferPlan.slices(sources: [r(100, 3), r(200, 5), r(300, 0), r(400, 2)], destinations: [r(1000, 10)])
        XCTAssertEqual(
            ops,
            [
                CopyOp(source: 100, destination: 1000, length: 3),
                CopyOp(source: 200, destination: 1003, length: 5),
                CopyOp(source: 400, destination: 1008, length: 2)
            ])
    }

    func testScatterAndGatherTogether() {
        let ops = TransferPlan.slices(sources: [r(0, 4), r(10, 4)], destinations: [r(100, 3), r(200, 5)])
        XCTAssertEqual(
            ops,
            [
                CopyOp(source: 0, destination: 100, length: 3),
                CopyOp(source: 3, destination: 200, length: 1),
                CopyOp(source: 10, destination: 201, length: 4)
            ])
    }

    func testMovesTheShorterSide() {
        let ops = TransferPlan.slices(sources: [r(0, 10)], destinations: [r(100, 4)])
        XCTAssertEqual(ops.reduce(0) { $0 + $1.length }, 4)
    }

    func testLocalCopyMovesBytesAndCountsThem() {
        let counters = TransferCounters()
        let t = LocalCopyTransport(counters: counters)
        let a: [UInt8] = Array(0..<10), b: [UInt8] = Array(10..<20)
        var out = [UInt8](repeating: 0, count: 20)
        a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                out.withUnsafeMutableBytes { po in
                    let src = [MemoryRegion(pa.baseAddress!, length: 10), MemoryRegion(pb.baseAddress!, length: 10)]
                    let dst = [MemoryRegion(po.baseAddress!, length: 20)]
                    src.withUnsafeBufferPointer { s in dst.withUnsafeBufferPointer { d in XCTAssertEqual(t.copy(from: s, to: d, into: .callerMemory), 20) } }
                }
            }
        }
        XCTAssertEqual(out, Array(0..<20))
        XCTAssertEqual(counters.bytesCopied.load(ordering: .relaxed), 20)
        XCTAssertEqual(counters.bytesStaged.load(ordering: .relaxed), 0)
        XCTAssertEqual(counters.copyOps.load(ordering: .relaxed), 2)
    }
}

final class SpinBackoffTests: XCTestCase {
    func testQuietPeriodsGrowWhileSignsComeAndResetWhenIsolated() {
        var s = SpinBackoff(spinNanos: 200_000)
        let t0 = 1_000_000_000
        s.noteBusy(now: t0)
        XCTAssertEqual(s.budget(now: t0 + 500_000), 0, "quiet for 1 ms")
        s.noteBusy(now: t0 + 1_100_000) // right after the period: back off longer
        XCTAssertEqual(s.quietLength, 2_000_000)
        for i in 0..<10 { s.noteBusy(now: t0 + 2_000_000 + i * 100_000) }
        XCTAssertEqual(s.quietLength, SpinBackoff.quiet, "capped")
        s.noteBusy(now: t0 + 10_000_000_000) // long after: an isolated sign
        XCTAssertEqual(s.quietLength, SpinBackoff.minQuiet)
        XCTAssertEqual(s.budget(now: t0 + 10_000_000_000 + SpinBackoff.minQuiet), 200_000)
    }

    func testTheLoadIsRead() {
        XCTAssertGreaterThanOrEqual(SpinBackoff.runnableTasks(), 1, "this thread is running")
        XCTAssertGreaterThanOrEqual(SpinBackoff.cores, 1)
    }

    func testProcFieldsAreParsedAsTheKernelWritesThem() throws {
        var name = Array("/tmp/kvstore-fields-XXXXXX".utf8CString)
        let fd = mkstemp(&name)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer {
            close(fd)
            unlink(name)
        }
        let text = Array("0.52 0.31 0.18 3/412 90817\n".utf8) // /proc/loadavg's shape
        XCTAssertEqual(text.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }, text.count)
        XCTAssertEqual(SpinBackoff.decimalField(3, of: fd), 3, "running, before the '/'")
        XCTAssertEqual(SpinBackoff.decimalField(4, of: fd), 90817)
        XCTAssertEqual(SpinBackoff.decimalField(0, of: fd), 0, "the digits before the '.'")
        XCTAssertNil(SpinBackoff.decimalField(9, of: fd), "no such field")
    }

    /// The calling thread's CPUs (sched_getaffinity/sched_setaffinity: Swift's Glibc does not
    /// declare them).
    typealias Affinity = @convention(c) (Int32, Int, UnsafeMutableRawPointer) -> Int32
    static func affinity(_ name: String, _ set: inout cpu_set_t) {
        guard let symbol = dlsym(nil, name) else { return XCTFail("no \(name)") }
        let rc = withUnsafeMutableBytes(of: &set) { unsafeBitCast(symbol, to: Affinity.self)(0, $0.count, $0.baseAddress!) }
        XCTAssertEqual(rc, 0, name)
    }

    /// Pins the calling thread to CPU 0.
    static func pinToFirstCPU() {
        var set = cpu_set_t()
        set.__bits.0 = 1
        affinity("sched_setaffinity", &set)
    }

    func testAnotherSpinnerOnTheCoreStopsSpinning() throws {
        try XCTSkipUnless(SpinBackoff.schedstatReadable, "this kernel keeps no per-thread schedstat")
        Self.pinToFirstCPU()
        var before = cpu_set_t()
        Self.affinity("sched_getaffinity", &before)
        defer { Self.affinity("sched_setaffinity", &before) }
        // Another thread spins on the same core: the run delay passes a quarter, waits block.
        let stop = Atomic<Bool>(false)
        let other = try BackgroundThread {
            Self.pinToFirstCPU()
            while !stop.load(ordering: .relaxed) {}
        }
        defer {
            stop.store(true, ordering: .relaxed)
            other.join()
        }
        var u = SpinBackoff(spinNanos: 200_000)
        let t0 = SpinBackoff.now()
        var blocked = false
        while !blocked && SpinBackoff.now() - t0 < 2_000_000_000 { blocked = u.budget(now: SpinBackoff.now()) == 0 }
        XCTAssertTrue(blocked, "a spinner sharing its core with another stops spinning")
        XCTAssertNotNil(SpinBackoff.runDelay())
    }
}
