import KVCore
import Synchronization

/// One NVIDIA GPU, driven through `CUDADriver` (loaded at run time). Operations run in the
/// device's primary context, made current for the call and the caller's context restored.
///
/// The primary context is retained lazily: probing and classifying use only `cuInit`,
/// `cuDeviceGet` and pointer queries, so creating a store retains nothing; the first `acquire`
/// (a store's first copy with this device, or pinning through it) retains it and the last
/// `release` lets it go. Copies are queued on the caller's stream and synchronized before the
/// call returns (`withCopies`).
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
    private let device: Int32
    /// Holds (`acquire`) and the retained primary context (0 while none is held).
    private let context = Mutex<(holds: Int, handle: UInt)>((0, 0))

    private init(driver: CUDADriver, ordinal: Int) throws(KVError) {
        self.driver = driver
        location = MemoryLocation(kind: .cuda, index: ordinal)
        var dev: Int32 = 0
        try driver.check(driver.cuDeviceGet(&dev, Int32(ordinal)), "cuDeviceGet(\(ordinal))", code: .unsupported)
        device = dev
    }

    public func classify(_ address: UInt) throws(KVError) -> MemoryLocation? {
        guard address != 0 else { return nil }
        var type: UInt32 = 0
        let r = driver.cuPointerGetAttribute(&type, CUDADriver.attributeMemoryType, UInt64(address))
        // CUDA_ERROR_INVALID_VALUE is the driver's "not a pointer I know": host memory. Any
        // other failure means it cannot tell, and guessing "host" would memcpy device memory.
        if r == CUDADriver.errorInvalidValue { return nil }
        try driver.check(r, "asking the CUDA driver where memory at 0x\(String(address, radix: 16)) lives")
        guard type == CUDADriver.memoryTypeDevice || type == CUDADriver.memoryTypeUnified else { return nil }
        var ordinal: Int32 = 0
        try driver.check(
            driver.cuPointerGetAttribute(&ordinal, CUDADriver.attributeDeviceOrdinal, UInt64(address)),
            "asking the CUDA driver which GPU holds 0x\(String(address, radix: 16))")
        return MemoryLocation(kind: .cuda, index: Int(ordinal))
    }

    public func acquire() throws(KVError) {
        let r: KVError? = context.withLock { c in
            if c.holds == 0 {
                var ctx: OpaquePointer?
                do throws(KVError) {
                    try driver.check(
                        driver.cuDevicePrimaryCtxRetain(&ctx, device), "cuDevicePrimaryCtxRetain on \(location)",
                        code: .unsupported)
                } catch {
                    return error
                }
                c.handle = UInt(bitPattern: ctx.map { UnsafeRawPointer($0) })
            }
            c.holds += 1
            return nil
        }
        if let r { throw r }
    }

    public func release() {
        context.withLock { c in
            guard c.holds > 0 else { return }
            c.holds -= 1
            if c.holds == 0 {
                _ = driver.cuDevicePrimaryCtxRelease(device)
                c.handle = 0
            }
        }
    }

    public func withCurrent<R>(_ body: () throws(KVError) -> R) throws(KVError) -> R {
        let handle = context.withLock { $0.handle }
        guard handle != 0 else { throw KVError(.internal, "\(location) is used without a hold on its context") }
        var previous: OpaquePointer?
        try driver.check(driver.cuCtxGetCurrent(&previous), "cuCtxGetCurrent")
        let mine = OpaquePointer(bitPattern: handle)
        if previous == mine { return try body() }
        try driver.check(driver.cuCtxSetCurrent(mine), "cuCtxSetCurrent(\(location))")
        defer { _ = driver.cuCtxSetCurrent(previous) }
        return try body()
    }

    public func withCopies<R>(on stream: DeviceStream, _ body: () throws(KVError) -> R) throws(KVError) -> R {
        // Unknown stream: the memory may still be written or read by work on any stream of
        // the context (PyTorch's side streams are non-blocking: the legacy stream does not
        // wait for them), so wait for all of it first.
        if !stream.known { try driver.check(driver.cuCtxSynchronize(), "cuCtxSynchronize before copies on \(location)") }
        let result: Result<R, KVError>
        do throws(KVError) { result = .success(try body()) } catch { result = .failure(error) }
        // Complete before returning, also after a failure: copies queued before it would
        // otherwise land after the caller saw the error.
        let synced = driver.cuStreamSynchronize(OpaquePointer(bitPattern: stream.handle))
        let value = try result.get()
        try driver.check(synced, "cuStreamSynchronize after copies on \(location) (\(stream))")
        return value
    }

    public func copy(
        _ direction: CopyDirection, from source: UInt, to destination: UInt, count: Int,
        stream: DeviceStream
    ) throws(KVError) {
        guard count > 0 else { return }
        let s = OpaquePointer(bitPattern: stream.handle)
        let r: CUDADriver.Result
        switch direction {
        case .hostToDevice:
            r = driver.cuMemcpyHtoDAsync(UInt64(destination), UnsafeRawPointer(bitPattern: source)!, count, s)
        case .deviceToHost:
            r = driver.cuMemcpyDtoHAsync(UnsafeMutableRawPointer(bitPattern: destination)!, UInt64(source), count, s)
        case .deviceToDevice, .hostToHost:
            // Unified addressing: the driver finds both sides (also across devices).
            r = driver.cuMemcpyAsync(UInt64(destination), UInt64(source), count, s)
        }
        try driver.check(r, "\(direction) copy of \(count) bytes on \(location)")
    }

    /// One `cuMemcpyBatchAsync` (CUDA 12.8+) on `stream`. The driver refuses the legacy
    /// default stream there, so for it (and for an unknown stream) the batch runs on a blocking
    /// stream made for the call, which the legacy stream orders against, synchronized and
    /// destroyed before returning. Source access in stream order (valid for pageable host
    /// memory too); no location hints.
    public func copyBatch(
        _ direction: CopyDirection, sources: [UInt], destinations: [UInt], counts: [Int],
        stream: DeviceStream
    ) throws(KVError) {
        guard let batch = driver.cuMemcpyBatchAsync else {
            throw KVError(.unsupported, "the CUDA driver has no cuMemcpyBatchAsync (it needs CUDA 12.8 or newer)")
        }
        guard sources.count == destinations.count, sources.count == counts.count else {
            throw .invalidArgument("a batched copy needs equally many sources, destinations and sizes")
        }
        guard !sources.isEmpty else { return }
        var own: OpaquePointer? = nil
        if stream.isLegacy {
            try driver.check(driver.cuStreamCreate(&own, 0), "cuStreamCreate") // blocking: ordered with the legacy stream
        }
        defer {
            if let own {
                _ = driver.cuStreamSynchronize(own)
                _ = driver.cuStreamDestroy(own)
            }
        }
        var src = sources.map { UInt64($0) }, dst = destinations.map { UInt64($0) }, sizes = counts
        // CUmemcpyAttributes: srcAccessOrder (CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1), two
        // CUmemLocation hints {type, id} left invalid (0), flags 0: 24 bytes.
        var attributes: (Int32, Int32, Int32, Int32, Int32, UInt32) = (1, 0, 0, 0, 0, 0)
        var firstIndex = [0], failed = Int.max
        let r = withUnsafeMutableBytes(of: &attributes) { a in
            batch(
                &dst, &src, &sizes, sizes.count, a.baseAddress!, &firstIndex, 1, &failed,
                own ?? OpaquePointer(bitPattern: stream.handle))
        }
        let which = failed >= 0 && failed < sizes.count ? " (copy \(failed) failed)" : ""
        try driver.check(r, "cuMemcpyBatchAsync of \(sizes.count) \(direction) copies on \(location)\(which)")
    }

    public func allocatePinned(bytes: Int) throws(KVError) -> MemoryRegion {
        guard bytes > 0 else { throw .invalidArgument("pinned allocation must be positive, got \(bytes)") }
        try acquire()
        do throws(KVError) {
            return try withCurrent { () throws(KVError) -> MemoryRegion in
                var p: UnsafeMutableRawPointer?
                try driver.check(
                    driver.cuMemHostAlloc(&p, bytes, CUDADriver.hostAllocPortable),
                    "cuMemHostAlloc(\(bytes))", code: .noSpace)
                return MemoryRegion(p!, length: bytes)
            }
        } catch {
            release()
            throw error
        }
    }

    public func freePinned(_ region: MemoryRegion) {
        guard let p = UnsafeMutableRawPointer(bitPattern: region.address) else { return }
        _ = try? withCurrent { () throws(KVError) in _ = driver.cuMemFreeHost(p) }
        release()
    }

    public func pin(_ region: MemoryRegion) throws(KVError) {
        guard let p = UnsafeMutableRawPointer(bitPattern: region.address), region.length > 0 else {
            throw .invalidArgument("cannot pin an empty range")
        }
        try acquire()
        do throws(KVError) {
            try withCurrent { () throws(KVError) in
                try driver.check(
                    driver.cuMemHostRegister(p, region.length, CUDADriver.hostRegisterPortable),
                    "cuMemHostRegister of \(region.length) bytes", code: .noSpace)
            }
        } catch {
            release()
            throw error
        }
    }

    public func unpin(_ region: MemoryRegion) {
        guard let p = UnsafeMutableRawPointer(bitPattern: region.address) else { return }
        _ = try? withCurrent { () throws(KVError) in _ = driver.cuMemHostUnregister(p) }
        release()
    }
}

@used @section("kvstore_accelerators")
let cudaDeviceRegistration: AcceleratorRegistration = { AcceleratorRecord.make(CUDADevice.self) }
