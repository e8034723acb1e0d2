/// A range of a segment handed out by `SegmentAllocator`. `offset` and `length` are in bytes;
/// `length` is the request rounded up to the allocator's granule. `block` identifies the
/// allocator's bookkeeping record so `free` costs O(1).
public struct Allocation: Sendable, Hashable {
    public let offset: Int
    public let length: Int
    let block: Int32
}

/// Allocator for one segment: a two-level segregated-fit (TLSF) allocator whose bookkeeping
/// lives outside the segment (the segment holds only object bytes, so it can be shared memory
/// or registered device memory later).
///
/// - Every offset is a multiple of `granule` (64 bytes: a cache line).
/// - `allocate` and `free` are O(1): two bitmaps find a free list whose blocks all fit; freed
///   blocks merge with free physical neighbours at once, so free space never stays split.
/// - An allocation succeeds whenever any single free block is large enough (the exact size
///   class is scanned when the good-fit search fails), so fragmentation costs only what it must.
///
/// Not thread-safe: the owner (the master state) serialises access.
public struct SegmentAllocator: Sendable {
    public static let granule = 64
    static let slBits = 4
    static let slCount = 1 << slBits
    static let flCount = 64 - slBits

    struct Block {
        var start: Int // granules
        var size: Int // granules
        var prevPhys: Int32 // -1: none
        var nextPhys: Int32
        var prevFree: Int32
        var nextFree: Int32
        var isFree: Bool
        var inUse: Bool // the record is live (not on the recycled list)
    }

    public let capacity: Int
    private var blocks: [Block] = []
    private var recycled: [Int32] = []
    private var heads: [Int32]
    private var flBitmap: UInt64 = 0
    private var slBitmaps: [UInt32]
    public private(set) var usedBytes = 0
    public private(set) var allocationCount = 0
    /// Number of free blocks (1 when all free space is one run; a fragmentation measure).
    public private(set) var freeBlockCount = 0

    /// - Parameter capacity: segment size in bytes; rounded down to the granule.
    public init(capacity: Int) {
        let granules = max(0, capacity) / Self.granule
        self.capacity = granules * Self.granule
        heads = Array(repeating: -1, count: Self.flCount * Self.slCount)
        slBitmaps = Array(repeating: 0, count: Self.flCount)
        if granules > 0 {
            let b = newBlock(
                Block(
                    start: 0, size: granules, prevPhys: -1, nextPhys: -1,
                    prevFree: -1, nextFree: -1, isFree: true, inUse: true))
            insertFree(b)
        }
    }

    public var freeBytes: Int { capacity - usedBytes }

    /// Bytes an allocation of `bytes` occupies (rounded up to the granule).
    public static func roundedLength(_ bytes: Int) -> Int {
        (bytes + granule - 1) / granule * granule
    }

    /// Returns a range of at least `bytes` bytes, or nil when no free block is large enough.
    public mutating func allocate(_ bytes: Int) -> Allocation? {
        guard bytes > 0, bytes <= capacity else { return nil }
        let want = (bytes + Self.granule - 1) / Self.granule
        guard let found = findFree(want) else { return nil }
        removeFree(found)
        if let rest = split(found, keeping: want) { insertFree(rest) }
        blocks[Int(found)].isFree = false
        usedBytes += want * Self.granule
        allocationCount += 1
        return Allocation(
            offset: blocks[Int(found)].start * Self.granule,
            length: want * Self.granule, block: found)
    }

    /// Takes exactly the range at `offset` for `bytes` bytes (rounded up to the granule) when
    /// all of it is free: what a restarted master does with the objects a segment's owner
    /// reports. nil when `offset` is not a granule boundary, the range leaves the segment, or
    /// any of it is taken. Ascending offsets cost O(1) each (the search starts after the last
    /// range taken); others scan the blocks before them.
    public mutating func reserve(offset: Int, bytes: Int) -> Allocation? {
        guard bytes > 0, offset >= 0, offset % Self.granule == 0, offset <= capacity, bytes <= capacity - offset,
            !blocks.isEmpty
        else { return nil }
        let start = offset / Self.granule, want = (bytes + Self.granule - 1) / Self.granule
        var b: Int32 = 0 // block 0 always starts the segment: nothing merges into a predecessor of it
        if reserveHint >= 0, Int(reserveHint) < blocks.count, blocks[Int(reserveHint)].inUse,
            blocks[Int(reserveHint)].start <= start
        {
            b = reserveHint
        }
        while b >= 0, blocks[Int(b)].start + blocks[Int(b)].size <= start { b = blocks[Int(b)].nextPhys }
        guard b >= 0, blocks[Int(b)].isFree, blocks[Int(b)].start + blocks[Int(b)].size >= start + want else { return nil }
        removeFree(b)
        var r = b
        let left = start - blocks[Int(b)].start
        if left > 0, let tail = split(b, keeping: left) { // the free part before the range stays free
            insertFree(b)
            r = tail
        }
        reserveHint = r
        if let rest = split(r, keeping: want) {
            insertFree(rest)
            reserveHint = rest
        }
        blocks[Int(r)].isFree = false
        usedBytes += want * Self.granule
        allocationCount += 1
        return Allocation(offset: start * Self.granule, length: want * Self.granule, block: r)
    }

    /// Where the last `reserve` left off (-1: none).
    private var reserveHint: Int32 = -1

