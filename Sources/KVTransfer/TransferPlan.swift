import KVAccelerator
import KVCore
/// One copy of `length` bytes (at most `TransferPlan.maxSliceSize`).
public struct CopyOp: Sendable, Hashable {
    public let source: UInt
    public let destination: UInt
    public let length: Int

    public init(source: UInt, destination: UInt, length: Int) {
        self.source = source
        self.destination = destination
        self.length = length
    }
}

/// Splits a transfer between two lists of regions (a gather on one side, a scatter on the
/// other, or both) into slices of at most `maxSliceSize` bytes, in order. The regions of each
/// side are read as one logical byte stream; the transfer moves `min(total source, total
/// destination)` bytes. Planning allocates nothing.
public enum TransferPlan {
    /// Largest slice: 16 MiB − 16 bytes (the limit transports and their descriptors share).
    public static let maxSliceSize = 16 * 1024 * 1024 - 16

    /// Total length of the regions, in bytes.
    public static func totalLength(_ regions: UnsafeBufferPointer<MemoryRegion>) -> Int {
        var n = 0
        for r in regions { n += r.length }
        return n
    }

    /// Calls `body` with each slice in order; returns the bytes planned.
    @discardableResult
    public static func forEachSlice<E: Error>(
        sources: UnsafeBufferPointer<MemoryRegion>, destinations: UnsafeBufferPointer<MemoryRegion>,
        maxSlice: Int = maxSliceSize, _ body: (CopyOp) throws(E) -> Void
    ) throws(E) -> Int {
        try forEachIndexedSlice(sources: sources, destinations: destinations, maxSlice: maxSlice) { (op, _, _) throws(E) in
            try body(op)
        }
    }

    /// `forEachSlice`, also passing the indices of the source and destination regions the
    /// slice lies in.
    @discardableResult
    public static func forEachIndexedSlice<E: Error>(
        sources: UnsafeBufferPointer<MemoryRegion>, destinations: UnsafeBufferPointer<MemoryRegion>,
        maxSlice: Int = maxSliceSize, _ body: (CopyOp, Int, Int) throws(E) -> Void
    ) throws(E) -> Int {
        var si = 0, di = 0, so = 0, dOff = 0, moved = 0
        while si < sources.count && di < destinations.count {
            let s = sources[si], d = destinations[di]
            let n = min(s.length - so, d.length - dOff, maxSlice)
            if n > 0 {
                try body(CopyOp(source: s.address + UInt(so), destination: d.address + UInt(dOff), length: n), si, di)
                moved += n
            }
            so += n
            dOff += n
            if so == s.length { si += 1; so = 0 }
            if dOff == d.length { di += 1; dOff = 0 }
        }
        return moved
    }

    /// The slices as an array (for inspection and tests; the copy paths use `forEachSlice`).
    public static func slices(
        sources: [MemoryRegion], destinations: [MemoryRegion],
        maxSlice: Int = maxSliceSize
    ) -> [CopyOp] {
        var ops: [CopyOp] = []
        _ = sources.withUnsafeBufferPointer { s in
            destinations.withUnsafeBufferPointer { d in
                forEachSlice(sources: s, destinations: d, maxSlice: maxSlice) { ops.append($0) }
            }
        }
        return ops
    }
}
