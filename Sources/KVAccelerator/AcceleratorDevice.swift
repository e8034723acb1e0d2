import KVCore

/// One device that memory can live on: the host (always present) or an accelerator.
///
/// A device type registers itself statically: it places a record in the
/// `kvstore_accelerators` linker section (see `AcceleratorRecord`), and
/// `AcceleratorRegistry` finds every record linked into the module and probes each type. There
/// is no runtime registration call.
///
/// Implementations are immutable after `probe` and safe to call from any thread.
public protocol AcceleratorDevice: AnyObject, Sendable {
    /// The kind every device of this type has ("cpu", "cuda").
    static var kind: DeviceKind { get }

    /// Finds this type's devices on this machine. Returns none when the driver is missing or
    /// finds no device; never throws or crashes for that. Called on every registry refresh.
    static func probe() -> [any AcceleratorDevice]

    /// Where this device's memory lives ("cuda:0").
    var location: MemoryLocation { get }

    /// Which device of this kind owns the memory at `address` (never 0), or nil when it is not
    /// this kind's memory. The fallback for unregistered memory: it may ask the driver.
    func classify(_ address: UInt) -> MemoryLocation?

    /// Runs `body` with this device current on the calling thread and restores the caller's
    /// previous current device afterwards, also when `body` throws.
    func withCurrent<R>(_ body: () throws(KVError) -> R) throws(KVError) -> R

    /// Copies `count` bytes from `source` to `destination`; `direction` says which side is
    /// this device's memory. A direction this device cannot perform is `unsupported`. Call it
    /// inside `withCurrent` (one scope can hold many copies: `DeviceCopyPlan` enters it once
    /// per device per batch).
    func copy(_ direction: CopyDirection, from source: UInt, to destination: UInt, count: Int) throws(KVError)
    /// Many copies of one direction in one driver call (`sources[i]` → `destinations[i]`,
    /// `counts[i]` bytes; the arrays are equally long), complete when it returns. Devices
    /// without such a call throw `unsupported` (the default). Call it inside `withCurrent`.
    func copyBatch(_ direction: CopyDirection, sources: [UInt], destinations: [UInt], counts: [Int]) throws(KVError)

    /// Allocates `bytes` of page-locked host memory usable for fast copies with this device.
    /// Freed with `freePinned`.
    func allocatePinned(bytes: Int) throws(KVError) -> MemoryRegion
    func freePinned(_ region: MemoryRegion)

    /// Page-locks existing host memory for this device's copies. Only a region that `pin`
    /// accepted may be passed to `unpin`, exactly once.
    func pin(_ region: MemoryRegion) throws(KVError)
    func unpin(_ region: MemoryRegion)
}

extension AcceleratorDevice {
    public var kind: DeviceKind { Self.kind }

    public func copyBatch(_ direction: CopyDirection, sources: [UInt], destinations: [UInt], counts: [Int]) throws(KVError) {
        throw KVError(.unsupported, "\(location) has no batched copy")
    }
}

/// The registration record of one device type: a C function in the `kvstore_accelerators`
/// section that returns a retained `AcceleratorRecord`. A device type registers itself with
///
///     @used @section("kvstore_accelerators")
///     let myRegistration: AcceleratorRegistration = { AcceleratorRecord.make(MyDevice.self) }
public typealias AcceleratorRegistration = @convention(c) () -> UnsafeMutableRawPointer

/// What a registration record hands the registry: the device type.
public final class AcceleratorRecord: Sendable {
    public let type: any AcceleratorDevice.Type

    private init(_ type: any AcceleratorDevice.Type) { self.type = type }

    /// A retained record for `type`, in the form a registration function returns.
    public static func make(_ type: any AcceleratorDevice.Type) -> UnsafeMutableRawPointer {
        Unmanaged.passRetained(AcceleratorRecord(type)).toOpaque()
    }
}
