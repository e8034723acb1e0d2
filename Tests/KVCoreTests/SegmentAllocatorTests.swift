import XCTest
import KVTestSupport
@testable import KVCore

final class SegmentAllocatorTests: XCTestCase {
    let g = SegmentAllocator.granule

    func testAllocationsAreAlignedDisjointAndAccounted() throws {
        var a = SegmentAllocator(capacity: 1 << 20)
        let x = try XCTUnwrap(a.allocate(1))
        let y = try XCTUnwrap(a.allocate(100))
        let z = try XCTUnwrap(a.allocate(4096))
        for r in [x, y, z] { XCTAssertEqual(r.offset % g, 0) }
        XCTAssertEqual(x.length, g)
        XCTAssertEqual(y.length, 128)
        XCTAssertEqual(z.length, 4096)
        XCTAssertLessThanOrEqual(x.offset + x.length, y.offset)
        XCTAssertLessThanOrEqual(y.offset + y.length, z.offset)
        XCTAssertEqual(a.usedBytes, g + 128 + 4096)
        XCTAssertEqual(a.allocationCount, 3)
    }

    func testRefusesZeroAndOversizedRequests() {
        var a = SegmentAllocator(capacity: 4096)
        XCTAssertNil(a.allocate(0))
        XCTAssertNil(a.allocate(-5))
        XCTAssertNil(a.allocate(4097))
        XCTAssertNotNil(a.allocate(4096))
        XCTAssertNil(a.allocate(1))
    }

    func testFreedNeighboursCoalesceIntoOneBlock() throws {
        var a = SegmentAllocator(capacity: 64 * g)
        let parts = try (0..<4).map { _ in try XCTUnwrap(a.allocate(16 * g)) }
        XCTAssertNil(a.allocate(1))
        try a.free(parts[1])
        try a.free(parts[2])
        XCTAssertEqual(a.freeBlockCount, 1)
        XCTAssertEqual(a.largestFreeBlock, 32 * g)
        let mid = try XCTUnwrap(a.allocate(32 * g), "two freed neighbours must serve one request")
        XCTAssertEqual(mid.offset, parts[1].offset)
        try a.free(mid)
        try a.free(parts[0])
        try a.free(parts[3])
        XCTAssertEqual(a.freeBlockCount, 1)
        XCTAssertEqual(a.usedBytes, 0)
        XCTAssertEqual(a.largestFreeBlock, a.capacity)
    }

    func testFragmentationIsReportedAndHealedByFrees() throws {
        var a = SegmentAllocator(capacity: 1024 * g)
        let blocks = try (0..<1024).map { _ in try XCTUnwrap(a.allocate(g)) }
        for (i, b) in blocks.enumerated() where i % 2 == 0 { try a.free(b) }
        XCTAssertEqual(a.freeBytes, 512 * g)
        XCTAssertNil(a.allocate(2 * g), "no two free granules are adjacent")
        XCTAssertNotNil(a.allocate(g))
        for (i, b) in blocks.enumerated() where i % 2 == 1 { try a.free(b) }
        XCTAssertNotNil(a.allocate(1000 * g))
    }

    func testFindsALargeEnoughBlockBelowTheGoodFitRounding() throws {
        // One free block of 17 granules; a request of 17 rounds up to the next class, so
        // only the exact-class scan finds it.
        var a = SegmentAllocator(capacity: 40 * g)
        let head = try XCTUnwrap(a.allocate(17 * g))
        let tail = try XCTUnwrap(a.allocate(23 * g))
        try a.free(head)
        let again = try XCTUnwrap(a.allocate(17 * g))
        XCTAssertEqual(again.offset, 0)
        try a.free(again)
        try a.free(tail)
    }

    func testDoubleAndForeignFreesThrow() throws {
        var a = SegmentAllocator(capacity: 1 << 16)
        let x = try XCTUnwrap(a.allocate(100))
        try a.free(x)
        XCTAssertThrowsError(try a.free(x))
        var b = SegmentAllocator(capacity: 1 << 16)
        _ = b.allocate(64)
        let y = try XCTUnwrap(b.allocate(64))
        XCTAssertThrowsError(try a.free(y))
        XCTAssertEqual(a.usedBytes, 0)
    }

    func testSizeClassesAreMonotonic() {
        var last = (fl: 0, sl: 0)
        for s in 1..<100_000 {
            let c = SegmentAllocator.sizeClass(s)
            XCTAssertTrue(c.fl > last.fl || (c.fl == last.fl && c.sl >= last.sl), "size \(s)")
            XCTAssertLessThan(c.sl, SegmentAllocator.slCount)
            last = c
        }
    }

    /// Random allocations and frees checked against a model: ranges stay inside the segment
    /// and disjoint, accounting is exact, and everything coalesces back at the end.
    func testRandomWorkloadAgainstModel() throws {
        var rng = SplitMix64(seed: 42)
        let capacity = 8 << 20
        var a = SegmentAllocator(capacity: capacity)
        var live: [Allocation] = []
        var expectedUsed = 0
        for step in 0..<50_000 {
            if live.isEmpty || rng.next() % 100 < 55 {
                let size = Int(rng.next() % (rng.next() % 4 == 0 ? 256 * 1024 : 4096)) + 1
                if let r = a.allocate(size) {
                    XCTAssertGreaterThanOrEqual(r.length, size)
                    XCTAssertLessThanOrEqual(r.offset + r.length, capacity)
                    live.append(r)
                    expectedUsed += r.length
                } else {
                    XCTAssertLessThan(a.largestFreeBlock, size, "step \(step): refused although a block fits")
                }
            } else {
                let i = Int(rng.next() % UInt64(live.count))
                let r = live.swapAt(i)
                try a.free(r)
                expectedUsed -= r.length
            }
            XCTAssertEqual(a.usedBytes, expectedUsed)
            if step % 5000 == 0 {
                let sorted = live.sorted { $0.offset < $1.offset }
                for (p, q) in zip(sorted, sorted.dropFirst()) { XCTAssertLessThanOrEqual(p.offset + p.length, q.offset) }
            }
        }
        for r in live { try a.free(r) }
        XCTAssertEqual(a.usedBytes, 0)
        XCTAssertEqual(a.freeBlockCount, 1)
        XCTAssertNotNil(a.allocate(capacity))
    }
}

extension Array {
    /// Removes and returns element i in O(1) (order not kept).
    mutating func swapAt(_ i: Int) -> Element {
        swapAt(i, count - 1)
        return removeLast()
    }
}
