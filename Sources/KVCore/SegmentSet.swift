/// Identifies a segment in the cluster (the embedded store's only segment is 0).
public typealias SegmentID = UInt32

/// One copy of an object's bytes: the segment holding it and the byte offset there.
public struct Replica: Sendable, Hashable, CustomStringConvertible {
    public let segment: SegmentID
    public let offset: Int

    public init(segment: SegmentID, offset: Int) {
        self.segment = segment
        self.offset = offset
    }

    public var description: String { "\(segment)@\(offset)" }
}

/// Where one replica lives inside the table: the segment's slot and its allocation.
struct Placement: Sendable, Equatable {
    var slot: Int32
    var allocation: Allocation
}

/// The replicas of one object version: the first inline, further ones in an array (so a
/// single-replica object costs no heap allocation).
struct PlacementList: Sendable {
    var first: Placement? = nil
    var rest: [Placement] = []

    init() {}
    init(_ p: Placement) { first = p }

    var isEmpty: Bool { first == nil }
    var count: Int { first == nil ? 0 : 1 + rest.count }

    mutating func append(_ p: Placement) {
        if first == nil { first = p } else { rest.append(p) }
    }

    func forEach(_ body: (Placement) -> Void) {
        guard let first else { return }
        body(first)
        for p in rest { body(p) }
    }

    func contains(slot: Int32) -> Bool {
        if first?.slot == slot { return true }
        return rest.contains { $0.slot == slot }
    }

    /// Removes the placement in `slot`; returns it.
    mutating func remove(slot: Int32) -> Placement? {
        if let f = first, f.slot == slot {
            first = rest.isEmpty ? nil : rest.removeFirst()
            return f
        }
        guard let i = rest.firstIndex(where: { $0.slot == slot }) else { return nil }
        return rest.remove(at: i)
    }

    /// Sum of the allocation lengths.
    var length: Int {
        var n = 0
        forEach { n += $0.allocation.length }
        return n
    }
}

/// One mounted segment's capacity and bytes in use (objects, writes in flight, hidden versions).
public struct SegmentUsage: Sendable, Equatable {
    public var segment: SegmentID
    public var capacity: Int
    public var used: Int
}

/// The segments an object table places objects in, each with its own allocator. Segments are
/// mounted and unmounted at run time (clients join and leave); a slot is never reused, so a
/// placement always names the segment it was made in.
///
/// Not thread-safe: the owner (the object table) serialises access.
struct SegmentSet: Sendable {
    struct Slot: Sendable {
        var id: SegmentID
        var allocator: SegmentAllocator
        var mounted: Bool
        /// Its owner is taking it away (`drain`): it keeps what it holds and takes nothing new.
        var draining = false
    }

    /// Most bytes all mounted segments may add up to (64 PiB): sums of sizes never overflow.
    static let maxTotalCapacity = 1 << 56

    private(set) var slots: [Slot] = []
    private var byID: [SegmentID: Int32] = [:]
    /// Sum over mounted segments, in bytes.
    private(set) var capacity = 0
    private(set) var usedBytes = 0
    private(set) var mountedCount = 0
    /// The largest mounted segment's capacity: no object can be larger. Kept on mount and
    /// unmount, since every write checks it.
    private(set) var largestCapacity = 0

    var freeBytes: Int { capacity - usedBytes }

    /// Each mounted segment's id, capacity and bytes in use, in mount order.
    var usage: [SegmentUsage] {
        slots.filter(\.mounted).map { SegmentUsage(segment: $0.id, capacity: $0.allocator.capacity, used: $0.allocator.usedBytes) }
    }

    func slot(of id: SegmentID) -> Int32? {
        guard let s = byID[id], slots[Int(s)].mounted else { return nil }
        return s
    }

    func id(of slot: Int32) -> SegmentID { slots[Int(slot)].id }

    func replica(_ p: Placement) -> Replica { Replica(segment: slots[Int(p.slot)].id, offset: p.allocation.offset) }

