/// Identifies one version of an object in `ObjectTable`: slot index in the low 32 bits,
/// the slot's generation in the high 32 bits (a stale handle is detected, never misused).
public typealias VersionHandle = UInt64

/// How a write treats an existing key.
public enum WriteMode: Sendable {
    /// Fails with `objectExists` when the key is visible or another put of it is in flight.
    case put
    /// Replaces the visible version when it commits; in place when the size is unchanged and
    /// no reader holds the current version.
    case upsert
}

/// Space reserved for a write. The caller copies `size` bytes to `offset` of the segment,
/// then calls `commitWrite` (the object becomes visible) or `abortWrite` (nothing remains).
public struct WriteTicket: Sendable, Equatable {
    public let handle: VersionHandle
    public let offset: Int
    public let size: Int
    /// The write overwrites the current version's bytes; readers wait until it commits.
    public let inPlace: Bool
}

/// A reader's hold on one complete version: its bytes stay in place (not freed, reused or
/// overwritten) until `releaseRead`.
public struct ReadTicket: Sendable, Equatable {
    public let handle: VersionHandle
    public let offset: Int
    public let size: Int

    /// Rebuilds a ticket handed across the C ABI; it must be one `acquireRead` returned.
    public init(handle: VersionHandle, offset: Int, size: Int) {
        self.handle = handle
        self.offset = offset
        self.size = size
    }
}

public enum ReadResult: Sendable, Equatable {
    case found(ReadTicket)
    case notFound
    /// An in-place upsert is writing the object's bytes; try again shortly.
    case busy
}

/// The master's state machine for one segment: which keys exist, where their bytes are, who
/// reads them. Pure logic, no I/O: the embedded store wraps it in a mutex, the network master
/// will wrap the same type.
///
/// Invariants: an object is visible only between `commitWrite` and its removal; a version's
/// space is freed only when it is neither visible nor read; `usedBytes` is exactly the
/// allocator's in-use space.
public struct ObjectTable: Sendable {
    enum State: Sendable { case free, writing, complete, rewriting }

    struct Version: Sendable {
        var generation: UInt32 = 0
        var state: State = .free
        var key = ObjectKey()
        var allocation: Allocation? = nil
        var size = 0
        var readers: Int32 = 0
        var linked = false
        var mode: WriteMode = .put
    }

    struct Entry: Sendable {
        var current: Int32 = -1
        var putPending = false
    }

    private(set) public var allocator: SegmentAllocator
    private var versions: [Version] = []
    private var recycled: [Int32] = []
    private var entries: [ObjectKey: Entry] = [:]
    /// Visible objects.
    public private(set) var objectCount = 0
    /// Sum of the sizes of visible objects, in bytes.
    public private(set) var objectBytes = 0
    /// Read holds currently outstanding.
    public private(set) var activeReaders = 0

    public init(capacity: Int) {
        allocator = SegmentAllocator(capacity: capacity)
    }

    public var capacity: Int { allocator.capacity }
    /// Bytes of the segment in use: visible objects, writes in flight, and removed versions
    /// still held by readers.
    public var usedBytes: Int { allocator.usedBytes }

    // MARK: writes

    /// Reserves space for a write of `size` bytes (> 0) under `key`.
    public mutating func beginWrite(key: ObjectKey, size: Int, mode: WriteMode) throws(KVError) -> WriteTicket {
        guard size > 0 else { throw .invalidArgument("value must not be empty") }
        if mode == .put {
            // One hash lookup: claims the key (inserting an entry when absent) unless taken.
            guard Self.claimForPut(&entries[key, default: Entry()]) else {
                throw .exists("object '\(key)' already exists")
            }
        } else if let e = entries[key], e.current >= 0 {
            let c = Int(e.current)
            if versions[c].state == .complete, versions[c].size == size, versions[c].readers == 0 {
                versions[c].state = .rewriting
                return WriteTicket(handle: handle(e.current), offset: versions[c].allocation!.offset,
                                   size: size, inPlace: true)
            }
        }
        guard let a = allocator.allocate(size) else {
            if mode == .put { releasePutClaim(key) }
            if size > allocator.capacity {
                throw .noSpace("value of \(size) bytes is larger than the segment (\(allocator.capacity) bytes)")
            }
            throw .noSpace("no free space for \(size) bytes (\(allocator.freeBytes) of \(allocator.capacity) bytes free, largest free block \(allocator.largestFreeBlock) bytes)")
        }
        let slot = newVersion(Version(state: .writing, key: key, allocation: a, size: size, mode: mode))
        return WriteTicket(handle: handle(slot), offset: a.offset, size: size, inPlace: false)
    }

    @inline(__always)
    private static func claimForPut(_ e: inout Entry) -> Bool {
        if e.current >= 0 || e.putPending { return false }
        e.putPending = true
        return true
    }

    private mutating func releasePutClaim(_ key: ObjectKey) {
        guard var e = entries[key] else { return }
        e.putPending = false
        entries[key] = e.current < 0 ? nil : e
    }

    /// Makes a written object visible. A put that lost a race to an upsert of the same key
    /// fails with `objectExists` and its space is freed.
    public mutating func commitWrite(_ t: WriteTicket) throws(KVError) {
        let s = try slot(t.handle)
        if t.inPlace {
            guard versions[s].state == .rewriting else { throw KVError(.internal, "commit of a write not in flight") }
            versions[s].state = .complete
            if !versions[s].linked { try reclaimIfUnused(Int32(s)) }
            return
        }
        guard versions[s].state == .writing else { throw KVError(.internal, "commit of a write not in flight") }
        let key = versions[s].key
        let isPut = versions[s].mode == .put
        // One hash lookup: installs the new version, or reports the put's lost race.
        let old = Self.install(&entries[key, default: Entry()], slot: Int32(s), isPut: isPut)
        if old == Self.lostRace {
            try dropVersion(Int32(s))
            throw .exists("object '\(key)' already exists")
        }
        versions[s].state = .complete
        versions[s].linked = true
        objectBytes += versions[s].size
        if old >= 0 {
            try unlink(old)
        } else {
            objectCount += 1
        }
    }

