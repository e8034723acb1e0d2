#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVSystem
import KVTransfer
import Synchronization

/// A cluster member's disk tier (docs/architecture.md, "Disk tier (cluster)"). The master
/// decides and indexes (`DiskDirectory`); this side moves bytes:
///
/// - **Offload.** A thread asks the master each round (`diskRound`) for objects of this
///   client's segment next in line for eviction, copies those the admission policy takes to
///   its `DiskTier` (under the master's read hold, ended as soon as the bytes are read), and
///   reports each copy with its next round; it deletes the files the master says are out of
///   date, and reports the files its own eviction dropped.
/// - **Serving.** The segment server answers peers' `diskRead` of this client's disk segment
///   from the tier (`DiskTier.serve`: every chunk checked before it is sent); this client
///   reads its own disk copies the same way without the network (`read`).
/// - **Registration.** After every (re)connect the thread registers every file with the
///   master (`diskRestore`) before its next round; files the master refuses are deleted.
final class ClusterDisk: @unchecked Sendable {
    let disk: DiskTier
    private let remote: RemoteMaster
    private let state: ClusterState
    private let segment: HostSegment
    private let stop = Atomic<Bool>(false)
    private let worker = Locked<BackgroundThread?>(nil)
    /// Rounds that failed (the master unreachable, a refused declaration), for statistics.
    let failedRounds = Atomic<Int>(0)
    static let bounceBytes = DiskTier.bufferBytes
    /// Objects asked for per round.
    static let perRound = 64
    /// Pause between rounds that found nothing to copy (µs).
    static let idlePause: UInt32 = 10_000

    init(disk: DiskTier, remote: RemoteMaster, state: ClusterState, segment: HostSegment) throws(KVError) {
        self.disk = disk
        self.remote = remote
        self.state = state
        self.segment = segment
        disk.reportDrops()
        state.server.withLock { $0 }?.serveDisk { [disk] g, offset, length, send throws(KVError) in
            try disk.serve(generation: g, offset: offset, length: length, send: send)
        }
        // The first round declares the tier before `connect` returns, so the master counts
        // the sightings of the very first puts and reads (reuse admission) and offers copies
        // from the start. A master that refuses now (a previous holder of this disk not yet
        // seen gone) is asked again by the thread.
        let bounce = UnsafeMutableRawPointer.allocate(byteCount: Self.bounceBytes, alignment: DiskRecord.block)
        defer { bounce.deallocate() }
        do throws(KVError) { _ = try round(bounce) } catch { failedRounds.add(1, ordering: .relaxed) }
        let t = try BackgroundThread { [self] in loop() }
        worker.withLock { $0 = t }
    }

    /// Stops the thread and serving, and closes the tier (its files stay for the next open).
    func close() {
        stop.store(true, ordering: .relaxed)
        let t = worker.withLock { w in
            defer { w = nil }; return w
        }
        t?.join()
        state.server.withLock { $0 }?.serveDisk(nil)
        disk.close()
    }

    /// Reads bytes `range` of this client's own disk file `generation` into `destinations`:
    /// a whole object into one buffer as the embedded tier reads it (pieces on up to four
    /// threads, checked as they are copied in), anything else piece by piece.
    func read(generation: UInt64, range: Range<Int>, into destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) {
        let copy = try disk.copy(generation: generation)
        if range == 0..<copy.size, let first = destinations.first, first.length >= copy.size {
            let want = max(1, min(4, (copy.size + DiskTier.bufferBytes - 1) / DiskTier.bufferBytes))
            let bounces = (0..<want).map { _ in disk.takeBuffer() }
            defer { for b in bounces { disk.giveBuffer(b) } }
            return try disk.read(copy, into: UnsafeMutableRawPointer(bitPattern: first.address)!, bounces: bounces, bounceBytes: DiskTier.bufferBytes)
        }
        var at = 0
        try disk.serve(generation: generation, offset: range.lowerBound, length: range.count) {
            (piece) throws(KVError) in
            PeerLink.pieces(of: destinations, skipping: at, count: piece.count) { d, done in
                UnsafeMutableRawPointer(bitPattern: d.address)!.copyMemory(from: piece.baseAddress! + done, byteCount: d.length)
            }
            at += piece.count
        }
    }

