import XCTest
import KVTestSupport
@testable import KVCore

/// Leases, eviction, pins and TTLs of the state machine, with time passed in by hand (no sleeps).
final class ObjectTableCacheTests: XCTestCase {
    static let second: Nanoseconds = 1_000_000_000
    let kib = 1024

    /// A table of `objects` KiB with the given rules (lease 5 s by default).
    func table(kib objects: Int, lease: Nanoseconds = 5 * second, watermark: Double = 0.9,
               ratio: Double = 0.05) -> ObjectTable {
        ObjectTable(capacity: objects * kib,
                    policy: CachePolicy(leaseTTL: lease, softPinTTL: 60 * Self.second, highWatermark: watermark, evictionRatio: ratio))
    }

    @discardableResult
    func put(_ t: inout ObjectTable, _ key: ObjectKey, _ size: Int = 1024, _ mode: WriteMode = .put,
             options: WriteOptions = .default, at now: Nanoseconds = 0) throws -> WriteTicket {
        let w = try t.beginWrite(key: key, size: size, mode: mode, options: options, now: now)
        try t.commitWrite(w, now: now)
        return w
    }

    /// Reads (takes and releases a hold): the object is leased afterwards.
    func read(_ t: inout ObjectTable, _ key: ObjectKey, at now: Nanoseconds = 0) throws {
        guard case .found(let r) = t.acquireRead(key: key, now: now) else { return XCTFail("\(key) not found") }
        try t.releaseRead(r.handle)
    }

    func code(_ body: () throws -> Void) -> KVError.Code? {
        do { try body() } catch { return (error as? KVError)?.code }
        return nil
    }

    // MARK: leases

    func testReadLeasesTheObjectUntilTheLeaseEnds() throws {
        var t = table(kib: 64)
        try put(&t, "a")
        try read(&t, "a", at: 10 * Self.second)
        XCTAssertEqual(t.activeLeases, 1)
        XCTAssertEqual(t.leaseEnd(key: "a"), 15 * Self.second)
        XCTAssertEqual(code { try t.remove(key: "a", now: 14 * Self.second) }, .leaseHeld)
        XCTAssertTrue(t.contains(key: "a"), "a refused remove leaves the object")
        try t.remove(key: "a", now: 15 * Self.second)
        XCTAssertEqual(t.activeLeases, 0)
        XCTAssertEqual(t.usedBytes, 0)
    }

    func testEveryReadExtendsTheLease() throws {
        var t = table(kib: 64)
        try put(&t, "a")
        try read(&t, "a", at: 0)
        try read(&t, "a", at: 4 * Self.second)
        t.advance(now: 6 * Self.second)
        XCTAssertEqual(t.activeLeases, 1, "extended to 9 s")
        t.advance(now: 9 * Self.second)
        XCTAssertEqual(t.activeLeases, 0)
        XCTAssertEqual(t.leaseEnd(key: "a"), 0)
    }

    func testExistsAndSizeLeaseLikeReads() throws {
        var t = table(kib: 64)
        try put(&t, "a", 100)
        XCTAssertEqual(t.lease(key: "a", now: 0), 100)
        XCTAssertNil(t.lease(key: "missing", now: 0))
        XCTAssertEqual(code { try t.remove(key: "a", now: 1) }, .leaseHeld)
    }

    func testForcedRemoveEndsTheLease() throws {
        var t = table(kib: 64)
        try put(&t, "a")
        try read(&t, "a")
        try t.remove(key: "a", force: true, now: 1)
        XCTAssertEqual(t.activeLeases, 0)
        XCTAssertEqual(t.usedBytes, 0, "no reader holds it: freed at once")
    }

    func testZeroLeaseTTLGrantsNoLeases() throws {
        var t = table(kib: 64, lease: 0)
        try put(&t, "a")
        try read(&t, "a")
        XCTAssertEqual(t.activeLeases, 0)
        try t.remove(key: "a", now: 0)
    }

