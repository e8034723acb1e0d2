import CKVAccelerator
import KVCore

/// The stream a device copy is ordered against: the caller's (known), or unknown.
///
/// Known: the copies run on that stream, so they start after the work the caller queued on it
/// before the call, and kvstore synchronizes the stream before returning, so they are complete
/// when the call returns. Unknown (memory passed by address with no stream, a registered
/// buffer, a KV layout): kvstore first waits for all work queued on the device's context,
/// then copies on the legacy default stream and synchronizes it. Handle 0 is the legacy
/// default stream.
public struct DeviceStream: Sendable, Hashable, CustomStringConvertible {
    public let handle: UInt
    public let known: Bool

    public init(handle: UInt, known: Bool = true) {
        self.handle = handle
        self.known = known
    }

    public static let unknown = DeviceStream(handle: 0, known: false)

    /// Whether the handle names the legacy default stream (0 or CU_STREAM_LEGACY).
    public var isLegacy: Bool { handle == 0 || handle == 1 }

    public var description: String { known ? "stream 0x\(String(handle, radix: 16))" : "no known stream" }
}

/// What the caller of the current call declared about memory it passes by address
/// (`kv_call_devices`, set by the Python extension for tensors): the device, when known, and
/// the stream. Thread-local: only calls on the declaring thread see it.
public enum CallDevices {
    public struct Declared: Sendable, Equatable {
        /// nil: CUDA memory whose device the driver must name (an `__cuda_array_interface__`).
        public let location: MemoryLocation?
        public let stream: DeviceStream
    }

    /// The declaration covering the whole of `region`, if any.
    public static func lookup(_ region: MemoryRegion) -> Declared? {
        var n = 0
        guard let parts = kv_call_devices_declared(&n), n > 0 else { return nil }
        for i in 0..<n {
            let p = parts[i]
            guard UInt(p.address) <= region.address, region.address + UInt(region.length) <= UInt(p.address) + UInt(p.length),
                region.length > 0 || UInt(p.address) == region.address
            else { continue }
            let stream = p.flags & UInt32(KV_DEVICE_STREAM_KNOWN) != 0 ? DeviceStream(handle: UInt(p.stream)) : .unknown
            switch p.kind {
            case Int32(KV_DEVICE_HOST):
                return Declared(location: .host, stream: stream)
            default:
                return Declared(location: p.device >= 0 ? MemoryLocation(kind: .cuda, index: Int(p.device)) : nil, stream: stream)
            }
        }
        return nil
    }

    /// The stream declared for the memory at `address` (unknown when none is).
    public static func stream(at address: UInt) -> DeviceStream {
        lookup(MemoryRegion(address: address, length: 1))?.stream ?? .unknown
    }
}

/// The devices one store has used, each acquired once (a CUDA device retains its primary
/// context then) and released when the store closes. A store that never touches a device
/// never acquires it.
public final class DeviceHolds: Sendable {
    private let held = Locked<[any AcceleratorDevice]>([])

    public init() {}

    /// Acquires `device` for this store unless it already holds it.
    public func hold(_ device: any AcceleratorDevice) throws(KVError) {
        let err: KVError? = held.withLock { list in
            if list.contains(where: { $0 === device }) { return nil }
            do throws(KVError) {
                try device.acquire()
                list.append(device)
                return nil
            } catch {
                return error
            }
        }
        if let err { throw err }
    }

    /// The locations held now.
    public var locations: [MemoryLocation] { held.withLock { $0.map(\.location) } }

    /// Releases every device held (on close).
    public func releaseAll() {
        let list = held.withLock { l in
            defer { l.removeAll() }; return l
        }
        for d in list { d.release() }
    }
}
