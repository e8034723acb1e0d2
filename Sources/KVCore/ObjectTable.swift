/// Identifies one version of an object in `ObjectTable`: slot index in the low 32 bits,
/// the slot's generation in the high 32 bits (a stale handle is detected, never misused).
public typealias VersionHandle = UInt64

/// How a write treats an existing key.
public enum WriteMode: Sendable {
    /// Fails with `objectExists` when the key is visible or another put of it is in flight.
    case put
    /// Replaces the visible version when it commits; in place when the size is unchanged and
    /// no reader holds or leases the current version.
    case upsert
}

/// Space reserved for a write: one place per replica. The caller copies `size` bytes to every
/// replica (the first at `offset` of `segment`), then calls `commitWrite` (the object becomes
/// visible) or `abortWrite` (nothing remains).
public struct WriteTicket: Sendable, Equatable {
    public let handle: VersionHandle
    /// The first replica's segment and offset.
    public let segment: SegmentID
    public let offset: Int
    public let size: Int
    /// The write overwrites the current version's bytes; readers wait until it commits.
    public let inPlace: Bool
    /// Replicas after the first (distinct segments).
    public let moreReplicas: [Replica]
    /// The writer's deadline on its own monotonic clock (0: none, an embedded master): no copy
    /// into the write's space may begin later, since a remote master frees the space of a
    /// write not committed within its write timeout (`RemoteMaster.started`).
    public var deadline: Nanoseconds = 0
    /// The writer's last moment to begin a copy (0: `deadline`): earlier than `deadline` when
    /// the master's leadership may end first (`StartedWrite.window`). A copy begun by then
    /// may still run to `deadline` (a segment server takes its bytes until then).
    public var beginBy: Nanoseconds = 0
    /// The CRC32C of the object's bytes when its writer computed one (`WriteOptions.checksum`),
    /// set before the commit; stored with the version and checked by every whole-object read.
    public var checksum: UInt32? = nil

    /// Every replica, the first included.
    public var replicas: [Replica] { [Replica(segment: segment, offset: offset)] + moreReplicas }
}

extension WriteTicket {
    /// A ticket as a remote master describes it (`replicas` not empty).
    public init(handle: VersionHandle, size: Int, inPlace: Bool, replicas: [Replica]) {
        self.init(
            handle: handle, segment: replicas[0].segment, offset: replicas[0].offset, size: size,
            inPlace: inPlace, moreReplicas: Array(replicas.dropFirst()))
    }
}

/// A reader's hold on one complete version: its bytes stay in place (not freed, reused or
/// overwritten) until `releaseRead`.
public struct ReadTicket: Sendable, Equatable {
    public let handle: VersionHandle
    /// The replica to read: its segment and offset.
    public let segment: SegmentID
    public let offset: Int
    public let size: Int
    /// Other replicas to read should this one fail (a remote master's answer; empty here).
    public var fallbacks: [Replica] = []
    /// For a read under a remote master's lease (nothing holds the bytes but the lease): the
    /// reader's own monotonic time by which its copy must have ended for the bytes to be the
    /// object's. 0: the version is held (an embedded store's reader), nothing to check.
    public var leaseEnd: Nanoseconds = 0
    /// The CRC32C its writer stored (nil: none): a read of the whole object checks its copy.
    public var checksum: UInt32? = nil

    /// Rebuilds a ticket handed across the C ABI; it must be one `acquireRead` returned.
    public init(
        handle: VersionHandle, segment: SegmentID = 0, offset: Int, size: Int, fallbacks: [Replica] = [],
        leaseEnd: Nanoseconds = 0, checksum: UInt32? = nil
    ) {
        self.handle = handle
        self.segment = segment
        self.offset = offset
        self.size = size
        self.fallbacks = fallbacks
        self.leaseEnd = leaseEnd
        self.checksum = checksum
    }
}

public enum ReadResult: Sendable, Equatable {
    case found(ReadTicket)
    case notFound
    /// An in-place upsert is writing the object's bytes; try again shortly.
    case busy
}

/// The master's state machine: which keys exist, in which segments their replicas are, who
/// reads and leases them, what is pinned, what expires, and what to evict. Segments are
/// mounted and unmounted at run time (the embedded store mounts one, segment 0). Pure logic, no I/O
/// and no clock: every call that depends on time takes `now` (monotonic nanoseconds), and the
/// timers due by then run first. The embedded store wraps it in a mutex; the network master
/// will wrap the same type.
///
/// Rules:
/// - An object is visible only between `commitWrite` and its removal (remove, eviction,
///   expiry, or replacement by an upsert).
/// - A read (`acquireRead`, `lease`) leases the version for `policy.leaseTTL`. A leased
///   object is never evicted; `remove` refuses it unless forced.
/// - A version's space is freed only when it is invisible and no reader holds it: an upsert,
///   removal or expiry hides it at once, and its bytes stay untouched until the last reader
///   copying them is done. Every reader that copies holds the version (an in-process reader
///   until `releaseRead`; a remote one through its master, until it says it is done or its
///   lease ends), so a lease alone keeps no hidden bytes.
/// - Eviction is approximately least-recently-used: evictable objects sit on an intrusive
///   list (most recent first); soft-pinned objects on a second list used only when the first
///   is empty. Leased, hard-pinned, held and incomplete versions are on no list, so each
///   eviction is O(1) and never scans past objects it may not take.
public struct ObjectTable: Sendable {
    enum State: Sendable { case free, writing, complete, rewriting }

    /// Which eviction list a version is on.
    enum List: UInt8, Sendable { case none = 0, ordinary = 1, softPinned = 2 }

