#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVSystem
import KVTransfer
import Synchronization

/// A segment of host memory: `size` bytes mapped read-write, transparent huge pages requested
/// (best effort). Pages are committed on first touch, or all at once when `prefault` is set
/// (creation pays the page faults so later copies run at memory speed).
///
/// Private segments are anonymous mappings. Shared segments live in an unnamed shared-memory
/// file (`fd`): another process on the host that received the descriptor (over a Unix-domain
/// socket, never by a path it was told) maps the same bytes with `HostSegment(attaching:)`,
/// so data moves between processes with one memcpy.
///
/// Owns the mapping (and the file) and releases them in `unmap()` or deinit. `@unchecked Sendable`: the bytes are
/// synchronised by the object table's write and read tickets, the mapping's lifetime by
/// `StoreClient`'s operation gate.
public final class HostSegment: @unchecked Sendable {
    public let size: Int
    private let base: UnsafeMutableRawPointer
    private var mapped = true
    /// The shared-memory file of a shared segment, -1 for a private one. Closed by `unmap()`.
    public private(set) var fd: Int32 = -1
    /// How the segment may be pinned (page-locked for a GPU's copies): chunk by chunk, each
    /// on the first device copy that touches it (`pinForDeviceCopy`), so a segment is not
    /// committed and locked whole at creation. Only chunks this process pinned are unpinned,
    /// exactly once, before unmapping.
    private let pinning: PinningPolicy
    /// Pinned chunks by index, and chunks whose pin was refused (not asked again).
    private let pins = Locked<(pinned: [Int: PinnedRange], refused: Set<Int>)>(([:], []))
    /// Bytes pinned now, and pins refused (budget or driver), readable without the lock.
    private let pinnedNow = Atomic<Int>(0)
    private let refusedPins = Atomic<Int>(0)
    /// The size of a pinned chunk.
    public static let pinChunk = 64 << 20
    /// The thread building the page tables (`populateInBackground`), and its stop flag:
    /// `unmap()` stops and joins it first, so it never touches an address after the munmap.
    private let populator = Locked<BackgroundThread?>(nil)
    private let population = Population()

    /// What the populating thread shares with the segment (not the segment itself, which
    /// it must not keep alive: `unmap()`, run by deinit too, joins it).
    final class Population: Sendable {
        let stop = Atomic<Bool>(false)
        let done = Atomic<Int>(0)
    }

    /// Bytes whose page tables the background thread has built so far.
    public var populatedBytes: Int { population.done.load(ordering: .relaxed) }