    /// Returns an allocation's range to the free space, merging it with free neighbours.
    /// Throws `internal` for a range this allocator did not hand out or already freed.
    public mutating func free(_ a: Allocation) throws(KVError) {
        let i = Int(a.block)
        guard i >= 0, i < blocks.count, blocks[i].inUse, !blocks[i].isFree,
            blocks[i].start * Self.granule == a.offset, blocks[i].size * Self.granule == a.length
        else { throw KVError(.internal, "free of an unknown or already freed range at offset \(a.offset)") }
        usedBytes -= a.length
        allocationCount -= 1
        var b = a.block
        blocks[i].isFree = true
        let prev = blocks[i].prevPhys
        if prev >= 0, blocks[Int(prev)].isFree {
            removeFree(prev)
            absorbNext(into: prev)
            b = prev
        }
        let next = blocks[Int(b)].nextPhys
        if next >= 0, blocks[Int(next)].isFree {
            removeFree(next)
            absorbNext(into: b)
        }
        insertFree(b)
    }

    /// Size in bytes of the largest free block (what the largest possible allocation is).
    public var largestFreeBlock: Int {
        guard flBitmap != 0 else { return 0 }
        let fl = Int.bitWidth - 1 - flBitmap.leadingZeroBitCount
        let sl = 31 - slBitmaps[fl].leadingZeroBitCount
        var best = 0
        var b = heads[fl * Self.slCount + sl]
        while b >= 0 { best = max(best, blocks[Int(b)].size); b = blocks[Int(b)].nextFree }
        return best * Self.granule
    }

    // MARK: - internals

    /// Size class of a block of `size` granules.
    static func sizeClass(_ size: Int) -> (fl: Int, sl: Int) {
        if size < slCount { return (0, size) }
        let f = Int.bitWidth - 1 - size.leadingZeroBitCount
        return (f - slBits + 1, (size >> (f - slBits)) ^ slCount)
    }

    private func findFree(_ want: Int) -> Int32? {
        // Good fit: round up to the next class boundary so every block of the class found fits.
        var rounded = want
        if want >= Self.slCount {
            let f = Int.bitWidth - 1 - want.leadingZeroBitCount
            rounded = want + (1 << (f - Self.slBits)) - 1
        }
        let (fl, sl) = Self.sizeClass(rounded)
        if fl < Self.flCount, let b = firstNonEmpty(fl: fl, sl: sl) { return b }
        // Exact class of `want`: some of its blocks may still be large enough.
        let (efl, esl) = Self.sizeClass(want)
        var b = heads[efl * Self.slCount + esl]
        while b >= 0 {
            if blocks[Int(b)].size >= want { return b }
            b = blocks[Int(b)].nextFree
        }
        return nil
    }

    private func firstNonEmpty(fl: Int, sl: Int) -> Int32? {
        var fl = fl
        var slMap = slBitmaps[fl] & (UInt32.max << UInt32(sl))
        if slMap == 0 {
            let flMap = fl + 1 >= 64 ? 0 : flBitmap & (UInt64.max << UInt64(fl + 1))
            if flMap == 0 { return nil }
            fl = flMap.trailingZeroBitCount
            slMap = slBitmaps[fl]
        }
        let s = slMap.trailingZeroBitCount
        return heads[fl * Self.slCount + s]
    }

    /// Cuts block `b` (off every free list) after its first `keep` granules; returns the new
    /// block holding the rest (off every free list too), or nil when nothing is left over.
    private mutating func split(_ b: Int32, keeping keep: Int) -> Int32? {
        let rest = blocks[Int(b)].size - keep
        guard rest > 0 else { return nil }
        let next = blocks[Int(b)].nextPhys
        let tail = newBlock(
            Block(
                start: blocks[Int(b)].start + keep, size: rest, prevPhys: b, nextPhys: next,
                prevFree: -1, nextFree: -1, isFree: false, inUse: true))
        if next >= 0 { blocks[Int(next)].prevPhys = tail }
        blocks[Int(b)].nextPhys = tail
        blocks[Int(b)].size = keep
        return tail
    }

    private mutating func newBlock(_ b: Block) -> Int32 {
        if let i = recycled.popLast() { blocks[Int(i)] = b; return i }
        blocks.append(b)
        return Int32(blocks.count - 1)
    }

    /// Merges the physical successor of `b` (free, already off its list) into `b`.
    private mutating func absorbNext(into b: Int32) {
        let n = blocks[Int(b)].nextPhys
        blocks[Int(b)].size += blocks[Int(n)].size
        let nn = blocks[Int(n)].nextPhys
        blocks[Int(b)].nextPhys = nn
        if nn >= 0 { blocks[Int(nn)].prevPhys = b }
        blocks[Int(n)].inUse = false
        recycled.append(n)
    }

    private mutating func insertFree(_ b: Int32) {
        let (fl, sl) = Self.sizeClass(blocks[Int(b)].size)
        let h = fl * Self.slCount + sl
        let old = heads[h]
        blocks[Int(b)].isFree = true
        blocks[Int(b)].prevFree = -1
        blocks[Int(b)].nextFree = old
        if old >= 0 { blocks[Int(old)].prevFree = b }
        heads[h] = b
        freeBlockCount += 1
        flBitmap |= 1 << UInt64(fl)
        slBitmaps[fl] |= 1 << UInt32(sl)
    }

    private mutating func removeFree(_ b: Int32) {
        let (fl, sl) = Self.sizeClass(blocks[Int(b)].size)
        let h = fl * Self.slCount + sl
        let p = blocks[Int(b)].prevFree, n = blocks[Int(b)].nextFree
        if p >= 0 { blocks[Int(p)].nextFree = n } else { heads[h] = n }
        if n >= 0 { blocks[Int(n)].prevFree = p }
        blocks[Int(b)].prevFree = -1
        blocks[Int(b)].nextFree = -1
        freeBlockCount -= 1
        if heads[h] < 0 {
            slBitmaps[fl] &= ~(1 << UInt32(sl))
            if slBitmaps[fl] == 0 { flBitmap &= ~(1 << UInt64(fl)) }
        }
    }
}
