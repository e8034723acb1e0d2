import Dispatch
import Synchronization
import XCTest
import KVAccelerator
import KVTestSupport
import KVCore
import KVTransfer
@testable import KVStore

/// The cache rules seen through the client: leases from every read call, eviction under
/// concurrent load, pins and statistics.
final class StoreClientCacheTests: XCTestCase {
    func stat(_ s: StoreClient, _ name: String) -> Int {
        s.statistics().first { $0.name.description == name }!.value
    }

    func testEveryReadCallLeasesAndTheLeaseEndsWithTime() throws {
        let clock = ManualClock()
        let s = try StoreClient(segmentSize: 1 << 20, clock: clock.clock)
        defer { s.close() }
        for k in ["get", "exists", "size", "untouched"] { try put(s, ObjectKey(stringLiteral: k), [1, 2, 3]) }
        _ = try get(s, "get")
        _ = try s.exists(key: "exists")
        _ = try s.size(key: "size")
        XCTAssertEqual(stat(s, "leases_active"), 3)
        for k in ["get", "exists", "size"] {
            XCTAssertThrowsError(try s.remove(key: ObjectKey(stringLiteral: k))) { XCTAssertEqual(($0 as? KVError)?.code, .leaseHeld) }
        }
        try s.remove(key: "untouched")
        clock.advance(seconds: 5)
        XCTAssertEqual(stat(s, "leases_active"), 0)
        try s.remove(key: "get")
        try s.remove(key: "exists")
        try s.remove(key: "size")
        XCTAssertEqual(stat(s, "objects"), 0)
    }

    func testStatisticsCountCacheEvents() throws {
        let clock = ManualClock()
        let s = try StoreClient(segmentSize: 64 << 10, clock: clock.clock)
        defer { s.close() }
        let v = [UInt8](repeating: 7, count: 4096)
        try v.withUnsafeBytes { b in
            var r = MemoryRegion(b.baseAddress!, length: b.count)
            try withUnsafePointer(to: &r) {
                try s.put(key: "pinned", parts: UnsafeBufferPointer(start: $0, count: 1), mode: .put, options: WriteOptions(hardPin: true))
                try s.put(key: "soft", parts: UnsafeBufferPointer(start: $0, count: 1), mode: .put, options: WriteOptions(softPinTTL: 1_000_000_000))
                try s.put(key: "ttl", parts: UnsafeBufferPointer(start: $0, count: 1), mode: .put, options: WriteOptions(hardPin: true, ttl: 2_000_000_000))
            }
        }
        XCTAssertEqual(stat(s, "hard_pinned_bytes"), 8192)
        XCTAssertEqual(stat(s, "soft_pinned_bytes"), 4096)
        for i in 0..<40 { try put(s, ObjectKey(stringLiteral: "k\(i)"), v) } // 172 KiB through 64 KiB
        XCTAssertGreaterThan(stat(s, "evicted_objects"), 20)
        XCTAssertEqual(stat(s, "evicted_bytes"), stat(s, "evicted_objects") * 4096)
        XCTAssertTrue(try s.exists(key: "pinned"))
        XCTAssertTrue(try s.exists(key: "soft"), "soft-pinned objects go after every ordinary one")
        XCTAssertThrowsError(try get(s, "k0")) { XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound) }
        XCTAssertEqual(stat(s, "puts"), 43)
        XCTAssertEqual(stat(s, "hits"), 0, "exists is not a get")
        XCTAssertEqual(stat(s, "misses"), 1)
        XCTAssertEqual(stat(s, "gets"), 1)
        clock.advance(seconds: 2)
        XCTAssertEqual(stat(s, "soft_pinned_bytes"), 0)
        XCTAssertEqual(stat(s, "expired_objects"), 1, "hard-pinned objects still expire")
        XCTAssertFalse(try s.exists(key: "ttl"))
        XCTAssertEqual(stat(s, "hard_pinned_bytes"), 4096)
        XCTAssertEqual(stat(s, "bytes_used") + stat(s, "bytes_free"), stat(s, "capacity"))
    }

    /// 8 readers `get` random keys while 2 writers fill the store to 12 times its capacity.
    /// Every byte a reader receives must belong to the object it asked for, complete; the
    /// only error a reader may see is objectNotFound (evicted or not yet written). Leases are
    /// short so that readers cannot pin the whole store; writers retry the rare noSpace.
    func testReadersSeeOnlyWholeObjectsWhileWritersFillFarPastCapacity() throws {
        let capacity = 2 << 20
        var policy = CachePolicy()
        policy.leaseTTL = 1_000_000 // 1 ms
        let s = try StoreClient(segmentSize: capacity, cache: policy)
        defer { s.close() }
        let written = Atomic(0), done = Atomic(false)
        let badReads = Atomic(0), otherErrors = Atomic(0), hits = Atomic(0), retries = Atomic(0)
        let perWriter = 12 * capacity / 2
        runThreads(10) { thread in
            var rng = SplitMix64(seed: UInt64(thread) + 100)
            if thread < 2 {
                var bytes = 0, i = 0
                while bytes < perWriter {
                    let length = 1024 + Int(rng.next() % 30_000)
                    let id = UInt64(thread) << 32 | UInt64(i)
                    let key = ObjectKey(stringLiteral: "w\(thread)-\(i)")
                    let v = StoreClientTests.value(tag: id, length: length)
                    while true {
                        do { try put(s, key, v); break } catch let e as KVError where e.code == .noSpace {
                            retries.add(1, ordering: .relaxed)
                            sched_yield()
                        } catch { otherErrors.add(1, ordering: .relaxed); break }
                    }
                    bytes += length
                    i += 1
                    written.store(max(written.load(ordering: .relaxed), i), ordering: .relaxed)
                }
                if thread == 0 { done.store(true, ordering: .releasing) }
                return
            }
            var out = [UInt8](repeating: 0, count: 32 << 10)
            while !done.load(ordering: .acquiring) {
                let n = written.load(ordering: .relaxed)
                guard n > 0 else { continue }
                let w = Int(rng.next() % 2), i = Int(rng.next() % UInt64(n))
                do {
                    let size: Int = try out.withUnsafeMutableBytes { b in
                        var r = MemoryRegion(b.baseAddress!, length: b.count)
                        return try withUnsafePointer(to: &r) {
                            try s.get(key: ObjectKey(stringLiteral: "w\(w)-\(i)"), into: UnsafeBufferPointer(start: $0, count: 1))
                        }
                    }
                    hits.add(1, ordering: .relaxed)
                    let ok = out.withUnsafeBytes { b in
                        StoreClientTests.check(b, count: size) && b.loadUnaligned(as: UInt64.self) == UInt64(w) << 32 | UInt64(i)
                    }
                    if !ok { badReads.add(1, ordering: .relaxed) }
                } catch let e as KVError where e.code == .objectNotFound {
                } catch {
                    otherErrors.add(1, ordering: .relaxed)
                }
            }
        }
        XCTAssertEqual(badReads.load(ordering: .relaxed), 0, "a reader got bytes of another object or a torn value")
        XCTAssertEqual(otherErrors.load(ordering: .relaxed), 0)
        XCTAssertGreaterThan(hits.load(ordering: .relaxed), 0)
        XCTAssertGreaterThan(stat(s, "evicted_objects"), 0)
        XCTAssertLessThanOrEqual(stat(s, "bytes_used"), capacity)
        XCTAssertEqual(stat(s, "active_readers"), 0)
    }
}
