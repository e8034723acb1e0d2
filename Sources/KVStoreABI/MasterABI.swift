#if canImport(Glibc)
import Glibc
#endif
import CKVStoreABI
import KVCore
import KVMaster

// The network master in the C ABI. Contract: include/kvstore_abi.h.

@c(kv_master_main)
public func kvMasterMain(_ program: UnsafePointer<CChar>?, _ argv: UnsafePointer<UnsafePointer<CChar>?>?, _ argc: Int) -> Int32 {
    var arguments: [String] = []
    for i in 0..<max(0, argc) {
        guard let a = argv?[i] else { continue }
        arguments.append(String(cString: a))
    }
    return MasterCommandLine.main(arguments, program: program.map { String(cString: $0) } ?? "kvstore master")
}
