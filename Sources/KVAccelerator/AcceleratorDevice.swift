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

    /// Which device of this kind owns the memory at `address` (never 0), or nil when the
    /// driver says it is not this kind's memory. Throws when the driver cannot tell (it failed
    /// to answer): such memory must not be treated as host memory. The fallback for
    /// unregistered memory whose location the caller did not declare.
    func classify(_ address: UInt) throws(KVError) -> MemoryLocation?

    /// Takes a hold on the device for one user (a store): a CUDA device retains its primary
    /// context on the first hold. Every `withCurrent` needs a hold; `release` ends one.
    /// Probing, listing and classifying never acquire.
    func acquire() throws(KVError)
    func release()

    /// Runs `body` with this device current on the calling thread and restores the caller's
    /// previous current device afterwards, also when `body` throws. Needs a hold (`acquire`).
    func withCurrent<R>(_ body: () throws(KVError) -> R) throws(KVError) -> R

    /// Runs `body`, which queues copies on `stream`, ordered after the work queued on that
    /// stream before (an unknown stream: after all of the device's queued work), and returns
    /// once they are complete, also when `body` throws. Call it inside `withCurrent`.
    func withCopies<R>(on stream: DeviceStream, _ body: () throws(KVError) -> R) throws(KVError) -> R

    /// Queues a copy of `count` bytes from `source` to `destination` on `stream` (call it
    /// inside `withCopies`); `direction` says which side is this device's memory. A direction
    /// this device cannot perform is `unsupported`.
    func copy(
        _ direction: CopyDirection, from source: UInt, to destination: UInt, count: Int,
        stream: DeviceStream) throws(KVError)
    /// Many copies of one direction in one driver call (`sources[i]` → `destinations[i]`,
    /// `counts[i]` bytes; the arrays are equally long), queued on `stream` (call it inside
    /// `withCopies`). Devices without such a call throw `unsupported` (the default).
    func copyBatch(
        _ direction: CopyDirection, sources: [UInt], destinations: [UInt], counts: [Int],
        stream: DeviceStream) throws(KVError)

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

    public func copyBatch(
        _ direction: CopyDirection, sources: [UInt], destinations: [UInt], counts: [Int],
        stream: DeviceStream
    ) throws(KVError) {
        throw KVError(.unsupported, "\(location) has no batched copy")
    }

    /// Devices whose copies complete within `copy` need no ordering.
    public func withCopies<R>(on stream: DeviceStream, _ body: () throws(KVError) -> R) throws(KVError) -> R {
        try body()
    }

    public func acquire() throws(KVError) {}
    public func release() {}
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
