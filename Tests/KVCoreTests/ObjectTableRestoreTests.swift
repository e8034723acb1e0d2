import XCTest
@testable import KVCore

/// A restarted master's table rebuilt from what segment owners report (issue 17 item 6):
/// exact ranges, replicas merged, the newer of two reports kept, old leases respected.
final class ObjectTableRestoreTests: XCTestCase {
    static let noLeases = CachePolicy(leaseTTL: 0, softPinTTL: 1_000_000_000, highWatermark: 1, evictionRatio: 0.05)

    func r(_ key: ObjectKey, _ offset: Int, _ size: Int, seq: UInt64, checksum: UInt32? = nil) -> ObjectTable.Restored {
        ObjectTable.Restored(key: key, offset: offset, size: size, seq: seq, options: .default, checksum: checksum)
    }

    func testTheAllocatorTakesExactRanges() {
        var a = SegmentAllocator(capacity: 1 << 20)
        XCTAssertNotNil(a.reserve(offset: 4096, bytes: 100))
        XCTAssertNil(a.reserve(offset: 4096, bytes: 1), "taken")
        XCTAssertNil(a.reserve(offset: 4000, bytes: 200), "overlaps")
        XCTAssertNil(a.reserve(offset: 100, bytes: 10), "not a granule boundary")
        XCTAssertNil(a.reserve(offset: (1 << 20) - 64, bytes: 65), "leaves the segment")
        let first = a.reserve(offset: 0, bytes: 64)
        XCTAssertNotNil(first)
        XCTAssertNotNil(a.reserve(offset: 8192, bytes: 64))
        XCTAssertEqual(a.usedBytes, 128 + 64 + 64)
        XCTAssertNoThrow(try a.free(first!))
        XCTAssertEqual(a.reserve(offset: 0, bytes: 64)?.offset, 0, "a freed range can be taken again")
    }

    func testReportsAreMergedByKeyAndSequence() throws {
        var t = ObjectTable(policy: Self.noLeases)
        try t.mount(segment: 1, capacity: 1 << 20, now: 0)
        try t.mount(segment: 2, capacity: 1 << 20, now: 0)
        XCTAssertEqual(
            try t.restore(
                [r("a", 0, 100, seq: 10, checksum: 7), r("b", 128, 50, seq: 11), r("old", 256, 64, seq: 5)],
                segment: 1, now: 0), [true, true, true])
        // Segment 2 holds a's other replica (same seq), a newer b, an older "old", and junk.
        XCTAssertEqual(
            try t.restore(
                [
                    r("b", 0, 60, seq: 12), r("a", 512, 100, seq: 10, checksum: 7), r("old", 1024, 64, seq: 4),
                    r("zero", 2048, 64, seq: 0), r("bad", 1 << 20, 64, seq: 9)
                ], segment: 2, now: 0),
            [true, true, false, false, false])
        XCTAssertEqual(t.replicas(key: "a")?.count, 2)
        XCTAssertEqual(t.size(key: "b"), 60, "the newer report wins")
        XCTAssertEqual(t.replicas(key: "b"), [Replica(segment: 2, offset: 0)])
        XCTAssertEqual(t.replicas(key: "old"), [Replica(segment: 1, offset: 256)])
        guard case .found(let rt) = t.acquireRead(key: "a", now: 0) else { return XCTFail() }
        XCTAssertEqual(rt.checksum, 7)
        try t.releaseRead(rt.handle)
        XCTAssertEqual(t.objectCount, 3)
        XCTAssertEqual(t.restoredObjects, 5)
        // New commits come after every restored one.
        let w = try t.beginWrite(key: "b", size: 10, mode: .upsert, now: 0)
        try t.commitWrite(w, now: 0)
        XCTAssertEqual(try t.restore([r("b", 4096, 60, seq: 12)], segment: 1, now: 0), [false], "a restored report never beats a new write")
        XCTAssertNil(t.invariantViolation())
    }

    func testReportsMustAscend() throws {
        var t = ObjectTable(policy: Self.noLeases)
        try t.mount(segment: 1, capacity: 1 << 20, now: 0)
        XCTAssertEqual(
            try t.restore([r("b", 4096, 100, seq: 2), r("a", 0, 100, seq: 1)], segment: 1, now: 0), [true, false],
            "a report below the last one is refused (no scans of the segment)")
        XCTAssertEqual(
            try t.restore([r("a", 0, 100, seq: 1), r("c", 8192, 64, seq: 3)], segment: 1, now: 0), [false, true],
            "also across requests")
        XCTAssertNil(t.invariantViolation())
    }

