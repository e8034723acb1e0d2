#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVSystem
import Synchronization

/// The embedded store's master with a disk tier below DRAM (docs/architecture.md, "Disk
/// tier"). Every call goes to the `EmbeddedMaster`; around it:
///
/// - **Offload ahead of eviction.** A background thread keeps the objects next in line for
///   eviction (the coldest quarter of the segment, once the segment fills past its high
///   watermark less that quarter) copied to disk, when the admission policy lets them. An
///   eviction then only drops a DRAM copy that is already on disk: a put that evicts never
///   waits for the disk. An object eviction takes before it was copied is dropped (counted).
/// - **Read-back.** A read that misses DRAM finds the disk copy, checks it (CRC32C per MiB)
///   while bringing it back into the segment (promotion: every disk hit, so every read call
///   works unchanged), and reads it there. The disk copy stays: evicting the promoted copy
///   costs nothing.
/// - **One version.** A committed write or a removal of a key drops its disk copy under the
///   table's lock, and marks an offload or promotion of it in flight as stale, so neither
///   can bring an older version back.
final class TieredMaster: MasterLink, @unchecked Sendable {
    let inner: EmbeddedMaster
    let disk: DiskTier
    private let segment: HostSegment
    private let stop = Atomic<Bool>(false)
    private let worker = Locked<BackgroundThread?>(nil)
    private let bounces = Locked<[UInt]>([])   // addresses of spare bounce buffers
    let promotions = Atomic<Int>(0)
    static let bounceBytes = 4 << 20
    /// How far eviction looks past objects not yet copied (or refused) for one that was:
    /// a burst of writes faster than the disk then evicts copies first. Each step costs a
    /// pointer walk per eviction: puts at 300% fill ran at 0.89 of a store without a disk
    /// tier with no look-ahead, 0.88 with 16, 0.86 with 64.
    static let evictionLooksAhead = 16
    /// Promotions of one batch run on at most this many threads.
    static let readThreads = 4

    init(inner: EmbeddedMaster, disk: DiskTier, segment: HostSegment) throws(KVError) {
        self.inner = inner
        self.disk = disk
        self.segment = segment
        inner.setEvictionLooksAhead(Self.evictionLooksAhead)
        let t = try BackgroundThread { [self] in offloadLoop() }
        worker.withLock { $0 = t }
    }

    /// Stops the offloading thread and closes the disk tier (its files stay).
    func close() {
        stop.store(true, ordering: .relaxed)
        let t = worker.withLock { w in defer { w = nil }; return w }
        t?.join()
        disk.close()
        bounces.withLock { b in
            for p in b { UnsafeMutableRawPointer(bitPattern: p)!.deallocate() }
            b.removeAll()
        }
    }

    var policy: CachePolicy { inner.policy }

    // MARK: writes

    func beginWrite(key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions,
                    preferred: SegmentID?) throws(KVError) -> WriteTicket {
        disk.note(key)
        if mode == .put, disk.size(key) != nil { throw .exists("object '\(key)' already exists (on disk)") }
        return try inner.beginWrite(key: key, size: size, mode: mode, options: options, preferred: preferred)
    }

    func commitWrite(_ ticket: WriteTicket) throws(KVError) {
        var gone: [UInt64] = []
        try inner.commitWrite(ticket) { key in if let g = disk.forgetLater(key) { gone.append(g) } }
        disk.removeFiles(gone)
    }

    func abortWrite(_ ticket: WriteTicket) throws(KVError) { try inner.abortWrite(ticket) }

    func beginWrites(_ items: [BatchWrite], mode: WriteMode, options: WriteOptions, preferred: SegmentID?,
                     started: (Range<Int>, [Result<WriteTicket, KVError>]) -> Void) throws(KVError) {
        for i in items { disk.note(i.key) }
        inner.beginWrites(items, mode: mode, options: options, preferred: preferred) { range, results in
            guard mode == .put else { return started(range, results) }
            var results = results
            for (j, i) in range.enumerated() {
                if case .success(let t) = results[j], disk.size(items[i].key) != nil {
                    try? inner.abortWrite(t)
                    results[j] = .failure(.exists("object '\(items[i].key)' already exists (on disk)"))
                }
            }
            started(range, results)
        }
    }

    func finishWrites(commit: [WriteTicket], abort: [WriteTicket]) -> [KVError?] {
        var gone: [UInt64] = []
        let r = inner.finishWrites(commit: commit, abort: abort) { key in if let g = disk.forgetLater(key) { gone.append(g) } }
        disk.removeFiles(gone)
        return r
    }

