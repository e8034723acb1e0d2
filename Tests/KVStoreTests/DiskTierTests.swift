import XCTest
import KVCore
import KVAccelerator
import KVTestSupport
import Synchronization
@testable import KVStore
#if canImport(Glibc)
import Glibc
#endif

/// The disk tier on its own: the file format, the CRC32C checks, stale transfers, eviction
/// under its capacity, recovery and the directory lock.
final class DiskTierTests: XCTestCase {
    var dir = ""
    let bounceBytes = 4 << 20
    var bounce: UnsafeMutableRawPointer!

    override func setUp() {
        var template = Array("/tmp/kvstore-disk-test-XXXXXX".utf8CString)
        dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        bounce = UnsafeMutableRawPointer.allocate(byteCount: bounceBytes, alignment: 4096)
    }

    override func tearDown() {
        bounce.deallocate()
        _ = dir.withCString { d in system("rm -rf '\(String(cString: d))'") }
    }

    func bytes(_ n: Int, seed: UInt8) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31) &+ seed } }

    func offload(_ t: DiskTier, _ key: ObjectKey, _ b: [UInt8], expires: Int64 = 0) throws {
        XCTAssertTrue(t.beginTransfer(key))
        defer { t.endTransfer(key) }
        try b.withUnsafeBytes { try t.offload(key, from: $0.baseAddress!, size: b.count, expiresAt: expires, bounce: bounce, bounceBytes: bounceBytes) }
    }

    func read(_ t: DiskTier, _ key: ObjectKey) throws -> [UInt8]? {
        guard let c = t.lookup(key) else { return nil }
        var out = [UInt8](repeating: 0, count: c.size)
        let extra = UnsafeMutableRawPointer.allocate(byteCount: bounceBytes, alignment: 4096)
        defer { extra.deallocate() }
        try out.withUnsafeMutableBytes { try t.read(c, into: $0.baseAddress!, bounces: [bounce, extra], bounceBytes: bounceBytes) }
        return out
    }

    func testObjectsRoundTripAcrossPiecesAndAReopen() throws {
        let sizes = [1, 4095, 4096, 1 << 20, (1 << 20) + 7, (4 << 20) + 100] // the last: two pieces on two threads
        do {
            let t = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 30))
            for (i, n) in sizes.enumerated() { try offload(t, ObjectKey("k\(i)"), bytes(n, seed: UInt8(i))) }
            for (i, n) in sizes.enumerated() { XCTAssertEqual(try read(t, ObjectKey("k\(i)")), bytes(n, seed: UInt8(i))) }
            XCTAssertEqual(t.statistics.objects, sizes.count)
            t.close()
        }
        let again = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 30))
        XCTAssertEqual(again.statistics.recovered, sizes.count)
        for (i, n) in sizes.enumerated() { XCTAssertEqual(try read(again, ObjectKey("k\(i)")), bytes(n, seed: UInt8(i))) }
        XCTAssertEqual(again.keys(after: nil, limit: 100).map(\.description), (0..<sizes.count).map { "k\($0)" })
    }

    func testACorruptChunkIsAnErrorAndTheCopyIsDropped() throws {
        let t = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 30))
        let key = ObjectKey("victim")
        try offload(t, key, bytes(3 << 20, seed: 1))
        let file = dir + "/objects/" + DiskRecord.name(1)
        let fd = open(file, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var b: UInt8 = 0
        XCTAssertEqual(pread(fd, &b, 1, 4096 + (2 << 20) + 5), 1)
        b ^= 1
        XCTAssertEqual(pwrite(fd, &b, 1, 4096 + (2 << 20) + 5), 1)
        close(fd)
        XCTAssertThrowsError(try read(t, key)) { XCTAssertEqual(($0 as? KVError)?.code, .checksum) }
        XCTAssertNil(try read(t, key))
        XCTAssertEqual(t.statistics.corrupt, 1)
        XCTAssertEqual(access(file, F_OK), -1)
    }

    func testAWriteOrRemovalDuringAnOffloadDropsIt() throws {
        let t = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 30))
        let key = ObjectKey("k")
        XCTAssertTrue(t.beginTransfer(key))
        XCTAssertFalse(t.beginTransfer(key))
        XCTAssertFalse(t.forget(key)) // a newer version committed meanwhile
        XCTAssertTrue(t.transferIsStale(key))
        let b = bytes(10_000, seed: 3)
        try b.withUnsafeBytes { try t.offload(key, from: $0.baseAddress!, size: b.count, expiresAt: 0, bounce: bounce, bounceBytes: bounceBytes) }
        t.endTransfer(key)
        XCTAssertNil(t.lookup(key))
        XCTAssertEqual(try DirectoryEntries.count(dir + "/objects"), 0)
    }

    func testItsOwnEvictionKeepsItUnderCapacityAndGivesReadObjectsASecondChance() throws {
        let t = try DiskTier(DiskTierOptions(path: dir, capacity: 10 * (4096 + 65536)))
        for i in 0..<10 { try offload(t, ObjectKey("k\(i)"), bytes(65536, seed: UInt8(i))) }
        XCTAssertNotNil(t.lookup(ObjectKey("k0"))) // used: survives the next pass of the hand
        for i in 10..<15 { try offload(t, ObjectKey("k\(i)"), bytes(65536, seed: UInt8(i))) }
        let s = t.statistics
        XCTAssertLessThanOrEqual(s.bytes, t.capacity)
        XCTAssertEqual(s.evictions, 5)
        XCTAssertNotNil(t.lookup(ObjectKey("k0")))
        XCTAssertNil(t.lookup(ObjectKey("k1")))
    }

    func testExpiredCopiesAreGoneAndHalfWrittenFilesAreRemovedAtOpen() throws {
        do {
            let t = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 30))
            try offload(t, ObjectKey("old"), bytes(100, seed: 1), expires: DiskTier.wallNow() - 1)
            try offload(t, ObjectKey("live"), bytes(100, seed: 2), expires: DiskTier.wallNow() + 60_000_000_000)
            XCTAssertNil(t.lookup(ObjectKey("old")))
            XCTAssertNotNil(t.lookup(ObjectKey("live"))?.ttlLeft)
            t.close()
        }
        let tmp = dir + "/objects/" + DiskRecord.name(99) + ".tmp"
        XCTAssertEqual(creat(tmp, 0o600) >= 0, true)
        let t = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 30))
        XCTAssertEqual(access(tmp, F_OK), -1)
        XCTAssertEqual(t.statistics.objects, 1)
    }

    func testOneOpenTierPerDirectory() throws {
        let t = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 20))
        XCTAssertThrowsError(try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 20))) {
            XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
        }
        t.close()
        XCTAssertNoThrow(try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 20)))
    }

    func testAdmissionWantsASecondSighting() throws {
        let t = try DiskTier(DiskTierOptions(path: dir, capacity: 1 << 20, admission: .reuse))
        let a = ObjectKey("a"), b = ObjectKey("b")
        t.note(a)
        t.note(b)
        t.note(b)
        XCTAssertFalse(t.admits(a))
        XCTAssertTrue(t.admits(b))
    }
}