    /// A remounted segment takes no new object until its owner's last report: a write placed
    /// between the mount and the reports would land on an object not yet taken back (the
    /// failover benchmark lost 10,000 objects that way once old leases no longer held it).
    func testARemountedSegmentTakesNothingNewUntilItsOwnersLastReport() throws {
        let s: Nanoseconds = 1_000_000_000
        var t = ObjectTable(policy: CachePolicy(leaseTTL: 2 * s, softPinTTL: s, highWatermark: 1, evictionRatio: 0.05))
        try t.mount(segment: 1, capacity: 1 << 20, indexBy: 10 * s, now: 0)
        XCTAssertThrowsError(try t.beginWrite(key: "new", size: 64, mode: .put, now: 1), "not before the reports")
        XCTAssertEqual(try t.restore([r("a", 0, 4096, seq: 3)], segment: 1, last: false, now: 2), [true])
        XCTAssertEqual(t.reportBytes, (1 << 20) - 4096)
        XCTAssertThrowsError(try t.beginWrite(key: "new", size: 64, mode: .put, now: 3), "nor between them")
        XCTAssertNotNil(t.size(key: "a"), "the held space comes back soon: nothing is evicted for the write")
        XCTAssertTrue(t.mustWaitForRoom(64), "the write waits for it")
        XCTAssertNil(t.invariantViolation())
        XCTAssertEqual(try t.restore([r("b", 8192, 4096, seq: 4)], segment: 1, last: true, now: 4), [true], "b's range was still free")
        XCTAssertEqual(t.reportBytes, 0)
        let w = try t.beginWrite(key: "new", size: 64, mode: .put, now: 5)
        XCTAssertFalse([0, 8192].contains(w.offset), "new objects go around what was taken back")
        XCTAssertNil(t.invariantViolation())

        // An owner that never sends its last report holds its segment only until `indexBy`.
        var u = ObjectTable(policy: Self.noLeases)
        try u.mount(segment: 1, capacity: 1 << 20, indexBy: 10 * s, now: 0)
        XCTAssertThrowsError(try u.beginWrite(key: "new", size: 64, mode: .put, now: 10 * s - 1))
        XCTAssertNoThrow(try u.beginWrite(key: "new", size: 64, mode: .put, now: 10 * s))

        // Old leases outlast a quick last report: held until they end.
        var v = ObjectTable(policy: CachePolicy(leaseTTL: 2 * s, softPinTTL: s, highWatermark: 1, evictionRatio: 0.05))
        try v.mount(segment: 1, capacity: 1 << 20, readyAt: 2 * s, indexBy: 10 * s, now: 0)
        XCTAssertEqual(try v.restore([], segment: 1, last: true, now: 1), [])
        XCTAssertThrowsError(try v.beginWrite(key: "new", size: 64, mode: .put, now: 2 * s - 1))
        XCTAssertNoThrow(try v.beginWrite(key: "new", size: 64, mode: .put, now: 2 * s))
        XCTAssertNil(v.invariantViolation())
    }

    func testASegmentHeldForOldLeasesStaysHeldAroundWhatWasRestored() throws {
        var t = ObjectTable(policy: CachePolicy(leaseTTL: 2_000_000_000, softPinTTL: 1_000_000_000, highWatermark: 1, evictionRatio: 0.05))
        try t.mount(segment: 1, capacity: 1 << 20, readyAt: 2_000_000_000, now: 0)
        XCTAssertEqual(try t.restore([r("a", 4096, 100, seq: 3)], segment: 1, now: 1), [true])
        XCTAssertThrowsError(try t.beginWrite(key: "new", size: 64, mode: .put, now: 2), "still held: old readers may copy")
        XCTAssertNotNil(t.size(key: "a"), "not evicted to make room either")
        XCTAssertNoThrow(try t.beginWrite(key: "new", size: 64, mode: .put, now: 2_000_000_002))
        XCTAssertNil(t.invariantViolation())
    }

