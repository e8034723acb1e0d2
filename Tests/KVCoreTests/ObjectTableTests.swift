import XCTest
@testable import KVCore
import KVTestSupport

final class ObjectTableTests: XCTestCase {
    /// The rules of these tests predate leases: reads protect bytes only while held.
    static let noLeases = CachePolicy(leaseTTL: 0, softPinTTL: 1_000_000_000, highWatermark: 1, evictionRatio: 0.05)

    func put(_ t: inout ObjectTable, _ key: ObjectKey, _ size: Int, _ mode: WriteMode = .put) throws -> WriteTicket {
        let w = try t.beginWrite(key: key, size: size, mode: mode, now: 0)
        try t.commitWrite(w, now: 0)
        return w
    }

    func read(_ t: inout ObjectTable, _ key: ObjectKey) -> ReadTicket? {
        if case .found(let r) = t.acquireRead(key: key, now: 0) { return r }
        return nil
    }

    func testObjectIsVisibleOnlyAfterCommit() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        let w = try t.beginWrite(key: "a", size: 100, mode: .put, now: 0)
        XCTAssertFalse(t.contains(key: "a"))
        XCTAssertEqual(t.acquireRead(key: "a", now: 0), .notFound)
        XCTAssertEqual(t.objectCount, 0)
        XCTAssertEqual(t.usedBytes, 128)
        try t.commitWrite(w, now: 0)
        XCTAssertEqual(t.size(key: "a"), 100)
        XCTAssertEqual(t.objectCount, 1)
        XCTAssertEqual(t.objectBytes, 100)
    }

    func testPutOfExistingOrPendingKeyFails() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        _ = try put(&t, "a", 10)
        XCTAssertThrowsError(try t.beginWrite(key: "a", size: 10, mode: .put, now: 0)) { XCTAssertEqual(($0 as? KVError)?.code, .objectExists) }
        let w = try t.beginWrite(key: "b", size: 10, mode: .put, now: 0)
        XCTAssertThrowsError(try t.beginWrite(key: "b", size: 10, mode: .put, now: 0)) { XCTAssertEqual(($0 as? KVError)?.code, .objectExists) }
        try t.abortWrite(w, now: 0)
        XCTAssertEqual(t.usedBytes, 64)
        _ = try put(&t, "b", 10)
    }

    func testAbortLeavesNothing() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        let w = try t.beginWrite(key: "a", size: 5000, mode: .put, now: 0)
        try t.abortWrite(w, now: 0)
        XCTAssertFalse(t.contains(key: "a"))
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertThrowsError(try t.commitWrite(w, now: 0), "a stale ticket must not commit")
    }

    func testUpsertOfSameSizeRewritesInPlaceAndReadersWait() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        let first = try put(&t, "a", 256)
        let w = try t.beginWrite(key: "a", size: 256, mode: .upsert, now: 0)
        XCTAssertTrue(w.inPlace)
        XCTAssertEqual(w.offset, first.offset)
        XCTAssertEqual(t.acquireRead(key: "a", now: 0), .busy)
        try t.commitWrite(w, now: 0)
        XCTAssertNotNil(read(&t, "a"))
        XCTAssertEqual(t.usedBytes, 256)
    }

    func testUpsertWhileReadHeldKeepsOldBytesUntilRelease() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        let first = try put(&t, "a", 256)
        let r = try XCTUnwrap(read(&t, "a"))
        let w = try t.beginWrite(key: "a", size: 256, mode: .upsert, now: 0)
        XCTAssertFalse(w.inPlace, "a read version is never overwritten")
        XCTAssertNotEqual(w.offset, first.offset)
        try t.commitWrite(w, now: 0)
        XCTAssertEqual(t.usedBytes, 512, "old version still held")
        XCTAssertEqual(t.objectCount, 1)
        XCTAssertEqual(t.objectBytes, 256)
        try t.releaseRead(r.handle)
        XCTAssertEqual(t.usedBytes, 256)
        XCTAssertEqual(t.activeReaders, 0)
    }

    func testUpsertOfOtherSizeReplaces() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        _ = try put(&t, "a", 100)
        _ = try put(&t, "a", 1000, .upsert)
        XCTAssertEqual(t.size(key: "a"), 1000)
        XCTAssertEqual(t.usedBytes, 1024)
        XCTAssertEqual(t.objectCount, 1)
    }

    func testAbortedInPlaceUpsertRemovesTheObject() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        _ = try put(&t, "a", 64)
        let w = try t.beginWrite(key: "a", size: 64, mode: .upsert, now: 0)
        XCTAssertTrue(w.inPlace)
        try t.abortWrite(w, now: 0)
        XCTAssertFalse(t.contains(key: "a"))
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertEqual(t.objectCount, 0)
    }

    func testPutLosingARaceToUpsertIsSupersededAndFreed() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        let p = try t.beginWrite(key: "a", size: 64, mode: .put, now: 0)
        _ = try put(&t, "a", 32, .upsert)
        XCTAssertNoThrow(try t.commitWrite(p, now: 0), "ordered just before the upsert, not refused")
        XCTAssertEqual(t.size(key: "a"), 32, "the upsert's value stays")
        XCTAssertEqual(t.usedBytes, 64, "the put's space is freed (32 bytes round up to a 64-byte granule)")
        XCTAssertEqual(t.objectCount, 1)
        XCTAssertEqual(t.supersededPuts, 1)
    }

    func testRemoveDuringReadDefersTheFree() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        _ = try put(&t, "a", 64)
        let r = try XCTUnwrap(read(&t, "a"))
        try t.remove(key: "a", now: 0)
        XCTAssertFalse(t.contains(key: "a"))
        XCTAssertEqual(t.usedBytes, 64)
        XCTAssertThrowsError(try t.remove(key: "a", now: 0)) { XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound) }
        try t.releaseRead(r.handle)
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertThrowsError(try t.releaseRead(r.handle), "a released hold cannot be released again")
    }

    func testRemoveDuringInPlaceRewriteFreesAtCommit() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        _ = try put(&t, "a", 64)
        let w = try t.beginWrite(key: "a", size: 64, mode: .upsert, now: 0)
        try t.remove(key: "a", now: 0)
        XCTAssertEqual(t.usedBytes, 64)
        try t.commitWrite(w, now: 0)
        XCTAssertEqual(t.usedBytes, 0)
        XCTAssertFalse(t.contains(key: "a"))
    }

    func testRemoveAllKeepsPendingPuts() throws {
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        for i in 0..<10 { _ = try put(&t, "k\(i)", 100) }
        let pending = try t.beginWrite(key: "p", size: 100, mode: .put, now: 0)
        XCTAssertEqual(t.removeAll(now: 0), 10)
        XCTAssertEqual(t.objectCount, 0)
        XCTAssertEqual(t.objectBytes, 0)
        XCTAssertEqual(t.usedBytes, 128)
        XCTAssertThrowsError(try t.beginWrite(key: "p", size: 1, mode: .put, now: 0))
        try t.commitWrite(pending, now: 0)
        XCTAssertEqual(t.objectCount, 1)
    }

    func testNoSpaceNamesTheProblem() throws {
        var t = ObjectTable(capacity: 4096)
        XCTAssertThrowsError(try t.beginWrite(key: "big", size: 4097, mode: .put, now: 0)) {
            XCTAssertEqual(($0 as? KVError)?.code, .noSpace)
            XCTAssertTrue(($0 as? KVError)?.message.contains("larger than the segment") ?? false)
        }
        try t.commitWrite(t.beginWrite(key: "a", size: 4096, mode: .put, options: WriteOptions(hardPin: true), now: 0), now: 0)
        XCTAssertThrowsError(try t.beginWrite(key: "b", size: 1, mode: .put, now: 0)) { XCTAssertEqual(($0 as? KVError)?.code, .noSpace) }
        XCTAssertFalse(t.contains(key: "b"))
        XCTAssertThrowsError(try t.beginWrite(key: "b", size: 1, mode: .put, now: 0), "a failed put leaves no pending key") {
            XCTAssertEqual(($0 as? KVError)?.code, .noSpace)
        }
        XCTAssertThrowsError(try t.beginWrite(key: "z", size: 0, mode: .put, now: 0)) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
    }

    func testKeyPagesWalkEveryKeyOnceInByteOrder() throws {
        var t = ObjectTable(capacity: 64 << 20, policy: Self.noLeases)
        var rng = SplitMix64(seed: 7)
        var all = Set<ObjectKey>()
        for i in 0..<600 {
            let k = try ObjectKey("k\(rng.next() % 100_000)-" + String(repeating: "x", count: Int(rng.next() % 60)) + "\(i)")
            _ = try put(&t, k, 64)
            all.insert(k)
        }
        let pending = try t.beginWrite(key: "not-committed", size: 64, mode: .put, now: 0)
        // Small pages: 300 bytes hold only a few keys each.
        var seen: [ObjectKey] = []
        var after: ObjectKey? = nil
        var pages = 0
        while true {
            let page = t.keysPage(after: after, maxBytes: 300, now: 0)
            pages += 1
            XCTAssertLessThanOrEqual(page.keys.reduce(0) { $0 + 4 + $1.count }, 300)
            XCTAssertEqual(page.keys, page.keys.sorted())
            seen += page.keys
            guard page.more, let last = page.keys.last else { break }
            after = last
            // Keys removed and added during the walk: those present throughout still come once.
            if pages == 5 { try t.remove(key: seen[0], force: true, now: 0); all.remove(seen[0]) }
        }
        XCTAssertGreaterThan(pages, 50)
        XCTAssertEqual(seen, seen.sorted(), "each page continues after the previous one")
        XCTAssertEqual(Set(seen).count, seen.count, "no key twice")
        XCTAssertTrue(all.isSubset(of: Set(seen)), "every key present throughout")
        XCTAssertFalse(seen.contains("not-committed"))
        try t.abortWrite(pending, now: 0)
        // One big page holds everything.
        let whole = t.keysPage(after: nil, now: 0)
        XCTAssertFalse(whole.more)
        XCTAssertEqual(Set(whole.keys), all)
        XCTAssertEqual(t.keysPage(after: whole.keys.last, now: 0), ObjectTable.KeysPage(keys: [], more: false))
        XCTAssertTrue(ObjectKey("a") < "ab" && ObjectKey("ab") < "b" && !(ObjectKey("b") < "b") && ObjectKey("Z") < "a")
    }

    func testAPageOfKeysFromALyingMasterIsRefused() throws {
        typealias Page = ObjectTable.KeysPage
        XCTAssertNoThrow(try Page(keys: ["a", "b"], more: true).validate(after: nil))
        XCTAssertNoThrow(try Page(keys: [], more: false).validate(after: "z"))
        func refused(_ p: Page, after: ObjectKey?, _ line: UInt = #line) {
            XCTAssertThrowsError(try p.validate(after: after), line: line) { XCTAssertEqual(($0 as? KVError)?.code, .transfer) }
        }
        refused(Page(keys: ["b", "a"], more: false), after: nil) // out of order
        refused(Page(keys: ["a", "a"], more: false), after: nil) // repeated
        refused(Page(keys: ["a", "c"], more: true), after: "b") // not after the cursor: a walk that never ends
        refused(Page(keys: [], more: true), after: "b") // claims more, moves nowhere
        let big = (0..<1100).map { i in
            try! ObjectKey(String(repeating: "0", count: 5 - String(i).count) + String(i) + String(repeating: "x", count: 1000))
        }
        refused(Page(keys: big, more: false), after: nil) // larger than the C ABI's page buffer
    }

    func testKeysCompareAsBytesInlineAndOnTheHeap() throws {
        let short: ObjectKey = "block-1", long = try ObjectKey(String(repeating: "x", count: 200))
        XCTAssertEqual(short, try ObjectKey(String("block-1")))
        XCTAssertNotEqual(short, try ObjectKey(String("block-2")))
        XCTAssertEqual(long, try ObjectKey(String(repeating: "x", count: 200)))
        XCTAssertNotEqual(long, try ObjectKey(String(repeating: "x", count: 199)))
        XCTAssertNotEqual(try ObjectKey(String("a\u{0}")), try ObjectKey(String("a")), "length is part of the key")
        XCTAssertEqual(try ObjectKey(String("é")).count, 2)
        XCTAssertEqual(long.description.count, 200)
        XCTAssertEqual(Set([short, long, "block-1"]).count, 2)
        var t = ObjectTable(capacity: 1 << 20, policy: Self.noLeases)
        for n in [1, 23, 24, 25, 1024] {
            let k = try ObjectKey(String(repeating: "k", count: n))
            _ = try put(&t, k, n)
            XCTAssertEqual(t.size(key: k), n)
        }
        let empty = String()
        XCTAssertThrowsError(try ObjectKey(empty))
        XCTAssertThrowsError(try ObjectKey(String(repeating: "k", count: 1025)))
    }

    func testKeyRules() {
        XCTAssertThrowsError(try ObjectKey.validate(byteCount: 0))
        XCTAssertThrowsError(try ObjectKey.validate(byteCount: ObjectKey.maxBytes + 1))
        XCTAssertNoThrow(try ObjectKey.validate(byteCount: ObjectKey.maxBytes))
    }
}