    func testUpsertOfALeasedObjectKeepsItsBytesUntilTheLeaseEnds() throws {
        var t = table(kib: 64)
        let first = try put(&t, "a")
        try read(&t, "a", at: 0)
        let w = try t.beginWrite(key: "a", size: 1024, mode: .upsert, now: 1)
        XCTAssertFalse(w.inPlace, "a leased object is never rewritten in place")
        XCTAssertNotEqual(w.offset, first.offset)
        try t.commitWrite(w, now: 1)
        XCTAssertEqual(t.usedBytes, 2048, "the old version is hidden but kept")
        XCTAssertEqual(t.objectCount, 1)
        guard case .found(let r) = t.acquireRead(key: "a", now: 2) else { return XCTFail() }
        XCTAssertEqual(r.offset, w.offset, "readers see the new value at once")
        try t.releaseRead(r.handle)
        t.advance(now: 5 * Self.second)
        XCTAssertEqual(t.usedBytes, 1024, "freed when its lease ended")
        XCTAssertEqual(t.activeLeases, 1, "the new version's lease from the read at 2 ns")
    }

    func testRemoveAllSkipsLeasedObjectsUnlessForced() throws {
        var t = table(kib: 64)
        for k in ["a", "b", "c"] { try put(&t, ObjectKey(stringLiteral: k)) }
        try read(&t, "b")
        XCTAssertEqual(t.removeAll(now: 1), 2)
        XCTAssertTrue(t.contains(key: "b"))
        XCTAssertEqual(t.removeAll(force: true, now: 1), 1)
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertEqual(t.activeLeases, 0)
    }

    // MARK: eviction

    func testEvictsLeastRecentlyUsedFirstAndSkipsLeased() throws {
        var t = table(kib: 10, lease: 5 * Self.second, watermark: 1, ratio: 0.1)  // rounds of 1 object
        for i in 0..<10 { try put(&t, ObjectKey(stringLiteral: "k\(i)"), at: 0) }
        try read(&t, "k0", at: 1)  // leased: off the list until 5 s + 1
        XCTAssertEqual(t.evictionOrder().prefix(3), ["k1", "k2", "k3"])
        try put(&t, "n0", at: 2)
        try put(&t, "n1", at: 2)
        XCTAssertTrue(t.contains(key: "k0"), "leased objects are never evicted")
        XCTAssertFalse(t.contains(key: "k1"))
        XCTAssertFalse(t.contains(key: "k2"))
        XCTAssertTrue(t.contains(key: "k3"))
        XCTAssertEqual(t.evictedObjects, 2)
        XCTAssertEqual(t.evictedBytes, 2048)
        // When its lease ends k0 rejoins at the recent end.
        t.advance(now: 10 * Self.second)
        XCTAssertEqual(t.evictionOrder().last, "k0")
    }

    func testHighWatermarkEvictsARoundBeforeTheSegmentIsFull() throws {
        var t = table(kib: 100, watermark: 0.9, ratio: 0.05)
        for i in 0..<90 { try put(&t, ObjectKey(stringLiteral: "k\(i)")) }
        XCTAssertEqual(t.evictedObjects, 0, "exactly at the watermark")
        try put(&t, "over")
        XCTAssertEqual(t.evictedObjects, 5, "one round: 5% of capacity")
        XCTAssertEqual(t.usedBytes, 86 * kib)
        XCTAssertFalse(t.contains(key: "k4"))
        XCTAssertTrue(t.contains(key: "k5"))
    }

    func testFillingToThreeHundredPercentSucceedsForEveryPut() throws {
        var t = table(kib: 256)
        var rng = SplitMix64(seed: 7)
        var written = 0
        var i = 0
        while written < 3 * t.capacity {
            let size = 512 + Int(rng.next() % 8192)
            try put(&t, ObjectKey(stringLiteral: "o\(i)"), size)
            written += size
            i += 1
        }
        XCTAssertGreaterThan(t.evictedObjects, 0)
        XCTAssertEqual(t.evictedObjects + t.objectCount, i)
        XCTAssertLessThanOrEqual(t.usedBytes, t.capacity)
        XCTAssertTrue(t.contains(key: ObjectKey(stringLiteral: "o\(i - 1)")), "the newest object is kept")
    }

    func testHardPinnedObjectsAreNeverEvicted() throws {
        var t = table(kib: 10, watermark: 1, ratio: 0.1)
        for i in 0..<5 { try put(&t, ObjectKey(stringLiteral: "pin\(i)"), options: WriteOptions(hardPin: true)) }
        XCTAssertEqual(t.hardPinnedBytes, 5 * kib)
        for i in 0..<20 { try put(&t, ObjectKey(stringLiteral: "k\(i)")) }
        for i in 0..<5 { XCTAssertTrue(t.contains(key: ObjectKey(stringLiteral: "pin\(i)"))) }
        XCTAssertEqual(t.evictedObjects, 15)
        // Only pinned and leased objects left: a put that does not fit fails and changes nothing.
        for i in 15..<20 { try read(&t, ObjectKey(stringLiteral: "k\(i)")) }
        let before = t.statistics
        XCTAssertEqual(code { try put(&t, "more") }, .noSpace)
        XCTAssertEqual(t.statistics, before)
        XCTAssertFalse(t.contains(key: "more"))
        // Pins are removable; hard-pinned bytes follow.
        try t.remove(key: "pin0", now: 0)
        XCTAssertEqual(t.hardPinnedBytes, 4 * kib)
    }

