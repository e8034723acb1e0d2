extension ObjectTable {
    /// Recomputes every counter from the versions and lists and compares; returns a description
    /// of the first mismatch, or nil. O(n): for tests and diagnostics only.
    public func invariantViolation() -> String? {
        var objects = 0, objectBytes = 0, readers = 0, leases = 0, hard = 0, soft = 0, used = 0, listed = 0
        for v in versions where v.state != .free {
            if v.linked { objects += 1; objectBytes += v.size }
            readers += Int(v.readers)
            if v.leaseUntil != 0 { leases += 1 }
            if v.hardPinned { hard += v.size }
            if v.softPinned { soft += v.size }
            v.placements.forEach { p in if segments.slots[Int(p.slot)].mounted { used += p.allocation.length } }
            if v.list != .none { listed += v.placements.length }
        }
        for q in quarantined where segments.slots[Int(q.placement.slot)].mounted { used += q.placement.allocation.length }
        for c in copies.values { for p in c.targets where segments.slots[Int(p.slot)].mounted { used += p.allocation.length } }
        for ps in retired.values { for p in ps where segments.slots[Int(p.slot)].mounted { used += p.allocation.length } }
        let reporting = quarantined.reduce(0) { $0 + (awaitingReport.contains($1.placement.slot) ? $1.placement.allocation.length : 0) }
        var awaiting = 0
        for (slot, l) in ledgers where segments.slots[Int(slot)].mounted {
            for w in l.awaiting { awaiting += w.placement.allocation.length }
        }
        used += awaiting
        var onLists = 0
        for l in [List.ordinary, .softPinned] {
            var s = lists[Int(l.rawValue)].head, prev: Int32 = -1
            while s >= 0 {
                if versions[Int(s)].list != l { return "version \(s) is on list \(l) but says \(versions[Int(s)].list)" }
                if versions[Int(s)].prev != prev { return "broken back link at \(s)" }
                onLists += versions[Int(s)].placements.length
                prev = s
                s = versions[Int(s)].next
            }
            if lists[Int(l.rawValue)].tail != prev { return "list \(l) tail is \(lists[Int(l.rawValue)].tail), walked to \(prev)" }
        }
        let checks: [(String, Int, Int)] = [
            ("objectCount", objectCount, objects), ("objectBytes", self.objectBytes, objectBytes),
            ("activeReaders", activeReaders, readers), ("activeLeases", activeLeases, leases),
            ("hardPinnedBytes", hardPinnedBytes, hard), ("softPinnedBytes", softPinnedBytes, soft),
            ("hard pins by owner", hardPinnedByOwner.values.reduce(0, +), hard),
            ("usedBytes", usedBytes, used), ("awaitingBytes", awaitingBytes, awaiting), ("reportBytes", reportBytes, reporting),
            ("evictableBytes", evictableBytes, listed),
            ("listed bytes", evictableBytes, onLists),
            ("visible entries", entries.values.filter { $0.current >= 0 }.count, objects)
        ]
        for (name, kept, actual) in checks where kept != actual { return "\(name) is \(kept), recomputed \(actual)" }
        return nil
    }
}