    /// Space of a committed version that went is handed out again only once its segment's
    /// owner confirmed the notice saying so: until then its index lists the version, and a
    /// restarted master would take it back over bytes another write put there.
    func testFreedSpaceWaitsForItsOwnersConfirmation() throws {
        var t = ObjectTable(policy: Self.noLeases)
        t.recordNotices = true
        try t.mount(segment: 1, capacity: 64 << 10, now: 0)
        for i in 0..<4 {
            let w = try t.beginWrite(key: "k\(i)", size: 16 << 10, mode: .put, now: 0)
            try t.commitWrite(w, now: 0)
        }
        let stored = t.takeNotices()
        XCTAssertEqual(stored.map(\.number), [1, 2, 3, 4], "numbered per segment")
        try t.remove(key: "k0", now: 0)
        XCTAssertEqual(t.takeNotices().map(\.number), [5])
        XCTAssertEqual(t.awaitingBytes, 16 << 10)
        XCTAssertThrowsError(try t.beginWrite(key: "new", size: 16 << 10, mode: .put, now: 0)) { e in
            XCTAssertEqual((e as? KVError)?.code, .noSpace)
        }
        XCTAssertEqual(t.statistics.objects, 3, "nothing was evicted for room that is about to come back")
        XCTAssertEqual(t.confirm(segment: 1, through: 4), 0, "the removal's notice is number 5")
        XCTAssertEqual(t.confirm(segment: 1, through: 99), 16 << 10, "confirmed (numbers past the last are clamped)")
        XCTAssertEqual(t.awaitingBytes, 0)
        XCTAssertNoThrow(try t.beginWrite(key: "new", size: 16 << 10, mode: .put, now: 0))
        XCTAssertNil(t.invariantViolation())
        // A version that goes after its owner confirmed its removal (its last reader was
        // slower) is freed at once: no notice of it is left to confirm.
        try t.remove(key: "k1", now: 0)
        XCTAssertEqual(t.takeNotices().count, 1, "k1 went")
        t.confirm(segment: 1, through: .max)
        let r = try t.beginWrite(key: "read", size: 16 << 10, mode: .put, now: 0)
        try t.commitWrite(r, now: 0)
        guard case .found(let held) = t.acquireRead(key: "read", now: 0) else { return XCTFail("read") }
        try t.remove(key: "read", force: true, now: 0)
        let last = try XCTUnwrap(t.takeNotices().last?.number)
        t.confirm(segment: 1, through: last)
        try t.releaseRead(held.handle)
        XCTAssertEqual(t.awaitingBytes, 0)
        XCTAssertNil(t.invariantViolation())
        // A write that never committed was never noticed: its space is free at once.
        var u = ObjectTable(policy: Self.noLeases)
        u.recordNotices = true
        try u.mount(segment: 1, capacity: 64 << 10, now: 0)
        try u.abortWrite(try u.beginWrite(key: "a", size: 64 << 10, mode: .put, now: 0), now: 0)
        XCTAssertEqual(u.awaitingBytes, 0)
        // A segment that goes takes its waiting space with it.
        let w = try u.beginWrite(key: "b", size: 64 << 10, mode: .put, now: 0)
        try u.commitWrite(w, now: 0)
        try u.remove(key: "b", now: 0)
        XCTAssertEqual(u.awaitingBytes, 64 << 10)
        _ = try u.unmount(segment: 1, now: 0)
        XCTAssertEqual(u.awaitingBytes, 0)
        XCTAssertNil(u.invariantViolation())
    }

    /// A write larger than the free space waits for space awaiting confirmation, after
    /// evicting what the confirmations will not bring back; once they come, it fits whole.
    func testAWriteWaitsForRoomAfterEvictingWhatIsMissing() throws {
        var t = ObjectTable(policy: Self.noLeases)
        t.recordNotices = true
        try t.mount(segment: 1, capacity: 64 << 10, now: 0)
        for i in 0..<4 {
            try t.commitWrite(try t.beginWrite(key: "k\(i)", size: 16 << 10, mode: .put, now: 0), now: 0)
        }
        XCTAssertTrue(t.mustWaitForRoom(16 << 10), "full: one object evicted, its space awaits confirmation")
        XCTAssertEqual(t.statistics.objects, 3)
        XCTAssertEqual(t.awaitingBytes, 16 << 10)
        XCTAssertTrue(t.mustWaitForRoom(16 << 10), "no second eviction while waiting")
        XCTAssertEqual(t.statistics.objects, 3)
        try t.remove(key: "k1", now: 0)
        XCTAssertTrue(t.mustWaitForRoom(48 << 10))
        XCTAssertEqual(t.statistics.objects, 1, "one more evicted for what the confirmation will not bring back")
        XCTAssertEqual(t.awaitingBytes, 48 << 10)
        XCTAssertFalse(t.mustWaitForRoom(1 << 20), "larger than every segment: never held back")
        t.confirm(segment: 1, through: .max)
        XCTAssertFalse(t.mustWaitForRoom(48 << 10))
        XCTAssertNoThrow(try t.beginWrite(key: "big", size: 48 << 10, mode: .put, now: 0))
        XCTAssertNil(t.invariantViolation())
    }

    func testCommitsAndRemovalsAreNoticedPerPlacement() throws {
        var t = ObjectTable(policy: Self.noLeases)
        t.recordNotices = true
        t.nextSeq = 100
        try t.mount(segment: 1, capacity: 1 << 20, now: 0)
        try t.mount(segment: 2, capacity: 1 << 20, now: 0)
        let w = try t.beginWrite(key: "k", size: 10, mode: .put, replicas: 2, now: 0)
        try t.commitWrite(w, now: 0)
        let stored = t.takeNotices()
        XCTAssertEqual(Set(stored.map(\.segment)), [1, 2])
        XCTAssertEqual(stored.map(\.seq), [100, 100])
        XCTAssertEqual(stored.first?.object?.key, "k")
        try t.remove(key: "k", now: 0)
        let gone = t.takeNotices()
        XCTAssertEqual(gone.count, 2)
        XCTAssertTrue(gone.allSatisfy { $0.object == nil && $0.seq == 100 })
    }
}