    struct Version: Sendable {
        var generation: UInt32 = 1 // from 1, so no handle is 0 (0 means "no hold")
        var state: State = .free
        var key = ObjectKey()
        var placements = PlacementList()
        var size = 0
        var readers: Int32 = 0
        var linked = false
        var mode: WriteMode = .put
        /// Applied when the write commits.
        var options = WriteOptions.default
        var hardPinned = false
        var softPinned = false
        /// Who wrote it (a master's client; 0 in an embedded store): hard pins count against
        /// the writer's quota.
        var owner: UInt64 = 0
        /// The writer's CRC32C of the bytes (nil: none).
        var checksum: UInt32? = nil
        /// The commit's place in the table's history (0: not committed): a restarted master
        /// resolves two reports of one key by it.
        var seq: UInt64 = 0
        /// End of the read lease; 0: not leased.
        var leaseUntil: Nanoseconds = 0
        var list = List.none
        var prev: Int32 = -1
        var next: Int32 = -1
        /// What a lower tier (the embedded store's disk) made of this version.
        var lowerTier = LowerTier.undecided
    }

    /// A lower tier's decision on a version, which eviction may look ahead for
    /// (`evictionLooksAhead`).
    public enum LowerTier: UInt8, Sendable {
        /// Not yet looked at: evicting it may lose something the lower tier wanted.
        case undecided
        /// The lower tier holds a copy: evicting it loses nothing.
        case copied
        /// Its admission refused it (reset when the object is read again).
        case refused
    }

    /// How many versions at the eviction end an eviction looks through for one a lower tier
    /// has decided on (copied or refused) before it takes the last one anyway; 0: plain
    /// least-recently-used order. Set by the embedded store's disk tier.
    public var evictionLooksAhead = 0
    /// Versions evicted before a lower tier decided on them (counted while it looks ahead):
    /// what a disk tier could not keep up with.
    public internal(set) var evictedUndecided = 0

    struct Entry: Sendable {
        var current: Int32 = -1
        var putPending = false
    }

    /// Head (most recent) and tail (eviction end) of one eviction list.
    struct ListEnds: Sendable {
        var head: Int32 = -1
        var tail: Int32 = -1
    }

    public let policy: CachePolicy
    var segments = SegmentSet()
    var versions: [Version] = []
    private var recycled: [Int32] = []
    var entries: [ObjectKey: Entry] = [:]
    var timers = TimerQueue()
    var lists = [ListEnds](repeating: ListEnds(), count: 3)
    /// Visible objects.
    public internal(set) var objectCount = 0
    /// Sum of the sizes of visible objects, in bytes.
    public internal(set) var objectBytes = 0
    /// Read holds currently outstanding.
    public internal(set) var activeReaders = 0
    /// Versions whose read lease has not ended (visible or not).
    public internal(set) var activeLeases = 0
    /// Sizes of the visible hard-pinned / soft-pinned objects, in bytes.
    public internal(set) var hardPinnedBytes = 0
    /// Hard-pinned bytes per writer (`Version.owner`); absent: none.
    public internal(set) var hardPinnedByOwner: [UInt64: Int] = [:]
    public internal(set) var softPinnedBytes = 0
    /// Space (allocation lengths) of the versions on an eviction list: what eviction could free.
    public internal(set) var evictableBytes = 0
    /// Objects evicted, and their sizes in bytes.
    public internal(set) var evictedObjects = 0
    public internal(set) var evictedBytes = 0
    /// Objects that disappeared because their TTL passed.
    public internal(set) var expiredObjects = 0

    /// A table with segment 0 of `capacity` bytes mounted (none when `capacity` is below one
    /// granule); `policy` must be valid (see `CachePolicy.validate`).
    public init(capacity: Int, policy: CachePolicy = CachePolicy()) {
        self.policy = policy
        try? segments.mount(0, capacity: capacity)
    }

    /// A table with no segment mounted yet.
    public init(policy: CachePolicy) {
        self.policy = policy
    }

    /// Total capacity of the mounted segments, in bytes.
    public var capacity: Int { segments.capacity }
    /// Bytes of the mounted segments in use: visible objects, writes in flight, and invisible
    /// versions still held or leased by readers.
    public var usedBytes: Int { segments.usedBytes }
    /// Each mounted segment's capacity and use.
    public var segmentUsage: [SegmentUsage] { segments.usage }
    /// Number of mounted segments.
    public var segmentCount: Int { segments.mountedCount }

    /// Adds segment `id` of `capacity` bytes. Throws `invalidArgument` when it is mounted already
    /// or smaller than one granule.
    ///
    /// `readyAt`: the segment's memory served reads before (a client that lost its master
    /// remounts the same memory), so readers under an earlier lease may still be copying out
    /// of it; it takes no object before then. Its whole space counts as used until then.
    ///
    /// `indexBy`: the memory holds objects its owner will report (`restore`): it takes no
    /// object until the last report (`restore(last: true)`), or `indexBy` at the latest, so
    /// no write lands on an object not yet taken back.
    public mutating func mount(
        segment id: SegmentID, capacity: Int, readyAt: Nanoseconds = 0, indexBy: Nanoseconds = 0, now: Nanoseconds = 0
    ) throws(KVError) {
        try segments.mount(id, capacity: capacity)
        let until = max(readyAt, indexBy)
        guard until > now, let slot = segments.slot(of: id),
            let all = segments.allocate(segments.slots[Int(slot)].allocator.capacity, in: slot)
        else { return }
        quarantined.append((all, until))
        if readyAt > now {
            leaseHolds[slot] = readyAt
        } else {
            awaitingReport.insert(slot)
            reportBytes += all.allocation.length
        }
    }

    /// Segment `id` takes no new object from now on (its owner is about to unmount it); what
    /// it holds stays readable, and may still be evicted or removed.
    public mutating func drain(segment id: SegmentID) throws(KVError) {
        guard let s = segments.slot(of: id) else { throw .invalidArgument("segment \(id) is not mounted") }
        segments.drain(s)
    }

