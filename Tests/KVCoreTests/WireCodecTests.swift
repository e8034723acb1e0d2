import XCTest
import KVTestSupport
@testable import KVCore

final class WireCodecTests: XCTestCase {
    /// A sample message of the shape the protocol will use: a key, sizes, flags, a list of
    /// replicas and a string.
    struct Sample: Equatable {
        var key: ObjectKey
        var size: Int
        var force: Bool
        var ttl: Double
        var replicas: [Replica]
        var note: String

        func encode() -> [UInt8] {
            var w = WireWriter()
            w.key(key)
            w.u64(UInt64(size))
            w.bool(force)
            w.f64(ttl)
            w.count(replicas.count)
            for r in replicas { w.u32(r.segment); w.u64(UInt64(r.offset)) }
            w.string(note)
            return w.bytes
        }

        static func decode(_ b: UnsafeRawBufferPointer) throws(KVError) -> Sample {
            var r = WireReader(b)
            let key = try r.key()
            let size = try r.size(max: 1 << 40)
            let force = try r.bool()
            let ttl = try r.f64()
            let n = try r.count(max: 16, minElementSize: 12, "replicas")
            var replicas: [Replica] = []
            for _ in 0..<n { replicas.append(Replica(segment: try r.u32(), offset: try r.size(max: 1 << 40))) }
            let note = try r.string(max: 100)
            try r.finish()
            return Sample(key: key, size: size, force: force, ttl: ttl, replicas: replicas, note: note)
        }
    }

    let sample = Sample(
        key: "req-7/layer-3/block-9", size: 65536, force: true, ttl: 2.5,
        replicas: [Replica(segment: 1, offset: 4096), Replica(segment: 9, offset: 0)], note: "héllo")

    func decode(_ bytes: [UInt8]) throws -> Sample {
        try bytes.withUnsafeBytes { b in try Sample.decode(b) }
    }