    // MARK: reads

    func acquireRead(key: ObjectKey, host: String) throws(KVError) -> ReadResult {
        disk.note(key)
        for _ in 0..<1000 {
            let r = inner.acquireRead(key: key, host: host)
            guard r == .notFound else { return r }
            let bounce = takeBounce()
            defer { giveBounce(bounce) }
            switch try promote(key, bounce: bounce) {
            case .absent: return .notFound
            case .promoted, .raced: continue
            case .busy: usleep(50)
            }
        }
        return .busy
    }

    func acquireReads(keys: [ObjectKey], host: String, found: (Range<Int>, [Result<ReadResult, KVError>]) -> Void) throws(KVError) {
        var results: [Result<ReadResult, KVError>] = []
        for k in keys { disk.note(k) }
        inner.acquireReads(keys: keys, host: host) { _, r in results.append(contentsOf: r) }
        var missing: [Int] = []
        for (i, r) in results.enumerated() where (try? r.get()) == .notFound && disk.contains(keys[i]) { missing.append(i) }
        if !missing.isEmpty {
            let answers = promoteAll(missing.map { keys[$0] })
            for (j, i) in missing.enumerated() {
                switch answers[j] {
                case .failure(let e): results[i] = .failure(e)
                case .success: results[i] = Result { () throws(KVError) in try acquireRead(key: keys[i], host: host) }
                }
            }
        }
        found(0..<keys.count, results)
    }

    func releaseRead(_ handle: VersionHandle) throws(KVError) { try inner.releaseRead(handle) }

    func lease(key: ObjectKey) throws(KVError) -> Int? {
        if let n = inner.lease(key: key) { return n }
        return disk.size(key)
    }

    func leases(keys: [ObjectKey]) throws(KVError) -> [Int?] {
        let r = inner.leases(keys: keys)
        return zip(keys, r).map { k, n in n ?? disk.size(k) }
    }

    // MARK: removal

    func remove(key: ObjectKey, force: Bool) throws(KVError) {
        do throws(KVError) {
            try inner.remove(key: key, force: force)
        } catch where error.code == .objectNotFound {
            if disk.forget(key) { return }
            throw error
        }
        disk.forget(key)
    }

    func remove(keys: [ObjectKey], force: Bool) throws(KVError) -> [KVError?] {
        let r = inner.remove(keys: keys, force: force)
        return zip(keys, r).map { k, e in
            if e == nil { disk.forget(k); return nil }
            if e!.code == .objectNotFound, disk.forget(k) { return nil }
            return e
        }
    }

    func removeAll(force: Bool) throws(KVError) -> Int {
        let onDisk = disk.keys(after: nil, limit: Int.max)
        let alsoInDRAM = onDisk.filter { inner.contains($0) }.count
        let n = inner.removeAll(force: force)
        return n + disk.forgetAll() - alsoInDRAM
    }

    func statistics() throws(KVError) -> CacheStatistics { inner.statistics() }

    func keysPage(after: ObjectKey?) throws(KVError) -> ObjectTable.KeysPage {
        let page = inner.keysPage(after: after)
        let ceiling = page.more ? page.keys.last : nil
        var onDisk = disk.keys(after: after, limit: 1 << 20)
        if let ceiling { onDisk = onDisk.filter { !(ceiling < $0) } }
        var merged = Array(Set(page.keys).union(onDisk)).sorted()
        var more = page.more
        var bytes = 0
        for (i, k) in merged.enumerated() {
            bytes += 4 + k.count
            if bytes > ObjectTable.keysPageBytes {
                merged.removeSubrange(i...)
                more = true
                break
            }
        }
        return ObjectTable.KeysPage(keys: merged, more: more && !merged.isEmpty)
    }

    // MARK: layouts

    func publishLayout(_ p: PublishedLayout) throws(KVError) { try inner.publishLayout(p) }
    func fetchLayout(node: String) throws(KVError) -> PublishedLayout { try inner.fetchLayout(node: node) }
    func unpublishLayout(node: String) throws(KVError) { try inner.unpublishLayout(node: node) }

    // MARK: promotion

    enum Promotion { case absent, promoted, raced, busy }

