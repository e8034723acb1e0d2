import KVCore
import Synchronization

/// One NVIDIA GPU, driven through `CUDADriver` (loaded at run time). Operations run in the
/// device's primary context, made current for the call and the caller's context restored.
public final class CUDADevice: AcceleratorDevice {
    public static let kind = DeviceKind.cuda

    public static func probe() -> [any AcceleratorDevice] {
        guard let driver = CUDADriver.shared.driver else { return [] }
        return (0..<driver.deviceCount).compactMap { try? CUDADevice(driver: driver, ordinal: $0) }
    }

    /// Why no CUDA device is available ("" when the driver loaded).
    public static var unavailableReason: String { CUDADriver.shared.reason }

    public let location: MemoryLocation
    private let driver: CUDADriver
    private let context: UInt   // CUcontext of the device's primary context (retained for the process)

    private init(driver: CUDADriver, ordinal: Int) throws(KVError) {
        self.driver = driver
        location = MemoryLocation(kind: .cuda, index: ordinal)
        var dev: Int32 = 0
        try driver.check(driver.cuDeviceGet(&dev, Int32(ordinal)), "cuDeviceGet(\(ordinal))", code: .unsupported)
        var ctx: OpaquePointer?
        try driver.check(driver.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain(\(ordinal))", code: .unsupported)
        context = UInt(bitPattern: ctx.map { UnsafeRawPointer($0) })
    }

    public func classify(_ address: UInt) -> MemoryLocation? {
        guard address != 0 else { return nil }
        var type: UInt32 = 0
        guard driver.cuPointerGetAttribute(&type, CUDADriver.attributeMemoryType, UInt64(address)) == 0,
              type == CUDADriver.memoryTypeDevice || type == CUDADriver.memoryTypeUnified else { return nil }
        var ordinal: Int32 = 0
        guard driver.cuPointerGetAttribute(&ordinal, CUDADriver.attributeDeviceOrdinal, UInt64(address)) == 0 else { return nil }
        return MemoryLocation(kind: .cuda, index: Int(ordinal))
    }

    public func withCurrent<R>(_ body: () throws(KVError) -> R) throws(KVError) -> R {
        var previous: OpaquePointer?
        try driver.check(driver.cuCtxGetCurrent(&previous), "cuCtxGetCurrent")
        let mine = OpaquePointer(bitPattern: context)
        if previous == mine { return try body() }
        try driver.check(driver.cuCtxSetCurrent(mine), "cuCtxSetCurrent(\(location))")
        defer { _ = driver.cuCtxSetCurrent(previous) }
        return try body()
    }

    public func copy(_ direction: CopyDirection, from source: UInt, to destination: UInt, count: Int) throws(KVError) {
        guard count > 0 else { return }
        let r: CUDADriver.Result
        switch direction {
        case .hostToDevice:
            r = driver.cuMemcpyHtoD(UInt64(destination), UnsafeRawPointer(bitPattern: source)!, count)
        case .deviceToHost:
            r = driver.cuMemcpyDtoH(UnsafeMutableRawPointer(bitPattern: destination)!, UInt64(source), count)
        case .deviceToDevice, .hostToHost:
            // Unified addressing: the driver finds both sides (also across devices).
            r = driver.cuMemcpy(UInt64(destination), UInt64(source), count)
        }
        try driver.check(r, "\(direction) copy of \(count) bytes on \(location)")
    }

    /// One `cuMemcpyBatchAsync` (CUDA 12.8+) on a stream created for the call, then a
    /// synchronize: the copies are done when this returns. Source access in stream order
    /// (valid for pageable host memory too); no location hints.
    public func copyBatch(_ direction: CopyDirection, sources: [UInt], destinations: [UInt], counts: [Int]) throws(KVError) {
        guard let batch = driver.cuMemcpyBatchAsync, let create = driver.cuStreamCreate, let sync = driver.cuStreamSynchronize,
              let destroy = driver.cuStreamDestroy else {
            throw KVError(.unsupported, "the CUDA driver has no cuMemcpyBatchAsync (it needs CUDA 12.8 or newer)")
        }
        guard sources.count == destinations.count, sources.count == counts.count else {
            throw .invalidArgument("a batched copy needs equally many sources, destinations and sizes")
        }
        guard !sources.isEmpty else { return }
        var stream: OpaquePointer?
        try driver.check(create(&stream, 1), "cuStreamCreate")   // CU_STREAM_NON_BLOCKING
        defer { _ = destroy(stream) }
        var src = sources.map { UInt64($0) }, dst = destinations.map { UInt64($0) }, sizes = counts
        // CUmemcpyAttributes: srcAccessOrder (CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1), two
        // CUmemLocation hints {type, id} left invalid (0), flags 0: 24 bytes.
        var attributes: (Int32, Int32, Int32, Int32, Int32, UInt32) = (1, 0, 0, 0, 0, 0)
        var firstIndex = [0], failed = 0
        let r = withUnsafeMutableBytes(of: &attributes) { a in
            batch(&dst, &src, &sizes, sizes.count, a.baseAddress!, &firstIndex, 1, &failed, stream)
        }
        try driver.check(r, "cuMemcpyBatchAsync of \(sizes.count) \(direction) copies on \(location) (copy \(failed) failed)")
        try driver.check(sync(stream), "cuStreamSynchronize after a batched copy on \(location)")
    }

    public func allocatePinned(bytes: Int) throws(KVError) -> MemoryRegion {
        guard bytes > 0 else { throw .invalidArgument("pinned allocation must be positive, got \(bytes)") }
        return try withCurrent { () throws(KVError) -> MemoryRegion in
            var p: UnsafeMutableRawPointer?
            try driver.check(driver.cuMemHostAlloc(&p, bytes, CUDADriver.hostAllocPortable),
                             "cuMemHostAlloc(\(bytes))", code: .noSpace)
            return MemoryRegion(p!, length: bytes)
        }
    }

    public func freePinned(_ region: MemoryRegion) {
        guard let p = UnsafeMutableRawPointer(bitPattern: region.address) else { return }
        _ = try? withCurrent { () throws(KVError) in _ = driver.cuMemFreeHost(p) }
    }

    public func pin(_ region: MemoryRegion) throws(KVError) {
        guard let p = UnsafeMutableRawPointer(bitPattern: region.address), region.length > 0 else {
            throw .invalidArgument("cannot pin an empty range")
        }
        try withCurrent { () throws(KVError) in
            try driver.check(driver.cuMemHostRegister(p, region.length, CUDADriver.hostRegisterPortable),
                             "cuMemHostRegister of \(region.length) bytes", code: .noSpace)
        }
    }

    public func unpin(_ region: MemoryRegion) {
        guard let p = UnsafeMutableRawPointer(bitPattern: region.address) else { return }
        _ = try? withCurrent { () throws(KVError) in _ = driver.cuMemHostUnregister(p) }
    }
}

@used @section("kvstore_accelerators")
let cudaDeviceRegistration: AcceleratorRegistration = { AcceleratorRecord.make(CUDADevice.self) }
