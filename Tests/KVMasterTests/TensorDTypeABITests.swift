import CKVStoreABI
import KVCore
import KVStoreABI
import XCTest

/// `kv_tensor_dtype`: the table Python reads `_native.DTYPES` from.
final class TensorDTypeABITests: XCTestCase {
    func testEveryCodeIsNamedAndOthersAreRefusedWithNothingWritten() {
        var name: UnsafePointer<CChar>? = nil
        var size: Int32 = -7
        for dt in TensorDType.allCases {
            XCTAssertEqual(kvTensorDType(dt.rawValue, &name, &size), 0)
            XCTAssertEqual(String(cString: name!), "\(dt.name)")
            XCTAssertEqual(Int(size), dt.itemSize)
        }
        XCTAssertEqual(Set(TensorDType.allCases.map { "\($0.name)" }).count, TensorDType.allCases.count, "names are unique")
        for bad: Int32 in [-1, Int32(TensorDType.allCases.count), .max, .min] {
            name = nil
            size = -7
            XCTAssertEqual(kvTensorDType(bad, &name, &size), Int32(KV_E_INVALID_ARGUMENT), "code \(bad)")
            XCTAssertNil(name)
            XCTAssertEqual(size, -7)
        }
        XCTAssertEqual(kvTensorDType(0, nil, &size), Int32(KV_E_INVALID_ARGUMENT))
        XCTAssertEqual(kvTensorDType(0, &name, nil), Int32(KV_E_INVALID_ARGUMENT))
    }
}