    /// Brings the disk copy of `key` back into the segment. `absent`: no disk copy; `raced`:
    /// a write of the key came first (read DRAM again); `busy`: another thread is at it.
    func promote(_ key: ObjectKey, bounce: UnsafeMutableRawPointer) throws(KVError) -> Promotion {
        guard let copy = disk.lookup(key) else { return .absent }
        // Room for it may evict: only objects already on disk (or not admitted) may go, or
        // this read would drop something a later read wants.
        // The reader copies them first itself (reads outpaced the offloading thread).
        let (used, capacity) = inner.fill()
        let round = max(Int(Double(capacity) * inner.policy.evictionRatio), copy.size) + copy.size
        if used + round > Int(Double(capacity) * inner.policy.highWatermark) {
            offload(disk.withoutCopies(inner.coldest(bytes: round, skip: { _ in false })), bounce: bounce)
        }
        guard disk.beginTransfer(key) else { return .busy }
        var options = WriteOptions.default
        options.ttl = copy.ttlLeft
        let ticket: WriteTicket
        do throws(KVError) {
            ticket = try inner.beginWrite(key: key, size: copy.size, mode: .put, options: options, preferred: nil)
        } catch {
            disk.endTransfer(key)
            if error.code == .objectExists { return .raced }
            if error.code == .noSpace {
                throw .noSpace("object '\(key)' is on the disk tier but DRAM has no room to read it back: \(error.message)")
            }
            throw error
        }
        do throws(KVError) {
            try withBounces(copy.size, first: bounce) { (b) throws(KVError) in
                try disk.read(copy, into: UnsafeMutableRawPointer(bitPattern: segment.region(offset: ticket.offset, length: copy.size).address)!,
                              bounces: b, bounceBytes: Self.bounceBytes)
            }
        } catch {
            try? inner.abortWrite(ticket)
            disk.endTransfer(key)
            if error.code == .objectNotFound { return .absent }
            throw error
        }
        let committed = try inner.commitWrite(ticket) { disk.transferIsStale(key) }
        disk.endTransfer(key)
        if committed { inner.decide(ticket.handle, .copied) }   // its disk copy stays
        if committed { promotions.add(1, ordering: .relaxed) }
        return committed ? .promoted : .raced
    }

