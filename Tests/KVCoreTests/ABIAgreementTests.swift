import XCTest
import CKVStoreABI
@testable import KVCore

/// Values that Swift, the C ABI header and Python must agree on. Python reads them from the
/// extension (`kvstore._native.ABI`, compiled from the header); this test ties the header to
/// the Swift core, and `python/tests/test_abi_tables.py` ties Python to the extension.
final class ABIAgreementTests: XCTestCase {
    func testErrorCodesMatchTheHeader() {
        let header: [KVError.Code: Int] = [
            .objectNotFound: Int(KV_E_OBJECT_NOT_FOUND), .objectExists: Int(KV_E_OBJECT_EXISTS), .noSpace: Int(KV_E_NO_SPACE),
            .leaseHeld: Int(KV_E_LEASE_HELD), .invalidArgument: Int(KV_E_INVALID_ARGUMENT), .transfer: Int(KV_E_TRANSFER),
            .storeClosed: Int(KV_E_STORE_CLOSED), .unsupported: Int(KV_E_UNSUPPORTED), .internal: Int(KV_E_INTERNAL),
            .argumentType: Int(KV_E_ARGUMENT_TYPE),
            .checksum: Int(KV_E_CHECKSUM)
        ]
        XCTAssertEqual(Set(header.keys), Set(KVError.Code.allCases), "every Swift code has a C constant")
        for (code, value) in header { XCTAssertEqual(Int(code.rawValue), value, "\(code)") }
    }

    func testKVKindsAndLimitsMatchTheHeader() {
        XCTAssertEqual(Int(KVBufferKind.key.rawValue), Int(KV_KIND_KEY))
        XCTAssertEqual(Int(KVBufferKind.value.rawValue), Int(KV_KIND_VALUE))
        XCTAssertEqual(Int(KVBufferKind.index.rawValue), Int(KV_KIND_INDEX))
        XCTAssertEqual(ObjectTable.keysPageBytes, Int(KV_KEYS_PAGE_BYTES))
        XCTAssertEqual(MemoryLayout<kv_block_buffer>.size, 72)
        XCTAssertEqual(Int(KV_TENSOR_HEADER_SIZE), TensorHeader.size)
    }
}
