import KVAccelerator
import KVCore
import KVTransfer

// Writes in pieces (Mooncake's put sessions): an object's space is reserved first, its bytes
// arrive in ranges over several calls (a layer at a time, from device or host memory), and it
// becomes visible only when the write ends; a revoked write frees its space and shows nothing.

/// The writes a client has begun and not ended, by id.
struct OpenWrites: Sendable {
    var byID: [UInt64: (ticket: WriteTicket, checksum: Bool)] = [:]
    var next: UInt64 = 1
}

extension StoreClient {
    /// Most writes one client may hold open at once (the master also bounds writes in flight
    /// per client, and aborts one not ended within its write timeout).
    public static let maxOpenWrites = 4096

    /// Reserves space for objects `keys[i]` of `sizes[i]` bytes (one master request per chunk);
    /// returns an open write's id per key, or its error (`objectExists` for a put of an
    /// existing key). Nothing is visible until `endWrites`.
    public func beginWrites(
        keys: [ObjectKey], sizes: [Int], mode: WriteMode,
        options: WriteOptions = .default
    ) throws(KVError) -> [Result<UInt64, KVError>] {
        try enter()
        defer { leave() }
        guard keys.count == sizes.count else { throw .invalidArgument("\(keys.count) keys but \(sizes.count) sizes") }
        var out = [Result<UInt64, KVError>](repeating: .failure(.invalidArgument("not begun")), count: keys.count)
        var asked: [Int] = []
        var requests: [BatchWrite] = []
        let open = openWrites.withLock { $0.byID.count }
        for (i, (k, n)) in zip(keys, sizes).enumerated() {
            if n <= 0 {
                out[i] = .failure(.invalidArgument("size must be positive, not \(n)"))
            } else if open + requests.count >= Self.maxOpenWrites {
                out[i] = .failure(.noSpace("\(Self.maxOpenWrites) writes are open already: end or revoke some first"))
            } else {
                asked.append(i)
                requests.append(BatchWrite(key: k, size: n))
            }
        }
        guard !requests.isEmpty else { return out }
        try master.beginWrites(requests, mode: mode, options: options, preferred: ownSegmentID) { range, started in
            for (i, r) in zip(asked[range], started) {
                switch r {
                case .failure(let e): out[i] = .failure(e)
                case .success(let t):
                    out[i] = .success(
                        openWrites.withLock { w in
                            let id = w.next
                            w.next += 1
                            w.byID[id] = (t, options.checksum)
                            return id
                        })
                }
            }
        }
        return out
    }

    /// Copies `pieces[j]` of `copies` (their memory the source) into open write `ids[j]`, every replica; returns one
    /// outcome per piece (nil: copied). A piece outside its object, or of a write that is not
    /// open, fails alone; a write whose deadline passed fails (revoke it).
    public func writeRanges(
        ids: [UInt64], pieces: [Range<Int>], copies: UnsafeBufferPointer<Piece>,
        memory: MemoryHint = .locate
    ) throws(KVError) -> [KVError?] {
        try enter()
        defer { leave() }
        guard ids.count == pieces.count else { throw .invalidArgument("\(ids.count) writes but \(pieces.count) piece lists") }
        for p in pieces where p.lowerBound < 0 || p.upperBound > copies.count {
            throw .invalidArgument("piece list \(p) is outside \(copies.count) pieces")
        }
        var outcome = [KVError?](repeating: nil, count: copies.count)
        var plan = DeviceCopyPlan() // device sources; each copy's owner is its piece
        for (j, id) in ids.enumerated() {
            guard let t = openWrites.withLock({ $0.byID[id]?.ticket }) else {
                for c in pieces[j] { outcome[c] = .invalidArgument("write \(id) is not open") }
                continue
            }
            for c in pieces[j] {
                let piece = copies[c]
                if let e = Self.check(piece, in: t.size) {
                    outcome[c] = e
                    continue
                }
                if piece.length == 0 { continue }
                var source = MemoryRegion(address: piece.memory.address, length: piece.length)
                do throws(KVError) {
                    try withUnsafePointer(to: &source) { (src) throws(KVError) in
                        let part = UnsafeBufferPointer(start: src, count: 1)
                        let locations = try locate(part, memory)
                        for r in t.replicas {
                            _ = try write(
                                part, locations: locations, size: piece.length,
                                to: Replica(segment: r.segment, offset: r.offset + piece.offset), of: t, plan: &plan, owner: c)
                        }
                    }
                } catch {
                    outcome[c] = error
                }
            }
        }
        for (c, e) in run(plan, into: .segment) where outcome[c] == nil {
            outcome[c] = e
        }
        return outcome
    }

    /// Ends open writes: commits them (visible from now), or with `abort` frees their space.
    /// One outcome per id (a write that is not open: `invalidArgument`).
    public func endWrites(ids: [UInt64], abort: Bool) throws(KVError) -> [KVError?] {
        try enter()
        defer { leave() }
        var outcome = [KVError?](repeating: nil, count: ids.count)
        var tickets: [(i: Int, t: WriteTicket)] = []
        for (i, id) in ids.enumerated() {
            guard let open = openWrites.withLock({ $0.byID.removeValue(forKey: id) }) else {
                outcome[i] = .invalidArgument("write \(id) is not open")
                continue
            }
            var t = open.ticket
            if open.checksum && !abort {
                do throws(KVError) { t.checksum = try checksumOfFirstReplica(t) } catch { outcome[i] = error }
            }
            tickets.append((i, t))
        }
        let commit = abort ? [] : tickets.filter { outcome[$0.i] == nil }
        let drop = abort ? tickets : tickets.filter { outcome[$0.i] != nil }
        let committed = master.finishWrites(commit: commit.map(\.t), abort: drop.map(\.t))
        for ((i, _), e) in zip(commit, committed) {
            if let e { outcome[i] = e } else { operations.puts.add(1, ordering: .relaxed) }
        }
        return outcome
    }
}
