import KVAccelerator
import KVCore

/// Memory ranges registered by the user, each with the location captured at registration.
/// Ranges never overlap. Lookup by address is a binary search over a sorted array.
/// Thread-safe (one mutex).
public final class MemoryRegistry: Sendable {
    public struct Entry: Sendable, Equatable {
        public let region: MemoryRegion
        public let location: MemoryLocation
    }

    private let entries = Locked<[Entry]>([])

    public init() {}

    /// Registers `region` at `location`. Throws `invalidArgument` for an empty range or one
    /// overlapping an existing registration.
    public func register(_ region: MemoryRegion, location: MemoryLocation) throws(KVError) {
        guard region.length > 0 else { throw .invalidArgument("cannot register an empty buffer") }
        let err: KVError? = entries.withLock { list in
            let i = Self.firstIndex(in: list, notBelow: region.address)
            if i > 0, list[i - 1].region.end > region.address { return Self.overlap(region, list[i - 1]) }
            if i < list.count, list[i].region.address < region.end { return Self.overlap(region, list[i]) }
            list.insert(Entry(region: region, location: location), at: i)
            return nil
        }
        if let err { throw err }
    }

    /// Removes the registration that starts at `address`; returns it.
    @discardableResult
    public func unregister(address: UInt) throws(KVError) -> Entry {
        let e: Entry? = entries.withLock { list in
            let i = Self.firstIndex(in: list, notBelow: address)
            guard i < list.count, list[i].region.address == address else { return nil }
            return list.remove(at: i)
        }
        guard let e else { throw .invalidArgument("no buffer is registered at address 0x\(String(address, radix: 16))") }
        return e
    }

    /// The registration that contains the whole of `region`, if any.
    public func lookup(_ region: MemoryRegion) -> Entry? {
        entries.withLock { list in
            let i = Self.firstIndex(in: list, notBelow: region.address + 1)
            guard i > 0 else { return nil }
            let e = list[i - 1]
            return e.region.address <= region.address && region.end <= e.region.end ? e : nil
        }
    }

    public var count: Int { entries.withLock { $0.count } }
    public var registeredBytes: Int { entries.withLock { $0.reduce(0) { $0 + $1.region.length } } }

    /// Drops every registration (on close).
    public func removeAll() { entries.withLock { $0.removeAll() } }

    private static func firstIndex(in list: [Entry], notBelow address: UInt) -> Int {
        var lo = 0, hi = list.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if list[mid].region.address < address { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    private static func overlap(_ r: MemoryRegion, _ e: Entry) -> KVError {
        .invalidArgument(
            "buffer [0x\(String(r.address, radix: 16)), +\(r.length)) overlaps a registered buffer [0x\(String(e.region.address, radix: 16)), +\(e.region.length))"
        )
    }
}
