import XCTest
@testable import KVCore

/// Replica copies and moves (Mooncake's copy and move tasks): new replicas of the current
/// version, added only when the copier commits, and nothing changed when the object does.
final class ObjectTableReplicaTests: XCTestCase {
    static let policy = CachePolicy(leaseTTL: 0, softPinTTL: 1_000_000_000, highWatermark: 1, evictionRatio: 0.05)

    /// A master-style table (notices recorded) with segments 1, 2 and 3 of 64 KiB.
    func table() throws -> ObjectTable {
        var t = ObjectTable(policy: Self.policy)
        t.recordNotices = true
        for s: SegmentID in 1...3 { try t.mount(segment: s, capacity: 64 << 10, now: 0) }
        return t
    }

    func put(_ t: inout ObjectTable, _ key: ObjectKey, size: Int = 4096, in segment: SegmentID = 1) throws {
        let w = try t.beginWrite(key: key, size: size, mode: .put, options: WriteOptions(replicas: 1), preferred: segment, now: 0)
        try t.commitWrite(w, now: 0)
    }

    func testACopyAddsAReplicaOnlyWhenItCommits() throws {
        var t = try table()
        try put(&t, "k")
        _ = t.takeNotices()
        let used = t.usedBytes
        let c = try t.beginCopy(key: "k", to: [2, 3], dropping: nil, now: 1)
        XCTAssertEqual(c.sources, [Replica(segment: 1, offset: 0)])
        XCTAssertEqual(c.targets.map(\.segment), [2, 3])
        XCTAssertEqual(t.replicas(key: "k")?.count, 1, "not yet")
        XCTAssertEqual(t.usedBytes, used + 2 * 4096, "the new space is taken")
        XCTAssertNil(t.invariantViolation())
        try t.commitCopy(c.handle, now: 2)
        XCTAssertEqual(t.replicas(key: "k")?.map(\.segment), [1, 2, 3])
        let notices = t.takeNotices()
        XCTAssertEqual(notices.map(\.segment), [2, 3], "the new owners hear of it (a restarted master takes it back)")
        XCTAssertEqual(notices.compactMap(\.object).map(\.key), ["k", "k"])
        XCTAssertEqual(t.statistics.objects, 1)
        XCTAssertNil(t.invariantViolation())
        XCTAssertThrowsError(try t.commitCopy(c.handle, now: 3), "once")
    }

    func testAnAbortedCopyOrAChangedObjectLeavesEverythingAsItWas() throws {
        var t = try table()
        try put(&t, "k")
        let used = t.usedBytes
        let c = try t.beginCopy(key: "k", to: [2], dropping: nil, now: 1)
        try t.abortCopy(c.handle)
        XCTAssertEqual(t.usedBytes, used)
        XCTAssertEqual(t.replicas(key: "k")?.count, 1)

        // Removed during the copy: the commit is refused, the copy's space and the old
        // version's are freed (the version waited for the copy's hold).
        let d = try t.beginCopy(key: "k", to: [2], dropping: nil, now: 1)
        try t.remove(key: "k", now: 2)
        XCTAssertThrowsError(try t.commitCopy(d.handle, now: 3)) { XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound) }
        XCTAssertNil(t.replicas(key: "k"))
        t.confirm(segment: 1, through: .max)
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertNil(t.invariantViolation())

        // Replaced by an upsert: the copy of the old version is not added to the new one.
        try put(&t, "u")
        let e = try t.beginCopy(key: "u", to: [3], dropping: nil, now: 4)
        let w = try t.beginWrite(key: "u", size: 100, mode: .upsert, options: WriteOptions(replicas: 1), preferred: 2, now: 4)
        try t.commitWrite(w, now: 4)
        XCTAssertThrowsError(try t.commitCopy(e.handle, now: 5))
        XCTAssertEqual(t.replicas(key: "u")?.map(\.segment), [2])
        XCTAssertNil(t.invariantViolation())
    }

    func testAMoveDropsItsSourceOnceNoReaderHoldsIt() throws {
        var t = try table()
        try put(&t, "k")
        guard case .found(let reader) = t.acquireRead(key: "k", now: 0) else { return XCTFail("read") }
        let c = try t.beginCopy(key: "k", to: [2], dropping: 1, now: 1)
        try t.commitCopy(c.handle, now: 2)
        XCTAssertEqual(t.replicas(key: "k")?.map(\.segment), [2], "moved")
        let notices = t.takeNotices()
        XCTAssertTrue(notices.contains { $0.segment == 1 && $0.object == nil }, "the old owner hears that it went")
        XCTAssertEqual(t.segmentUsage.first { $0.segment == 1 }?.used, 4096, "a reader still copies from it")
        XCTAssertNil(t.invariantViolation())
        try t.releaseRead(reader.handle)
        XCTAssertEqual(t.awaitingBytes, 4096, "then it waits for its owner to confirm the notice")
        t.confirm(segment: 1, through: .max)
        XCTAssertEqual(t.segmentUsage.first { $0.segment == 1 }?.used, 0)
        XCTAssertNil(t.invariantViolation())
    }

    func testBadCopiesAreRefusedAndChangeNothing() throws {
        var t = try table()
        try put(&t, "k")
        let before = t.usedBytes
        func code(_ body: () throws -> Void) -> KVError.Code? {
            do { try body() } catch { return (error as? KVError)?.code }
            return nil
        }
        XCTAssertEqual(code { _ = try t.beginCopy(key: "none", to: [2], dropping: nil, now: 0) }, .objectNotFound)
        XCTAssertEqual(code { _ = try t.beginCopy(key: "k", to: [], dropping: nil, now: 0) }, .invalidArgument)
        XCTAssertEqual(code { _ = try t.beginCopy(key: "k", to: [2, 2], dropping: nil, now: 0) }, .invalidArgument)
        XCTAssertEqual(code { _ = try t.beginCopy(key: "k", to: [1], dropping: nil, now: 0) }, .invalidArgument, "already there")
        XCTAssertEqual(code { _ = try t.beginCopy(key: "k", to: [9], dropping: nil, now: 0) }, .invalidArgument, "not mounted")
        XCTAssertEqual(code { _ = try t.beginCopy(key: "k", to: [2], dropping: 3, now: 0) }, .invalidArgument, "no replica to move")
        try put(&t, "big", size: 62 << 10, in: 3)
        XCTAssertEqual(code { _ = try t.beginCopy(key: "k", to: [2, 3], dropping: nil, now: 0) }, .noSpace, "segment 3 is full")
        XCTAssertEqual(t.usedBytes, before + (62 << 10), "the room taken in segment 2 was given back")
        XCTAssertEqual(code { try t.commitCopy(77, now: 0) }, .invalidArgument)
        XCTAssertEqual(code { try t.abortCopy(77) }, .invalidArgument)
        XCTAssertNil(t.invariantViolation())
    }

    func testATargetThatGoesFailsTheCopy() throws {
        var t = try table()
        try put(&t, "k")
        let c = try t.beginCopy(key: "k", to: [2], dropping: nil, now: 1)
        _ = try t.unmount(segment: 2, now: 2)
        XCTAssertNil(t.invariantViolation())
        XCTAssertThrowsError(try t.commitCopy(c.handle, now: 3)) { XCTAssertEqual(($0 as? KVError)?.code, .transfer) }
        XCTAssertEqual(t.replicas(key: "k")?.map(\.segment), [1])
        XCTAssertNil(t.invariantViolation())
    }
}
