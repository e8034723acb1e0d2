/// Leases, pins, TTLs and eviction of `ObjectTable`.
extension ObjectTable {
    // MARK: time

    /// Runs every timer due at or before `now`: ends leases (freeing hidden versions whose
    /// last lease it was), turns expired soft pins ordinary, and removes objects whose TTL
    /// passed. Every call that takes `now` runs this first; tests call it to move time.
    public mutating func advance(now: Nanoseconds) {
        if !quarantined.isEmpty { releaseQuarantine(now: now) }
        while let t = timers.popDue(now: now) {
            let s = t.slot, i = Int(t.slot)
            switch t.kind {
            case .lease:
                if versions[i].leaseUntil > now {
                    // Extended since it was scheduled: reads only move `leaseUntil` (O(1)).
                    timers.schedule(slot: s, kind: .lease, at: versions[i].leaseUntil)
                    continue
                }
                versions[i].leaseUntil = 0
                activeLeases -= 1
                if versions[i].linked { updateList(s) } else { reclaimIfUnused(s) }
            case .softPin:
                if versions[i].softPinned {
                    versions[i].softPinned = false
                    softPinnedBytes -= versions[i].size
                    updateList(s)
                }
            case .expiry:
                if versions[i].linked {
                    expiredObjects += 1
                    hide(s)
                }
            }
        }
    }

    // MARK: leases

    mutating func grantLease(_ s: Int32, now: Nanoseconds) {
        guard policy.leaseTTL > 0 else { return }
        let until = now &+ policy.leaseTTL
        if versions[Int(s)].leaseUntil == 0 {
            activeLeases += 1
            timers.schedule(slot: s, kind: .lease, at: until)
        }
        versions[Int(s)].leaseUntil = max(versions[Int(s)].leaseUntil, until)
    }

    /// A read of version `s`: leases it and takes it off the eviction order while leased or held.
    mutating func noteRead(_ s: Int32, now: Nanoseconds) {
        if versions[Int(s)].lowerTier == .refused { versions[Int(s)].lowerTier = .undecided } // wanted again: ask again
        grantLease(s, now: now)
        updateList(s)
    }

    mutating func endLease(_ s: Int32) {
        guard versions[Int(s)].leaseUntil != 0 else { return }
        versions[Int(s)].leaseUntil = 0
        activeLeases -= 1
        timers.cancel(slot: s, kind: .lease)
    }

    /// The lease end of the visible version of `key` (0: not leased), or nil when absent.
    public func leaseEnd(key: ObjectKey) -> Nanoseconds? {
        guard let e = entries[key], e.current >= 0 else { return nil }
        return versions[Int(e.current)].leaseUntil
    }

    // MARK: pins and TTLs

    /// Applies a committed write's options to visible version `s`.
    mutating func applyOptions(_ s: Int32, now: Nanoseconds) {
        let o = versions[Int(s)].options
        if o.hardPin {
            versions[Int(s)].hardPinned = true
            hardPinnedBytes += versions[Int(s)].size
            hardPinnedByOwner[versions[Int(s)].owner, default: 0] += versions[Int(s)].size
        }
        if let ttl = o.softPinTTL {
            versions[Int(s)].softPinned = true
            softPinnedBytes += versions[Int(s)].size
            timers.schedule(slot: s, kind: .softPin, at: now &+ ttl)
        }
        if let ttl = o.ttl { timers.schedule(slot: s, kind: .expiry, at: now &+ ttl) }
        updateList(s)
    }

    /// Undoes `applyOptions` (the version is hidden, or about to be rewritten in place) and
    /// takes it off its eviction list. Leases are left alone.
    mutating func clearCacheState(_ s: Int32) {
        let i = Int(s)
        if versions[i].hardPinned {
            hardPinnedBytes -= versions[i].size
            let left = hardPinnedByOwner[versions[i].owner, default: 0] - versions[i].size
            hardPinnedByOwner[versions[i].owner] = left == 0 ? nil : left
        }
        if versions[i].softPinned { softPinnedBytes -= versions[i].size }
        versions[i].hardPinned = false
        versions[i].softPinned = false
        timers.cancel(slot: s, kind: .softPin)
        timers.cancel(slot: s, kind: .expiry)
        listRemove(s)
    }

    /// Pin and TTL state of the visible version of `key`: (hard, soft, expiry deadline).
    public func cacheState(key: ObjectKey) -> (hardPinned: Bool, softPinned: Bool, expiresAt: Nanoseconds?)? {
        guard let e = entries[key], e.current >= 0 else { return nil }
        let v = versions[Int(e.current)]
        return (v.hardPinned, v.softPinned, timers.deadline(slot: e.current, kind: .expiry))
    }

