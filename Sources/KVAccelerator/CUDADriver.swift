#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVSystem

/// The CUDA driver API (`libcuda.so.1`), loaded with `dlopen` at run time: kvstore links no
/// vendor library, and a machine without the driver simply has no CUDA devices.
/// `KVSTORE_CUDA_DRIVER` names another library file to load instead (for example a driver
/// shim in a container).
///
/// `@unchecked Sendable`: every field is set once in `init` and never changes; the driver API
/// itself is thread-safe.
final class CUDADriver: @unchecked Sendable {
    typealias Result = Int32
    typealias Context = OpaquePointer

    let cuInit: @convention(c) (UInt32) -> Result
    let cuDeviceGetCount: @convention(c) (UnsafeMutablePointer<Int32>) -> Result
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Result
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<Context?>, Int32) -> Result
    let cuDevicePrimaryCtxRelease: @convention(c) (Int32) -> Result
    let cuCtxSynchronize: @convention(c) () -> Result
    let cuCtxGetCurrent: @convention(c) (UnsafeMutablePointer<Context?>) -> Result
    let cuCtxSetCurrent: @convention(c) (Context?) -> Result
    let cuPointerGetAttribute: @convention(c) (UnsafeMutableRawPointer, Int32, UInt64) -> Result
    let cuMemcpyHtoDAsync: @convention(c) (UInt64, UnsafeRawPointer, Int, OpaquePointer?) -> Result
    let cuMemcpyDtoHAsync: @convention(c) (UnsafeMutableRawPointer, UInt64, Int, OpaquePointer?) -> Result
    let cuMemcpyAsync: @convention(c) (UInt64, UInt64, Int, OpaquePointer?) -> Result
    let cuMemHostAlloc: @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>, Int, UInt32) -> Result
    let cuMemFreeHost: @convention(c) (UnsafeMutableRawPointer) -> Result
    let cuMemHostRegister: @convention(c) (UnsafeMutableRawPointer, Int, UInt32) -> Result
    let cuMemHostUnregister: @convention(c) (UnsafeMutableRawPointer) -> Result
    let cuGetErrorString: (@convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result)?
    /// CUDA 12.8+: many copies in one call (the 12.8 signature, with failIdx; drivers keep it
    /// beside the 13.x `_v2`), on any stream but the legacy default one. nil on older drivers.
    typealias MemcpyBatchAsync =
        @convention(c) (
            UnsafeMutablePointer<UInt64>, UnsafeMutablePointer<UInt64>, UnsafeMutablePointer<Int>, Int,
            UnsafeMutableRawPointer, UnsafeMutablePointer<Int>, Int, UnsafeMutablePointer<Int>,
            OpaquePointer?
        ) -> Result
    let cuMemcpyBatchAsync: MemcpyBatchAsync?
    let cuStreamCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Result
    let cuStreamSynchronize: @convention(c) (OpaquePointer?) -> Result
    let cuStreamDestroy: @convention(c) (OpaquePointer?) -> Result

    /// Number of devices the driver reports (> 0).
    let deviceCount: Int

    // Constants of cuda.h.
    static let errorInvalidValue: Result = 1 // CUDA_ERROR_INVALID_VALUE: "not my pointer"
    static let attributeMemoryType: Int32 = 2 // CU_POINTER_ATTRIBUTE_MEMORY_TYPE
    static let attributeDeviceOrdinal: Int32 = 9 // CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    static let memoryTypeDevice: UInt32 = 2 // CU_MEMORYTYPE_DEVICE
    static let memoryTypeUnified: UInt32 = 4 // CU_MEMORYTYPE_UNIFIED
    static let hostAllocPortable: UInt32 = 1 // CU_MEMHOSTALLOC_PORTABLE
    static let hostRegisterPortable: UInt32 = 1 // CU_MEMHOSTREGISTER_PORTABLE

    /// The loaded driver, or nil with the reason (no library, a missing symbol, cuInit failed,
    /// no device). Loaded once per process.
    static let shared: (driver: CUDADriver?, reason: String) = load()

    private static func load() -> (driver: CUDADriver?, reason: String) {
        var names = ["libcuda.so.1", "libcuda.so"]
        if let p = Environment.string("KVSTORE_CUDA_DRIVER") { names = [p] }
        var handle: UnsafeMutableRawPointer?
        for n in names where handle == nil { handle = dlopen(n, RTLD_NOW | RTLD_LOCAL) }
        guard let handle else { return (nil, "no CUDA driver library (\(names.joined(separator: ", ")))") }
        do {
            let d = try CUDADriver(handle)
            return (d, "")
        } catch {
            return (nil, error.message)
        }
    }

    private init(_ h: UnsafeMutableRawPointer) throws(KVError) {
        func sym<T>(_ name: String, _: T.Type) throws(KVError) -> T {
            guard let p = dlsym(h, name) else { throw KVError(.unsupported, "CUDA driver lacks \(name)") }
            return unsafeBitCast(p, to: T.self)
        }
        cuInit = try sym("cuInit", (@convention(c) (UInt32) -> Result).self)
        cuDeviceGetCount = try sym("cuDeviceGetCount", (@convention(c) (UnsafeMutablePointer<Int32>) -> Result).self)
        cuDeviceGet = try sym("cuDeviceGet", (@convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Result).self)
        cuDevicePrimaryCtxRetain = try sym(
            "cuDevicePrimaryCtxRetain",
            (@convention(c) (UnsafeMutablePointer<Context?>, Int32) -> Result).self)
        cuDevicePrimaryCtxRelease = try sym("cuDevicePrimaryCtxRelease_v2", (@convention(c) (Int32) -> Result).self)
        cuCtxSynchronize = try sym("cuCtxSynchronize", (@convention(c) () -> Result).self)
        cuCtxGetCurrent = try sym("cuCtxGetCurrent", (@convention(c) (UnsafeMutablePointer<Context?>) -> Result).self)
        cuCtxSetCurrent = try sym("cuCtxSetCurrent", (@convention(c) (Context?) -> Result).self)
        cuPointerGetAttribute = try sym(
            "cuPointerGetAttribute",
            (@convention(c) (UnsafeMutableRawPointer, Int32, UInt64) -> Result).self)
        cuMemcpyHtoDAsync = try sym(
            "cuMemcpyHtoDAsync_v2",
            (@convention(c) (UInt64, UnsafeRawPointer, Int, OpaquePointer?) -> Result).self)
        cuMemcpyDtoHAsync = try sym(
            "cuMemcpyDtoHAsync_v2",
            (@convention(c) (UnsafeMutableRawPointer, UInt64, Int, OpaquePointer?) -> Result).self)
        cuMemcpyAsync = try sym("cuMemcpyAsync", (@convention(c) (UInt64, UInt64, Int, OpaquePointer?) -> Result).self)
        cuMemHostAlloc = try sym(
            "cuMemHostAlloc",
            (@convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>, Int, UInt32) -> Result).self)
        cuMemFreeHost = try sym("cuMemFreeHost", (@convention(c) (UnsafeMutableRawPointer) -> Result).self)
        cuMemHostRegister = try sym("cuMemHostRegister_v2", (@convention(c) (UnsafeMutableRawPointer, Int, UInt32) -> Result).self)
        cuMemHostUnregister = try sym("cuMemHostUnregister", (@convention(c) (UnsafeMutableRawPointer) -> Result).self)
        func optional<T>(_ name: String, _: T.Type) -> T? { dlsym(h, name).map { unsafeBitCast($0, to: T.self) } }
        cuMemcpyBatchAsync = optional("cuMemcpyBatchAsync", MemcpyBatchAsync.self)
        cuStreamCreate = try sym("cuStreamCreate", (@convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> Result).self)
        cuStreamSynchronize = try sym("cuStreamSynchronize", (@convention(c) (OpaquePointer?) -> Result).self)
        cuStreamDestroy = try sym("cuStreamDestroy_v2", (@convention(c) (OpaquePointer?) -> Result).self)
        cuGetErrorString = dlsym(h, "cuGetErrorString").map {
            unsafeBitCast($0, to: (@convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result).self)
        }
        var n: Int32 = 0
        var r = cuInit(0)
        if r == 0 { r = cuDeviceGetCount(&n) }
        guard r == 0 else { throw KVError(.unsupported, "CUDA driver initialisation failed (CUresult \(r))") }
        guard n > 0 else { throw KVError(.unsupported, "the CUDA driver found no GPU") }
        deviceCount = Int(n)
    }

    /// Throws `code` with the driver's error text when `result` is not CUDA_SUCCESS.
    func check(_ result: Result, _ what: @autoclosure () -> String, code: KVError.Code = .transfer) throws(KVError) {
        guard result != 0 else { return }
        var text: UnsafePointer<CChar>?
        if let f = cuGetErrorString { _ = f(result, &text) }
        let name = text.map { String(cString: $0) } ?? "CUresult \(result)"
        throw KVError(code, "\(what()) failed: \(name)")
    }
}