    /// Reads the disk copy of `key` straight into host memory `destinations` (for a read
    /// DRAM cannot take back: everything there leased or pinned); returns its size.
    func readDirect(_ key: ObjectKey, into destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> Int {
        guard let copy = disk.lookup(key) else { throw .notFound("object '\(key)' not found") }
        let room = destinations.reduce(0) { $0 + $1.length }
        guard room >= copy.size else {
            throw .invalidArgument("buffer of \(room) bytes is too small for an object of \(copy.size) bytes")
        }
        let bounce = takeBounce()
        defer { giveBounce(bounce) }
        if destinations.count == 1 || destinations[0].length >= copy.size {
            try withBounces(copy.size, first: bounce) { (b) throws(KVError) in
                try disk.read(copy, into: UnsafeMutableRawPointer(bitPattern: destinations[0].address)!, bounces: b, bounceBytes: Self.bounceBytes)
            }
            return copy.size
        }
        let whole = UnsafeMutableRawPointer.allocate(byteCount: copy.size, alignment: 64)
        defer { whole.deallocate() }
        try withBounces(copy.size, first: bounce) { (b) throws(KVError) in
            try disk.read(copy, into: whole, bounces: b, bounceBytes: Self.bounceBytes)
        }
        var at = 0
        for d in destinations where at < copy.size {
            let n = min(d.length, copy.size - at)
            UnsafeMutableRawPointer(bitPattern: d.address)!.copyMemory(from: whole + at, byteCount: n)
            at += n
        }
        return copy.size
    }

    /// Promotes `keys` on up to `readThreads` threads; one result per key.
    private func promoteAll(_ keys: [ObjectKey]) -> [Result<Void, KVError>] {
        let results = Locked([Result<Void, KVError>](repeating: .success(()), count: keys.count))
        let next = Atomic<Int>(0)
        let work: @Sendable () -> Void = { [self] in
            let bounce = takeBounce()
            defer { giveBounce(bounce) }
            while true {
                let i = next.add(1, ordering: .relaxed).oldValue
                guard i < keys.count else { return }
                do throws(KVError) {
                    for _ in 0..<1000 {
                        if try promote(keys[i], bounce: bounce) != .busy { break }
                        usleep(50)
                    }
                } catch {
                    results.withLock { $0[i] = .failure(error) }
                }
            }
        }
        let helpers = (1..<min(Self.readThreads, keys.count)).compactMap { _ in try? BackgroundThread(work) }
        work()
        for h in helpers { h.join() }
        return results.withLock { $0 }
    }

    /// Runs `body` with `first` and as many more bounce buffers as a read of `size` bytes
    /// uses at once (at most `readThreads`).
    private func withBounces(_ size: Int, first: UnsafeMutableRawPointer,
                             _ body: ([UnsafeMutableRawPointer]) throws(KVError) -> Void) throws(KVError) {
        let want = min(Self.readThreads, (size + Self.bounceBytes - 1) / Self.bounceBytes)
        var all = [first]
        for _ in 1..<max(want, 1) { all.append(takeBounce()) }
        defer { for b in all.dropFirst() { giveBounce(b) } }
        try body(all)
    }

    private func takeBounce() -> UnsafeMutableRawPointer {
        if let p = bounces.withLock({ $0.popLast() }) { return UnsafeMutableRawPointer(bitPattern: p)! }
        return UnsafeMutableRawPointer.allocate(byteCount: Self.bounceBytes, alignment: 4096)
    }

    private func giveBounce(_ p: UnsafeMutableRawPointer) {
        let kept = bounces.withLock { b in
            guard b.count < 2 * Self.readThreads else { return false }
            b.append(UInt(bitPattern: p))
            return true
        }
        if !kept { p.deallocate() }
    }

    // MARK: offloading

    /// Bytes at the eviction end kept copied to disk: a quarter of the segment (a burst of
    /// writes up to that size evicts only copies). The walk over it holds the table's lock,
    /// so it is not made longer lightly: half measured 0.73 of puts without a tier at 300%
    /// fill in one run (against 0.87–0.90 for a quarter; both noisy on this machine's disk).
    private func margin(_ capacity: Int) -> Int { max(capacity / 4, 4096) }

    private func offloadLoop() {
        let bounce = UnsafeMutableRawPointer.allocate(byteCount: Self.bounceBytes, alignment: 4096)
        defer { bounce.deallocate() }
        while !stop.load(ordering: .relaxed) {
            // Between rounds that found work too: each walk of the eviction end holds the
            // table's lock, and back to back they cost writers the most (docs/disk-tier.md).
            usleep(offloadRound(bounce) == 0 ? 2_000 : 1_000)
        }
    }

    /// One pass over the eviction end; returns the objects copied.
    func offloadRound(_ bounce: UnsafeMutableRawPointer) -> Int {
        let (used, capacity) = inner.fill()
        let high = Int(Double(capacity) * inner.policy.highWatermark)
        let m = margin(capacity)
        guard used > high - m else { return 0 }
        // The walk holds the table's lock; the disk index is asked afterwards, once.
        return offload(disk.withoutCopies(inner.coldest(bytes: m) { _ in false }), bounce: bounce)
    }

    /// Copies those of `candidates` the admission policy lets in to disk; returns how many.
    @discardableResult
    private func offload(_ candidates: [ObjectTable.ColdObject], bounce: UnsafeMutableRawPointer) -> Int {
        var copied = 0
        for c in candidates {
            if stop.load(ordering: .relaxed) { break }
            guard disk.admits(c.key) else { inner.decide(c.handle, .refused); continue }
            guard disk.beginTransfer(c.key) else { continue }
            // Another thread may have copied it since the list was made.
            guard !disk.contains(c.key), let t = inner.holdInPlace(key: c.key) else { disk.endTransfer(c.key); continue }
            var expires: Int64 = 0
            if let e = c.expiresAt {
                expires = DiskTier.wallNow() + Int64(bitPattern: e) - Int64(bitPattern: inner.clock())
                if expires <= DiskTier.wallNow() { try? inner.releaseRead(t.handle); disk.endTransfer(c.key); continue }
            }
            let source = UnsafeRawPointer(bitPattern: segment.region(offset: t.offset, length: t.size).address)!
            // The hold ends once the bytes are in the bounce buffer, not after the disk write:
            // a held object that eviction takes keeps its space until then.
            var held = true
            let ok = (try? disk.offload(c.key, from: source, size: t.size, expiresAt: expires, bounce: bounce,
                                        bounceBytes: Self.bounceBytes,
                                        sourceRead: { if held { held = false; try? inner.releaseRead(t.handle) } })) != nil
            if held { try? inner.releaseRead(t.handle) }
            if ok {
                copied += 1
                if !disk.transferIsStale(c.key) { inner.decide(t.handle, .copied) }
            }
            disk.endTransfer(c.key)
        }
        return copied
    }
}