    private static let lostRace: Int32 = -2

    /// Makes `slot` the entry's current version; returns the previous one (-1: none), or
    /// `lostRace` for a put whose key became visible meanwhile (the entry is left visible).
    @inline(__always)
    private static func install(_ e: inout Entry, slot: Int32, isPut: Bool) -> Int32 {
        if isPut {
            e.putPending = false
            if e.current >= 0 { return lostRace }
        }
        let old = e.current
        e.current = slot
        return old
    }

    /// Abandons a write: its space is freed and the key is as before. An aborted in-place
    /// upsert has already destroyed the old bytes, so the object is removed.
    public mutating func abortWrite(_ t: WriteTicket) throws(KVError) {
        let s = try slot(t.handle)
        if t.inPlace {
            guard versions[s].state == .rewriting else { throw KVError(.internal, "abort of a write not in flight") }
            versions[s].state = .complete
            if versions[s].linked {
                try remove(key: versions[s].key)
            } else {
                try reclaimIfUnused(Int32(s))
            }
            return
        }
        guard versions[s].state == .writing else { throw KVError(.internal, "abort of a write not in flight") }
        if versions[s].mode == .put { releasePutClaim(versions[s].key) }
        try dropVersion(Int32(s))
    }

    // MARK: reads

    /// Takes a read hold on the visible version of `key`.
    public mutating func acquireRead(key: ObjectKey) -> ReadResult {
        guard let e = entries[key], e.current >= 0 else { return .notFound }
        let c = Int(e.current)
        if versions[c].state == .rewriting { return .busy }
        versions[c].readers += 1
        activeReaders += 1
        return .found(ReadTicket(handle: handle(e.current), offset: versions[c].allocation!.offset,
                                 size: versions[c].size))
    }

    /// Ends a read hold; frees the version's space if it was removed or replaced meanwhile.
    public mutating func releaseRead(_ h: VersionHandle) throws(KVError) {
        let s = try slot(h)
        guard versions[s].readers > 0 else { throw KVError(.internal, "release of a version that is not read") }
        versions[s].readers -= 1
        activeReaders -= 1
        if !versions[s].linked { try reclaimIfUnused(Int32(s)) }
    }

    /// Size of the visible version of `key`, or nil.
    public func size(key: ObjectKey) -> Int? {
        guard let e = entries[key], e.current >= 0 else { return nil }
        return versions[Int(e.current)].size
    }

    public func contains(key: ObjectKey) -> Bool { size(key: key) != nil }

    // MARK: removal

    /// Removes the visible version of `key`; readers in progress finish with the bytes they hold.
    public mutating func remove(key: ObjectKey) throws(KVError) {
        guard var e = entries[key], e.current >= 0 else { throw .notFound("object '\(key)' not found") }
        try unlink(e.current)
        objectCount -= 1
        e.current = -1
        entries[key] = e.putPending ? e : nil
    }

    /// Removes every visible object; returns how many.
    public mutating func removeAll() throws(KVError) -> Int {
        let n = objectCount
        var pending = 0
        for i in entries.indices {
            let c = entries.values[i].current
            if c >= 0 { entries.values[i].current = -1; try unlink(c) }
            if entries.values[i].putPending { pending += 1 }
        }
        if pending == 0 {
            entries.removeAll(keepingCapacity: true)
        } else {
            entries = entries.filter { $0.value.putPending }
        }
        objectCount = 0
        return n
    }

    // MARK: internals

    private func handle(_ slot: Int32) -> VersionHandle {
        VersionHandle(versions[Int(slot)].generation) << 32 | VersionHandle(UInt32(slot))
    }

    private func slot(_ h: VersionHandle) throws(KVError) -> Int {
        let s = Int(h & 0xFFFF_FFFF)
        guard s < versions.count, versions[s].generation == UInt32(h >> 32), versions[s].state != .free else {
            throw KVError(.internal, "stale or unknown version handle \(h)")
        }
        return s
    }

    private mutating func newVersion(_ v: Version) -> Int32 {
        if let s = recycled.popLast() {
            let gen = versions[Int(s)].generation
            versions[Int(s)] = v
            versions[Int(s)].generation = gen
            return s
        }
        versions.append(v)
        return Int32(versions.count - 1)
    }

    /// Takes a visible version out of its key; frees it now or when its last reader leaves.
    private mutating func unlink(_ s: Int32) throws(KVError) {
        versions[Int(s)].linked = false
        objectBytes -= versions[Int(s)].size
        try reclaimIfUnused(s)
    }

    private mutating func reclaimIfUnused(_ s: Int32) throws(KVError) {
        let i = Int(s)
        if versions[i].readers == 0 && versions[i].state == .complete && !versions[i].linked { try dropVersion(s) }
    }

    private mutating func dropVersion(_ s: Int32) throws(KVError) {
        if let a = versions[Int(s)].allocation { try allocator.free(a) }
        let gen = versions[Int(s)].generation &+ 1
        versions[Int(s)] = Version()
        versions[Int(s)].generation = gen
        recycled.append(s)
    }
}