    /// The key validator agrees with the standard library on ASCII, every UTF-8 form, and
    /// broken sequences at every position (its ASCII fast path must not skip a bad byte).
    func testKeyUTF8ValidationAgreesWithTheStandardLibrary() {
        var cases: [[UInt8]] = [
            [], Array("plain-ascii-key-0123456789".utf8), Array("é".utf8), Array("ключ/😀/鍵".utf8),
            [0xC3], [0xC3, 0x28], [0x80], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xC0, 0xAF], [0xFF]
        ]
        var g = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let n = Int.random(in: 1...40, using: &g)
            var b = (0..<n).map { _ in UInt8.random(in: 0x20...0x7E, using: &g) }
            if Bool.random(using: &g) { b[Int.random(in: 0..<n, using: &g)] = UInt8.random(in: 0x80...0xFF, using: &g) }
            if Bool.random(using: &g) { b.insert(contentsOf: Array("ü€".utf8), at: Int.random(in: 0...n, using: &g)) }
            cases.append(b)
        }
        for b in cases {
            let want = String(validating: b, as: UTF8.self) != nil
            XCTAssertEqual(b.withUnsafeBytes { ObjectKey.isValidUTF8($0) }, want, "\(b)")
        }
    }

    func testFieldsRoundTrip() throws {
        XCTAssertEqual(try decode(sample.encode()), sample)
    }

    func testFrameHeaderRoundTripAndValidation() throws {
        let frame = WireWriter.frame(kind: 7, requestID: 42, payload: [1, 2, 3])
        XCTAssertEqual(Array(frame.prefix(4)), Array("KVST".utf8))
        let h = try frame.withUnsafeBytes { b in try WireFrameHeader.decode(b) }
        XCTAssertEqual(h, WireFrameHeader(kind: 7, requestID: 42, length: 3))
        func fails(_ bytes: [UInt8], max: Int = 1 << 20, known: @escaping (UInt16) -> Bool = { _ in true }, _ text: String) {
            XCTAssertThrowsError(try bytes.withUnsafeBytes { b in try WireFrameHeader.decode(b, maxPayload: max, isKnown: known) }) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
                XCTAssertTrue(($0 as? KVError)?.message.contains(text) ?? false, "\($0)")
            }
        }
        fails(Array(frame.prefix(15)), "needs 16")
        var bad = frame; bad[0] ^= 1
        fails(bad, "magic")
        bad = frame; bad[4] = 9
        fails(bad, "version 9")
        fails(frame, known: { $0 != 7 }, "unknown message kind 7")
        fails(WireWriter.frame(kind: 1, requestID: 1, payload: [UInt8](repeating: 0, count: 100)), max: 99, "exceeds the limit")
    }

    func testEveryTruncationIsRefused() {
        let bytes = sample.encode()
        for n in 0..<bytes.count {
            XCTAssertThrowsError(try decode(Array(bytes.prefix(n)))) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        }
        XCTAssertThrowsError(try decode(bytes + [0])) { XCTAssertTrue(($0 as? KVError)?.message.contains("trailing") ?? false) }
    }

    func testHostileLengthsAndValuesAreRefusedBeforeAllocating() {
        var w = WireWriter()
        w.key("k"); w.u64(1); w.bool(false); w.f64(0)
        w.u32(16) // sixteen replicas announced, none present
        XCTAssertThrowsError(try decode(w.bytes)) { XCTAssertTrue(($0 as? KVError)?.message.contains("cannot fit") ?? false) }
        var big = WireWriter(); big.u32(UInt32.max) // a 4 GiB key
        XCTAssertThrowsError(try decode(big.bytes)) { XCTAssertTrue(($0 as? KVError)?.message.contains("exceeds") ?? false) }
        var empty = WireWriter(); empty.u32(0)
        XCTAssertThrowsError(try decode(empty.bytes)) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        var badUTF8 = WireWriter(); badUTF8.u32(2); badUTF8.u8(0xC3); badUTF8.u8(0x28)
        XCTAssertThrowsError(try decode(badUTF8.bytes)) { XCTAssertTrue(($0 as? KVError)?.message.contains("UTF-8") ?? false) }
        var bytes = sample.encode()
        let boolAt = 4 + sample.key.count + 8
        bytes[boolAt] = 2
        XCTAssertThrowsError(try decode(bytes)) { XCTAssertTrue(($0 as? KVError)?.message.contains("bool") ?? false) }
    }

    /// Random bytes and random mutations of a valid message: decoding either succeeds or
    /// throws invalidArgument; it never traps.
    func testFuzzedInputNeverCrashes() {
        var rng = SplitMix64(seed: 5)
        let valid = sample.encode()
        var ok = 0
        for i in 0..<50_000 {
            var bytes: [UInt8]
            if i % 4 == 0 {
                bytes = (0..<Int(rng.next() % 80)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                bytes = valid
                for _ in 0..<(1 + Int(rng.next() % 4)) {
                    switch rng.next() % 3 {
                    case 0: bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: bytes.removeLast(Int(rng.next() % UInt64(bytes.count)))
                    default: bytes.insert(UInt8(truncatingIfNeeded: rng.next()), at: Int(rng.next() % UInt64(bytes.count + 1)))
                    }
                    if bytes.isEmpty { bytes = [0] }
                }
            }
            do { _ = try decode(bytes); ok += 1 } catch {
                XCTAssertEqual((error as? KVError)?.code, .invalidArgument)
            }
            let framed = WireWriter.frame(kind: UInt16(truncatingIfNeeded: rng.next()), requestID: 1, payload: bytes)
            var mutated = framed
            mutated[Int(rng.next() % 16)] = UInt8(truncatingIfNeeded: rng.next())
            _ = try? mutated.withUnsafeBytes { b in try WireFrameHeader.decode(b, maxPayload: 1 << 16) }
        }
        XCTAssertGreaterThan(ok, 0, "some mutations (in the payload's free bytes) still decode")
    }
}