    func testHardPinningMoreThanCapacityIsRefused() throws {
        var t = table(kib: 4)
        try put(&t, "a", 3 * kib, options: WriteOptions(hardPin: true))
        XCTAssertEqual(code { try put(&t, "b", 2 * kib, options: WriteOptions(hardPin: true)) }, .noSpace)
        XCTAssertFalse(t.contains(key: "b"))
        XCTAssertEqual(t.hardPinnedBytes, 3 * kib)
    }

    func testSoftPinnedObjectsGoLastAndBecomeOrdinaryAfterTheirTTL() throws {
        var t = table(kib: 10, watermark: 1, ratio: 0.1)
        try put(&t, "soft", options: WriteOptions(softPinTTL: 30 * Self.second))
        XCTAssertEqual(t.softPinnedBytes, kib)
        for i in 0..<9 { try put(&t, ObjectKey(stringLiteral: "k\(i)")) }
        for i in 9..<18 { try put(&t, ObjectKey(stringLiteral: "k\(i)")) }
        XCTAssertTrue(t.contains(key: "soft"), "ordinary objects went first")
        try put(&t, "k18", 10 * kib - kib)  // needs all but one slot: takes ordinary ones first
        XCTAssertTrue(t.contains(key: "soft"))
        try put(&t, "all", 10 * kib)       // only the soft-pinned one is left to evict
        XCTAssertFalse(t.contains(key: "soft"))
        XCTAssertEqual(t.softPinnedBytes, 0)

        var u = table(kib: 10, watermark: 1, ratio: 0.1)
        try put(&u, "soft", options: WriteOptions(softPinTTL: 30 * Self.second), at: 0)
        try put(&u, "k0", at: 1)
        u.advance(now: 30 * Self.second)
        XCTAssertEqual(u.softPinnedBytes, 0)
        XCTAssertEqual(u.evictionOrder(), ["k0", "soft"], "ordinary now, at the recent end")
    }

    func testExpiredObjectsDisappear() throws {
        var t = table(kib: 64)
        try put(&t, "a", options: WriteOptions(ttl: 10 * Self.second), at: 5)
        XCTAssertEqual(t.cacheState(key: "a")?.expiresAt, 10 * Self.second + 5)
        guard case .found(let r) = t.acquireRead(key: "a", now: 10 * Self.second + 4) else { return XCTFail() }
        // Expiry hides a leased, held object at once; its bytes stay until the read and lease end.
        XCTAssertEqual(t.acquireRead(key: "a", now: 10 * Self.second + 5), .notFound)
        XCTAssertEqual(t.expiredObjects, 1)
        XCTAssertEqual(t.usedBytes, kib)
        try t.releaseRead(r.handle)
        XCTAssertEqual(t.usedBytes, kib, "still leased until 15 s + 4")
        t.advance(now: 15 * Self.second + 4)
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertEqual(t.activeLeases, 0)
    }

    func testUpsertAppliesItsOwnOptions() throws {
        var t = table(kib: 64)
        try put(&t, "a", options: WriteOptions(hardPin: true, ttl: Self.second))
        try put(&t, "a", 1024, .upsert)  // same size, no reader: in place, options replaced
        XCTAssertEqual(t.hardPinnedBytes, 0)
        XCTAssertNil(t.cacheState(key: "a")?.expiresAt)
        t.advance(now: 2 * Self.second)
        XCTAssertTrue(t.contains(key: "a"), "the old TTL no longer applies")
        XCTAssertEqual(t.evictionOrder(), ["a"])
    }

