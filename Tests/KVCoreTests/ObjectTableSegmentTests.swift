import XCTest
import KVTestSupport
@testable import KVCore

/// Several segments: replica placement, reads that prefer a segment, unmounting (a client
/// that died), eviction across segments, and the accounting under random operations.
final class ObjectTableSegmentTests: XCTestCase {
    let kib = 1024

    func table(segments: [SegmentID], kib size: Int, lease: Nanoseconds = 0) throws -> ObjectTable {
        var t = ObjectTable(policy: CachePolicy(leaseTTL: lease, softPinTTL: 1_000_000_000, highWatermark: 0.9, evictionRatio: 0.05))
        for s in segments { try t.mount(segment: s, capacity: size * kib) }
        return t
    }

    func put(
        _ t: inout ObjectTable, _ key: ObjectKey, _ size: Int = 1024, replicas: Int = 1,
        preferred: SegmentID? = nil
    ) throws -> WriteTicket {
        let w = try t.beginWrite(key: key, size: size, mode: .put, replicas: replicas, preferred: preferred, now: 0)
        try t.commitWrite(w, now: 0)
        return w
    }

    func code(_ body: () throws -> Void) -> KVError.Code? {
        do { try body() } catch { return (error as? KVError)?.code }
        return nil
    }

    func testMountRules() throws {
        var t = try table(segments: [7], kib: 64)
        XCTAssertEqual(code { try t.mount(segment: 7, capacity: 1 << 20) }, .invalidArgument)
        XCTAssertEqual(code { try t.mount(segment: 8, capacity: 10) }, .invalidArgument)
        XCTAssertEqual(code { _ = try t.unmount(segment: 9, now: 0) }, .invalidArgument)
        XCTAssertEqual(t.capacity, 64 * kib)
        _ = try t.unmount(segment: 7, now: 0)
        XCTAssertEqual(t.capacity, 0)
        XCTAssertEqual(code { _ = try put(&t, "a") }, .noSpace, "no segment mounted")
        try t.mount(segment: 7, capacity: 32 * kib) // a client may come back with the same id
        _ = try put(&t, "a")
        XCTAssertNil(t.invariantViolation())
    }

    func testARemountedSegmentTakesNoObjectUntilItIsReady() throws {
        var t = ObjectTable(policy: CachePolicy(leaseTTL: 100, softPinTTL: 1_000_000_000, highWatermark: 0.9, evictionRatio: 0.05))
        try t.mount(segment: 1, capacity: 64 * kib, readyAt: 1_000, now: 10)
        XCTAssertEqual(t.usedBytes, 64 * kib, "its whole space is taken until then")
        XCTAssertNil(t.invariantViolation())
        XCTAssertEqual(code { _ = try t.beginWrite(key: "a", size: 10, mode: .put, now: 999) }, .noSpace)
        try t.mount(segment: 2, capacity: 64 * kib, now: 999) // a fresh segment: ready at once
        XCTAssertEqual(try t.beginWrite(key: "a", size: 10, mode: .put, now: 999).segment, 2)
        let w = try t.beginWrite(key: "b", size: 60 * kib, mode: .put, preferred: 1, now: 1_000)
        XCTAssertEqual(w.segment, 1, "ready now")
        XCTAssertNil(t.invariantViolation())
        // Unmounted before it is ready: nothing is left behind.
        try t.mount(segment: 3, capacity: 64 * kib, readyAt: 5_000, now: 1_000)
        _ = try t.unmount(segment: 3, now: 1_001)
        XCTAssertTrue(t.quarantined.isEmpty)
        XCTAssertNil(t.invariantViolation())
    }

    func testReplicasGoToDistinctSegmentsPreferredFirst() throws {
        var t = try table(segments: [1, 2, 3], kib: 64)
        let w = try put(&t, "a", replicas: 3, preferred: 2)
        XCTAssertEqual(w.segment, 2)
        XCTAssertEqual(Set(w.replicas.map(\.segment)), [1, 2, 3])
        XCTAssertEqual(t.usedBytes, 3 * kib)
        let few = try put(&t, "b", replicas: 5)
        XCTAssertEqual(few.replicas.count, 3, "best effort: only three segments exist")
        XCTAssertEqual(code { _ = try put(&t, "c", replicas: 0) }, .invalidArgument)
        XCTAssertEqual(code { _ = try put(&t, "c", replicas: ObjectTable.maxReplicas + 1) }, .invalidArgument)
        XCTAssertFalse(t.contains(key: "c"))
        // Reads take the preferred segment's replica.
        for seg: SegmentID in [1, 2, 3] {
            guard case .found(let r) = t.acquireRead(key: "a", now: 0, prefer: seg) else { return XCTFail() }
            XCTAssertEqual(r.segment, seg)
            XCTAssertTrue(w.replicas.contains(Replica(segment: seg, offset: r.offset)))
            try t.releaseRead(r.handle)
        }
        XCTAssertNil(t.invariantViolation())
    }