    // MARK: eviction lists

    /// Puts version `s` on the list its state calls for: evictable versions (visible,
    /// complete, not hard-pinned, not held, not leased) on the soft-pinned or ordinary list,
    /// everything else on none. A version that joins a list goes to its most recent end;
    /// one already on the right list keeps its place.
    mutating func updateList(_ s: Int32) {
        let v = versions[Int(s)]
        let want: List
        if v.linked && v.state == .complete && !v.hardPinned && v.readers == 0 && v.leaseUntil == 0 {
            want = v.softPinned ? .softPinned : .ordinary
        } else {
            want = .none
        }
        guard want != v.list else { return }
        listRemove(s)
        guard want != .none else { return }
        let l = Int(want.rawValue)
        evictableBytes += v.placements.length
        versions[Int(s)].list = want
        versions[Int(s)].prev = -1
        versions[Int(s)].next = lists[l].head
        if lists[l].head >= 0 { versions[Int(lists[l].head)].prev = s } else { lists[l].tail = s }
        lists[l].head = s
    }

    mutating func listRemove(_ s: Int32) {
        let v = versions[Int(s)]
        guard v.list != .none else { return }
        let l = Int(v.list.rawValue)
        evictableBytes -= v.placements.length
        if v.prev >= 0 { versions[Int(v.prev)].next = v.next } else { lists[l].head = v.next }
        if v.next >= 0 { versions[Int(v.next)].prev = v.prev } else { lists[l].tail = v.prev }
        versions[Int(s)].list = .none
        versions[Int(s)].prev = -1
        versions[Int(s)].next = -1
    }

    /// Keys on an eviction list from the eviction end: ordinary objects first, then soft-pinned.
    public func evictionOrder() -> [ObjectKey] {
        var out: [ObjectKey] = []
        for l in [List.ordinary, .softPinned] {
            var s = lists[Int(l.rawValue)].tail
            while s >= 0 { out.append(versions[Int(s)].key); s = versions[Int(s)].prev }
        }
        return out
    }

    /// One object next in line for eviction (`coldest`).
    public struct ColdObject: Sendable, Equatable {
        public var key: ObjectKey
        /// The version (for `holdInPlace` and `decide`).
        public var handle: VersionHandle
    }

    /// The objects eviction would take first, in that order (ordinary, then soft-pinned),
    /// until `bytes` of them have been looked at; those a lower tier decided on are left out
    /// of the answer (but counted). What a lower tier copies ahead of eviction.
    public func coldest(bytes: Int) -> [ColdObject] {
        var out: [ColdObject] = []
        var seen = 0
        for l in [List.ordinary, .softPinned] {
            var s = lists[Int(l.rawValue)].tail
            while s >= 0 && seen < bytes {
                let v = versions[Int(s)]
                seen += v.placements.length
                if v.lowerTier == .undecided {
                    out.append(ColdObject(key: v.key, handle: handle(s)))
                }
                s = v.prev
            }
        }
        return out
    }

    /// `coldest(bytes:)` for one segment's owner: the undecided versions among the coldest
    /// `bytes` of the whole table whose first replica is in segment `seg`, looking at no more
    /// than `walk` versions (the walk runs on the master's only thread) and leaving out those
    /// `skip` names.
    public func coldest(bytes: Int, in seg: SegmentID, walk: Int, skip: (ObjectKey) -> Bool) -> [ColdObject] {
        guard let slot = segments.slot(of: seg) else { return [] }
        var out: [ColdObject] = []
        var seen = 0, looked = 0
        for l in [List.ordinary, .softPinned] {
            var s = lists[Int(l.rawValue)].tail
            while s >= 0 && seen < bytes && looked < walk {
                let v = versions[Int(s)]
                seen += v.placements.length
                looked += 1
                if v.lowerTier == .undecided, v.placements.first?.slot == slot, !skip(v.key) {
                    out.append(ColdObject(key: v.key, handle: handle(s)))
                }
                s = v.prev
            }
        }
        return out
    }

    // MARK: eviction

    /// Bytes one eviction round frees at least.
    var roundBytes: Int { max(SegmentAllocator.granule, Int(Double(capacity) * policy.evictionRatio)) }