    func testIncompleteAndHeldObjectsAreNotEvicted() throws {
        var t = table(kib: 8, lease: 0, watermark: 1, ratio: 0.125)
        let pending = try t.beginWrite(key: "pending", size: 2 * kib, mode: .put, now: 0)
        try put(&t, "held", 2 * kib)
        guard case .found(let r) = t.acquireRead(key: "held", now: 0) else { return XCTFail() }
        for i in 0..<8 { try put(&t, ObjectKey(stringLiteral: "k\(i)"), 2 * kib) }
        XCTAssertTrue(t.contains(key: "held"))
        try t.commitWrite(pending, now: 0)
        XCTAssertTrue(t.contains(key: "pending"))
        try t.releaseRead(r.handle)
        XCTAssertEqual(t.evictionOrder().last, "held", "back on the list, most recent")
    }

    func testAPutThatCannotFitEvictsNothing() throws {
        var t = table(kib: 8, watermark: 1, ratio: 0.125)
        for i in 0..<4 { try put(&t, ObjectKey(stringLiteral: "pin\(i)"), options: WriteOptions(hardPin: true)) }
        for i in 0..<4 { try put(&t, ObjectKey(stringLiteral: "k\(i)")) }
        let before = t.statistics
        XCTAssertEqual(code { try put(&t, "big", 5 * kib) }, .noSpace)
        XCTAssertEqual(t.statistics, before, "4 KiB evictable can never make room for 5 KiB")
    }

    // MARK: options

    func testBadDurationsAndPoliciesAreRefused() {
        let p = CachePolicy()
        for bad in [-1.0, .nan, .infinity, 0, 366 * 86400.0] {
            XCTAssertThrowsError(try WriteOptions(hardPin: false, softPin: false, softPinSeconds: nil, ttlSeconds: bad, policy: p)) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
                XCTAssertTrue(($0 as? KVError)?.message.contains("ttl") ?? false)
            }
            XCTAssertThrowsError(try WriteOptions(hardPin: false, softPin: true, softPinSeconds: bad, ttlSeconds: nil, policy: p))
        }
        XCTAssertThrowsError(try WriteOptions(hardPin: true, softPin: true, softPinSeconds: nil, ttlSeconds: nil, policy: p))
        XCTAssertThrowsError(try WriteOptions(hardPin: false, softPin: false, softPinSeconds: 3, ttlSeconds: nil, policy: p))
        let soft = try? WriteOptions(hardPin: false, softPin: true, softPinSeconds: nil, ttlSeconds: 2.5, policy: p)
        XCTAssertEqual(soft, WriteOptions(softPinTTL: p.softPinTTL, ttl: 2_500_000_000))
        XCTAssertNoThrow(try CachePolicy(leaseSeconds: 0, softPinSeconds: 1, highWatermark: 1, evictionRatio: 1))
        for (lease, soft, wm, ratio) in [(-1.0, 1.0, 0.9, 0.05), (1, 0, 0.9, 0.05), (1, 1, 0, 0.05), (1, 1, 1.5, 0.05),
                                         (1, 1, 0.9, 0), (1, 1, 0.9, .nan), (.infinity, 1, 0.9, 0.05)] {
            XCTAssertThrowsError(try CachePolicy(leaseSeconds: lease, softPinSeconds: soft, highWatermark: wm, evictionRatio: ratio)) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
            }
        }
    }

    // MARK: timer queue

    func testTimerQueueMatchesAReferenceModel() {
        var q = TimerQueue()
        var model: [Int: Nanoseconds] = [:]  // slot * 3 + kind -> deadline
        var rng = SplitMix64(seed: 11)
        var now: Nanoseconds = 0
        for _ in 0..<20_000 {
            let slot = Int32(rng.next() % 200), kind = TimerKind(rawValue: Int(rng.next() % 3))!
            let id = Int(slot) * 3 + kind.rawValue
            switch rng.next() % 4 {
            case 0, 1:
                let d = now + rng.next() % 1000
                q.schedule(slot: slot, kind: kind, at: d)
                model[id] = d
            case 2:
                q.cancel(slot: slot, kind: kind)
                model[id] = nil
            default:
                now += rng.next() % 50
                var popped: [Int: Nanoseconds] = [:]
                var last: Nanoseconds = 0
                while let t = q.popDue(now: now) {
                    XCTAssertGreaterThanOrEqual(t.deadline, last, "in deadline order")
                    last = t.deadline
                    popped[Int(t.slot) * 3 + t.kind.rawValue] = t.deadline
                }
                let due = model.filter { $0.value <= now }
                XCTAssertEqual(popped, due)
                for k in due.keys { model[k] = nil }
            }
            XCTAssertEqual(q.count, model.count)
            XCTAssertEqual(q.deadline(slot: slot, kind: kind), model[id])
        }
    }
}
