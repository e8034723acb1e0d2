import Dispatch
import Synchronization
import XCTest
import KVAccelerator
import KVTestSupport
#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVTransfer
@testable import KVStore

final class StoreClientTests: XCTestCase {
    /// A value whose every byte is determined by (tag, length): a torn or mixed read cannot
    /// pass `check`.
    static func value(tag: UInt64, length: Int) -> [UInt8] {
        var v = [UInt8](repeating: 0, count: length)
        withUnsafeBytes(of: tag.littleEndian) { for i in 0..<8 { v[i] = $0[i] } }
        withUnsafeBytes(of: UInt64(length).littleEndian) { for i in 0..<8 { v[8 + i] = $0[i] } }
        for i in 16..<length { v[i] = UInt8(truncatingIfNeeded: tag &* 31 &+ UInt64(i) &* 7) }
        return v
    }

    static func check(_ bytes: UnsafeRawBufferPointer, count: Int) -> Bool {
        guard count >= 16 else { return false }
        let tag = bytes.loadUnaligned(as: UInt64.self)
        let length = bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        guard length == UInt64(count) else { return false }
        for i in 16..<count where bytes[i] != UInt8(truncatingIfNeeded: tag &* 31 &+ UInt64(i) &* 7) { return false }
        return true
    }

    func stat(_ s: StoreClient, _ name: String) -> Int {
        s.statistics().first { $0.name.description == name }!.value
    }

    func testRoundTripCopiesOnceAndStagesNothing() throws {
        let s = try StoreClient(segmentSize: 1 << 20)
        defer { s.close() }
        let v = Self.value(tag: 7, length: 5000)
        try put(s, "a", v)
        XCTAssertEqual(stat(s, "bytes_copied"), 5000)
        XCTAssertEqual(try get(s, "a"), v)
        XCTAssertEqual(stat(s, "bytes_copied"), 10000)
        XCTAssertEqual(stat(s, "bytes_staged"), 0)
        XCTAssertThrowsError(try put(s, "a", v)) { XCTAssertEqual(($0 as? KVError)?.code, .objectExists) }
        XCTAssertThrowsError(try get(s, "a", capacity: 10)) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        XCTAssertEqual(stat(s, "active_readers"), 0, "a failed get_into releases its hold")
    }

    func testRangedReadsCopyOnlyTheirRangesAndFailAlone() throws {
        let s = try StoreClient(segmentSize: 32 << 20)
        defer { s.close() }
        let v = Self.value(tag: 9, length: 5000)
        try put(s, "a", v)
        let copiedBefore = stat(s, "bytes_copied")
        var out = [UInt8](repeating: 0, count: 64)
        let outcome = try out.withUnsafeMutableBytes { (b) throws(KVError) -> [KVError?] in
            let base = UInt(bitPattern: b.baseAddress!)
            let copies = [
                StoreClient.Piece(offset: 100, length: 10, memory: MemoryRegion(address: base, length: 10)),
                StoreClient.Piece(offset: 4995, length: 10, memory: MemoryRegion(address: base + 10, length: 10)),
                StoreClient.Piece(offset: 0, length: 1, memory: MemoryRegion(address: base + 20, length: 1)),
                StoreClient.Piece(offset: 4990, length: 10, memory: MemoryRegion(address: base + 30, length: 10)),
                StoreClient.Piece(offset: 0, length: 8, memory: MemoryRegion(address: base + 40, length: 4))
            ]
            return try copies.withUnsafeBufferPointer { (c) throws(KVError) in
                try s.readRanges(keys: ["a", "missing", "a"], pieces: [0..<2, 2..<3, 3..<5], copies: c)
            }
        }
        XCTAssertNil(outcome[0])
        XCTAssertEqual(outcome[1]?.code, .invalidArgument, "past the object's end")
        XCTAssertEqual(outcome[2]?.code, .objectNotFound)
        XCTAssertNil(outcome[3])
        XCTAssertEqual(outcome[4]?.code, .invalidArgument, "a destination too small")
        XCTAssertEqual(Array(out[0..<10]), Array(v[100..<110]))
        XCTAssertEqual(Array(out[30..<40]), Array(v[4990..<5000]))
        XCTAssertEqual(Array(out[10..<30]), [UInt8](repeating: 0, count: 20))
        XCTAssertEqual(stat(s, "bytes_copied") - copiedBefore, 20, "only the ranges are copied")
        XCTAssertEqual(stat(s, "active_readers"), 0, "every hold is released")
        XCTAssertThrowsError(
            try [StoreClient.Piece]().withUnsafeBufferPointer { (c) throws(KVError) in
                try s.readRanges(keys: ["a"], pieces: [0..<1], copies: c)
            }
        ) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }

        // Host memory from a mapped segment: the pieces are copied in one pass (small ones with
        // memcpy, pieces adding up to a cold plan with streaming stores), with the same outcomes.
        for pieceLength in [100, 1 << 20] {
            let big = Self.value(tag: 11, length: 8 * pieceLength)
            try put(s, "big\(pieceLength)", big)
            var dst = [UInt8](repeating: 0, count: 8 * pieceLength)
            let before = stat(s, "bytes_copied")
            let got = try dst.withUnsafeMutableBytes { (b) throws(KVError) -> [KVError?] in
                let base = UInt(bitPattern: b.baseAddress!)
                // the object's eight pieces in reverse order, and one past its end
                var copies = (0..<8).map { i in
                    StoreClient.Piece(
                        offset: i * pieceLength, length: pieceLength,
                        memory: MemoryRegion(address: base + UInt((7 - i) * pieceLength), length: pieceLength))
                }
                copies.append(StoreClient.Piece(offset: 8 * pieceLength, length: 1, memory: MemoryRegion(address: base, length: 1)))
                return try copies.withUnsafeBufferPointer { (c) throws(KVError) in
                    try s.readRanges(keys: ["big\(pieceLength)"], pieces: [0..<9], copies: c, memory: .host)
                }
            }
            XCTAssertEqual(got.prefix(8).compactMap { $0 }.count, 0)
            XCTAssertEqual(got[8]?.code, .invalidArgument)
            for i in 0..<8 {
                XCTAssertEqual(Array(dst[(7 - i) * pieceLength..<(8 - i) * pieceLength]), Array(big[i * pieceLength..<(i + 1) * pieceLength]))
            }
            XCTAssertEqual(stat(s, "bytes_copied") - before, 8 * pieceLength)
        }
        XCTAssertEqual(stat(s, "active_readers"), 0)
    }

    func testWritesInPiecesAreInvisibleUntilTheyEnd() throws {
        let s = try StoreClient(segmentSize: 1 << 20)
        defer { s.close() }
        try put(s, "taken", [1])
        let v = Self.value(tag: 5, length: 3000)
        let begun = try s.beginWrites(keys: ["w", "taken", "empty", "gone"], sizes: [3000, 10, 0, 100], mode: .put)
        let w = try begun[0].get(), gone = try begun[3].get()
        XCTAssertThrowsError(try begun[1].get()) { XCTAssertEqual(($0 as? KVError)?.code, .objectExists) }
        XCTAssertThrowsError(try begun[2].get()) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        let outcome = try v.withUnsafeBytes { (b) throws(KVError) -> [KVError?] in
            let base = UInt(bitPattern: b.baseAddress!)
            // the back half first, then the front, then one past the end and one for no write
            let pieces = [
                StoreClient.Piece(offset: 1500, length: 1500, memory: MemoryRegion(address: base + 1500, length: 1500)),
                StoreClient.Piece(offset: 0, length: 1500, memory: MemoryRegion(address: base, length: 1500)),
                StoreClient.Piece(offset: 2999, length: 2, memory: MemoryRegion(address: base, length: 2)),
                StoreClient.Piece(offset: 0, length: 1, memory: MemoryRegion(address: base, length: 1))
            ]
            return try pieces.withUnsafeBufferPointer { (p) throws(KVError) in
                try s.writeRanges(ids: [w, w, 999], pieces: [0..<2, 2..<3, 3..<4], copies: p)
            }
        }
        XCTAssertNil(outcome[0])
        XCTAssertNil(outcome[1])
        XCTAssertEqual(outcome[2]?.code, .invalidArgument)
        XCTAssertEqual(outcome[3]?.code, .invalidArgument, "no write 999 is open")
        XCTAssertFalse(try s.exists(key: "w"), "invisible until the write ends")
        let ended = try s.endWrites(ids: [w, w], abort: false)
        XCTAssertNil(ended[0])
        XCTAssertEqual(ended[1]?.code, .invalidArgument, "ended once")
        XCTAssertEqual(try get(s, "w"), v)
        let used = stat(s, "bytes_used")
        XCTAssertEqual(try s.endWrites(ids: [gone], abort: true).compactMap { $0 }.count, 0)
        XCTAssertFalse(try s.exists(key: "gone"))
        XCTAssertLessThan(stat(s, "bytes_used"), used, "a revoked write frees its space")
    }

    func testPlacementsNameEachReplicaAndCopyNothing() throws {
        let s = try StoreClient(segmentSize: 1 << 20)
        defer { s.close() }
        try put(s, "a", Self.value(tag: 3, length: 3000))
        let copied = stat(s, "bytes_copied")
        let found = try s.placements(keys: ["a", "missing"])
        let a = try found[0].get()
        XCTAssertEqual(a.size, 3000)
        XCTAssertEqual(a.replicas.count, 1)
        XCTAssertThrowsError(try found[1].get()) { XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound) }
        XCTAssertEqual(stat(s, "bytes_copied"), copied)
        XCTAssertEqual(stat(s, "active_readers"), 0)
    }

    func testCallsAfterCloseFail() throws {
        let s = try StoreClient(segmentSize: 1 << 20)
        try put(s, "a", [1, 2, 3])
        s.close()
        s.close()
        XCTAssertThrowsError(try get(s, "a")) { XCTAssertEqual(($0 as? KVError)?.code, .storeClosed) }
        XCTAssertThrowsError(try put(s, "b", [1])) { XCTAssertEqual(($0 as? KVError)?.code, .storeClosed) }
        XCTAssertThrowsError(try s.exists(key: "a")) { XCTAssertEqual(($0 as? KVError)?.code, .storeClosed) }
    }

    /// Many threads put, upsert, get and remove overlapping keys. Every read must be one
    /// complete version; afterwards the accounting must be exact.
    func testConcurrentWritersAndReadersNeverTear() throws {
        // Reads lease (5 s); every clock reading moves time 1 ms, so leases end as work goes on.
        let clock = ManualClock(step: 1_000_000)
        let s = try StoreClient(segmentSize: 8 << 20, clock: clock.clock)
        defer { s.close() }
        let keys: [ObjectKey] = (0..<12).map { "key-\($0)" }
        let torn = Atomic(0)
        DispatchQueue.concurrentPerform(iterations: 6) { thread in
            var rng = SplitMix64(seed: UInt64(thread + 1))
            var out = [UInt8](repeating: 0, count: 1 << 15)
            for step in 0..<3000 {
                let key = keys[Int(rng.next() % UInt64(keys.count))]
                let length = [64, 256, 4096, 20000][Int(rng.next() % 4)]
                let tag = UInt64(thread) << 32 | UInt64(step)
                switch rng.next() % 10 {
                case 0..<2: try? put(s, key, Self.value(tag: tag, length: length))
                case 2..<5: try? put(s, key, Self.value(tag: tag, length: length), .upsert)
                case 5: try? s.remove(key: key, force: rng.next() % 2 == 0)
                default:
                    let n: Int? = out.withUnsafeMutableBytes { b in
                        var r = MemoryRegion(b.baseAddress!, length: b.count)
                        return withUnsafePointer(to: &r) { try? s.get(key: key, into: UnsafeBufferPointer(start: $0, count: 1)) }
                    }
                    if let n, !out.withUnsafeBytes({ Self.check($0, count: n) }) { torn.add(1, ordering: .relaxed) }
                }
            }
        }
        XCTAssertEqual(torn.load(ordering: .relaxed), 0, "a read returned a torn or mixed value")
        clock.advance(seconds: 10) // every lease ends: replaced versions are freed
        var expectedObjects = 0, expectedUsed = 0, expectedBytes = 0
        for k in keys where try s.exists(key: k) {
            let v = try get(s, k)
            XCTAssertTrue(v.withUnsafeBytes { Self.check($0, count: v.count) })
            expectedObjects += 1
            expectedBytes += v.count
            expectedUsed += SegmentAllocator.roundedLength(v.count)
        }
        XCTAssertEqual(stat(s, "objects"), expectedObjects)
        XCTAssertEqual(stat(s, "object_bytes"), expectedBytes)
        XCTAssertEqual(stat(s, "bytes_used"), expectedUsed)
        XCTAssertEqual(stat(s, "active_readers"), 0)
        XCTAssertEqual(stat(s, "leases_active"), expectedObjects, "the checks above leased every object")
        XCTAssertEqual(try s.removeAll(), 0, "leased objects stay")
        XCTAssertEqual(try s.removeAll(force: true), expectedObjects)
        XCTAssertEqual(stat(s, "bytes_used"), 0)
        XCTAssertEqual(stat(s, "free_blocks"), 1, "all space coalesces back")
    }

    /// Ranged reads and writes in pieces racing puts, upserts and removes: every ranged read
    /// of an object's pieces comes from one version, and a write in pieces shows nothing until
    /// it ends (checked with self-describing values).
    func testRangedReadsAndWritesInPiecesNeverTear() throws {
        let clock = ManualClock(step: 1_000_000)
        let s = try StoreClient(segmentSize: 8 << 20, clock: clock.clock)
        defer { s.close() }
        let keys: [ObjectKey] = (0..<8).map { "key-\($0)" }
        let lengths = [64, 256, 4096, 20000]
        let torn = Atomic(0), pieceWrites = Atomic(0), checked = Atomic(0)
        DispatchQueue.concurrentPerform(iterations: 6) { thread in
            var rng = SplitMix64(seed: UInt64(thread + 11))
            var out = [UInt8](repeating: 0, count: 20000)
            for step in 0..<2000 {
                let key = keys[Int(rng.next() % UInt64(keys.count))]
                let length = lengths[Int(rng.next() % UInt64(lengths.count))]
                let tag = UInt64(thread) << 32 | UInt64(step)
                switch rng.next() % 10 {
                case 0..<2: try? put(s, key, Self.value(tag: tag, length: length), .upsert)
                case 2: try? s.remove(key: key, force: true)
                case 3..<5:
                    // a write in three pieces, last piece first
                    let v = Self.value(tag: tag, length: length)
                    guard let id = try? s.beginWrites(keys: [key], sizes: [length], mode: .upsert)[0].get() else { continue }
                    let cut1 = length / 3, cut2 = 2 * length / 3
                    let ok: Bool = v.withUnsafeBytes { b in
                        let base = UInt(bitPattern: b.baseAddress!)
                        let pieces = [(cut2, length - cut2), (0, cut1), (cut1, cut2 - cut1)].map { (o, n) in
                            StoreClient.Piece(offset: o, length: n, memory: MemoryRegion(address: base + UInt(o), length: n))
                        }
                        let r = pieces.withUnsafeBufferPointer { p in try? s.writeRanges(ids: [id], pieces: [0..<3], copies: p) }
                        return r?.allSatisfy { $0 == nil } ?? false
                    }
                    if (try? s.endWrites(ids: [id], abort: !ok))?.first ?? nil == nil, ok { pieceWrites.add(1, ordering: .relaxed) }
                default:
                    // the object as three pieces, in reverse order, in one ranged read
                    let cut1 = length / 3, cut2 = 2 * length / 3
                    let got: [KVError?]? = out.withUnsafeMutableBytes { b in
                        let base = UInt(bitPattern: b.baseAddress!)
                        let copies = [(cut2, length - cut2), (cut1, cut2 - cut1), (0, cut1)].map { (o, n) in
                            StoreClient.Piece(offset: o, length: n, memory: MemoryRegion(address: base + UInt(o), length: n))
                        }
                        return copies.withUnsafeBufferPointer { c in
                            try? s.readRanges(keys: [key], pieces: [0..<3], copies: c, memory: rng.next() % 2 == 0 ? .host : .locate)
                        }
                    }
                    guard let got, got.allSatisfy({ $0 == nil }) else { continue } // missing, or of another length
                    let stored = out.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self) }
                    guard stored == UInt64(length) else { continue }
                    checked.add(1, ordering: .relaxed)
                    if !out.withUnsafeBytes({ Self.check($0, count: length) }) { torn.add(1, ordering: .relaxed) }
                }
            }
        }
        XCTAssertEqual(torn.load(ordering: .relaxed), 0, "a ranged read mixed versions, or saw a write in pieces before it ended")
        XCTAssertGreaterThan(checked.load(ordering: .relaxed), 100)
        XCTAssertGreaterThan(pieceWrites.load(ordering: .relaxed), 100)
        XCTAssertEqual(stat(s, "active_readers"), 0)
        XCTAssertEqual(s.openWrites.withLock { $0.byID.count }, 0, "every write in pieces ended")
    }

    /// Closing while other threads work: every operation either completes or reports
    /// storeClosed; nothing crashes.
    func testCloseWhileBusy() throws {
        // No leases: with them, each upsert of a just-read key would keep the old 100 KB for 5 s
        // and a slow run could fill the segment before close (this test is about close).
        var noLeases = CachePolicy()
        noLeases.leaseTTL = 0
        let s = try StoreClient(segmentSize: 4 << 20, cache: noLeases)
        let v = Self.value(tag: 1, length: 100_000)
        let other = Atomic(0)
        DispatchQueue.concurrentPerform(iterations: 4) { thread in
            if thread == 0 {
                for _ in 0..<2000 { sched_yield() }
                s.close()
                return
            }
            for i in 0..<5000 {
                do {
                    try put(s, "t\(thread)-\(i % 20)", v, .upsert)
                    _ = try get(s, "t\(thread)-\(i % 20)", capacity: 100_000)
                } catch let e as KVError where e.code == .storeClosed {
                    return
                } catch {
                    other.add(1, ordering: .relaxed)
                }
            }
        }
        s.close()
        XCTAssertTrue(s.isClosed)
        XCTAssertEqual(other.load(ordering: .relaxed), 0)
    }
}

// Helpers at file scope so worker closures need not capture the test case.
func put(_ s: StoreClient, _ key: ObjectKey, _ bytes: [UInt8], _ mode: WriteMode = .put) throws {
    try bytes.withUnsafeBytes { b in
        var r = MemoryRegion(b.baseAddress!, length: b.count)
        try withUnsafePointer(to: &r) { try s.put(key: key, parts: UnsafeBufferPointer(start: $0, count: 1), mode: mode) }
    }
}

func get(_ s: StoreClient, _ key: ObjectKey, capacity: Int = 1 << 16) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: capacity)
    let n = try out.withUnsafeMutableBytes { b in
        var r = MemoryRegion(b.baseAddress!, length: b.count)
        return try withUnsafePointer(to: &r) { try s.get(key: key, into: UnsafeBufferPointer(start: $0, count: 1)) }
    }
    return Array(out[0..<n])
}