    /// Per segment slot mounted with a `readyAt` ahead: until when old readers may copy out of it.
    var leaseHolds: [Int32: Nanoseconds] = [:]
    /// Segment slots held only until their owner's last report (no old leases), and the bytes
    /// held there: they come back within moments, so writes wait for them (as for
    /// `awaitingBytes`) instead of evicting.
    var awaitingReport: Set<Int32> = []
    public private(set) var reportBytes = 0
    /// Held space that comes back within moments: freed space awaiting its owner's
    /// confirmation, and remounted segments awaiting their owner's report.
    public var comingBackBytes: Int { awaitingBytes + reportBytes }

    /// Takes the quarantine entries for which `take` holds off the list and frees them;
    /// returns the latest `until` among them (0: none taken).
    private mutating func dropQuarantine(where take: ((placement: Placement, until: Nanoseconds)) -> Bool) -> Nanoseconds {
        var until: Nanoseconds = 0
        quarantined.removeAll { q in
            guard take(q) else { return false }
            until = max(until, q.until)
            if awaitingReport.contains(q.placement.slot) { reportBytes -= q.placement.allocation.length }
            segments.free(q.placement) // a no-op once the segment is unmounted
            return true
        }
        return until
    }

    /// Whole segments mounted with a `readyAt` still ahead: their placeholder allocation and when it goes.
    var quarantined: [(placement: Placement, until: Nanoseconds)] = []

    /// Frees the quarantined segments that are ready by `now`.
    mutating func releaseQuarantine(now: Nanoseconds) {
        guard dropQuarantine(where: { $0.until <= now }) != 0, !awaitingReport.isEmpty else { return }
        awaitingReport = awaitingReport.filter { slot in quarantined.contains { $0.placement.slot == slot } }
    }

    // MARK: writes

    /// Reserves space for a write of `size` bytes (> 0) under `key`: `replicas` copies in
    /// distinct segments (fewer when fewer are mounted or have room), the first in `preferred`
    /// when it can. Evicts when the write would take usage above the high watermark or does
    /// not fit. Throws `noSpace` only when nothing evictable is left.
    ///
    /// `owner` is the writer (a master's client id); with `ownerHardPinLimit`, a hard-pinned
    /// write that would take the owner's hard-pinned bytes past it is `noSpace`.
    public mutating func beginWrite(
        key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions = .default,
        replicas: Int = 1, preferred: SegmentID? = nil, owner: UInt64 = 0,
        ownerHardPinLimit: Int? = nil,
        now: Nanoseconds
    ) throws(KVError) -> WriteTicket {
        advance(now: now)
        guard size > 0 else { throw .invalidArgument("value must not be empty") }
        guard replicas >= 1, replicas <= Self.maxReplicas else {
            throw .invalidArgument("replica count must be between 1 and \(Self.maxReplicas), got \(replicas)")
        }
        guard segments.mountedCount > 0 else { throw .noSpace("no segment is mounted") }
        guard size <= segments.largestCapacity else {
            throw .noSpace("value of \(size) bytes is larger than the segment (\(segments.largestCapacity) bytes)")
        }
        if options.hardPin && hardPinnedBytes + size > capacity {
            throw .noSpace("hard-pinning \(size) bytes would exceed the capacity: \(hardPinnedBytes) of \(capacity) bytes are hard-pinned already")
        }
        if options.hardPin, let limit = ownerHardPinLimit, hardPinnedByOwner[owner, default: 0] + size > limit {
            throw .noSpace(
                "hard-pinning \(size) bytes would take this client past its quota of \(limit) hard-pinned bytes (\(hardPinnedByOwner[owner, default: 0]) pinned)"
            )
        }
        if mode == .put {
            // One hash lookup: claims the key (inserting an entry when absent) unless taken.
            guard Self.claimForPut(&entries[key, default: Entry()]) else {
                throw .exists("object '\(key)' already exists")
            }
        } else if let e = entries[key], e.current >= 0 {
            let c = Int(e.current)
            if policy.inPlaceUpserts, versions[c].state == .complete, versions[c].size == size, versions[c].readers == 0, versions[c].leaseUntil == 0,
                versions[c].placements.count == min(replicas, segments.mountedCount)
            {
                clearCacheState(e.current)
                versions[c].state = .rewriting
                versions[c].lowerTier = .undecided
                versions[c].options = options
                versions[c].owner = owner
                return ticket(e.current, inPlace: true)
            }
        }
        guard let placed = placeEvicting(size, replicas: replicas, preferred: preferred) else {
            if mode == .put { releasePutClaim(key) }
            let held = quarantined.reduce(0) { $0 + $1.placement.allocation.length }
            let remounted =
                (held == 0
                    ? ""
                    : ", \(held) bytes of remounted segments held until their owners have reported what they hold "
                        + "and readers of the old mount are done")
                + (awaitingBytes == 0 ? "" : ", \(awaitingBytes) bytes freed moments ago waiting for their segment owner to confirm it heard")
            throw .noSpace(
                "no space for \(size) bytes and nothing left to evict: \(segments.freeBytes) of \(segments.capacity) bytes free (largest free block \(segments.largestFreeBlock) bytes), \(hardPinnedBytes) bytes hard-pinned, \(activeLeases) objects leased, \(activeReaders) reads in progress\(remounted)"
            )
        }
        let slot = newVersion(Version(state: .writing, key: key, placements: placed, size: size, mode: mode, options: options, owner: owner))
        return ticket(slot, inPlace: false)
    }

    /// Most replicas one object may have.
    public static let maxReplicas = 16

