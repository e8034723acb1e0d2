#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVSystem

/// Host memory: always available, the only device that classifies every non-null pointer.
/// Copies are `memcpy`; pinning is `mlock` (page-locking for the kernel's sake; accelerators
/// pin with their own driver, see `PinnedMemory`).
public final class HostDevice: AcceleratorDevice {
    public static let kind = DeviceKind.cpu
    public static func probe() -> [any AcceleratorDevice] { [HostDevice()] }

    public let location = MemoryLocation.host

    public init() {}

    public func classify(_ address: UInt) -> MemoryLocation? { address == 0 ? nil : .host }

    public func withCurrent<R>(_ body: () throws(KVError) -> R) throws(KVError) -> R { try body() }

    public func copy(
        _ direction: CopyDirection, from source: UInt, to destination: UInt, count: Int,
        stream: DeviceStream = .unknown
    ) throws(KVError) {
        guard direction == .hostToHost else {
            throw KVError(.unsupported, "the host device cannot copy \(direction)")
        }
        guard count > 0, let d = UnsafeMutableRawPointer(bitPattern: destination),
            let s = UnsafeRawPointer(bitPattern: source)
        else { return }
        memcpy(d, s, count)
    }

    public func allocatePinned(bytes: Int) throws(KVError) -> MemoryRegion {
        guard bytes > 0 else { throw .invalidArgument("pinned allocation must be positive, got \(bytes)") }
        let p = try SystemCall.mmap(length: bytes, protection: PROT_READ | PROT_WRITE, flags: MAP_PRIVATE | MAP_ANONYMOUS)
        if mlock(p, bytes) != 0 {
            let e = SystemCall.failure("mlock of \(bytes) bytes", code: .noSpace)
            munmap(p, bytes)
            throw e
        }
        return MemoryRegion(p, length: bytes)
    }

    public func freePinned(_ region: MemoryRegion) {
        guard let p = UnsafeMutableRawPointer(bitPattern: region.address) else { return }
        munlock(p, region.length)
        munmap(p, region.length)
    }

    public func pin(_ region: MemoryRegion) throws(KVError) {
        try SystemCall.check("mlock of \(region.length) bytes", mlock(UnsafeRawPointer(bitPattern: region.address), region.length), code: .noSpace)
    }

    public func unpin(_ region: MemoryRegion) {
        munlock(UnsafeRawPointer(bitPattern: region.address), region.length)
    }
}

@used @section("kvstore_accelerators")
let hostDeviceRegistration: AcceleratorRegistration = { AcceleratorRecord.make(HostDevice.self) }