    /// Places `replicas` copies of `size` bytes in distinct segments (`preferred` first): first
    /// evicts down to the high watermark (a round of at least `roundBytes`) when the write
    /// would cross it, then evicts round after round while the copies do not fit. Best effort
    /// beyond the first copy: fewer when fewer segments are mounted or can make room. nil only
    /// when not even one copy fits with nothing evictable left.
    mutating func placeEvicting(_ size: Int, replicas: Int, preferred: SegmentID?) -> PlacementList? {
        let rounded = SegmentAllocator.roundedLength(size)
        // Cannot fit even if everything evictable went: fail before evicting anything.
        guard size <= segments.largestCapacity, rounded <= segments.freeBytes + evictableBytes else { return nil }
        let target = min(replicas, segments.mountedCount)
        let high = Int(Double(capacity) * policy.highWatermark)
        let over = usedBytes - comingBackBytes + rounded * target - high // space awaiting its owner comes back soon
        if over > 0 { evict(atLeast: max(over, roundBytes)) }
        var placed = PlacementList()
        while true {
            if segments.slots.count == 1 { // the embedded store: no ordering to compute
                if let p = segments.allocate(size, in: 0) { placed.append(p) }
            } else {
                for s in segments.placementOrder(preferred: preferred) where placed.count < target && !placed.contains(slot: s) {
                    if let p = segments.allocate(size, in: s) { placed.append(p) }
                }
            }
            if placed.count == target { return placed }
            // Space freed moments ago waits for its owner's confirmation (`ledgers`):
            // evicting on would empty the cache for room that is about to come back.
            if comingBackBytes >= rounded * (target - placed.count) { return placed.isEmpty ? nil : placed }
            if evict(atLeast: max(rounded, roundBytes)) == 0 { return placed.isEmpty ? nil : placed }
        }
    }

    /// Whether a write of `bytes` (all its replicas) should wait for space that awaits its
    /// owners' confirmation (`ledgers`): it does not fit the free space now. Evicts
    /// first what the confirmations will not bring back, so that once they come the write
    /// fits; a write larger than every segment together is never held back (it fails).
    public mutating func mustWaitForRoom(_ bytes: Int) -> Bool {
        let free = segments.freeBytes
        guard free < bytes, bytes <= capacity else { return false }
        let short = bytes - free - comingBackBytes
        if short > 0 { evict(atLeast: short) }
        return comingBackBytes > 0
    }

    /// Evicts from the eviction end until `target` bytes are freed or nothing evictable is
    /// left; returns the bytes freed.
    @discardableResult
    public mutating func evict(atLeast target: Int) -> Int {
        var freed = 0
        while freed < target {
            var s = lists[Int(List.ordinary.rawValue)].tail
            if s < 0 { s = lists[Int(List.softPinned.rawValue)].tail }
            guard s >= 0 else { break }
            // With a lower tier: the first version it decided on near the end, so one it has
            // not reached yet is not lost while another can go.
            var c = s, looked = 0
            while c >= 0 && looked < evictionLooksAhead {
                if versions[Int(c)].lowerTier != .undecided { s = c; break }
                c = versions[Int(c)].prev
                looked += 1
            }
            if evictionLooksAhead > 0 && versions[Int(s)].lowerTier == .undecided { evictedUndecided += 1 }
            freed += versions[Int(s)].placements.length
            evictedObjects += 1
            evictedBytes += versions[Int(s)].size
            hide(s)
        }
        return freed
    }

    // MARK: statistics

    /// The table's counters at one instant.
    public var statistics: CacheStatistics {
        CacheStatistics(
            objects: objectCount, objectBytes: objectBytes, usedBytes: usedBytes, capacity: capacity,
            activeReaders: activeReaders, activeLeases: activeLeases,
            hardPinnedBytes: hardPinnedBytes, softPinnedBytes: softPinnedBytes,
            evictedObjects: evictedObjects, evictedBytes: evictedBytes, expiredObjects: expiredObjects,
            freeBlocks: segments.freeBlockCount, largestFreeBlock: segments.largestFreeBlock)
    }
}

/// Counters of one `ObjectTable`, taken together.
public struct CacheStatistics: Sendable, Equatable {
    public var objects: Int
    public var objectBytes: Int
    public var usedBytes: Int
    public var capacity: Int
    public var activeReaders: Int
    public var activeLeases: Int
    public var hardPinnedBytes: Int
    public var softPinnedBytes: Int
    public var evictedObjects: Int
    public var evictedBytes: Int
    public var expiredObjects: Int
    public var freeBlocks: Int
    public var largestFreeBlock: Int
}