    mutating func mount(_ id: SegmentID, capacity bytes: Int) throws(KVError) {
        guard byID[id] == nil || !slots[Int(byID[id]!)].mounted else {
            throw .invalidArgument("segment \(id) is already mounted")
        }
        let allocator = SegmentAllocator(capacity: bytes)
        guard allocator.capacity > 0 else {
            throw .invalidArgument("segment size must be at least \(SegmentAllocator.granule) bytes, got \(bytes)")
        }
        // Checked: sizes come from clients, and their sum must never wrap.
        guard capacity <= Self.maxTotalCapacity - allocator.capacity else {
            throw .noSpace("mounting \(bytes) more bytes would pass the limit of \(Self.maxTotalCapacity) bytes over all segments")
        }
        slots.append(Slot(id: id, allocator: allocator, mounted: true))
        byID[id] = Int32(slots.count - 1)
        capacity += allocator.capacity
        mountedCount += 1
        largestCapacity = max(largestCapacity, allocator.capacity)
    }

    /// Unmounts segment `id`: its space leaves the totals; placements in it must no longer be
    /// freed (`free` ignores them). Returns its slot, or nil when it is not mounted.
    mutating func unmount(_ id: SegmentID) -> Int32? {
        guard let s = slot(of: id) else { return nil }
        slots[Int(s)].mounted = false
        capacity -= slots[Int(s)].allocator.capacity
        usedBytes -= slots[Int(s)].allocator.usedBytes
        mountedCount -= 1
        largestCapacity = slots.lazy.filter(\.mounted).map(\.allocator.capacity).max() ?? 0
        return s
    }

    mutating func allocate(_ size: Int, in s: Int32) -> Placement? {
        guard slots[Int(s)].mounted, let a = slots[Int(s)].allocator.allocate(size) else { return nil }
        usedBytes += a.length
        return Placement(slot: s, allocation: a)
    }

    /// Takes exactly `size` bytes at `offset` of slot `s` (see `SegmentAllocator.reserve`).
    mutating func reserve(offset: Int, size: Int, in s: Int32) -> Placement? {
        guard slots[Int(s)].mounted, let a = slots[Int(s)].allocator.reserve(offset: offset, bytes: size) else { return nil }
        usedBytes += a.length
        return Placement(slot: s, allocation: a)
    }

    /// Frees a placement; a placement in an unmounted segment is already gone.
    mutating func free(_ p: Placement) {
        guard slots[Int(p.slot)].mounted else { return }
        // The table hands out and frees every allocation itself: a failure is a bug there.
        do { try slots[Int(p.slot)].allocator.free(p.allocation) } catch { assertionFailure("\(error)") }
        usedBytes -= p.allocation.length
    }

    /// Mounted slots in the order a new object's replicas should try them: `preferred` first,
    /// then by free bytes, most first.
    func placementOrder(preferred: SegmentID?) -> [Int32] {
        var order = (0..<Int32(slots.count)).filter { slots[Int($0)].mounted && !slots[Int($0)].draining }
        order.sort { slots[Int($0)].allocator.freeBytes > slots[Int($1)].allocator.freeBytes }
        if let preferred, let p = slot(of: preferred), let i = order.firstIndex(of: p) {
            order.remove(at: i)
            order.insert(p, at: 0)
        }
        return order
    }

    /// Segment slot `s` takes no new placement from now on (`placementOrder` skips it).
    mutating func drain(_ s: Int32) { slots[Int(s)].draining = true }

    /// Free blocks across mounted segments (a fragmentation measure).
    var freeBlockCount: Int { slots.reduce(0) { $0 + ($1.mounted ? $1.allocator.freeBlockCount : 0) } }
    /// The largest free block of any mounted segment.
    var largestFreeBlock: Int { slots.lazy.filter(\.mounted).map(\.allocator.largestFreeBlock).max() ?? 0 }
}