/// Directory entry counts without Foundation.
enum DirectoryEntries {
    static func count(_ path: String) throws -> Int {
        guard let d = opendir(path) else { throw KVError(.internal, "opendir \(path)") }
        defer { closedir(d) }
        var n = 0
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { n += 1 }
        }
        return n
    }
}

/// The disk tier under a store: readers racing upserts through a segment far smaller than
/// the keys' values, so reads go to disk, promotions race writes, and the copier races both.
final class TieredStoreTests: XCTestCase {
    func testReadersRacingUpsertsAcrossTiersSeeOnlyWholeCurrentKeysValues() throws {
        var template = Array("/tmp/kvstore-tiered-test-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        defer { _ = system("rm -rf '\(dir)'") }
        var policy = CachePolicy()
        policy.leaseTTL = 0
        let s = try StoreClient(
            segmentSize: 1 << 20, cache: policy,
            disk: DiskTierOptions(path: dir, capacity: 64 << 20, admission: .all))
        defer { s.close() }
        let done = Atomic(false), badReads = Atomic(0), otherErrors = Atomic(0), hits = Atomic(0)
        runThreads(4) { thread in
            if thread < 2 {
                for i in 0..<600 {
                    let key = ObjectKey(stringLiteral: "w\(thread)-\(i % 24)")
                    do { try put(s, key, StoreClientTests.value(tag: UInt64(thread) << 32 | UInt64(i), length: 40_000), .upsert) } catch {
                        otherErrors.add(1, ordering: .relaxed)
                    }
                    if i % 8 == 0 { usleep(500) }
                }
                if thread == 0 { done.store(true, ordering: .releasing) }
                return
            }
            var j = thread
            while !done.load(ordering: .acquiring) {
                let w = j % 2, k = (j / 2) % 24
                j += 1
                do {
                    let value = try get(s, ObjectKey(stringLiteral: "w\(w)-\(k)"))
                    hits.add(1, ordering: .relaxed)
                    let ok = value.withUnsafeBytes { b in
                        let tag = b.loadUnaligned(as: UInt64.self)
                        return StoreClientTests.check(b, count: b.count) && tag >> 32 == UInt64(w) && (tag & 0xFFFF_FFFF) % 24 == UInt64(k)
                    }
                    if !ok { badReads.add(1, ordering: .relaxed) }
                } catch let e as KVError where e.code == .objectNotFound {
                } catch {
                    otherErrors.add(1, ordering: .relaxed)
                }
            }
        }
        XCTAssertEqual(badReads.load(ordering: .relaxed), 0, "a reader got another key's bytes or a torn value")
        XCTAssertEqual(otherErrors.load(ordering: .relaxed), 0)
        XCTAssertGreaterThan(hits.load(ordering: .relaxed), 0)
        let stats = Dictionary(uniqueKeysWithValues: s.statistics().map { ("\($0.name)", $0.value) })
        XCTAssertGreaterThan(stats["disk_offloads"]!, 0)
        XCTAssertGreaterThan(stats["disk_hits"]!, 0)
        // A key read now gives its last value, from whichever tier, never an older one. (It
        // may be gone: writes this fast outrun the copier, and an upsert's value evicted
        // before it was copied is dropped, as without a disk tier.)
        var found = 0
        for w in 0..<2 {
            for k in 0..<24 {
                let last = (0..<600).last { $0 % 24 == k }!
                do {
                    let value = try get(s, ObjectKey(stringLiteral: "w\(w)-\(k)"))
                    XCTAssertEqual(value.count, 40_000)
                    XCTAssertEqual(value.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }, UInt64(w) << 32 | UInt64(last))
                    found += 1
                } catch let e as KVError where e.code == .objectNotFound {}
            }
        }
        XCTAssertGreaterThan(found, 0)
    }
}