    // MARK: the thread

    private var reports: [DiskReport] = [] // the thread's own
    private var dropped: [UInt64] = []
    private var registeredEpoch = -1

    private func loop() {
        let bounce = UnsafeMutableRawPointer.allocate(byteCount: Self.bounceBytes, alignment: DiskRecord.block)
        defer { bounce.deallocate() }
        while !stop.load(ordering: .relaxed) {
            var copied = 0
            do throws(KVError) {
                copied = try round(bounce)
            } catch {
                failedRounds.add(1, ordering: .relaxed)
                usleep(100_000) // the master is away, or refused: try again later
            }
            if copied == 0 { usleep(Self.idlePause) }
        }
    }

    /// One round; returns the objects copied.
    func round(_ bounce: UnsafeMutableRawPointer) throws(KVError) -> Int {
        let seg = state.segment.load(ordering: .relaxed)
        guard seg != 0 else { return 0 }
        dropped += disk.takeDropped()
        // Reports go with the round's request: the master releases their holds then at the
        // latest. A round that fails keeps them for the next (the master ignores repeats).
        let (offers, forget, epoch) = try remote.diskRound(
            segment: seg, disk: disk.id, capacity: disk.capacity, reports: Array(reports.prefix(MasterLimits.maxBatch)),
            dropped: Array(dropped.prefix(MasterLimits.maxBatch)), want: Self.perRound)
        reports.removeFirst(min(reports.count, MasterLimits.maxBatch))
        dropped.removeFirst(min(dropped.count, MasterLimits.maxBatch))
        for g in forget { disk.forget(generation: g) }
        if epoch != registeredEpoch { try register(seg, epoch: epoch) }
        var copied = 0
        for o in offers {
            if stop.load(ordering: .relaxed) { reports.append(DiskReport(handle: o.handle, generation: 0, stored: false)); continue }
            let generation = copy(o, bounce)
            reports.append(DiskReport(handle: o.handle, generation: generation ?? 0, stored: generation != nil))
            if generation != nil { copied += 1 }
        }
        return copied
    }

    /// Copies offer `o` to disk when the admission policy takes it; its generation, or nil.
    /// The hold on the version ends once its bytes are read.
    private func copy(_ o: DiskOffer, _ bounce: UnsafeMutableRawPointer) -> UInt64? {
        var held = true
        let release = { [remote] in
            if held {
                held = false
                try? remote.releaseRead(o.handle)
            }
        }
        defer { release() }
        // The reuse admission takes only keys the master has seen twice (written or looked up).
        guard disk.admission == .all || o.reused else { return nil }
        guard o.offset >= 0, o.size > 0, o.offset <= segment.size, o.size <= segment.size - o.offset else { return nil }
        guard disk.beginTransfer(o.key) else { return nil }
        defer { disk.endTransfer(o.key) }
        let expires = o.ttlLeft.map { DiskTier.wallNow() + Int64(clamping: $0) } ?? 0
        let source = UnsafeRawPointer(bitPattern: segment.region(offset: o.offset, length: o.size).address)!
        return
            (try? disk.offload(
                o.key, from: source, size: o.size, expiresAt: expires, bounce: bounce, bounceBytes: Self.bounceBytes,
                sourceRead: release)) ?? nil
    }

    /// Registers every file with the master (after a connect); deletes those it refuses.
    private func register(_ seg: SegmentID, epoch: Int) throws(KVError) {
        dropped += disk.takeDropped()
        let files = disk.files()
        var refused = Set<UInt64>()
        var at = 0
        while at < files.count {
            let chunk = Array(files[at..<min(files.count, at + MasterLimits.maxBatch)])
            let taken = try remote.diskRestore(segment: seg, files: chunk)
            for (f, ok) in zip(chunk, taken) where !ok {
                disk.forget(generation: f.generation)
                refused.insert(f.generation)
            }
            at += chunk.count
        }
        dropped += disk.takeDropped().filter { !refused.contains($0) } // the master has no entry for a refused one
        registeredEpoch = epoch
    }
}
