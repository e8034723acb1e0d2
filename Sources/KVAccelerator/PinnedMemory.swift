#if canImport(Glibc)
import Glibc
#endif
import KVCore
import Synchronization

/// Whether and how much host memory to pin, read from the environment:
/// `KVSTORE_PIN_MEMORY` (`0`, `false`, `no`, `off` turn pinning off; default on) and
/// `KVSTORE_PIN_MEMORY_MAX_BYTES` (a byte count; unset or 0: no cap). `MC_STORE_PIN_MEMORY`
/// and `MC_STORE_PIN_MEMORY_MAX_BYTES` are accepted as aliases; the KVSTORE_ name wins.
public struct PinningPolicy: Sendable, Equatable {
    public var enabled: Bool
    /// Most bytes this process keeps pinned at once; 0 means no cap.
    public var maxBytes: Int

    public init(enabled: Bool = true, maxBytes: Int = 0) {
        self.enabled = enabled
        self.maxBytes = maxBytes
    }

    /// The policy the environment asks for; throws `invalidArgument` for a value it cannot read.
    public static func fromEnvironment() throws(KVError) -> PinningPolicy {
        func value(_ names: String...) -> (String, String)? {
            // Set but empty counts as set here ("" means on, as before).
            for n in names { if let v = getenv(n) { return (n, String(cString: v)) } }
            return nil
        }
        var p = PinningPolicy()
        if let (name, v) = value("KVSTORE_PIN_MEMORY", "MC_STORE_PIN_MEMORY") {
            switch v.lowercased() {
            case "0", "false", "no", "off": p.enabled = false
            case "1", "true", "yes", "on", "": p.enabled = true
            default: throw .invalidArgument("\(name)='\(v)' is not a boolean (use 0 or 1)")
            }
        }
        if let (name, v) = value("KVSTORE_PIN_MEMORY_MAX_BYTES", "MC_STORE_PIN_MEMORY_MAX_BYTES"), !v.isEmpty {
            guard let n = Int(v), n >= 0 else {
                throw .invalidArgument("\(name)='\(v)' is not a byte count (a non-negative integer)")
            }
            p.maxBytes = n
        }
        return p
    }
}

/// A host range that one device pinned; unpin it with `PinnedMemory.unpin` exactly once.
public struct PinnedRange: Sendable {
    public let region: MemoryRegion
    public let device: any AcceleratorDevice
}

/// What became of a request to pin.
public enum PinOutcome: Sendable {
    /// Pinned by an accelerator.
    case pinned(PinnedRange)
    /// Nothing to do: pinning is off, or no accelerator is present.
    case notNeeded
    /// Stays pageable: the budget was exhausted or the driver refused (the reason says which).
    case fellBack(String)
}

/// The process's pinned host memory: every pin goes through here, within the policy's byte
/// cap. Pinning never fails an operation: a refused pin falls back to pageable memory and is
/// counted. Thread-safe (the budget is an atomic reservation).
public final class PinnedMemory: Sendable {
    public static let shared = PinnedMemory()

    /// Bytes pinned now, by every store in the process.
    public let pinnedBytes = Atomic<Int>(0)
    /// Pins refused (budget or driver) since start.
    public let fallbacks = Atomic<Int>(0)

    public init() {}

    /// Pins `region` with `device` (nil: the first accelerator of `snapshot`), if the policy
    /// allows and the budget has room. Pins are portable: usable by every device's copies.
    public func pin(
        _ region: MemoryRegion, policy: PinningPolicy, device: (any AcceleratorDevice)? = nil,
        snapshot: AcceleratorSnapshot = AcceleratorRegistry.snapshot
    ) -> PinOutcome {
        guard policy.enabled, region.length > 0, let device = device ?? snapshot.accelerators.first,
            !device.location.isHost
        else { return .notNeeded }
        guard reserve(region.length, cap: policy.maxBytes) else {
            fallbacks.add(1, ordering: .relaxed)
            return .fellBack("pinning \(region.length) bytes would exceed the pinned-memory budget of \(policy.maxBytes) bytes")
        }
        do {
            try device.pin(region)
            return .pinned(PinnedRange(region: region, device: device))
        } catch {
            pinnedBytes.subtract(region.length, ordering: .relaxed)
            fallbacks.add(1, ordering: .relaxed)
            return .fellBack(error.message)
        }
    }

    /// Unpins a range that `pin` pinned and returns its bytes to the budget.
    public func unpin(_ range: PinnedRange) {
        range.device.unpin(range.region)
        pinnedBytes.subtract(range.region.length, ordering: .relaxed)
    }

    private func reserve(_ bytes: Int, cap: Int) -> Bool {
        var current = pinnedBytes.load(ordering: .relaxed)
        while true {
            if cap > 0, current + bytes > cap { return false }
            let (done, seen) = pinnedBytes.compareExchange(expected: current, desired: current + bytes, ordering: .relaxed)
            if done { return true }
            current = seen
        }
    }
}
