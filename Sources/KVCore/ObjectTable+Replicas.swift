/// Replica copies and moves: another replica of an object's current version, in segments
/// the caller names, filled by a client and added when it commits (Mooncake's copy and move
/// tasks). The version itself does not change: readers, leases and pins carry on.

/// A copy or move in flight, as the table keeps it.
struct ReplicaCopyState: Sendable {
    /// The version copied (its slot and generation: it may go meanwhile).
    var version: Int32
    var generation: UInt32
    /// The new space, one placement per target segment.
    var targets: [Placement]
    /// A move: the slot whose replica goes when the copy commits.
    var drop: Int32?
    /// A target segment was unmounted meanwhile: the copy cannot commit.
    var lostTarget = false
}

/// What a client copying replicas is told (`ObjectTable.beginCopy`).
public struct ReplicaCopy: Sendable, Equatable {
    /// Names the copy (`commitCopy`, `abortCopy`); it also holds the version, so its bytes
    /// stay where they are until the copy ends.
    public let handle: UInt64
    public let size: Int
    /// Where the bytes are now (read from any), and where to write them (one per target).
    public let sources: [Replica]
    public let targets: [Replica]
    public let checksum: UInt32?

    public init(handle: UInt64, size: Int, sources: [Replica], targets: [Replica], checksum: UInt32?) {
        self.handle = handle
        self.size = size
        self.sources = sources
        self.targets = targets
        self.checksum = checksum
    }
}

extension ObjectTable {
    /// Begins copying the visible version of `key` into each of `targets` (distinct segments
    /// that are mounted and hold no replica of it yet); with `dropping`, a move: that
    /// segment's replica goes when the copy commits. Reserves the space (no eviction: it fails
    /// `noSpace` when a target has no room) and holds the version until the copy ends.
    public mutating func beginCopy(key: ObjectKey, to targets: [SegmentID], dropping: SegmentID?, now: Nanoseconds) throws(KVError) -> ReplicaCopy {
        advance(now: now)
        guard let e = entries[key], e.current >= 0 else { throw .notFound("object '\(key)' not found") }
        let c = e.current
        guard versions[Int(c)].state == .complete else { throw KVError(.leaseHeld, "object '\(key)' is being rewritten; try again") }
        guard !targets.isEmpty else { throw .invalidArgument("a replica copy needs at least one target segment") }
        guard Set(targets).count == targets.count else { throw .invalidArgument("target segments must be distinct") }
        var slots: [Int32] = []
        for t in targets {
            guard let s = segments.slot(of: t) else { throw .invalidArgument("segment \(t) is not mounted") }
            guard !segments.slots[Int(s)].draining else { throw .invalidArgument("segment \(t) is being unmounted (drained)") }
            guard !versions[Int(c)].placements.contains(slot: s) else {
                throw .invalidArgument("segment \(t) already holds a replica of '\(key)'")
            }
            slots.append(s)
        }
        var drop: Int32? = nil
        if let d = dropping {
            guard let s = segments.slot(of: d), versions[Int(c)].placements.contains(slot: s) else {
                throw .invalidArgument("segment \(d) holds no replica of '\(key)' to move")
            }
            drop = s
        }
        let count = versions[Int(c)].placements.count + targets.count - (drop == nil ? 0 : 1)
        guard count <= Self.maxReplicas else {
            throw .invalidArgument("'\(key)' would have \(count) replicas; at most \(Self.maxReplicas)")
        }
        let size = versions[Int(c)].size
        var placed: [Placement] = []
        for (t, s) in zip(targets, slots) {
            guard let p = segments.allocate(size, in: s) else {
                placed.forEach { segments.free($0) }
                throw .noSpace("no room for a \(size)-byte replica of '\(key)' in segment \(t)")
            }
            placed.append(p)
        }
        versions[Int(c)].readers += 1
        activeReaders += 1
        let h = nextCopy
        nextCopy &+= 1
        copies[h] = ReplicaCopyState(version: c, generation: versions[Int(c)].generation, targets: placed, drop: drop)
        var sources: [Replica] = []
        versions[Int(c)].placements.forEach { sources.append(segments.replica($0)) }
        return ReplicaCopy(
            handle: h, size: size, sources: sources, targets: placed.map { segments.replica($0) }, checksum: versions[Int(c)].checksum)
    }

    /// Adds the copied replicas to the version (and, for a move, takes the dropped one off:
    /// its space is freed once no reader holds the version and its owner heard it went).
    /// Throws `objectNotFound` when the object went or changed meanwhile, `transfer` when a
    /// target segment went: the new space is freed and nothing changes.
    public mutating func commitCopy(_ h: UInt64, now: Nanoseconds) throws(KVError) {
        advance(now: now)
        guard let copy = copies.removeValue(forKey: h) else { throw .invalidArgument("no replica copy \(h) in flight") }
        let s = copy.version
        versions[Int(s)].readers -= 1
        activeReaders -= 1
        let same = versions[Int(s)].generation == copy.generation && versions[Int(s)].linked && versions[Int(s)].state == .complete
        guard same, !copy.lostTarget else {
            copy.targets.forEach { segments.free($0) }
            finishRead(s)
            throw copy.lostTarget
                ? KVError(.transfer, "a target segment went during the replica copy")
                : KVError(.objectNotFound, "the object changed or went during the replica copy")
        }
        listRemove(s) // eviction accounting counts placements (held, it is on no list anyway)
        let v = versions[Int(s)]
        for p in copy.targets {
            versions[Int(s)].placements.append(p)
            if recordNotices, v.seq != 0 {
                record(
                    p.slot, offset: p.allocation.offset, seq: v.seq,
                    object: Restored(key: v.key, offset: p.allocation.offset, size: v.size, seq: v.seq, options: v.options, checksum: v.checksum))
            }
        }
        if let d = copy.drop, let gone = versions[Int(s)].placements.remove(slot: d) {
            if recordNotices, v.seq != 0 { record(d, offset: gone.allocation.offset, seq: v.seq, object: nil) }
            if versions[Int(s)].readers > 0 { retired[s, default: []].append(gone) } else { freeNoticed(gone) }
        }
        finishRead(s)
    }

    /// Ends a copy without adding anything: its space is freed.
    public mutating func abortCopy(_ h: UInt64) throws(KVError) {
        guard let copy = copies.removeValue(forKey: h) else { throw .invalidArgument("no replica copy \(h) in flight") }
        copy.targets.forEach { segments.free($0) }
        versions[Int(copy.version)].readers -= 1
        activeReaders -= 1
        finishRead(copy.version)
    }

    /// Frees the placements a move retired from version `s` (kept while readers held it).
    /// (Checked for emptiness first: no move, no hash of `s` on every read's end.)
    mutating func freeRetired(of s: Int32) {
        guard !retired.isEmpty, let gone = retired.removeValue(forKey: s) else { return }
        gone.forEach { freeNoticed($0) }
    }

    /// After a hold on `s` ended: frees what a move retired once no reader is left, and the
    /// version itself when it went meanwhile.
    private mutating func finishRead(_ s: Int32) {
        if versions[Int(s)].readers == 0 { freeRetired(of: s) }
        if versions[Int(s)].linked { updateList(s) } else { reclaimIfUnused(s) }
    }
}
