import XCTest
import KVTestSupport
@testable import KVCore

/// Leases, eviction, pins and TTLs of the state machine, with time passed in by hand (no sleeps).
final class ObjectTableCacheTests: XCTestCase {
    static let second: Nanoseconds = 1_000_000_000
    let kib = 1024

    /// A table of `objects` KiB with the given rules (lease 5 s by default).
    func table(
        kib objects: Int, lease: Nanoseconds = 5 * second, watermark: Double = 0.9,
        ratio: Double = 0.05
    ) -> ObjectTable {
        ObjectTable(
            capacity: objects * kib,
            policy: CachePolicy(leaseTTL: lease, softPinTTL: 60 * Self.second, highWatermark: watermark, evictionRatio: ratio))
    }

    @discardableResult
    func put(
        _ t: inout ObjectTable, _ key: ObjectKey, _ size: Int = 1024, _ mode: WriteMode = .put,
        options: WriteOptions = .default, at now: Nanoseconds = 0
    ) throws -> WriteTicket {
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

    // MARK: a lower tier

    /// With a lower tier, eviction takes a version it decided on (copied or refused) from
    /// near the eviction end before one it has not reached; beyond its look-ahead, or when
    /// none is decided, plain LRU. `coldest` lists only undecided versions, and a read makes
    /// a refused one undecided again. An in-place rewrite makes a copied one undecided.
    func testEvictionLooksAheadForWhatALowerTierHasDecided() throws {
        var t = table(kib: 8, lease: 0, watermark: 1, ratio: 0.01)
        t.evictionLooksAhead = 2
        var w: [ObjectKey: WriteTicket] = [:]
        for k in ["a", "b", "c", "d"] as [ObjectKey] { w[k] = try put(&t, k, 2 * kib) }
        XCTAssertEqual(t.coldest(bytes: 1 << 20).map(\.key), ["a", "b", "c", "d"])
        t.decide(w["b"]!.handle, .copied)
        t.decide(w["d"]!.handle, .copied)
        XCTAssertEqual(t.coldest(bytes: 1 << 20).map(\.key), ["a", "c"])
        try put(&t, "e", 2 * kib) // evicts b (decided), not a
        XCTAssertTrue(t.contains(key: "a"))
        XCTAssertFalse(t.contains(key: "b"))
        XCTAssertEqual(t.evictedUndecided, 0)
        try put(&t, "f", 2 * kib) // a and c undecided, d beyond the look-ahead: a
        XCTAssertFalse(t.contains(key: "a"))
        XCTAssertEqual(t.evictedUndecided, 1)
        XCTAssertTrue(t.contains(key: "c") && t.contains(key: "d"))
        guard case .found(let r) = t.acquireRead(key: "c", now: 0) else { return XCTFail() }
        try t.releaseRead(r.handle)
        t.decide(r.handle, .refused)
        XCTAssertEqual(t.coldest(bytes: 1 << 20).map(\.key), ["e", "f"])
        try read(&t, "c") // wanted again: undecided again
        XCTAssertEqual(t.coldest(bytes: 1 << 20).map(\.key), ["e", "f", "c"])
        let rewrite = try t.beginWrite(key: "d", size: 2 * kib, mode: .upsert, now: 0)
        XCTAssertTrue(rewrite.inPlace)
        try t.commitWrite(rewrite, now: 0)
        XCTAssertTrue(t.coldest(bytes: 1 << 20).map(\.key).contains("d"))
        XCTAssertNil(t.invariantViolation())
    }

    /// A lower tier's hold: no lease, no move in the eviction order, only the version it was
    /// told about; eviction may hide a held object, whose space comes back at the release.
    func testAHoldInPlaceLeavesTheEvictionOrderAndTakesOnlyItsVersion() throws {
        var t = table(kib: 8, lease: 5 * Self.second, watermark: 1, ratio: 0.01)
        let a = try put(&t, "a", 2 * kib)
        try put(&t, "b", 2 * kib)
        guard let (held, expiry) = t.holdInPlace(a.handle, now: 0) else { return XCTFail("a is visible") }
        XCTAssertNil(expiry)
        XCTAssertEqual(t.activeLeases, 0)
        XCTAssertEqual(t.evictionOrder(), ["a", "b"], "still first to go")
        try put(&t, "c", 2 * kib)
        try put(&t, "d", 2 * kib)
        try put(&t, "e", 2 * kib) // evicts a although held
        XCTAssertFalse(t.contains(key: "a"))
        XCTAssertNil(t.invariantViolation())
        let usedWhileHeld = t.usedBytes
        try t.releaseRead(held.handle)
        XCTAssertEqual(t.usedBytes, usedWhileHeld - 2 * kib, "its space comes back at the release")
        let d = try XCTUnwrap(t.coldest(bytes: 1 << 20).first { $0.key == "d" })
        try put(&t, "d", 1 * kib, .upsert) // a newer version: the old handle holds nothing
        XCTAssertNil(t.holdInPlace(d.handle, now: 0))
        let c = try XCTUnwrap(t.coldest(bytes: 1 << 20).first { $0.key == "c" })
        var ttl = WriteOptions.default
        ttl.ttl = 7 * Self.second
        let rewrite = try t.beginWrite(key: "c", size: 2 * kib, mode: .upsert, options: ttl, now: 0)
        XCTAssertTrue(rewrite.inPlace)
        try t.commitWrite(rewrite, now: 0) // same version, new bytes and TTL: the hold says so
        guard let (hc, cExpiry) = t.holdInPlace(c.handle, now: 0) else { return XCTFail("c is visible") }
        XCTAssertEqual(cExpiry, 7 * Self.second)
        try t.releaseRead(hc.handle)
        XCTAssertNil(t.holdInPlace(a.handle, now: 0))
        XCTAssertNil(t.invariantViolation())
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

    func testUpsertOfALeasedObjectKeepsItsBytesOnlyWhileAReaderHoldsThem() throws {
        var t = table(kib: 64)
        let first = try put(&t, "a")
        guard case .found(let held) = t.acquireRead(key: "a", now: 0) else { return XCTFail() }
        let w = try t.beginWrite(key: "a", size: 1024, mode: .upsert, now: 1)
        XCTAssertFalse(w.inPlace, "a leased object is never rewritten in place")
        XCTAssertNotEqual(w.offset, first.offset)
        try t.commitWrite(w, now: 1)
        XCTAssertEqual(t.usedBytes, 2048, "the old version is hidden but kept for its reader")
        XCTAssertEqual(t.objectCount, 1)
        guard case .found(let r) = t.acquireRead(key: "a", now: 2) else { return XCTFail() }
        XCTAssertEqual(r.offset, w.offset, "readers see the new value at once")
        try t.releaseRead(r.handle)
        try t.releaseRead(held.handle)
        XCTAssertEqual(t.usedBytes, 1024, "freed when its last reader is done, lease or not")
        XCTAssertEqual(t.activeLeases, 1, "the new version's lease from the read at 2 ns")
        XCTAssertNil(t.invariantViolation())
        // A lease alone (exists, size) keeps no hidden bytes: nobody copies them.
        _ = t.lease(key: "a", now: 3)
        let again = try t.beginWrite(key: "a", size: 1024, mode: .upsert, now: 4)
        try t.commitWrite(again, now: 4)
        XCTAssertEqual(t.usedBytes, 1024)
        XCTAssertNil(t.invariantViolation())
    }

    func testAHoldForARemoteReaderKeepsTheBytesOfARemovedObject() throws {
        var t = table(kib: 64)
        try put(&t, "a")
        guard let (size, replicas, hold, _) = t.holdReplicas(key: "a", now: 1) else { return XCTFail() }
        XCTAssertEqual(size, 1024)
        XCTAssertEqual(replicas.count, 1)
        try t.remove(key: "a", force: true, now: 2)
        XCTAssertEqual(t.usedBytes, 1024, "the remote reader may still be copying")
        XCTAssertEqual(t.activeLeases, 0, "a forced removal ends the lease")
        let w = try t.beginWrite(key: "b", size: 60 * 1024, mode: .put, now: 3)
        XCTAssertNotEqual(w.offset, replicas[0].offset)
        try t.releaseRead(hold)
        XCTAssertEqual(t.usedBytes, 60 * 1024, "freed once the reader is done")
        XCTAssertNil(t.invariantViolation())
    }

    func testExpiredObjectsDisappear() throws {
        var t = table(kib: 64)
        try put(&t, "a", options: WriteOptions(ttl: 10 * Self.second), at: 5)
        XCTAssertEqual(t.cacheState(key: "a")?.expiresAt, 10 * Self.second + 5)
        guard case .found(let r) = t.acquireRead(key: "a", now: 10 * Self.second + 4) else { return XCTFail() }
        // Expiry hides a leased, held object at once; its bytes stay until the read ends.
        XCTAssertEqual(t.acquireRead(key: "a", now: 10 * Self.second + 5), .notFound)
        XCTAssertEqual(t.expiredObjects, 1)
        XCTAssertEqual(t.usedBytes, kib)
        try t.releaseRead(r.handle)
        XCTAssertEqual(t.usedBytes, 0, "no reader left: the lease keeps nothing hidden")
        XCTAssertEqual(t.activeLeases, 0)
        XCTAssertNil(t.invariantViolation())
    }

    func testUpsertAppliesItsOwnOptions() throws {
        var t = table(kib: 64)
        try put(&t, "a", options: WriteOptions(hardPin: true, ttl: Self.second))
        try put(&t, "a", 1024, .upsert) // same size, no reader: in place, options replaced
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
                XCTAssertTrue(($0 as? KVError)?.message.contains("TTL") ?? false)
            }
            XCTAssertThrowsError(try WriteOptions(hardPin: false, softPin: true, softPinSeconds: bad, ttlSeconds: nil, policy: p))
        }
        XCTAssertThrowsError(try WriteOptions(hardPin: true, softPin: true, softPinSeconds: nil, ttlSeconds: nil, policy: p))
        XCTAssertThrowsError(try WriteOptions(hardPin: false, softPin: false, softPinSeconds: 3, ttlSeconds: nil, policy: p))
        let soft = try? WriteOptions(hardPin: false, softPin: true, softPinSeconds: nil, ttlSeconds: 2.5, policy: p)
        XCTAssertEqual(soft, WriteOptions(softPinTTL: p.softPinTTL, ttl: 2_500_000_000))
        XCTAssertNoThrow(try CachePolicy(leaseSeconds: 0, softPinSeconds: 1, highWatermark: 1, evictionRatio: 1))
        for (lease, soft, wm, ratio) in [
            (-1.0, 1.0, 0.9, 0.05), (1, 0, 0.9, 0.05), (1, 1, 0, 0.05), (1, 1, 1.5, 0.05),
            (1, 1, 0.9, 0), (1, 1, 0.9, .nan), (.infinity, 1, 0.9, 0.05)
        ] {
            XCTAssertThrowsError(try CachePolicy(leaseSeconds: lease, softPinSeconds: soft, highWatermark: wm, evictionRatio: ratio)) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
            }
        }
    }

    // MARK: timer queue

    func testTimerQueueMatchesAReferenceModel() {
        var q = TimerQueue()
        var model: [Int: Nanoseconds] = [:] // slot * 3 + kind -> deadline
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
