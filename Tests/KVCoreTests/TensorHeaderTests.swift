import XCTest
@testable import KVCore

final class TensorHeaderTests: XCTestCase {
    func testEncodeDecodeRoundTripsEveryDTypeAndRank() throws {
        for dt in TensorDType.allCases {
            for rank in 0...TensorHeader.maxDimensions {
                let shape = (0..<rank).map { $0 % 3 + 1 }
                let h = try TensorHeader(dtype: dt, shape: shape)
                let bytes = try h.encoded()
                XCTAssertEqual(bytes.count, 304)
                let back = try bytes.withUnsafeBytes { try TensorHeader(decoding: $0) }
                XCTAssertEqual(back, h)
                XCTAssertEqual(back.dataBytes, shape.reduce(dt.itemSize, *))
            }
        }
    }

    func testFieldOffsetsMatchTheFormat() throws {
        let bytes = try TensorHeader(dtype: .bfloat16, shape: [2, 3]).encoded()
        func u32(_ o: Int) -> UInt32 { bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt32.self) } }
        func i64(_ o: Int) -> Int64 { bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: Int64.self) } }
        XCTAssertEqual(u32(0), 0x4D4F_4F4E)
        XCTAssertEqual(u32(4), 1 | 304 << 16) // version, header size
        XCTAssertEqual(u32(8), 12) // dtype bf16
        XCTAssertEqual(u32(12), 2) // ndim
        XCTAssertEqual(i64(24), 304)
        XCTAssertEqual(i64(32), 12)
        XCTAssertEqual([i64(40), i64(48), i64(56)], [2, 3, -1])
        XCTAssertEqual([i64(104), i64(112), i64(120)], [2, 3, -1])
        XCTAssertEqual(u32(168), 0)
    }

    func testBadInputsAreInvalidArguments() throws {
        XCTAssertThrowsError(try TensorHeader(dtype: .float32, shape: Array(repeating: 1, count: 9)))
        XCTAssertThrowsError(try TensorHeader(dtype: .float32, shape: [-1]))
        XCTAssertThrowsError(try TensorHeader(dtype: .float64, shape: [Int.max / 2, 4]))
        var good = try TensorHeader(dtype: .int32, shape: [4]).encoded()
        func decode(_ b: [UInt8]) throws -> TensorHeader { try b.withUnsafeBytes { try TensorHeader(decoding: $0) } }
        XCTAssertThrowsError(try decode(Array(good.prefix(303))))
        for (offset, value) in [(0, 1), (8, 77), (12, 9), (16, 3), (32, 15), (168, 5)] {
            var b = good
            b.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(value), toByteOffset: offset, as: UInt32.self) }
            XCTAssertThrowsError(try decode(b), "offset \(offset)") { e in
                XCTAssertEqual((e as! KVError).code, .invalidArgument)
            }
        }
        good[48] = 5 // an unused dimension that is not -1
        XCTAssertThrowsError(try decode(good))
    }
}