    /// Maps `size` bytes (> 0) — in a new shared-memory file when `shared`. Pins nothing yet:
    /// `pinning` applies chunk by chunk as device copies first touch them. Throws `noSpace`
    /// when the memory cannot be had.
    public init(
        size: Int, prefault: Bool = false, pinning: PinningPolicy = PinningPolicy(enabled: false),
        shared: Bool = false
    ) throws(KVError) {
        guard size > 0 else { throw .invalidArgument("segment size must be positive") }
        if shared {
            let fd = try Self.anonymousSharedFile()
            do throws(KVError) {
                try SystemCall.check("ftruncate of a \(size)-byte segment", ftruncate(fd, off_t(size)), code: .noSpace)
                try Self.reserve(fd, size)
                base = try SystemCall.mmap(length: size, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED, fd: fd)
            } catch {
                close(fd)
                throw error
            }
            self.fd = fd
        } else {
            base = try SystemCall.mmap(
                length: size, protection: PROT_READ | PROT_WRITE,
                flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        }
        self.size = size
        SystemCall.bestEffort("madvise MADV_HUGEPAGE", madvise(base, size, 14 /* MADV_HUGEPAGE */))
        if prefault {
            // MADV_POPULATE_WRITE (Linux 5.14+) faults every page in writable; on older
            // kernels touch one byte per page.
            if madvise(base, size, 23 /* MADV_POPULATE_WRITE */) != 0 {
                let page = Int(sysconf(Int32(_SC_PAGESIZE)))
                var offset = 0
                while offset < size { base.storeBytes(of: 0, toByteOffset: offset, as: UInt8.self); offset += page }
            }
        }
        self.pinning = pinning
    }

    /// Maps the shared segment of another process (or of this one) from its descriptor `fd`,
    /// which this segment then owns (closed on failure too). Only a shared-memory file (tmpfs
    /// or hugetlbfs) that is open for reading and writing and holds at least `size` bytes is
    /// accepted: a descriptor of any other file is refused (`invalidArgument`), so a peer
    /// cannot make this process write into a file of its choosing. Never pinned.
    public init(attaching fd: Int32, size: Int) throws(KVError) {
        guard size > 0 else { close(fd); throw .invalidArgument("segment size must be positive") }
        do throws(KVError) {
            try SharedMemoryFile.check(fd, holding: size)
        } catch {
            close(fd)
            throw error
        }
        // The pages exist (shared segments are reserved at creation); this mapping's page
        // tables are built in the background (`populateInBackground`), not here: mapping a
        // 256 MiB segment with MAP_POPULATE took 17 ms, inside the first put that reached it.
        do throws(KVError) {
            base = try SystemCall.mmap(length: size, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED, fd: fd)
        } catch {
            close(fd)
            throw error
        }
        self.fd = fd
        self.size = size
        pinning = PinningPolicy(enabled: false)
    }

    /// Builds this mapping's page tables on a background thread (MADV_POPULATE_WRITE, Linux
    /// 5.14+; older kernels fault pages in on first use instead), so later copies take no
    /// fault. 4 MiB at a time: each step holds the process's memory-map lock (shared) for
    /// well under a millisecond, so a foreground mmap or munmap is not held up. `unmap()`
    /// (and so deinit) stops the thread and waits for it before unmapping.
    public func populateInBackground() {
        let chunk = 4 << 20
        let address = UInt(bitPattern: base), size = size, p = population
        let t = try? BackgroundThread {
            let base = UnsafeMutableRawPointer(bitPattern: address)!
            var at = 0
            while at < size, !p.stop.load(ordering: .acquiring) {
                if madvise(base + at, min(chunk, size - at), 23 /* MADV_POPULATE_WRITE */) != 0 { return }
                at += chunk
                p.done.store(min(at, size), ordering: .relaxed)
            }
        }
        populator.withLock { $0 = t }
    }

    /// A new shared-memory file with no name: created in /dev/shm (`shm_open`, exclusive,
    /// mode 0600) and unlinked at once, so nothing is left behind when the process dies; other
    /// processes receive its descriptor from the owner's segment server (`SegmentShare`).
    private static func anonymousSharedFile() throws(KVError) -> Int32 {
        for attempt in 0..<16 {
            let name = "/kvstore-\(getpid())-\(UInt32.random(in: 0...UInt32.max))-\(attempt)"
            let fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            if fd >= 0 {
                shm_unlink(name)
                return fd
            }
            if errno != EEXIST { throw SystemCall.failure("shm_open of a shared segment", code: .noSpace) }
        }
        throw KVError(.noSpace, "shm_open of a shared segment kept finding its random name taken")
    }

    /// Reserves every page of a shared-memory file now (`posix_fallocate`): a sparse file on
    /// a small /dev/shm would let writes fault with SIGBUS later. Throws `noSpace` naming the
    /// space /dev/shm has and how to raise it.
    static func reserve(_ fd: Int32, _ size: Int) throws(KVError) {
        var rc: Int32
        repeat { rc = posix_fallocate(fd, 0, off_t(size)) } while rc == EINTR
        guard rc != 0 else { return }
        var fs = statvfs()
        let free = statvfs("/dev/shm", &fs) == 0 ? Int(fs.f_bavail) * Int(fs.f_frsize) : -1
        let total = free >= 0 ? Int(fs.f_blocks) * Int(fs.f_frsize) : -1
        let what = String(cString: strerror(rc))
        let room = free >= 0 ? "/dev/shm has \(free) of \(total) bytes free" : "/dev/shm could not be measured"
        throw KVError(
            .noSpace,
            "cannot reserve a \(size)-byte shared segment (\(what)): \(room); use a smaller segment, "
                + "or give /dev/shm more room (in Docker: docker run --shm-size=...; on a host: mount -o remount,size=... /dev/shm)")
    }

    /// Whether the segment lives in a shared-memory file other processes can map.
    public var isShared: Bool { fd >= 0 }

    /// Bytes of this segment pinned now.
    public var pinnedBytes: Int { pinnedNow.load(ordering: .relaxed) }
    /// Chunk pins refused (the budget, or the driver) so far.
    public var pinRefusals: Int { refusedPins.load(ordering: .relaxed) }

    /// Whether `address` lies in this segment.
    public func contains(_ address: UInt) -> Bool {
        address >= UInt(bitPattern: base) && address < UInt(bitPattern: base) + UInt(size)
    }

    /// Pins the chunks of `region` (inside this segment) not pinned yet, when the policy
    /// allows, through `device` (the one about to copy; nil: the first accelerator): called
    /// before a device copy touches them. A refused pin leaves the chunk pageable (the copy
    /// still runs) and is not asked again.
    public func pinForDeviceCopy(_ region: MemoryRegion, device: (any AcceleratorDevice)? = nil) {
        guard pinning.enabled, region.length > 0, mapped else { return }
        let start = Int(region.address - UInt(bitPattern: base))
        let first = start / Self.pinChunk, last = (start + region.length - 1) / Self.pinChunk
        for chunk in first...last {
            pins.withLock { p in
                guard p.pinned[chunk] == nil, !p.refused.contains(chunk) else { return }
                let offset = chunk * Self.pinChunk
                switch PinnedMemory.shared.pin(
                    MemoryRegion(base + offset, length: min(Self.pinChunk, size - offset)), policy: pinning,
                    device: device)
                {
                case .pinned(let r):
                    p.pinned[chunk] = r
                    pinnedNow.add(r.region.length, ordering: .relaxed)
                case .notNeeded:
                    p.refused.insert(chunk) // no accelerator: nothing to pin, ever
                case .fellBack:
                    p.refused.insert(chunk)
                    refusedPins.add(1, ordering: .relaxed)
                }
            }
        }
    }

    /// The bytes at `offset` ..< `offset + length` as a region.
    public func region(offset: Int, length: Int) -> MemoryRegion {
        precondition(offset >= 0 && length >= 0 && offset + length <= size, "range outside the segment")
        return MemoryRegion(base + offset, length: length)
    }

    /// Unmaps the segment. Call once no operation uses it.
    public func unmap() {
        population.stop.store(true, ordering: .releasing)
        populator.withLock { t -> BackgroundThread? in
            defer { t = nil }; return t
        }?.join()
        if mapped {
            let all = pins.withLock { p in
                defer { p.pinned.removeAll() }; return Array(p.pinned.values)
            }
            for r in all { PinnedMemory.shared.unpin(r) }
            pinnedNow.store(0, ordering: .relaxed)
            munmap(base, size)
            if fd >= 0 { close(fd); fd = -1 }
            mapped = false
        }
    }

    deinit { unmap() }
}