    private func ticket(_ s: Int32, inPlace: Bool) -> WriteTicket {
        let v = versions[Int(s)]
        let first = segments.replica(v.placements.first!)
        return WriteTicket(
            handle: handle(s), segment: first.segment, offset: first.offset, size: v.size, inPlace: inPlace,
            moreReplicas: v.placements.rest.map { segments.replica($0) })
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

    /// Makes a written object visible with its write options. A put that lost a race to an
    /// upsert of the same key (its claim kept other puts out, not upserts) succeeds as if it
    /// had committed just before that upsert, which replaced it: its space is freed and the
    /// upsert's value stays (`supersededPuts`). A commit is never refused for that, so a
    /// pipelined commit that returned success is never undone by it.
    public mutating func commitWrite(_ t: WriteTicket, now: Nanoseconds) throws(KVError) {
        advance(now: now)
        let s = try slot(t.handle)
        if versions[s].placements.isEmpty && (versions[s].state == .writing || versions[s].state == .rewriting) {
            let key = versions[s].key
            try abortWrite(t, now: now)
            throw KVError(.transfer, "every segment of '\(key)' was unmounted during the write")
        }
        if t.inPlace {
            guard versions[s].state == .rewriting else { throw KVError(.internal, "commit of a write not in flight") }
            versions[s].state = .complete
            versions[s].checksum = t.checksum
            if versions[s].linked { applyOptions(Int32(s), now: now) } else { reclaimIfUnused(Int32(s)) }
            return
        }
        guard versions[s].state == .writing else { throw KVError(.internal, "commit of a write not in flight") }
        let key = versions[s].key
        let isPut = versions[s].mode == .put
        // One hash lookup: installs the new version, or reports the put's lost race.
        let old = Self.install(&entries[key, default: Entry()], slot: Int32(s), isPut: isPut)
        if old == Self.lostRace {
            dropVersion(Int32(s))
            supersededPuts += 1
            return
        }
        versions[s].state = .complete
        versions[s].checksum = t.checksum
        versions[s].linked = true
        versions[s].seq = nextSeq
        nextSeq &+= 1
        objectBytes += versions[s].size
        applyOptions(Int32(s), now: now)
        if recordNotices { notice(stored: Int32(s)) }
        if old >= 0 {
            unlink(old)
        } else {
            objectCount += 1
        }
    }

    /// Puts that committed after an upsert of their key had (see `commitWrite`).
    public private(set) var supersededPuts = 0

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
    public mutating func abortWrite(_ t: WriteTicket, now: Nanoseconds) throws(KVError) {
        let s = try slot(t.handle)
        if t.inPlace {
            guard versions[s].state == .rewriting else { throw KVError(.internal, "abort of a write not in flight") }
            versions[s].state = .complete
            if versions[s].linked {
                try remove(key: versions[s].key, force: true, now: now)
            } else {
                reclaimIfUnused(Int32(s))
            }
            return
        }
        guard versions[s].state == .writing else { throw KVError(.internal, "abort of a write not in flight") }
        if versions[s].mode == .put { releasePutClaim(versions[s].key) }
        dropVersion(Int32(s))
    }

    /// What unmounting a segment did.
    public struct UnmountReport: Sendable, Equatable {
        /// Visible objects whose last replica was in the segment: gone.
        public var lostObjects: [ObjectKey] = []
        /// Objects that lost one replica and still have others.
        public var degradedObjects = 0
        /// Writes in flight that lost every replica (their commit fails with `transfer`).
        public var failedWrites = 0
    }

    /// Removes segment `id` (its client left or died): every replica in it is gone at once.
    /// An object left without replicas disappears (and its lease ends); others keep serving
    /// from their remaining replicas. Throws `invalidArgument` when `id` is not mounted.
    public mutating func unmount(segment id: SegmentID, now: Nanoseconds) throws(KVError) -> UnmountReport {
        advance(now: now)
        guard let dead = segments.unmount(id) else { throw .invalidArgument("segment \(id) is not mounted") }
        _ = dropQuarantine { $0.placement.slot == dead }
        leaseHolds[dead] = nil
        awaitingReport.remove(dead)
        awaitingBytes -= ledgers.removeValue(forKey: dead)?.awaiting.reduce(0) { $0 + $1.placement.allocation.length } ?? 0
        for (h, c) in copies where c.targets.contains(where: { $0.slot == dead }) {
            copies[h]!.targets.removeAll { $0.slot == dead }
            copies[h]!.lostTarget = true
        }
        for (v, ps) in retired where ps.contains(where: { $0.slot == dead }) {
            retired[v] = ps.filter { $0.slot != dead }
            if retired[v]!.isEmpty { retired[v] = nil }
        }
        var report = UnmountReport()
        for i in versions.indices where versions[i].state != .free && versions[i].placements.contains(slot: dead) {
            let s = Int32(i)
            let listed = versions[i].list
            listRemove(s) // eviction accounting counts placements: take it off before changing them
            _ = versions[i].placements.remove(slot: dead)
            if !versions[i].placements.isEmpty {
                if versions[i].linked { report.degradedObjects += 1 }
                if listed != .none { updateList(s) }
                continue
            }
            switch versions[i].state {
            case .writing, .rewriting:
                report.failedWrites += 1
            case .complete:
                endLease(s)
                if versions[i].linked {
                    report.lostObjects.append(versions[i].key)
                    hide(s)
                } else {
                    reclaimIfUnused(s)
                }
            case .free:
                break
            }
        }
        return report
    }

    // MARK: reads

    /// Takes a read hold on the visible version of `key` and leases it. The ticket names the
    /// replica in `prefer` when there is one, else the first.
    public mutating func acquireRead(key: ObjectKey, now: Nanoseconds, prefer: SegmentID? = nil) -> ReadResult {
        advance(now: now)
        guard let e = entries[key], e.current >= 0 else { return .notFound }
        let c = Int(e.current)
        if versions[c].state == .rewriting { return .busy }
        versions[c].readers += 1
        activeReaders += 1
        noteRead(e.current, now: now)
        var chosen = versions[c].placements.first!
        if let prefer, let ps = segments.slot(of: prefer) {
            versions[c].placements.forEach { if $0.slot == ps { chosen = $0 } }
        }
        let r = segments.replica(chosen)
        return .found(
            ReadTicket(
                handle: handle(e.current), segment: r.segment, offset: r.offset, size: versions[c].size,
                checksum: versions[c].checksum))
    }

    /// A read hold on the version `h` names, while it is the visible one and complete, that
    /// grants no lease and leaves the object where it is in the eviction order (released with
    /// `releaseRead`): a copy to a lower tier must not make the object look used, and must
    /// copy the version it was told about (`coldest`), not a newer one. nil otherwise.
    /// Eviction may still hide the object meanwhile; its space is freed at the release.
    /// Also returns the version's TTL deadline now (an in-place upsert keeps the version and
    /// may change it).
    public mutating func holdInPlace(_ h: VersionHandle, now: Nanoseconds) -> (ReadTicket, expiresAt: Nanoseconds?)? {
        advance(now: now)
        guard let c = try? slot(h), versions[c].linked, versions[c].state == .complete else { return nil }
        versions[c].readers += 1
        activeReaders += 1
        let r = segments.replica(versions[c].placements.first!)
        return (
            ReadTicket(handle: h, segment: r.segment, offset: r.offset, size: versions[c].size, checksum: versions[c].checksum),
            timers.deadline(slot: Int32(c), kind: .expiry)
        )
    }

    /// Records a lower tier's decision on the version `h` names (ignored when it is gone).
    public mutating func decide(_ h: VersionHandle, _ d: LowerTier) {
        guard let s = try? slot(h) else { return }
        versions[s].lowerTier = d
    }

    /// The key of the version `h` names (a write in flight or a visible object).
    public func key(of h: VersionHandle) throws(KVError) -> ObjectKey {
        versions[try slot(h)].key
    }

    /// The replicas of the visible version of `key`, or nil.
    public func replicas(key: ObjectKey) -> [Replica]? {
        guard let e = entries[key], e.current >= 0 else { return nil }
        var out: [Replica] = []
        versions[Int(e.current)].placements.forEach { out.append(segments.replica($0)) }
        return out
    }

    /// Ends a read hold; frees the version's space if it was hidden meanwhile and is not leased.
    /// Needs no time: timers due meanwhile run at the next call that takes `now`.
    public mutating func releaseRead(_ h: VersionHandle) throws(KVError) {
        let s = try slot(h)
        guard versions[s].readers > 0 else { throw KVError(.internal, "release of a version that is not read") }
        versions[s].readers -= 1
        activeReaders -= 1
        if versions[s].readers == 0 { freeRetired(of: Int32(s)) }
        if versions[s].linked { updateList(Int32(s)) } else { reclaimIfUnused(Int32(s)) }
    }

    /// Size of the visible version of `key`, leasing it (what `exists` and `size` do); nil
    /// when there is none. An object being rewritten in place is reported but not leased.
    public mutating func lease(key: ObjectKey, now: Nanoseconds) -> Int? {
        advance(now: now)
        guard let e = entries[key], e.current >= 0 else { return nil }
        if versions[Int(e.current)].state == .complete { noteRead(e.current, now: now) }
        return versions[Int(e.current)].size
    }

    /// Leases the visible version of `key`, takes a read hold on it (released with
    /// `releaseRead(handle)`) and returns its size, replicas (those in `first` segments ahead
    /// of the others: a reader's own host) and the hold's handle; nil when absent or being
    /// rewritten in place. What a remote reader gets: its master releases the hold when the
    /// reader says its copy ended, or when the lease would have.
    public mutating func holdReplicas(
        key: ObjectKey, now: Nanoseconds,
        first: (SegmentID) -> Bool = { _ in false }
    ) -> (size: Int, replicas: [Replica], handle: VersionHandle, checksum: UInt32?)? {
        advance(now: now)
        guard let e = entries[key], e.current >= 0, versions[Int(e.current)].state == .complete else { return nil }
        versions[Int(e.current)].readers += 1
        activeReaders += 1
        noteRead(e.current, now: now)
        var near: [Replica] = [], far: [Replica] = []
        versions[Int(e.current)].placements.forEach {
            let r = segments.replica($0)
            if first(r.segment) { near.append(r) } else { far.append(r) }
        }
        return (versions[Int(e.current)].size, near + far, handle(e.current), versions[Int(e.current)].checksum)
    }

    /// Size of the visible version of `key`, or nil. Grants no lease and runs no timers.
    public func size(key: ObjectKey) -> Int? {
        guard let e = entries[key], e.current >= 0 else { return nil }
        return versions[Int(e.current)].size
    }

    public func contains(key: ObjectKey) -> Bool { size(key: key) != nil }

    // MARK: removal

    /// Removes the visible version of `key`. A leased object is refused with `leaseHeld`
    /// unless `force`, which also ends the lease. Readers in progress finish with the bytes
    /// they hold.
    public mutating func remove(key: ObjectKey, force: Bool = false, now: Nanoseconds) throws(KVError) {
        advance(now: now)
        guard let e = entries[key], e.current >= 0 else { throw .notFound("object '\(key)' not found") }
        let c = e.current
        let until = versions[Int(c)].leaseUntil
        if until != 0 {
            guard force else {
                let ms = (until - min(until, now) + 999_999) / 1_000_000
                throw KVError(.leaseHeld, "object '\(key)' is leased by a reader for another \(ms) ms; remove(force=True) removes it anyway")
            }
            // Every reader copying holds the version: the object and its lease go now, its
            // bytes when the last reader is done.
            endLease(c)
        }
        hide(c)
    }

    /// One page of `keysPage`: keys in byte order; `more` when keys after the last remain.
    public struct KeysPage: Sendable, Equatable {
        public var keys: [ObjectKey]
        public var more: Bool
        public init(keys: [ObjectKey], more: Bool) {
            self.keys = keys
            self.more = more
        }

        /// This page with the keys of a lower tier after the same cursor (`lower`, sorted;
        /// `lowerMore`: it has more past them) merged in: sorted, each key once, none past
        /// this page's last when more pages follow (the next one starts there), cut to
        /// `keysPageBytes`.
        public func merged(with lower: [ObjectKey], lowerMore: Bool) -> KeysPage {
            var lower = lower
            if more, let ceiling = keys.last { lower = lower.filter { !(ceiling < $0) } }
            var all = Array(Set(keys).union(lower)).sorted()
            var more = more || lowerMore
            var bytes = 0
            for (i, k) in all.enumerated() {
                bytes += 4 + k.count
                if bytes > ObjectTable.keysPageBytes {
                    all.removeSubrange(i...)
                    more = true
                    break
                }
            }
            return KeysPage(keys: all, more: more && !all.isEmpty)
        }

        /// Checks a page that came from a master, which may lie: keys strictly increasing
        /// and all after `after` (so walking the pages always moves forward and ends), at
        /// most `keysPageBytes` encoded (the C ABI copies a page into a buffer that size), and
        /// `more` only with at least one key. Throws `transfer`.
        public func validate(after: ObjectKey?) throws(KVError) {
            var bytes = 0
            var previous = after
            for k in keys {
                if let p = previous, !(p < k) {
                    throw KVError(.transfer, "the master sent a page of keys out of order or not after '\(p)'")
                }
                bytes += 4 + k.count
                previous = k
            }
            guard bytes <= ObjectTable.keysPageBytes else {
                throw KVError(.transfer, "the master sent a page of \(bytes) key bytes; a page holds at most \(ObjectTable.keysPageBytes)")
            }
            guard !more || !keys.isEmpty else { throw KVError(.transfer, "the master sent an empty page that claims more keys") }
        }
    }

    /// Encoded bytes a page of keys may take (4 + length per key): every page fits one frame
    /// and one fixed buffer of the C ABI.
    public static let keysPageBytes = 1 << 20

    /// The visible keys after `after` (nil: from the first) in byte order, as many as fit in
    /// `maxBytes` (4 + length each). Like Redis SCAN, a key present for the whole walk is
    /// returned exactly once; keys added or removed meanwhile may or may not be. Each page
    /// scans the table once (O(n log k) for k keys per page).
    /// With `prefix`, only keys starting with those bytes (a tenant's namespace).
    public mutating func keysPage(after: ObjectKey?, prefix: [UInt8]? = nil, maxBytes: Int = keysPageBytes, now: Nanoseconds) -> KeysPage {
        advance(now: now)
        // The smallest keys above `after`, gathered in a max-heap bounded by the byte budget.
        var heap: [ObjectKey] = []
        var bytes = 0
        var more = false
        func siftUp(_ i: Int) {
            var i = i
            while i > 0 {
                let p = (i - 1) / 2
                guard heap[p] < heap[i] else { return }
                heap.swapAt(p, i)
                i = p
            }
        }
        func popMax() -> ObjectKey {
            let top = heap[0]
            let last = heap.removeLast()
            if !heap.isEmpty {
                heap[0] = last
                var i = 0
                while true {
                    let l = 2 * i + 1, r = l + 1
                    var m = i
                    if l < heap.count && heap[m] < heap[l] { m = l }
                    if r < heap.count && heap[m] < heap[r] { m = r }
                    if m == i { break }
                    heap.swapAt(i, m)
                    i = m
                }
            }
            return top
        }
        // The smallest key left out so far: the page must end below it, or the key would be
        // skipped by the next page (which starts after this page's last key).
        var ceiling: ObjectKey? = nil
        for (k, e) in entries where e.current >= 0 {
            if let after, !(after < k) { continue }
            if let c = ceiling, !(k < c) { continue }
            if let prefix, !k.hasPrefix(prefix) { continue }
            if bytes + 4 + k.count > maxBytes {
                // Full: make room by dropping kept keys above k (they come in a later page);
                // when that is not enough, k waits for a later page too.
                more = true
                while let top = heap.first, k < top, bytes + 4 + k.count > maxBytes {
                    let dropped = popMax()
                    bytes -= 4 + dropped.count
                    ceiling = dropped
                }
                if bytes + 4 + k.count > maxBytes {
                    ceiling = k
                    continue
                }
            }
            heap.append(k)
            bytes += 4 + k.count
            siftUp(heap.count - 1)
        }
        return KeysPage(keys: heap.sorted(), more: more)
    }

    /// Removes every visible object that is not leased (every object when `force`); returns how many.
    /// With `prefix`, only keys starting with those bytes (a tenant's namespace).
    public mutating func removeAll(force: Bool = false, prefix: [UInt8]? = nil, now: Nanoseconds) -> Int {
        advance(now: now)
        var victims: [Int32] = []
        victims.reserveCapacity(prefix == nil ? objectCount : 0)
        for (k, e) in entries where e.current >= 0 {
            if let prefix, !k.hasPrefix(prefix) { continue }
            if versions[Int(e.current)].leaseUntil != 0 && !force { continue }
            victims.append(e.current)
        }
        for c in victims {
            endLease(c)
            hide(c)
        }
        return victims.count
    }

    // MARK: restore

    /// One object as a segment's owner knows it (from the master's notices), reported to a
    /// restarted master (`restore`).
    public struct Restored: Sendable, Equatable {
        public var key: ObjectKey
        public var offset: Int
        public var size: Int
        public var seq: UInt64
        public var options: WriteOptions
        public var checksum: UInt32?
        public init(key: ObjectKey, offset: Int, size: Int, seq: UInt64, options: WriteOptions, checksum: UInt32?) {
            self.key = key
            self.offset = offset
            self.size = size
            self.seq = seq
            self.options = options
            self.checksum = checksum
        }
    }

    /// What a segment's owner hears of its segment: an object stored in it (`object`), or one
    /// gone from it (nil: the version committed as `seq` at `offset`).
    public struct SegmentNotice: Sendable, Equatable {
        public var segment: SegmentID
        public var offset: Int
        public var seq: UInt64
        public var object: Restored?
        /// Its place in its segment's stream of notices (1, 2, ...): the owner confirms the
        /// notices it has applied by number (`confirm`).
        public var number: UInt64
        public init(segment: SegmentID, offset: Int, seq: UInt64, object: Restored?, number: UInt64 = 0) {
            self.segment = segment
            self.offset = offset
            self.seq = seq
            self.object = object
            self.number = number
        }
    }

    /// Whether commits and removals are recorded in `notices` (a master sets it; an embedded
    /// store has no one to tell).
    public var recordNotices = false
    /// Commits and removals since the last `takeNotices`, per placement.
    public private(set) var notices: [SegmentNotice] = []
    /// The sequence number the next commit gets. A master starts it at its wall-clock time in
    /// nanoseconds, so that a restarted master's commits come after its predecessor's.
    public var nextSeq: UInt64 = 1
    /// Per segment slot: where the last restored range ended (reports must ascend).
    var restoreCursor: [Int32: Int] = [:]
    /// Objects taken back by `restore`, and reports it refused.
    public private(set) var restoredObjects = 0
    public private(set) var refusedRestores = 0

    /// What a segment's owner has heard of it (a master's table: `recordNotices`).
    struct Ledger {
        /// Notices recorded so far (the last one's `number`), and the last number the owner
        /// confirmed.
        var recorded: UInt64 = 0
        var confirmed: UInt64 = 0
        /// Space of committed versions that went, each with `recorded` when it went: the owner
        /// may still list the version (it has not confirmed hearing that it went), so the space
        /// is not handed out again until it confirms that notice (`confirm`). Otherwise a
        /// master that dies meanwhile would be told by the owner that the version is still
        /// there, over bytes other writes have replaced.
        var awaiting: [(placement: Placement, notice: UInt64)] = []
    }
    /// Per mounted segment slot that has had a notice (gone with its segment: `unmount`).
    var ledgers: [Int32: Ledger] = [:]
    /// Bytes in the ledgers' `awaiting` (counted as used until then).
    public internal(set) var awaitingBytes = 0

    /// Replica copies and moves in flight (`beginCopy`), by their handle.
    var copies: [UInt64: ReplicaCopyState] = [:]
    var nextCopy: UInt64 = 1
    /// Placements taken off a version by a move while readers still held it: freed when its
    /// last reader is done (`releaseRead`) or it goes.
    var retired: [Int32: [Placement]] = [:]

    /// Appends a notice about slot `slot`, numbered in its segment's stream.
    mutating func record(_ slot: Int32, offset: Int, seq: UInt64, object: Restored?) {
        ledgers[slot, default: Ledger()].recorded &+= 1
        let n = ledgers[slot]!.recorded
        notices.append(SegmentNotice(segment: segments.id(of: slot), offset: offset, seq: seq, object: object, number: n))
    }

    /// The owner of segment `id` has applied its notices up to `number`: the space whose
    /// notices those were is free again. Numbers past the last recorded one are clamped.
    /// Returns the bytes freed.
    @discardableResult
    public mutating func confirm(segment id: SegmentID, through number: UInt64) -> Int {
        guard let slot = segments.slot(of: id), var ledger = ledgers[slot] else { return 0 }
        ledger.confirmed = max(ledger.confirmed, min(number, ledger.recorded))
        let heard = ledger.awaiting.prefix { $0.notice <= ledger.confirmed } // in notice order
        var freed = 0
        for w in heard {
            segments.free(w.placement)
            freed += w.placement.allocation.length
        }
        ledger.awaiting.removeFirst(heard.count)
        ledgers[slot] = ledger
        awaitingBytes -= freed
        return freed
    }

    public mutating func takeNotices() -> [SegmentNotice] {
        var taken: [SegmentNotice] = []
        swap(&taken, &notices) // hands the buffer over: no copy
        return taken
    }

    private mutating func notice(stored s: Int32) {
        let v = versions[Int(s)]
        v.placements.forEach { p in
            record(
                p.slot, offset: p.allocation.offset, seq: v.seq,
                object: Restored(key: v.key, offset: p.allocation.offset, size: v.size, seq: v.seq, options: v.options, checksum: v.checksum))
        }
    }

    /// Takes back the objects the owner of segment `id` reports (after this master restarted):
    /// each exactly where it lies. One reported in another segment too, with the same `seq`,
    /// gains a replica; two reports of one key keep the higher `seq`; a report whose range is
    /// not free (or leaves the segment) is refused. Returns, per object, whether it was taken.
    /// A segment still held for old leases (`mount(readyAt:)`) stays held around what was
    /// taken. Leases are not restored; pins and TTLs start again from `now` (an object lives
    /// at least as long as it would have). `last`: the owner has nothing more to report, so a
    /// segment mounted with `indexBy` is held from now on only for old leases, if at all.
    public mutating func restore(_ objects: [Restored], segment id: SegmentID, last: Bool = true, now: Nanoseconds) throws(KVError) -> [Bool] {
        advance(now: now)
        guard let slot = segments.slot(of: id) else { throw .invalidArgument("segment \(id) is not mounted") }
        var until = dropQuarantine { $0.placement.slot == slot }
        let leaseHeld = leaseHolds[slot].map { $0 > now } ?? false
        if last {
            until = leaseHeld ? leaseHolds[slot]! : 0
            awaitingReport.remove(slot)
        }
        var taken: [Bool] = []
        taken.reserveCapacity(objects.count)
        for o in objects {
            let ok = restoreOne(o, slot: slot, held: leaseHeld, now: now)
            if ok { restoredObjects += 1 } else { refusedRestores += 1 }
            taken.append(ok)
        }
        if until > now { // the rest of the segment stays held until the old leases have ended
            while case let n = segments.slots[Int(slot)].allocator.largestFreeBlock, n > 0, let p = segments.allocate(n, in: slot) {
                quarantined.append((p, until))
                if awaitingReport.contains(slot) { reportBytes += p.allocation.length }
            }
        }
        return taken
    }

    /// `held`: the segment is still held for old leases; the object is then leased for a lease
    /// TTL (past that hold), so it is not evicted and its space not reused meanwhile.
    private mutating func restoreOne(_ o: Restored, slot: Int32, held: Bool, now: Nanoseconds) -> Bool {
        // Offsets must ascend across all of a segment's reports: each range is then found where
        // the last one ended (O(1)), so no report can make the master scan the segment.
        guard o.size > 0, o.seq != 0, o.offset >= restoreCursor[slot, default: 0], (try? o.options.validate()) != nil,
            let p = segments.reserve(offset: o.offset, size: o.size, in: slot)
        else { return false }
        restoreCursor[slot] = p.allocation.offset + p.allocation.length
        nextSeq = max(nextSeq, o.seq &+ 1)
        if let e = entries[o.key], e.current >= 0 {
            let c = e.current
            let v = versions[Int(c)]
            if v.seq == o.seq { // the same write, another replica
                guard v.size == o.size, v.checksum == o.checksum, !v.placements.contains(slot: slot),
                    v.placements.count < Self.maxReplicas
                else {
                    segments.free(p)
                    return false
                }
                listRemove(c)
                versions[Int(c)].placements.append(p)
                if held { grantLease(c, now: now) }
                updateList(c)
                return true
            }
            if v.seq > o.seq || v.state != .complete {
                segments.free(p)
                return false
            }
        }
        let s = newVersion(
            Version(
                state: .complete, key: o.key, placements: PlacementList(p), size: o.size, mode: .upsert,
                options: o.options, owner: 0))
        versions[Int(s)].seq = o.seq
        versions[Int(s)].checksum = o.checksum
        versions[Int(s)].linked = true
        let old = Self.install(&entries[o.key, default: Entry()], slot: s, isPut: false)
        objectBytes += o.size
        if held { grantLease(s, now: now) }
        applyOptions(s, now: now)
        if old >= 0 { unlink(old) } else { objectCount += 1 }
        return true
    }

    /// Takes visible version `c` out of its key (remove, eviction, expiry).
    mutating func hide(_ c: Int32) {
        let key = versions[Int(c)].key
        var e = entries[key]!
        e.current = -1
        entries[key] = e.putPending ? e : nil
        objectCount -= 1
        unlink(c)
    }

    // MARK: internals

    func handle(_ slot: Int32) -> VersionHandle {
        VersionHandle(versions[Int(slot)].generation) << 32 | VersionHandle(UInt32(slot))
    }

    func slot(_ h: VersionHandle) throws(KVError) -> Int {
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

    /// Makes a visible version invisible; frees it now or when its last reader and lease end.
    mutating func unlink(_ s: Int32) {
        if recordNotices, versions[Int(s)].seq != 0 {
            let seq = versions[Int(s)].seq
            versions[Int(s)].placements.forEach { p in record(p.slot, offset: p.allocation.offset, seq: seq, object: nil) }
        }
        clearCacheState(s)
        versions[Int(s)].linked = false
        objectBytes -= versions[Int(s)].size
        reclaimIfUnused(s)
    }

    /// Frees the space of a committed placement whose owner was told it went: once the owner
    /// confirms that notice (`ledgers`). At once when the segment is gone or its owner already
    /// confirmed every notice (the version went after its removal was heard), or in a table
    /// that records no notices.
    mutating func freeNoticed(_ p: Placement) {
        guard recordNotices, segments.slots[Int(p.slot)].mounted, let l = ledgers[p.slot], l.recorded > l.confirmed else {
            return segments.free(p)
        }
        ledgers[p.slot]!.awaiting.append((p, l.recorded))
        awaitingBytes += p.allocation.length
    }

    mutating func reclaimIfUnused(_ s: Int32) {
        let v = versions[Int(s)]
        if v.readers == 0 && v.state == .complete && !v.linked { dropVersion(s) }
    }

    private mutating func dropVersion(_ s: Int32) {
        timers.cancelAll(slot: s)
        if versions[Int(s)].leaseUntil != 0 { activeLeases -= 1 }
        freeRetired(of: s)
        if recordNotices, versions[Int(s)].seq != 0 { // its owners may list it: free once they heard it went
            versions[Int(s)].placements.forEach { freeNoticed($0) }
        } else {
            versions[Int(s)].placements.forEach { segments.free($0) }
        }
        let next = versions[Int(s)].generation &+ 1
        let gen = next == 0 ? 1 : next
        versions[Int(s)] = Version()
        versions[Int(s)].generation = gen
        recycled.append(s)
    }
}
