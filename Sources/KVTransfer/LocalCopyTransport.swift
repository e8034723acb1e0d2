#if canImport(Glibc)
import Glibc
#endif
import CKVCopy
import KVAccelerator
import KVCore

/// Moves bytes within this process's address space: one copy per slice, straight from source
/// to destination, no staging. Safe to use from many threads at once; the caller guarantees
/// both sides of every region stay valid for the call.
///
/// Kernel choice per slice: slices of at least `streamingThreshold` bytes use non-temporal
/// (streaming) stores, smaller ones `memcpy`. Measured on the development machine (glibc
/// 2.36, AMD EPYC VM): glibc switches to streaming stores only above 240 MiB there, and below
/// that `memcpy` of 1–16 MiB reaches 8–10 GB/s where streaming stores reach 12–15 GB/s.
public struct LocalCopyTransport: Sendable {
    /// What the destination of a copy is; it decides the copy kernel.
    public enum Destination: Sendable {
        /// A segment: the bytes are not read again soon, and consecutive puts land on cold
        /// lines, so skipping the read-for-ownership pays from one page up (4 KiB puts: about
        /// 650k → 800k+ ops/s on the development machine). Streams from 4 KiB.
        case segment
        /// The caller's memory, which it may read at once: below 64 KiB the buffer may still be
        /// in cache. Above, glibc's `rep movsb` measured 4.5 GB/s reading 64 KiB objects out of
        /// a huge-page segment where streaming stores reached 13.6 GB/s. Streams from 64 KiB.
        case callerMemory

        /// Slices of at least this many bytes use streaming stores.
        public var streamingThreshold: Int {
            switch self {
            case .segment: 4 * 1024
            case .callerMemory: 64 * 1024
            }
        }
    }

    public let counters: TransferCounters

    public init(counters: TransferCounters) {
        self.counters = counters
    }

    /// Copies the source stream into the destination stream; returns bytes copied
    /// (`min` of the two totals).
    @discardableResult
    public func copy(
        from sources: UnsafeBufferPointer<MemoryRegion>,
        to destinations: UnsafeBufferPointer<MemoryRegion>,
        into destination: Destination
    ) -> Int {
        let threshold = destination.streamingThreshold
        var ops = 0
        let moved = TransferPlan.forEachSlice(sources: sources, destinations: destinations) { (op: CopyOp) in
            Self.hostCopy(op, threshold: threshold)
            ops += 1
        }
        counters.bytesCopied.add(moved, ordering: .relaxed)
        counters.copyOps.add(ops, ordering: .relaxed)
        return moved
    }

    /// `copy` that also computes the CRC32C of the bytes in the same pass, chained from `crc`
    /// (the CRC of the bytes before these; 0 for none). Returns bytes copied and the CRC.
    public func copyChecksummed(
        from sources: UnsafeBufferPointer<MemoryRegion>,
        to destinations: UnsafeBufferPointer<MemoryRegion>,
        into destination: Destination, crc: UInt32 = 0
    ) -> (Int, UInt32) {
        let threshold = destination.streamingThreshold
        var ops = 0
        var c = crc
        let moved = TransferPlan.forEachSlice(sources: sources, destinations: destinations) { (op: CopyOp) in
            c = kv_crc32c_copy(
                UnsafeMutableRawPointer(bitPattern: op.destination), UnsafeRawPointer(bitPattern: op.source),
                op.length, c, op.length < threshold ? 0 : destination == .segment ? 2 : 1)
            ops += 1
        }
        counters.bytesCopied.add(moved, ordering: .relaxed)
        counters.copyOps.add(ops, ordering: .relaxed)
        return (moved, c)
    }

    /// The CRC32C of the first `length` bytes of `regions` (host memory), chained from `crc`.
    public static func checksum(_ regions: UnsafeBufferPointer<MemoryRegion>, length: Int, crc: UInt32 = 0) -> UInt32 {
        var c = crc, left = length
        for r in regions where left > 0 {
            let n = min(r.length, left)
            c = kv_crc32c_copy(nil, UnsafeRawPointer(bitPattern: r.address), n, c, 0)
            left -= n
        }
        return c
    }

    /// Copies one host→host slice and counts it.
    public func copyHost(_ op: CopyOp, into destination: Destination) {
        Self.hostCopy(op, threshold: destination.streamingThreshold)
        count(op.length)
    }

    /// Many separate host copies into cold caller memory (the pieces of a ranged read that add
    /// up to more than a cache holds), with streaming stores and one fence for all
    /// (`kv_copy_pieces_streaming`).
    public func copyColdPieces(_ ops: [CopyOp]) {
        var d = [UnsafeMutableRawPointer?](), s = [UnsafeRawPointer?](), n = [Int]()
        d.reserveCapacity(ops.count)
        s.reserveCapacity(ops.count)
        n.reserveCapacity(ops.count)
        var total = 0
        for op in ops {
            d.append(UnsafeMutableRawPointer(bitPattern: op.destination))
            s.append(UnsafeRawPointer(bitPattern: op.source))
            n.append(op.length)
            total += op.length
        }
        kv_copy_pieces_streaming(d, s, n, ops.count)
        counters.bytesCopied.add(total, ordering: .relaxed)
        counters.copyOps.add(ops.count, ordering: .relaxed)
    }

    /// Counts one slice of `length` bytes that a device copied.
    public func count(_ length: Int) {
        counters.bytesCopied.add(length, ordering: .relaxed)
        counters.copyOps.add(1, ordering: .relaxed)
    }

    /// Copies into the caller's memory of at least this many bytes read the segment as three
    /// streams (`kv_copy_streaming3`): their source is usually cold.
    static let threeStreams = 1 << 20

    @inline(__always)
    private static func hostCopy(_ op: CopyOp, threshold: Int) {
        let d = UnsafeMutableRawPointer(bitPattern: op.destination)!
        let s = UnsafeRawPointer(bitPattern: op.source)!
        if op.length >= threshold {
            if threshold == Destination.callerMemory.streamingThreshold && op.length >= threeStreams {
                kv_copy_streaming3(d, s, op.length)
            } else {
                kv_copy_streaming(d, s, op.length)
            }
        } else {
            memcpy(d, s, op.length)
        }
    }
}
