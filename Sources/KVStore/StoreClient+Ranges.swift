#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVTransfer

// Ranged reads: pieces of objects copied straight into the caller's memory, without reading
// the whole object (Mooncake's `get_into_ranges`, tensor shards read out of a larger tensor).

extension StoreClient {
    /// One piece of a ranged read or of a write in pieces: bytes `offset..<offset+length` of an
    /// object, and the caller's `memory` (at least `length` bytes) they are copied into (a read)
    /// or from (a write).
    public struct Piece: Sendable {
        public var offset: Int
        public var length: Int
        public var memory: MemoryRegion

        public init(offset: Int, length: Int, memory: MemoryRegion) {
            self.offset = offset
            self.length = length
            self.memory = memory
        }
    }

    /// Copies `copies[pieces[i]]` out of object `keys[i]`, for every i; returns one outcome per
    /// copy (nil: copied). Every object is held first (one master request per chunk of keys),
    /// its pieces copied, then its hold released. A piece outside its object fails alone
    /// (`invalidArgument`); a missing object fails all its pieces. An object whose copies
    /// outlived the read's lease is read again on its own (its bytes may have been another
    /// object's), at most `expiredReadRetries` more times. Ranges are not checked against the
    /// object's checksum, which covers the whole object.
    public func readRanges(
        keys: [ObjectKey], pieces: [Range<Int>], copies: UnsafeBufferPointer<Piece>,
        memory: MemoryHint = .locate
    ) throws(KVError) -> [KVError?] {
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
    static func check(_ piece: Piece, in size: Int) -> KVError? {
        guard piece.offset >= 0, piece.length >= 0, piece.offset <= size, piece.length <= size - piece.offset else {
            return .invalidArgument("range at \(piece.offset) of \(piece.length) bytes is outside an object of \(size) bytes")
        }
        guard piece.memory.length >= piece.length else {
            return .invalidArgument("memory of \(piece.memory.length) bytes is smaller than the range's \(piece.length)")
        }
        return nil
    }

    /// Copies the pieces `which` of held object `t`, recording each failure; false when a copy
    /// outlived the lease (read the object again).
    private func copyPieces(
        _ t: ReadTicket, _ copies: UnsafeBufferPointer<Piece>, _ which: Range<Int>,
        _ outcome: inout [KVError?], _ memory: MemoryHint
    ) -> Bool {
        var valid: [Int] = [] // the pieces to copy: inside the object, with room, not empty
        valid.reserveCapacity(which.count)
        for c in which {
            if let e = Self.check(copies[c], in: t.size) { outcome[c] = e } else if copies[c].length > 0 { valid.append(c) }
        }
        if let held = copyMappedPieces(t, copies, valid, memory) { return held }
        var held = true
        for c in valid {
            let piece = copies[c]
            let destination = MemoryRegion(address: piece.memory.address, length: piece.length)
            do throws(KVError) {
                let n = try withUnsafePointer(to: destination) { (d) throws(KVError) in
                    try copyOutIfLeased(
                        t, range: piece.offset..<piece.offset + piece.length,
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
    private func copyMappedPieces(
        _ t: ReadTicket, _ copies: UnsafeBufferPointer<Piece>, _ valid: [Int],
        _ memory: MemoryHint
    ) -> Bool? {
        guard case .host = memory else { return nil }
        do throws(KVError) {
            try enter()
        } catch {
            return nil
        }
        defer { leave() }
        guard case .mapped(let s)? = try? access(t.segment),
            let whole = try? Self.region(of: s, Replica(segment: t.segment, offset: t.offset), t.size)
        else { return nil }
        if t.leaseEnd != 0, Self.testReadPause > 0 { usleep(Self.testReadPause) }
        let ops = valid.map { c in
            CopyOp(source: whole.address + UInt(copies[c].offset), destination: copies[c].memory.address, length: copies[c].length)
        }
        let total = ops.reduce(0) { $0 + $1.length }
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
