#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVTransfer

/// A segment of host memory: an anonymous private mapping of `size` bytes, transparent huge
/// pages requested (best effort). Pages are committed on first touch, or all at once when
/// `prefault` is set (MAP_POPULATE: creation pays the page faults so later copies run at
/// memory speed).
///
/// Owns the mapping and unmaps it in `unmap()` or deinit. `@unchecked Sendable`: the bytes are
/// synchronised by the object table's write and read tickets, the mapping's lifetime by
/// `StoreClient`'s operation gate.
public final class HostSegment: @unchecked Sendable {
    public let size: Int
    private let base: UnsafeMutableRawPointer
    private var mapped = true
    /// The pin taken at creation, if any: released (only it, exactly once) before unmapping.
    public private(set) var pinned: PinnedRange?
    /// Bytes pinned at creation (0 when pageable); constant, so readable without the gate.
    public let pinnedLength: Int
    /// Why pinning was refused ("" when pinned or not attempted).
    public let pinFallbackReason: String

    /// Maps `size` bytes (> 0), then pins them when `pinning` allows and an accelerator is
    /// present. Throws `noSpace` when the mapping fails; a refused pin is not an error.
    public init(size: Int, prefault: Bool = false, pinning: PinningPolicy = PinningPolicy(enabled: false)) throws(KVError) {
        guard size > 0 else { throw .invalidArgument("segment size must be positive") }
        base = try SystemCall.mmap(length: size, protection: PROT_READ | PROT_WRITE,
                                   flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        self.size = size
        _ = madvise(base, size, 14 /* MADV_HUGEPAGE */)
        if prefault {
            // MADV_POPULATE_WRITE (Linux 5.14+) faults every page in writable; on older
            // kernels touch one byte per page.
            if madvise(base, size, 23 /* MADV_POPULATE_WRITE */) != 0 {
                let page = Int(sysconf(Int32(_SC_PAGESIZE)))
                var offset = 0
                while offset < size { base.storeBytes(of: 0, toByteOffset: offset, as: UInt8.self); offset += page }
            }
        }
        switch PinnedMemory.shared.pin(MemoryRegion(base, length: size), policy: pinning) {
        case .pinned(let r): pinned = r; pinFallbackReason = ""; pinnedLength = size
        case .notNeeded: pinned = nil; pinFallbackReason = ""; pinnedLength = 0
        case .fellBack(let why): pinned = nil; pinFallbackReason = why; pinnedLength = 0
        }
    }

    /// Whether a pin was refused at creation.
    public var pinFellBack: Bool { !pinFallbackReason.isEmpty }

    /// The bytes at `offset` ..< `offset + length` as a region.
    public func region(offset: Int, length: Int) -> MemoryRegion {
        precondition(offset >= 0 && length >= 0 && offset + length <= size, "range outside the segment")
        return MemoryRegion(base + offset, length: length)
    }

    /// Unmaps the segment. Call once no operation uses it.
    public func unmap() {
        if mapped {
            if let p = pinned {
                PinnedMemory.shared.unpin(p)
                pinned = nil
            }
            munmap(base, size)
            mapped = false
        }
    }

    deinit { unmap() }
}
