import XCTest
import CKVCopy
import KVAccelerator
@testable import KVCore
@testable import KVTransfer

/// The copy kernels: the three-stream streaming copy, the CRC32C kernel (the same answers
/// across the three-stream block boundary, the split into thirds and slices), and checksums
/// kept by the object table.
final class CopyKernelTests: XCTestCase {
    func testTheThreeStreamCopyMovesEveryByteAndNothingElse() {
        for n in [0, 1, 63, 64, 191, 192, 4097, 1 << 20, (1 << 20) + 13, 3 * (1 << 20) + 65] {
            for shift in [0, 5] {
                let src = (0..<(n + 8)).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) }
                var dst = [UInt8](repeating: 0, count: n + 16)
                src.withUnsafeBytes { s in dst.withUnsafeMutableBytes { d in kv_copy_streaming3(d.baseAddress! + shift, s.baseAddress! + 3, n) } }
                XCTAssertEqual(Array(dst[shift..<(shift + n)]), Array(src[3..<(3 + n)]), "length \(n)")
                XCTAssertTrue(dst[..<shift].allSatisfy { $0 == 0 } && dst[(shift + n)...].allSatisfy { $0 == 0 }, "length \(n): outside the range")
            }
        }
    }

    /// A plain bitwise CRC32C, independent of the kernel.
    static func reference(_ bytes: [UInt8], _ crc: UInt32 = 0) -> UInt32 {
        var c = ~crc
        for b in bytes {
            c ^= UInt32(b)
            for _ in 0..<8 { c = (c >> 1) ^ (0x82F6_3B78 & (0 &- (c & 1))) }
        }
        return ~c
    }

    func testKnownValueAndEveryLengthAroundTheBlocks() {
        XCTAssertEqual(kv_crc32c_copy(nil, Array("123456789".utf8), 9, 0, 0), 0xE306_9283)
        var g = SystemRandomNumberGenerator()
        let data = (0..<(600_000)).map { _ in UInt8.random(in: 0...255, using: &g) }
        // Around the 4 KiB blocks of three streams, and the split into thirds from 192 KiB.
        for n in [0, 1, 7, 8, 9, 4095, 12_287, 12_288, 12_289, 24_576, 24_676, 196_607, 196_608, 196_609, 599_999] {
            var out = [UInt8](repeating: 0, count: n)
            let want = Self.reference(Array(data[0..<n]))
            for streaming: Int32 in [0, 1, 2] { // 2: the folding path from 32 KiB (where the processor has it)
                let got = data.withUnsafeBytes { s in out.withUnsafeMutableBytes { d in kv_crc32c_copy(d.baseAddress, s.baseAddress, n, 0, streaming) } }
                XCTAssertEqual(got, want, "length \(n)")
                XCTAssertEqual(out, Array(data[0..<n]), "the copy, length \(n)")
            }
            // Destinations off the 16-byte grid take plain stores: same bytes, same checksum.
            for shift in [1, 8] where n > 0 {
                var wide = [UInt8](repeating: 0, count: n + shift)
                let got = data.withUnsafeBytes { s in wide.withUnsafeMutableBytes { d in kv_crc32c_copy(d.baseAddress! + shift, s.baseAddress, n, 0, 2) } }
                XCTAssertEqual(got, want, "length \(n), destination +\(shift)")
                XCTAssertEqual(Array(wide[shift...]), Array(data[0..<n]), "the copy, length \(n), destination +\(shift)")
            }
            // Chained over two pieces: the same as one pass.
            let cut = n / 3
            let first = data.withUnsafeBytes { kv_crc32c_copy(nil, $0.baseAddress, cut, 0, 0) }
            let both = data.withUnsafeBytes { kv_crc32c_copy(nil, $0.baseAddress! + cut, n - cut, first, 0) }
            XCTAssertEqual(both, want, "chained, length \(n)")
        }
    }

    func testACopyAcrossSlicesChecksumsTheWholeStream() {
        let a = [UInt8](repeating: 1, count: 5000) + [UInt8](repeating: 2, count: 3), b = [UInt8](repeating: 9, count: 20_000)
        var out = [UInt8](repeating: 0, count: a.count + b.count)
        let t = LocalCopyTransport(counters: TransferCounters())
        let (moved, crc) = a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                out.withUnsafeMutableBytes { po in
                    let sources = [
                        MemoryRegion(address: UInt(bitPattern: pa.baseAddress!), length: pa.count),
                        MemoryRegion(address: UInt(bitPattern: pb.baseAddress!), length: pb.count)
                    ]
                    let dests = [
                        MemoryRegion(address: UInt(bitPattern: po.baseAddress!), length: 7000),
                        MemoryRegion(address: UInt(bitPattern: po.baseAddress! + 7000), length: po.count - 7000)
                    ]
                    return sources.withUnsafeBufferPointer { s in dests.withUnsafeBufferPointer { d in t.copyChecksummed(from: s, to: d, into: .segment) } }
                }
            }
        }
        XCTAssertEqual(moved, a.count + b.count)
        XCTAssertEqual(out, a + b)
        XCTAssertEqual(crc, Self.reference(a + b))
    }

    func testTheTableKeepsTheWritersChecksumPerVersion() throws {
        var t = ObjectTable(policy: CachePolicy())
        try t.mount(segment: 1, capacity: 1 << 20, now: 0)
        var w = try t.beginWrite(key: "k", size: 100, mode: .put, options: .default, now: 0)
        w.checksum = 0xABCD
        try t.commitWrite(w, now: 0)
        guard case .found(let r) = t.acquireRead(key: "k", now: 0) else { return XCTFail() }
        XCTAssertEqual(r.checksum, 0xABCD)
        try t.releaseRead(r.handle)
        XCTAssertEqual(t.holdReplicas(key: "k", now: 0)?.checksum, 0xABCD)
        let plain = try t.beginWrite(key: "k", size: 100, mode: .upsert, options: .default, now: 0)
        try t.commitWrite(plain, now: 0)
        guard case .found(let r2) = t.acquireRead(key: "k", now: 0) else { return XCTFail() }
        XCTAssertNil(r2.checksum, "an upsert without a checksum drops the old one")
    }
}
