import XCTest
import KVTestSupport
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

    /// Copies and moves mixed with writes, reads, removals, evictions, confirmations and
    /// unmounts: the accounting holds after every step, and everything is freed at the end.
    func testAccountingSurvivesRandomCopiesAndMoves() throws {
        var t = ObjectTable(policy: CachePolicy(leaseTTL: 2_000, softPinTTL: 1_000_000_000, highWatermark: 0.9, evictionRatio: 0.05))
        t.recordNotices = true
        for s: SegmentID in 1...3 { try t.mount(segment: s, capacity: 96 << 10, now: 0) }
        var rng = SplitMix64(seed: 7)
        var held: [VersionHandle] = [], copies: [UInt64] = []
        var next: SegmentID = 4, now: Nanoseconds = 0, committed = 0
        func mounted() -> [SegmentID] { t.segments.slots.filter(\.mounted).map(\.id) }
        for step in 0..<20_000 {
            now += rng.next() % 200
            let key = ObjectKey(stringLiteral: "k\(rng.next() % 200)")
            switch rng.next() % 100 {
            case 0..<30:
                let mode: WriteMode = rng.next() % 3 == 0 ? .upsert : .put
                if let w = try? t.beginWrite(
                    key: key, size: 64 + Int(rng.next() % 6000), mode: mode, options: WriteOptions(replicas: 1 + Int(rng.next() % 2)), now: now)
                {
                    try? t.commitWrite(w, now: now)
                }
            case 30..<45:
                if case .found(let r) = t.acquireRead(key: key, now: now) { held.append(r.handle) }
            case 45..<55:
                if !held.isEmpty { try t.releaseRead(held.remove(at: Int(rng.next() % UInt64(held.count)))) }
            case 55..<62:
                try? t.remove(key: key, force: rng.next() % 2 == 0, now: now)
            case 62..<75:
                let ids = mounted()
                let target = ids[Int(rng.next() % UInt64(ids.count))]
                let drop = rng.next() % 2 == 0 ? t.replicas(key: key)?.first?.segment : nil
                if let c = try? t.beginCopy(key: key, to: [target], dropping: drop, now: now) { copies.append(c.handle) }
            case 75..<85:
                if !copies.isEmpty {
                    let h = copies.remove(at: Int(rng.next() % UInt64(copies.count)))
                    if rng.next() % 4 == 0 {
                        try t.abortCopy(h)
                    } else if (try? t.commitCopy(h, now: now)) != nil {
                        committed += 1
                    }
                }
            case 85..<93:
                for n in t.takeNotices() { t.confirm(segment: n.segment, through: n.number) }
            case 93..<96:
                if t.segmentCount > 1 {
                    let ids = mounted()
                    _ = try t.unmount(segment: ids[Int(rng.next() % UInt64(ids.count))], now: now)
                }
            default:
                if t.segmentCount < 5 {
                    try t.mount(segment: next, capacity: (32 + Int(rng.next() % 96)) << 10, now: now)
                    next += 1
                }
            }
            if let v = t.invariantViolation() { return XCTFail("step \(step): \(v)") }
        }
        for h in copies { try? t.commitCopy(h, now: now) }
        for h in held { try t.releaseRead(h) }
        t.advance(now: now + 1_000_000)
        _ = t.removeAll(force: true, now: now + 1_000_000)
        for n in t.takeNotices() { t.confirm(segment: n.segment, through: n.number) }
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertNil(t.invariantViolation())
        XCTAssertGreaterThan(committed, 100, "copies and moves did commit")
    }
}
