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
    let promotions = Atomic<Int>(0)
    static let bounceBytes = DiskTier.bufferBytes
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
        inner.withTable { t, _ in t.evictionLooksAhead = Self.evictionLooksAhead }
        let t = try BackgroundThread { [self] in offloadLoop() }
        worker.withLock { $0 = t }
    }

    /// Stops the offloading thread and closes the disk tier (its files stay).
    func close() {
        stop.store(true, ordering: .relaxed)
        let t = worker.withLock { w in
            defer { w = nil }; return w
        }
        t?.join()
        disk.close()
    }

    var policy: CachePolicy { inner.policy }

    // MARK: writes

    func beginWrite(
        key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions,
        preferred: SegmentID?
    ) throws(KVError) -> WriteTicket {
        disk.note(key)
        if mode == .put, disk.size(key) != nil { throw .exists("object '\(key)' already exists (on disk)") }
        return try inner.beginWrite(key: key, size: size, mode: mode, options: options, preferred: preferred)
    }

    /// The commit and the drop of the key's disk copy happen under the table's lock: nothing
    /// sees the new version while the old one is still on disk (a promotion checks there).
    func commitWrite(_ ticket: WriteTicket) throws(KVError) {
        var gone: [UInt64] = []
        defer { disk.removeFiles(gone) }
        try inner.withTable { (t, now) throws(KVError) in
            let key = try t.key(of: ticket.handle)
            try t.commitWrite(ticket, now: now)
            if let g = disk.forgetLater(key) { gone.append(g) }
        }
    }

    func abortWrite(_ ticket: WriteTicket) throws(KVError) { try inner.abortWrite(ticket) }

    func beginWrites(
        _ items: [BatchWrite], mode: WriteMode, options: WriteOptions, preferred: SegmentID?,
        started: (Range<Int>, [Result<WriteTicket, KVError>]) -> Void
    ) throws(KVError) {
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
        defer { disk.removeFiles(gone) }
        return inner.withTable { t, now in
            for a in abort { try? t.abortWrite(a, now: now) }
            return commit.map { c in
                do throws(KVError) {
                    let key = try t.key(of: c.handle)
                    try t.commitWrite(c, now: now)
                    if let g = disk.forgetLater(key) { gone.append(g) }
                    return nil
                } catch { return error }
            }
        }
    }

    // MARK: reads

    func acquireRead(key: ObjectKey, host: String) throws(KVError) -> ReadResult {
        disk.note(key)
        return try acquire(key, host: host)
    }

    /// `acquireRead` without counting a sighting: DRAM, else the disk copy brought back.
    private func acquire(_ key: ObjectKey, host: String) throws(KVError) -> ReadResult {
        for _ in 0..<1000 {
            let r = inner.acquireRead(key: key, host: host)
            guard r == .notFound else { return r }
            switch try promote(key) {
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
                case .success: results[i] = Result { () throws(KVError) in try acquire(keys[i], host: host) }
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

    /// Removals drop the disk copy under the table's lock, like commits: a promotion of the
    /// key cannot commit between the two and bring a removed object back.
    func remove(key: ObjectKey, force: Bool) throws(KVError) {
        var gone: [UInt64] = []
        defer { disk.removeFiles(gone) }
        try inner.withTable { (t, now) throws(KVError) in try Self.remove(key, force: force, from: &t, disk, now, &gone) }
    }

    func remove(keys: [ObjectKey], force: Bool) throws(KVError) -> [KVError?] {
        var gone: [UInt64] = []
        defer { disk.removeFiles(gone) }
        return inner.withTable { t, now in
            keys.map { k in
                do throws(KVError) { try Self.remove(k, force: force, from: &t, disk, now, &gone); return nil } catch { return error }
            }
        }
    }

    /// Removes `key` from `t` and `disk`; `objectNotFound` only when neither had it.
    private static func remove(
        _ key: ObjectKey, force: Bool, from t: inout ObjectTable, _ disk: DiskTier,
        _ now: Nanoseconds, _ gone: inout [UInt64]
    ) throws(KVError) {
        do throws(KVError) {
            try t.remove(key: key, force: force, now: now)
        } catch  where error.code == .objectNotFound {
            guard let g = disk.forgetLater(key) else { throw error }
            gone.append(g)
            return
        }
        if let g = disk.forgetLater(key) { gone.append(g) }
    }

    func removeAll(force: Bool) throws(KVError) -> Int {
        var gone: [UInt64] = []
        defer { disk.removeFiles(gone) }
        return inner.withTable { t, now in
            let dropped = disk.forgetAllLater()
            gone = dropped.map(\.generation)
            let diskOnly = dropped.filter { t.cacheState(key: $0.key) == nil }.count
            return t.removeAll(force: force, now: now) + diskOnly
        }
    }

    func statistics() throws(KVError) -> CacheStatistics { inner.statistics() }

    func keysPage(after: ObjectKey?) throws(KVError) -> ObjectTable.KeysPage {
        inner.keysPage(after: after).merged(with: disk.keys(after: after, limit: 1 << 20), lowerMore: false)
    }

    // MARK: layouts

    func publishLayout(_ p: PublishedLayout) throws(KVError) { try inner.publishLayout(p) }
    func fetchLayout(node: String) throws(KVError) -> PublishedLayout { try inner.fetchLayout(node: node) }
    func unpublishLayout(node: String) throws(KVError) { try inner.unpublishLayout(node: node) }

    // MARK: promotion

    enum Promotion { case absent, promoted, raced, busy }

    /// Brings the disk copy of `key` back into the segment. `absent`: no disk copy; `raced`:
    /// a write of the key came first (read DRAM again); `busy`: another thread is at it.
    func promote(_ key: ObjectKey) throws(KVError) -> Promotion {
        guard let copy = disk.lookup(key) else { return .absent }
        let bounce = takeBounce()
        defer { giveBounce(bounce) }
        // Room for it may evict: only objects already on disk (or not admitted) may go, or
        // this read would drop something a later read wants.
        // The reader copies them first itself (reads outpaced the offloading thread).
        let cold: [ObjectTable.ColdObject] = inner.withTable { t, _ in
            let round = max(Int(Double(t.capacity) * policy.evictionRatio), copy.size) + copy.size
            return t.usedBytes + round > Int(Double(t.capacity) * policy.highWatermark) ? t.coldest(bytes: round) : []
        }
        if !cold.isEmpty { offload(disk.withoutCopies(cold), bounce: bounce) }
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
                try disk.read(
                    copy, into: UnsafeMutableRawPointer(bitPattern: segment.region(offset: ticket.offset, length: copy.size).address)!,
                    bounces: b, bounceBytes: Self.bounceBytes)
            }
        } catch {
            try? inner.abortWrite(ticket)
            disk.endTransfer(key)
            if error.code == .objectNotFound { return .absent }
            throw error
        }
        // Under the table's lock, where commits and removals drop disk copies: a write or
        // removal of the key since the transfer began means these bytes are out of date.
        let committed = try inner.withTable { (t, now) throws(KVError) -> Bool in
            if disk.transferIsStale(key) {
                try t.abortWrite(ticket, now: now)
                return false
            }
            try t.commitWrite(ticket, now: now)
            t.decide(ticket.handle, .copied) // its disk copy stays
            return true
        }
        disk.endTransfer(key)
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
        if destinations[0].length >= copy.size {
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
            while true {
                let i = next.add(1, ordering: .relaxed).oldValue
                guard i < keys.count else { return }
                do throws(KVError) {
                    for _ in 0..<1000 {
                        if try promote(keys[i]) != .busy { break }
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
    private func withBounces(
        _ size: Int, first: UnsafeMutableRawPointer,
        _ body: ([UnsafeMutableRawPointer]) throws(KVError) -> Void
    ) throws(KVError) {
        let want = min(Self.readThreads, (size + Self.bounceBytes - 1) / Self.bounceBytes)
        var all = [first]
        for _ in 1..<max(want, 1) { all.append(takeBounce()) }
        defer { for b in all.dropFirst() { giveBounce(b) } }
        try body(all)
    }

    private func takeBounce() -> UnsafeMutableRawPointer { disk.takeBuffer() }
    private func giveBounce(_ p: UnsafeMutableRawPointer) { disk.giveBuffer(p) }

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
        // The walk holds the table's lock; the disk index is asked afterwards, once.
        let cold: [ObjectTable.ColdObject] = inner.withTable { t, _ in
            let m = margin(t.capacity)
            return t.usedBytes > Int(Double(t.capacity) * policy.highWatermark) - m ? t.coldest(bytes: m) : []
        }
        return cold.isEmpty ? 0 : offload(disk.withoutCopies(cold), bounce: bounce)
    }

    /// Copies those of `candidates` the admission policy lets in to disk; returns how many.
    @discardableResult
    private func offload(_ candidates: [ObjectTable.ColdObject], bounce: UnsafeMutableRawPointer) -> Int {
        var copied = 0
        for c in candidates {
            if stop.load(ordering: .relaxed) { break }
            guard disk.admits(c.key) else { inner.withTable { t, _ in t.decide(c.handle, .refused) }; continue }
            guard disk.beginTransfer(c.key) else { continue }
            // Another thread may have copied it since the list was made.
            // The candidate's own version (a newer one waits for its turn), with its TTL now.
            guard !disk.contains(c.key), let (t, expiresAt) = inner.withTable({ t, now in t.holdInPlace(c.handle, now: now) }) else {
                disk.endTransfer(c.key)
                continue
            }
            var expires: Int64 = 0
            if let e = expiresAt {
                expires = DiskTier.wallNow() + Int64(bitPattern: e) - Int64(bitPattern: inner.clock())
                if expires <= DiskTier.wallNow() { try? inner.releaseRead(t.handle); disk.endTransfer(c.key); continue }
            }
            let source = UnsafeRawPointer(bitPattern: segment.region(offset: t.offset, length: t.size).address)!
            // The hold ends once the bytes are in the bounce buffer, not after the disk write:
            // a held object that eviction takes keeps its space until then.
            var held = true
            let ok =
                (try? disk.offload(
                    c.key, from: source, size: t.size, expiresAt: expires, bounce: bounce,
                    bounceBytes: Self.bounceBytes,
                    sourceRead: { if held { held = false; try? inner.releaseRead(t.handle) } })) != nil
            if held { try? inner.releaseRead(t.handle) }
            if ok {
                copied += 1
                if !disk.transferIsStale(c.key) { inner.withTable { tb, _ in tb.decide(t.handle, .copied) } }
            }
            disk.endTransfer(c.key)
        }
        return copied
    }
}