    func testUnmountLosesOnlyObjectsWithoutAnotherReplica() throws {
        var t = try table(segments: [1, 2], kib: 64, lease: 5_000_000_000)
        _ = try put(&t, "both", replicas: 2)
        _ = try put(&t, "only1", preferred: 1)
        _ = try put(&t, "only2", preferred: 2)
        guard case .found(let r) = t.acquireRead(key: "only1", now: 0) else { return XCTFail() } // held and leased
        let inFlight = try t.beginWrite(key: "writing", size: 100, mode: .put, preferred: 1, now: 0)
        XCTAssertEqual(inFlight.segment, 1)
        let report = try t.unmount(segment: 1, now: 1)
        XCTAssertEqual(report.lostObjects, ["only1"])
        XCTAssertEqual(report.degradedObjects, 1)
        XCTAssertEqual(report.failedWrites, 1)
        XCTAssertEqual(t.replicas(key: "both")?.map(\.segment), [2])
        XCTAssertFalse(t.contains(key: "only1"))
        XCTAssertTrue(t.contains(key: "only2"))
        XCTAssertEqual(t.capacity, 64 * kib)
        XCTAssertEqual(t.usedBytes, 2 * kib, "only segment 2 counts")
        XCTAssertEqual(t.activeLeases, 0, "the lost object's lease ended with it")
        XCTAssertEqual(code { try t.commitWrite(inFlight, now: 2) }, .transfer)
        XCTAssertFalse(t.contains(key: "writing"))
        _ = try put(&t, "writing") // the key is free again
        try t.releaseRead(r.handle)
        XCTAssertEqual(t.activeReaders, 0)
        XCTAssertNil(t.invariantViolation())
    }

    func testEvictionSpansSegments() throws {
        var t = try table(segments: [1, 2, 3], kib: 128)
        for i in 0..<600 { _ = try put(&t, ObjectKey(stringLiteral: "k\(i)"), replicas: 2) }
        XCTAssertGreaterThan(t.evictedObjects, 0)
        XCTAssertLessThanOrEqual(t.usedBytes, t.capacity)
        for i in 590..<600 { XCTAssertEqual(t.replicas(key: ObjectKey(stringLiteral: "k\(i)"))?.count, 2) }
        XCTAssertNil(t.invariantViolation())
    }

    /// Random puts (1-3 replicas), upserts, reads, removes, mounts and unmounts, with time
    /// moving: every counter must match a recount after every step.
    func testAccountingSurvivesRandomOperations() throws {
        var t = try table(segments: [0, 1, 2], kib: 96, lease: 3_000)
        var rng = SplitMix64(seed: 42)
        var held: [VersionHandle] = []
        var nextSegment: SegmentID = 3
        var now: Nanoseconds = 0
        for step in 0..<20_000 {
            now += rng.next() % 200
            let key = ObjectKey(stringLiteral: "k\(rng.next() % 300)")
            switch rng.next() % 100 {
            case 0..<35:
                let size = 64 + Int(rng.next() % 6000)
                let mode: WriteMode = rng.next() % 3 == 0 ? .upsert : .put
                let opts = [WriteOptions.default, WriteOptions(hardPin: true), WriteOptions(softPinTTL: 500), WriteOptions(ttl: 700)][Int(rng.next() % 4)]
                if let w = try? t.beginWrite(key: key, size: size, mode: mode, options: opts, replicas: 1 + Int(rng.next() % 3), now: now) {
                    if rng.next() % 8 == 0 { try t.abortWrite(w, now: now) } else { try? t.commitWrite(w, now: now) }
                }
            case 35..<65:
                if case .found(let r) = t.acquireRead(key: key, now: now, prefer: SegmentID(rng.next() % 4)) { held.append(r.handle) }
            case 65..<80:
                if !held.isEmpty { try t.releaseRead(held.remove(at: Int(rng.next() % UInt64(held.count)))) }
            case 80..<90:
                try? t.remove(key: key, force: rng.next() % 2 == 0, now: now)
            case 90..<93:
                _ = t.lease(key: key, now: now)
            case 93..<95:
                _ = t.removeAll(force: rng.next() % 4 == 0, now: now)
            case 95..<98:
                if t.segmentCount > 1 {
                    let ids = t.segments.slots.filter(\.mounted).map(\.id)
                    _ = try t.unmount(segment: ids[Int(rng.next() % UInt64(ids.count))], now: now)
                }
            default:
                if t.segmentCount < 5 {
                    try t.mount(segment: nextSegment, capacity: (32 + Int(rng.next() % 96)) * kib)
                    nextSegment += 1
                }
            }
            if let v = t.invariantViolation() { return XCTFail("step \(step): \(v)") }
        }
        for h in held { try t.releaseRead(h) }
        t.advance(now: now + 1_000_000)
        _ = t.removeAll(force: true, now: now + 1_000_000)
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertNil(t.invariantViolation())
    }
}
