import KVCore

/// The devices available at one moment: an immutable value that any thread reads without a
/// lock. The host device is always first.
public final class AcceleratorSnapshot: Sendable {
    /// Increases with every refresh.
    public let generation: Int
    /// Every device, host first, then each registered kind's devices in record order.
    public let devices: [any AcceleratorDevice]
    /// Every registered kind, available or not.
    public let kinds: [DeviceKind]
    /// The first device of each non-host kind: the ones asked to classify a pointer.
    private let classifiers: [any AcceleratorDevice]
    private let byLocation: [MemoryLocation: Int]

    init(generation: Int, devices: [any AcceleratorDevice], kinds: [DeviceKind]) {
        self.generation = generation
        self.devices = devices
        self.kinds = kinds
        var map: [MemoryLocation: Int] = [:]
        var seen: Set<DeviceKind> = []
        var classifiers: [any AcceleratorDevice] = []
        for (i, d) in devices.enumerated() {
            if map[d.location] == nil { map[d.location] = i }
            if !d.location.isHost, seen.insert(d.kind).inserted { classifiers.append(d) }
        }
        self.byLocation = map
        self.classifiers = classifiers
    }

    /// The host device.
    public var host: any AcceleratorDevice { devices[0] }

    /// Every device that is not the host.
    public var accelerators: ArraySlice<any AcceleratorDevice> { devices.dropFirst() }

    /// Whether any accelerator is present (pinning host memory only matters then).
    public var hasAccelerator: Bool { devices.count > 1 }

    /// The device at `location`, or nil when no such device exists now.
    public func device(at location: MemoryLocation) -> (any AcceleratorDevice)? {
        byLocation[location].map { devices[$0] }
    }

    /// The device at `location`; throws `invalidArgument` naming the devices that exist.
    public func requireDevice(at location: MemoryLocation) throws(KVError) -> any AcceleratorDevice {
        if let d = device(at: location) { return d }
        throw missing(location)
    }

    /// The error for a location with no device: names the devices that exist and, for CUDA,
    /// why the driver offers none.
    public func missing(_ location: MemoryLocation) -> KVError {
        let names = devices.map { $0.location.description }.joined(separator: ", ")
        var why = ""
        if location.kind == .cuda, !CUDADevice.unavailableReason.isEmpty { why = "; \(CUDADevice.unavailableReason)" }
        return .invalidArgument("no device '\(location)' on this machine (available: \(names)\(why))")
    }

    /// Where the memory at `address` lives: asks each accelerator kind (a driver query), and
    /// answers host when every driver says it is not its memory. Nil for the null pointer.
    /// Throws when a driver cannot tell. With no accelerator present this is a comparison,
    /// not a query.
    public func classify(_ address: UInt) throws(KVError) -> MemoryLocation? {
        guard address != 0 else { return nil }
        for c in classifiers {
            if let loc = try c.classify(address) { return loc }
        }
        return .host
    }
}
