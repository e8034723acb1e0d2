import CKVAccelerator
import KVCore
import Synchronization

/// The process's devices. Device types register themselves statically (records in the
/// `kvstore_accelerators` linker section, see `AcceleratorRegistration`); the first use probes
/// every registered type once and publishes the result as an immutable `AcceleratorSnapshot`.
/// Readers take the current snapshot with one atomic load, no lock. `refresh()` probes again
/// and publishes a new snapshot; snapshots are never freed (refreshes are rare and explicit),
/// so a reader may keep using the one it took.
public enum AcceleratorRegistry {
    private static let published = Atomic<Unmanaged<AcceleratorSnapshot>?>(nil)
    /// Serialises refreshes and keeps every published snapshot alive.
    private static let history = Locked<[AcceleratorSnapshot]>([])

    /// The device types whose records are linked into this module, host first.
    public static let registeredTypes: [any AcceleratorDevice.Type] = {
        var count = 0
        var types: [any AcceleratorDevice.Type] = []
        if let records = kv_accelerator_records(&count) {
            for i in 0..<count {
                guard let raw = records[i] else { continue }
                let make = unsafeBitCast(raw, to: AcceleratorRegistration.self)
                let record = Unmanaged<AcceleratorRecord>.fromOpaque(make()).takeRetainedValue()
                if !types.contains(where: { $0 == record.type }) { types.append(record.type) }
            }
        }
        // The host comes first whatever the link order; it is always registered (HostDevice).
        types.sort { a, b in a.kind == .cpu && b.kind != .cpu }
        return types
    }()

    /// The current snapshot; probes on first use.
    public static var snapshot: AcceleratorSnapshot {
        if let s = published.load(ordering: .acquiring) { return s.takeUnretainedValue() }
        return refresh(ifGenerationIs: 0)
    }

    /// Probes every registered device type again and publishes the result.
    @discardableResult
    public static func refresh() -> AcceleratorSnapshot {
        refresh(ifGenerationIs: nil)
    }

    private static func refresh(ifGenerationIs expected: Int?) -> AcceleratorSnapshot {
        history.withLock { list in
            if let expected, let last = list.last, last.generation != expected { return last }
            var devices: [any AcceleratorDevice] = []
            var kinds: [DeviceKind] = []
            for t in registeredTypes {
                if !kinds.contains(t.kind) { kinds.append(t.kind) }
                devices.append(contentsOf: t.probe())
            }
            if devices.first?.location != .host { devices.insert(HostDevice(), at: 0) }
            let s = AcceleratorSnapshot(generation: (list.last?.generation ?? 0) + 1, devices: devices, kinds: kinds)
            list.append(s)
            published.store(Unmanaged.passUnretained(s), ordering: .releasing)
            return s
        }
    }
}
