#if canImport(Glibc)
import Glibc
#endif

/// Moves bytes within this process's address space: one `memcpy` per slice, straight from
/// source to destination, no staging. Safe to use from many threads at once; the caller
/// guarantees both sides of every region stay valid for the call.
public struct LocalCopyTransport: Sendable {
    public let counters: TransferCounters

    public init(counters: TransferCounters) {
        self.counters = counters
    }

    /// Copies the source stream into the destination stream; returns bytes copied
    /// (`min` of the two totals).
    @discardableResult
    public func copy(from sources: UnsafeBufferPointer<MemoryRegion>,
                     to destinations: UnsafeBufferPointer<MemoryRegion>) -> Int {
        var ops = 0
        let moved = TransferPlan.forEachSlice(sources: sources, destinations: destinations) { (op: CopyOp) in
            memcpy(UnsafeMutableRawPointer(bitPattern: op.destination)!,
                   UnsafeRawPointer(bitPattern: op.source)!, op.length)
            ops += 1
        }
        counters.bytesCopied.add(moved, ordering: .relaxed)
        counters.copyOps.add(ops, ordering: .relaxed)
        return moved
    }

    /// Copies one region into one region (the single-buffer fast path).
    @discardableResult
    public func copy(from source: MemoryRegion, to destination: MemoryRegion) -> Int {
        withUnsafePointer(to: source) { s in
            withUnsafePointer(to: destination) { d in
                copy(from: UnsafeBufferPointer(start: s, count: 1), to: UnsafeBufferPointer(start: d, count: 1))
            }
        }
    }
}
