#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVTransfer

// Ranged reads: pieces of objects copied straight into the caller's memory, without reading
// the whole object (Mooncake's `get_into_ranges`, tensor shards read out of a larger tensor).

extension StoreClient {
    /// One piece of a ranged read: bytes `offset..<offset+length` of an object into `destination`
    /// (which must hold `length` bytes).
    public struct RangeCopy: Sendable {
        public var offset: Int
        public var length: Int
        public var destination: MemoryRegion

        public init(offset: Int, length: Int, destination: MemoryRegion) {
            self.offset = offset
            self.length = length
            self.destination = destination
        }
    }

    /// Copies `copies[pieces[i]]` out of object `keys[i]`, for every i; returns one outcome per
    /// copy (nil: copied). Every object is held first (one master request per chunk of keys),
    /// its pieces copied, then its hold released. A piece outside its object fails alone
    /// (`invalidArgument`); a missing object fails all its pieces. An object whose copies
    /// outlived the read's lease is read again on its own (its bytes may have been another
    /// object's), at most `expiredReadRetries` more times. Ranges are not checked against the
    /// object's checksum, which covers the whole object.
    public func readRanges(keys: [ObjectKey], pieces: [Range<Int>], copies: UnsafeBufferPointer<RangeCopy>,
                           memory: MemoryHint = .locate) throws(KVError) -> [KVError?] {
        guard keys.count == pieces.count else { throw .invalidArgument("\(keys.count) keys but \(pieces.count) piece lists") }
        for p in pieces where p.lowerBound < 0 || p.upperBound > copies.count {
            throw .invalidArgument("piece list \(p) is outside \(copies.count) copies")
        }
        var outcome = [KVError?](repeating: nil, count: copies.count)
        var again: [Int] = []
        for (i, r) in try beginReads(keys: keys).enumerated() {
            switch r {
            case .failure(let e):
                for c in pieces[i] { outcome[c] = e }
            case .success(let t):
                if !copyPieces(t, copies, pieces[i], &outcome, memory) { again.append(i) }
                try? endRead(t)
            }
        }
        for i in again {
            var tries = 1
            while true {
                let t: ReadTicket
                do throws(KVError) {
                    t = try beginRead(key: keys[i])
                } catch {
                    for c in pieces[i] { outcome[c] = error }
                    break
                }
                for c in pieces[i] { outcome[c] = nil }
                let held = copyPieces(t, copies, pieces[i], &outcome, memory)
                try? endRead(t)
                if held { break }
                tries += 1
                if tries > Self.expiredReadRetries {
                    for c in pieces[i] where outcome[c] == nil { outcome[c] = Self.leaseExpired(t, tries: tries) }
                    break
                }
            }
        }
        return outcome
    }

    /// Why `piece` cannot be copied out of an object of `size` bytes; nil when it can.
    static func check(_ piece: RangeCopy, in size: Int) -> KVError? {
        guard piece.offset >= 0, piece.length >= 0, piece.offset <= size, piece.length <= size - piece.offset else {
            return .invalidArgument("range at \(piece.offset) of \(piece.length) bytes is outside an object of \(size) bytes")
        }
        guard piece.destination.length >= piece.length else {
            return .invalidArgument("destination of \(piece.destination.length) bytes is smaller than the range's \(piece.length)")
        }
        return nil
    }

    /// Copies the pieces `which` of held object `t`, recording each failure; false when a copy
    /// outlived the lease (read the object again).
    private func copyPieces(_ t: ReadTicket, _ copies: UnsafeBufferPointer<RangeCopy>, _ which: Range<Int>,
                            _ outcome: inout [KVError?], _ memory: MemoryHint) -> Bool {
        if let held = copyMappedPieces(t, copies, which, &outcome, memory) { return held }
        var held = true
        for c in which {
            let piece = copies[c]
            if let e = Self.check(piece, in: t.size) {
                outcome[c] = e
                continue
            }
            if piece.length == 0 { continue }
            let destination = MemoryRegion(address: piece.destination.address, length: piece.length)
            do throws(KVError) {
                let n = try withUnsafePointer(to: destination) { (d) throws(KVError) in
                    try copyOutIfLeased(t, range: piece.offset..<piece.offset + piece.length,
                                        to: UnsafeBufferPointer(start: d, count: 1), memory: memory)
                }
                if n == nil { held = false }
            } catch {
                outcome[c] = error
            }
        }
        return held
    }
}

extension StoreClient {
    /// Pieces of one object adding up to at least this many bytes are copied with streaming
    /// stores (their destination is too large to stay in cache).
    static let coldPlanBytes = 4 << 20

    /// `copyPieces` into host memory from a replica this process maps: the segment is found
    /// once and each piece is one copy, the lease checked once after the last (a plan of
    /// thousands of row pieces costs little more than its bytes). nil when that does not apply
    /// (device memory, a peer's segment): the caller copies piece by piece.
    private func copyMappedPieces(_ t: ReadTicket, _ copies: UnsafeBufferPointer<RangeCopy>, _ which: Range<Int>,
                                  _ outcome: inout [KVError?], _ memory: MemoryHint) -> Bool? {
        guard case .host = memory else { return nil }
        do throws(KVError) {
            try enter()
        } catch {
            return nil
        }
        defer { leave() }
        guard case .mapped(let s)? = try? access(t.segment),
              let whole = try? Self.region(of: s, Replica(segment: t.segment, offset: t.offset), t.size) else { return nil }
        if t.leaseEnd != 0, Self.testReadPause > 0 { usleep(Self.testReadPause) }
        var ops: [CopyOp] = []
        ops.reserveCapacity(which.count)
        var total = 0
        for c in which {
            let piece = copies[c]
            if let e = Self.check(piece, in: t.size) {
                outcome[c] = e
                continue
            }
            if piece.length == 0 { continue }
            ops.append(CopyOp(source: whole.address + UInt(piece.offset), destination: piece.destination.address, length: piece.length))
            total += piece.length
        }
        // Pieces that add up to more than a cache's worth land on cold lines: streaming stores,
        // one fence for all (a TP=4 → TP=2 reshard of 256 MiB, rows of 16 KiB: 66% of
        // get_into's rate with a memcpy per piece, 78% so).
        if total >= Self.coldPlanBytes {
            transport.copyColdPieces(ops)
        } else {
            for op in ops { transport.copyHost(op, into: .callerMemory) }
        }
        return leaseHeld(t)
    }

    /// Where an object's bytes are: its size and its replicas (segment and offset), first the
    /// one a read tries first.
    public struct Placement: Sendable, Equatable {
        public var size: Int
        public var replicas: [Replica]
    }

    /// The placement of each key (`notFound` for a missing one): one master request per chunk
    /// of keys. Like `exists`, it leases each object it finds; it copies nothing.
    public func placements(keys: [ObjectKey]) throws(KVError) -> [Result<Placement, KVError>] {
        try beginReads(keys: keys).map { r in
            r.map { t in
                try? endRead(t)
                return Placement(size: t.size, replicas: [Replica(segment: t.segment, offset: t.offset)] + t.fallbacks)
            }
        }
    }
}
