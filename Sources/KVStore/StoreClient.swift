import KVAccelerator
import KVCore
import KVSystem
import KVTransfer
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The store client: every object operation of kvstore, embedded (an in-process master and
/// one private segment) or connected to a master (its own shared segment, the others' mapped
/// or reached over the network). Bytes are copied exactly once, straight between the caller's
/// memory and a segment; no master lock is held during a copy.
///
/// Thread-safe: any number of threads may call any method at once. Memory passed in as
/// `MemoryRegion`s must stay valid for the call.
public final class StoreClient: Sendable {
    /// What the caller knows about where its buffers live.
    public enum MemoryHint: Sendable {
        /// Every buffer is host memory (a Python buffer-protocol object, for example): no lookup.
        case host
        /// Find out: a registered buffer's location by address range, otherwise ask the
        /// accelerator registry (a driver query only when an accelerator is present).
        case locate
    }

    /// This client's segment (nil for a pure client of a cluster).
    public let segment: HostSegment?
    public let registry = MemoryRegistry()
    /// The devices this store has copied with (their contexts held until close).
    public let deviceHolds = DeviceHolds()
    public let counters = TransferCounters()
    let master: any MasterLink
    /// Where objects live and how to reach them: the embedded store's segment, or the cluster.
    let directory: any SegmentDirectory
    let transport: LocalCopyTransport
    let gate = OperationGate()
    /// This client's published KV layout (prefill→decode transfer), if any.
    let kvNode = Locked<PublishedLayout?>(nil)
    /// Writes begun by `beginWrites` and not yet ended (`StoreClient+Sessions`).
    let openWrites = Locked<OpenWrites>(OpenWrites())
    let operations = OperationCounters()

    /// Creates an embedded store with one host segment of `segmentSize` bytes; `prefault`
    /// commits the segment's pages now instead of on first use. The segment is pinned when an
    /// accelerator is present and `pinning` (default: from the environment, see
    /// `PinningPolicy`) allows; a refused pin leaves it pageable and is counted in stats.
    /// `cache` sets leases and eviction (checked here); `disk` adds a disk tier below the
    /// segment (`TieredMaster`); `clock` is for tests.
    public init(
        segmentSize: Int, prefault: Bool = false, pinning: PinningPolicy? = nil,
        cache: CachePolicy = CachePolicy(), disk: DiskTierOptions? = nil,
        clock: @escaping Clock = monotonicClock
    ) throws(KVError) {
        guard segmentSize >= SegmentAllocator.granule else {
            throw .invalidArgument("segment size must be at least \(SegmentAllocator.granule) bytes, got \(segmentSize)")
        }
        try cache.validate()
        let tier = try disk.map { (d) throws(KVError) in try DiskTier(d) }
        let seg = try HostSegment(size: segmentSize, prefault: prefault, pinning: try Self.pinningPolicy(pinning))
        segment = seg
        let embedded = EmbeddedMaster(capacity: segmentSize, policy: cache, clock: clock)
        if let tier {
            do throws(KVError) {
                master = try TieredMaster(inner: embedded, disk: tier, segment: seg)
            } catch {
                tier.close()
                seg.unmap()
                throw error
            }
        } else {
            master = embedded
        }
        directory = EmbeddedDirectory(segment: seg)
        transport = LocalCopyTransport(counters: counters)
    }

    /// Joins the cluster of the master at `url` ("kvstore://host:port"): mounts a shared
    /// segment of `segmentSize` bytes (0: a pure client that stores nothing itself) served to
    /// other hosts over TCP, and reads and writes objects in every segment of the cluster.
    /// `token` is the cluster's (nil: `KVSTORE_MASTER_TOKEN`, else the token file a master on
    /// a loopback address wrote for this user; see `ClusterToken`). Throws `transfer` when the
    /// master cannot be reached and `invalidArgument` when the token is refused.
    ///
    /// `segmentFile`: the segment is the first `segmentSize` bytes of this shared-memory file
    /// (tmpfs or hugetlbfs, this user's, not writable by others) instead of new memory: what
    /// Mooncake's `mount_segment` mounts. Its bytes are the segment's: objects are written
    /// there, and whatever it held before is overwritten as space is used.
    ///
    /// `disk`: a disk tier below the segment (`ClusterDisk`): objects of this segment next in
    /// line for eviction are copied there, and every client reads them back from it.
    public init(
        connecting url: String, segmentSize: Int, token: String? = nil, prefault: Bool = false,
        pinning: PinningPolicy? = nil, name: String = "", segmentFile: String? = nil,
        disk: DiskTierOptions? = nil
    ) throws(KVError) {
        guard segmentSize == 0 || segmentSize >= SegmentAllocator.granule else {
            throw .invalidArgument("segment size must be 0 (a pure client) or at least \(SegmentAllocator.granule) bytes, got \(segmentSize)")
        }
        if disk != nil && segmentSize == 0 { throw .invalidArgument("a disk tier needs a segment (segment size 0 stores nothing)") }
        let policy = try Self.pinningPolicy(pinning)
        let (tenant, host, port) = try RemoteMaster.parseWithTenant(url: url)
        let clusterToken = ClusterToken(explicit: token, host: host, port: port, tenant: tenant)
        // The data plane uses the key each welcome carries (the same for every member).
        let dataKey = ClusterToken("")
        let state = ClusterState(token: dataKey, counters: counters)
        let remote = try RemoteMaster(
            url: url, token: clusterToken, dataKey: dataKey, name: name.isEmpty ? "pid \(getpid())" : name,
            onConnect: { epoch, seg, local in state.connected(epoch: epoch, segment: seg, local: local) })
        var own: HostSegment? = nil
        var tier: DiskTier? = nil
        var clusterDisk: ClusterDisk? = nil
        do throws(KVError) {
            if segmentFile != nil && segmentSize == 0 { throw .invalidArgument("a segment file needs a segment size") }
            tier = try disk.map { (d) throws(KVError) in try DiskTier(d) } // its lock before anything is mounted
            if segmentSize > 0 {
                let s: HostSegment
                if let path = segmentFile {
                    s = try HostSegment(attaching: try Self.openSegmentFile(path), size: segmentSize)
                } else {
                    s = try HostSegment(size: segmentSize, prefault: prefault, pinning: policy, shared: true)
                }
                // Its pages are reserved (posix_fallocate) but not yet mapped: without prefault,
                // map them on a background thread, so an engine's first puts, long after
                // connect, do not take a page fault per 4 KiB.
                if !prefault { s.populateInBackground() }
                own = s
                let server = try SegmentServer(
                    region: s.region(offset: 0, length: segmentSize), host: remote.localHost, token: remote.dataKey,
                    dataLock: remote.dataLock, rdma: RDMA.shared.context, shareFD: s.fd, log: logLine)
                state.server.withLock { $0 = server }
                _ = try remote.mount(
                    RemoteMaster.Mount(
                        size: segmentSize, host: state.host, sharePath: server.localName,
                        endpoint: server.endpoint, shareFD: s.fd))
            }
            remote.maintenance = { [weak remote] in if let remote { state.prunePeers(remote) } }
            try remote.startHeartbeat()
            if let tier, let own { clusterDisk = try ClusterDisk(disk: tier, remote: remote, state: state, segment: own) }
        } catch {
            clusterDisk?.close()
            tier?.close()
            remote.close()
            state.close()
            own?.unmap()
            throw error
        }
        segment = own
        master = remote
        directory = ClusterDirectory(remote: remote, state: state, segment: own, disk: clusterDisk)
        transport = LocalCopyTransport(counters: counters)
    }

    /// Opens a caller's segment file for `segmentFile`: read-write, not through a symbolic
    /// link, a regular file of this user that nobody else may write (another user could change
    /// objects under the store otherwise); `HostSegment(attaching:)` checks it is shared memory.
    static func openSegmentFile(_ path: String) throws(KVError) -> Int32 {
        guard !path.isEmpty, !path.utf8.contains(0) else { throw .invalidArgument("segment file path \"\(path)\" is not a path") }
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw SystemCall.failure("opening segment file \(path)", code: .invalidArgument) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_uid == geteuid(), st.st_mode & 0o022 == 0 else {
            Glibc.close(fd)
            throw .invalidArgument("segment file \(path) must belong to this user and be writable by nobody else")
        }
        return fd
    }

    /// `pinning`, or the environment's policy when nil.
    private static func pinningPolicy(_ pinning: PinningPolicy?) throws(KVError) -> PinningPolicy {
        if let pinning { return pinning }
        return try PinningPolicy.fromEnvironment()
    }

    /// The store's lease and eviction rules.
    public var cachePolicy: CachePolicy { master.policy }

    // MARK: writes

    /// Writes the concatenation of `parts` as the object `key`: each part copied once, in
    /// order, straight into its place in the segment. The object becomes visible only when
    /// completely written.
    /// Parts on a device are copied by that device (device→host); see `MemoryHint`.
    /// `options` pin the object or give it a TTL. Evicts when the store is full.
    public func put(
        key: ObjectKey, parts: UnsafeBufferPointer<MemoryRegion>, mode: WriteMode,
        options: WriteOptions = .default, memory: MemoryHint = .locate
    ) throws(KVError) {
        try enter()
        defer { leave() }
        let total = TransferPlan.totalLength(parts)
        guard total > 0 else { throw .invalidArgument("value must not be empty") }
        let locations = try locate(parts, memory)
        let ticket = try master.beginWrite(key: key, size: total, mode: mode, options: options, preferred: ownSegmentID)
        var done = ticket
        do throws(KVError) {
            var plan = DeviceCopyPlan() // device parts only; host parts are copied at once
            for (i, r) in ticket.replicas.enumerated() {
                let crc = try write(
                    parts, locations: locations, size: total, to: r, of: ticket, plan: &plan, owner: 0,
                    checksum: options.checksum && i == 0)
                if i == 0 { done.checksum = crc }
            }
            if locations != nil {
                try Self.checkDeadline(ticket)
                if let e = run(plan, into: .segment)[0] { throw e }
            }
            if options.checksum && done.checksum == nil { done.checksum = try checksumOfFirstReplica(ticket) }
        } catch {
            try? master.abortWrite(ticket)
            throw error
        }
        try master.commitWrite(done)
        operations.puts.add(1, ordering: .relaxed)
    }

    /// Copies `parts` (`size` bytes) into replica `r`: host parts into a mapped segment at
    /// once, device parts into `plan` (the caller executes it), parts for a segment on
    /// another host over TCP at once. With `checksum`, returns the bytes' CRC32C when it could
    /// be had now (in the copy's pass for host parts into a mapped segment); nil when the copy
    /// is planned (the caller computes it from the segment once the plan has run).
    func write(
        _ parts: UnsafeBufferPointer<MemoryRegion>, locations: [MemoryLocation]?, size: Int,
        to r: Replica, of ticket: WriteTicket, plan: inout DeviceCopyPlan, owner: Int,
        checksum: Bool = false
    ) throws(KVError) -> UInt32? {
        let target = try access(r.segment)
        if ticket.deadline != 0, Self.testWritePause > 0 { usleep(Self.testWritePause) }
        try Self.checkDeadline(ticket)
        switch target {
        case .mapped(let s):
            let destination = try Self.region(of: s, r, size)
            if let locations {
                plan.addWrite(parts, locations: locations, into: destination, owner: owner)
                return nil
            }
            if checksum {
                return withUnsafePointer(to: destination) { d in
                    transport.copyChecksummed(from: parts, to: UnsafeBufferPointer(start: d, count: 1), into: .segment).1
                }
            }
            copyHost(parts, into: destination)
            return nil
        case .peer(let p):
            guard let locations else {
                let crc = checksum ? LocalCopyTransport.checksum(parts, length: size) : nil
                try p.write(segment: r.segment, offset: r.offset, length: size, from: parts, deadline: ticket.deadline)
                return crc
            }
            // A socket cannot read device memory: stage through host memory (docs/architecture.md §3).
            var crc: UInt32? = nil
            try withStaging(size) { (staging) throws(KVError) in
                var d2h = DeviceCopyPlan()
                d2h.addWrite(parts, locations: locations, into: staging, owner: 0)
                if let e = run(d2h, into: .segment)[0] { throw e }
                try withUnsafePointer(to: staging) { (s) throws(KVError) in
                    let one = UnsafeBufferPointer(start: s, count: 1)
                    if checksum { crc = LocalCopyTransport.checksum(one, length: size) }
                    try p.write(segment: r.segment, offset: r.offset, length: size, from: one, deadline: ticket.deadline)
                }
            }
            return crc
        }
    }

    /// The CRC32C of a write's first replica as it lies in its (mapped) segment: for bytes a
    /// device copied there.
    func checksumOfFirstReplica(_ t: WriteTicket) throws(KVError) -> UInt32 {
        guard case .mapped(let s) = try access(t.segment) else {
            throw KVError(.unsupported, "checksum=True with device memory needs the write's first replica on this host")
        }
        let region = try Self.region(of: s, Replica(segment: t.segment, offset: t.offset), t.size)
        return withUnsafePointer(to: region) { LocalCopyTransport.checksum(UnsafeBufferPointer(start: $0, count: 1), length: t.size) }
    }

    /// Fenced writers: no copy into a write's space begins after the write's deadline (the
    /// master may have freed the space and given it to another object), nor after the
    /// master's leadership may have ended (`beginBy`: a later leader may hand the space out).
    /// `transfer` when it has passed; the caller aborts the write.
    static func checkDeadline(_ t: WriteTicket) throws(KVError) {
        let by = t.beginBy != 0 ? t.beginBy : t.deadline
        guard by != 0, monotonicClock() >= by else { return }
        throw KVError(
            .transfer,
            by < t.deadline
                ? "this write outlived its master's leadership before its copy began, so it was not stored "
                    + "(the master may have lost its etcd lease; put again)"
                : "this write outlived the master's write timeout before its copy began, so it was not stored "
                    + "(the writer was paused, or the copies were slower than the timeout)")
    }

    /// Replica `r`'s `size` bytes in mapped segment `s`; `internal` when the master's answer
    /// points outside it.
    static func region(of s: HostSegment, _ r: Replica, _ size: Int) throws(KVError) -> MemoryRegion {
        guard r.offset >= 0, size >= 0, r.offset <= s.size, size <= s.size - r.offset else {
            throw KVError(.internal, "replica \(r) of \(size) bytes lies outside its \(s.size)-byte segment")
        }
        return s.region(offset: r.offset, length: size)
    }

    /// One object of a batch: its key and the range of its regions in the batch's region list
    /// (its parts for `putBatch`, its destinations for `getBatch`).
    public struct BatchItem: Sendable {
        public let key: ObjectKey
        public let regions: Range<Int>
        public init(key: ObjectKey, regions: Range<Int>) {
            self.key = key
            self.regions = regions
        }
    }

    /// Writes several objects; returns one result per object (nil: written). Space for every
    /// object is taken first (one request to the master), then all copies run grouped per
    /// device (each device made current once), then every object commits — or is revoked if
    /// its copy failed — in one more message.
    public func putBatch(
        _ items: [BatchItem], parts: UnsafeBufferPointer<MemoryRegion>, mode: WriteMode,
        options: WriteOptions = .default, memory: MemoryHint = .locate
    ) throws(KVError) -> [KVError?] {
        try enter()
        defer { leave() }
        var results = [KVError?](repeating: nil, count: items.count)
        var asked: [Int] = [] // items with a valid slice, in request order
        var requests: [BatchWrite] = []
        for (i, item) in items.enumerated() {
            do throws(KVError) {
                let total = TransferPlan.totalLength(try Self.slice(parts, item.regions, "parts"))
                guard total > 0 else { throw .invalidArgument("value must not be empty") }
                asked.append(i)
                requests.append(BatchWrite(key: item.key, size: total))
            } catch {
                results[i] = error
            }
        }
        guard !requests.isEmpty else { return results }
        var tickets: [(item: Int, ticket: WriteTicket)] = []
        tickets.reserveCapacity(requests.count)
        var plan = DeviceCopyPlan()
        /// Commits the writes in `tickets` whose copies succeeded, aborts the others.
        func finish(failed: [Int: KVError]) {
            var commit: [(item: Int, ticket: WriteTicket)] = [], abort: [WriteTicket] = []
            for (i, t) in tickets {
                var t = t
                if results[i] == nil, failed[i] == nil, options.checksum, t.checksum == nil { // a device copy: from the segment
                    do throws(KVError) { t.checksum = try checksumOfFirstReplica(t) } catch { results[i] = error }
                }
                if let e = results[i] ?? failed[i] {
                    results[i] = e
                    abort.append(t)
                } else {
                    commit.append((i, t))
                }
            }
            tickets.removeAll(keepingCapacity: true)
            let committed = master.finishWrites(commit: commit.map(\.ticket), abort: abort)
            for ((i, _), e) in zip(commit, committed) {
                if let e { results[i] = e } else { operations.puts.add(1, ordering: .relaxed) }
            }
        }
        // Host parts are copied as each chunk's space arrives, while the master starts the next.
        try master.beginWrites(requests, mode: mode, options: options, preferred: ownSegmentID) { range, started in
            for (i, r) in zip(asked[range], started) {
                switch r {
                case .failure(let e): results[i] = e
                case .success(var t):
                    do throws(KVError) {
                        let mine = UnsafeBufferPointer(rebasing: parts[items[i].regions])
                        let locations = try locate(mine, memory)
                        for (k, r) in t.replicas.enumerated() {
                            let crc = try write(
                                mine, locations: locations, size: t.size, to: r, of: t, plan: &plan, owner: i,
                                checksum: options.checksum && k == 0)
                            if k == 0 { t.checksum = crc }
                        }
                    } catch {
                        results[i] = error
                    }
                    tickets.append((i, t))
                }
            }
            // Every copy so far done (host memory: nothing planned): commit this chunk now, so a
            // batch of any length keeps at most a chunk's writes in flight at the master (its
            // per-client limit is `writesInFlight`).
            if plan.hostCopies.isEmpty && plan.deviceGroups.isEmpty && tickets.count >= Self.commitChunk { finish(failed: [:]) }
        }
        finish(failed: run(plan, into: .segment))
        return results
    }

    /// Writes of a batch committed together once copied (when no device copy is pending).
    static let commitChunk = 1024

    /// Regions `range` of `all` (one batch item's); throws `invalidArgument` when out of range.
    static func slice(
        _ all: UnsafeBufferPointer<MemoryRegion>, _ range: Range<Int>,
        _ what: String
    ) throws(KVError) -> UnsafeBufferPointer<MemoryRegion> {
        guard range.lowerBound >= 0, range.upperBound <= all.count else {
            throw .invalidArgument("\(what) \(range) out of range of \(all.count) \(what)")
        }
        return UnsafeBufferPointer(rebasing: all[range])
    }

    /// Runs a device copy plan: first pins the chunks of this client's segment that its device
    /// copies touch (`HostSegment.pinForDeviceCopy`), then executes it with this store's
    /// device holds. Returns the failure of each owner that failed.
    func run(_ plan: DeviceCopyPlan, into destination: LocalCopyTransport.Destination) -> [Int: KVError] {
        let devices = AcceleratorRegistry.snapshot
        if let segment {
            for g in plan.deviceGroups {
                let device = devices.device(at: g.device) // pinned through the GPU that copies
                for c in g.copies where c.direction != .deviceToDevice {
                    let host = c.direction == .hostToDevice ? c.op.source : c.op.destination
                    if segment.contains(host) { segment.pinForDeviceCopy(MemoryRegion(address: host, length: c.op.length), device: device) }
                }
            }
        }
        return plan.execute(transport: transport, into: destination, devices: devices, holds: deviceHolds)
    }

    /// Where each of `regions` lives; nil when all are host memory (the fast path). Throws
    /// when a driver cannot tell where some memory lives.
    func locate(_ regions: UnsafeBufferPointer<MemoryRegion>, _ hint: MemoryHint) throws(KVError) -> [MemoryLocation]? {
        guard hint == .locate else { return nil }
        let snapshot = AcceleratorRegistry.snapshot
        var out: [MemoryLocation]? = nil
        for (i, r) in regions.enumerated() {
            let loc = try location(of: r, snapshot: snapshot)
            if loc.isHost && out == nil { continue }
            if out == nil { out = [MemoryLocation](repeating: .host, count: regions.count) }
            out![i] = loc
        }
        return out
    }

    /// The location of `region`: its registration's, else what the caller declared for it
    /// (`CallDevices`: a tensor's device, never asked again), else the registry's
    /// classification. Memory declared as CUDA memory of an unknown device is classified and
    /// must be CUDA memory; memory no driver can place throws.
    public func location(of region: MemoryRegion, snapshot: AcceleratorSnapshot = AcceleratorRegistry.snapshot) throws(KVError) -> MemoryLocation {
        if let e = registry.lookup(region) { return e.location }
        if let declared = CallDevices.lookup(region) {
            if let loc = declared.location { return loc }
            return try Self.cudaLocation(of: region.address, snapshot: snapshot)
        }
        return try snapshot.classify(region.address) ?? .host
    }

    /// The GPU holding `address`, which the caller says is CUDA memory of some device.
    static func cudaLocation(of address: UInt, snapshot: AcceleratorSnapshot) throws(KVError) -> MemoryLocation {
        guard snapshot.devices.contains(where: { $0.kind == .cuda }) else { throw snapshot.missing(MemoryLocation(kind: .cuda, index: 0)) }
        guard let loc = try snapshot.classify(address), loc.kind == .cuda else {
            throw .invalidArgument("memory at 0x\(String(address, radix: 16)) is declared CUDA device memory, but the CUDA driver does not know it")
        }
        return loc
    }

    // MARK: reads
    //
    // The public read calls each pass the operation gate once; the `held…` helpers below
    // assume the caller is inside it, so `get` pays for one gate entry, not three.

    /// Takes a read hold on `key`, waiting while an in-place upsert rewrites it.
    public func beginRead(key: ObjectKey) throws(KVError) -> ReadTicket {
        try enter()
        defer { leave() }
        return try heldBeginRead(key: key)
    }

    /// Takes a read hold without waiting; `.busy` while an in-place upsert rewrites the object.
    public func tryBeginRead(key: ObjectKey) throws(KVError) -> ReadResult {
        try enter()
        defer { leave() }
        return try heldTryBeginRead(key: key)
    }

    /// Copies a held object into `destinations` (filled in order); returns bytes copied.
    /// Throws `invalidArgument` when they hold fewer than `ticket.size` bytes (nothing copied).
    public func copyOut(
        _ ticket: ReadTicket, to destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint = .locate
    ) throws(KVError) -> Int {
        try enter()
        defer { leave() }
        return try heldCopyOut(ticket, range: 0..<ticket.size, to: destinations, memory: memory)
    }

    /// Copies bytes `range` of a held object into `destinations` (which must hold at least
    /// `range.count` bytes); returns bytes copied.
    public func copyOut(
        _ ticket: ReadTicket, range: Range<Int>, to destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint = .locate
    ) throws(KVError) -> Int {
        try enter()
        defer { leave() }
        guard range.lowerBound >= 0, range.upperBound <= ticket.size else {
            throw .invalidArgument("range \(range.lowerBound)..<\(range.upperBound) is outside an object of \(ticket.size) bytes")
        }
        return try heldCopyOut(ticket, range: range, to: destinations, memory: memory)
    }

    /// `copyOut` of bytes `range` for a caller that retries: nil when the copy outlived the
    /// read's lease (its bytes are not the object's: end the read and begin it again).
    public func copyOutIfLeased(
        _ ticket: ReadTicket, range: Range<Int>, to destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint = .locate
    ) throws(KVError) -> Int? {
        try enter()
        defer { leave() }
        guard range.lowerBound >= 0, range.upperBound <= ticket.size else {
            throw .invalidArgument("range \(range.lowerBound)..<\(range.upperBound) is outside an object of \(ticket.size) bytes")
        }
        let n = try uncheckedCopyOut(ticket, range: range, to: destinations, memory: memory)
        return leaseHeld(ticket) ? n : nil
    }

    /// Ends a read hold. After `close` it throws `storeClosed` (the segment is gone).
    public func endRead(_ ticket: ReadTicket) throws(KVError) {
        try enter()
        defer { leave() }
        try master.releaseRead(ticket.handle)
    }

    /// Copies object `key` into `destinations`; returns its size. The store is unchanged when
    /// it fails.
    public func get(
        key: ObjectKey, into destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint = .locate
    ) throws(KVError) -> Int {
        try enter()
        defer { leave() }
        return try heldGet(key: key, into: destinations, memory: memory)
    }

    /// How many times a read whose copy outlived its lease is tried again before it fails.
    static let expiredReadRetries = 3

    /// `get` inside the gate: a copy that ended after its lease deadline is thrown away and
    /// the read starts again (the object may have moved, or be gone: `notFound` then).
    private func heldGet(
        key: ObjectKey, into destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint
    ) throws(KVError) -> Int {
        var tries = 0
        while true {
            let t: ReadTicket
            do throws(KVError) {
                t = try heldBeginRead(key: key)
            } catch  where error.code == .noSpace {
                // On the disk tier, and DRAM cannot take it back: read it from disk directly.
                guard let tier = master as? TieredMaster, (try locate(destinations, memory)) == nil else { throw error }
                let n = try tier.readDirect(key, into: destinations)
                operations.hits.add(1, ordering: .relaxed)
                return n
            }
            defer { try? master.releaseRead(t.handle) }
            let n = try uncheckedCopyOut(t, range: 0..<t.size, to: destinations, memory: memory)
            if leaseHeld(t) { return n }
            tries += 1
            if tries > Self.expiredReadRetries { throw Self.leaseExpired(t, tries: tries) }
        }
    }

    /// Reads several objects, object `i` into `destinations[items[i].regions]`; returns one
    /// result per object (its size, or the error). Every object is held first (one request
    /// to the master), then all copies run grouped per device, then the holds are released.
    /// An object whose copy outlived its lease is read again on its own (see `get`).
    public func getBatch(
        _ items: [BatchItem], destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint = .locate
    ) throws(KVError) -> [Result<Int, KVError>] {
        try enter()
        defer { leave() }
        var results = [Result<Int, KVError>](repeating: .success(0), count: items.count)
        var asked: [Int] = []
        var keys: [ObjectKey] = []
        for (i, item) in items.enumerated() {
            do throws(KVError) {
                _ = try Self.slice(destinations, item.regions, "destinations")
                asked.append(i)
                keys.append(item.key)
            } catch {
                results[i] = .failure(error)
            }
        }
        guard !keys.isEmpty else { return results }
        var held: [ReadTicket] = []
        held.reserveCapacity(keys.count)
        defer { for t in held { try? master.releaseRead(t.handle) } }
        var leased: [(item: Int, ticket: ReadTicket)] = [] // copies to check once they are done
        var stale: [Int] = [] // copies that outlived their lease
        var fromDisk: [(item: Int, ticket: ReadTicket)] = [] // disk tier copies into host memory: read together at the end
        var plan = DeviceCopyPlan()
        try master.acquireReads(keys: keys, host: directory.host) { range, answers in
            // With every copy of the batch so far done (host memory: nothing planned), this
            // chunk's holds are checked and ended now, so a batch of any length holds at most
            // a chunk's worth at the master (its per-client limit is `readsInFlight`).
            defer {
                if plan.hostCopies.isEmpty && plan.deviceGroups.isEmpty {
                    for (i, t) in leased {
                        if case .success = results[i], !leaseHeld(t) { stale.append(i) }
                    }
                    leased.removeAll(keepingCapacity: true)
                    for t in held { try? master.releaseRead(t.handle) }
                    held.removeAll(keepingCapacity: true)
                }
            }
            for (i, r) in zip(asked[range], answers) {
                do throws(KVError) {
                    let t: ReadTicket
                    switch r {
                    case .failure(let e):
                        let mine = UnsafeBufferPointer(rebasing: destinations[items[i].regions])
                        guard e.code == .noSpace, let tier = master as? TieredMaster, (try locate(mine, memory)) == nil else { throw e }
                        results[i] = .success(try tier.readDirect(items[i].key, into: mine)) // see heldGet
                        operations.hits.add(1, ordering: .relaxed)
                        continue
                    case .success(.found(let found)):
                        countLookup(.found(found))
                        t = found
                    case .success(.notFound):
                        countLookup(.notFound)
                        throw .notFound("object '\(items[i].key)' not found")
                    case .success(.busy):
                        t = try heldBeginRead(key: items[i].key) // an in-place upsert (embedded only): wait for it alone
                    }
                    held.append(t)
                    let mine = UnsafeBufferPointer(rebasing: destinations[items[i].regions])
                    let locations = try locate(mine, memory)
                    if DiskDirectory.isDisk(t.segment) && locations == nil && t.fallbacks.isEmpty {
                        try Self.checkRoom(mine, for: t.size, of: t)
                        fromDisk.append((i, t))
                        continue
                    }
                    results[i] = .success(try heldCopyOut(t, range: 0..<t.size, to: mine, locations: locations, plan: &plan, owner: i))
                    if t.leaseEnd != 0 { leased.append((i, t)) }
                } catch {
                    results[i] = .failure(error)
                }
            }
        }
        for (i, e) in run(plan, into: .callerMemory) {
            results[i] = .failure(e)
        }
        for (i, r) in readFromDisk(fromDisk, items, destinations) { results[i] = r }
        for (i, t) in leased {
            if case .success = results[i], !leaseHeld(t) { stale.append(i) }
        }
        for i in stale {
            results[i] = Result { () throws(KVError) in
                try heldGet(key: items[i].key, into: UnsafeBufferPointer(rebasing: destinations[items[i].regions]), memory: memory)
            }
        }
        return results
    }

    /// Disk tiers' copies a batch found, read into host memory on up to
    /// `diskReadThreads` threads (each disk read waits on a disk and often a peer: one after
    /// another they leave both idle). One result per entry.
    private func readFromDisk(
        _ reads: [(item: Int, ticket: ReadTicket)], _ items: [BatchItem], _ destinations: UnsafeBufferPointer<MemoryRegion>
    ) -> [(Int, Result<Int, KVError>)] {
        guard !reads.isEmpty else { return [] }
        let out = Locked([(Int, Result<Int, KVError>)]())
        let next = Atomic<Int>(0)
        let base = UInt(bitPattern: destinations.baseAddress), count = destinations.count
        let work: @Sendable () -> Void = { [self] in
            let all = UnsafeBufferPointer(start: UnsafePointer<MemoryRegion>(bitPattern: base), count: count)
            while true {
                let j = next.add(1, ordering: .relaxed).oldValue
                guard j < reads.count else { return }
                let (i, t) = reads[j]
                let mine = UnsafeBufferPointer(rebasing: all[items[i].regions])
                let r = Result { () throws(KVError) -> Int in
                    try directory.readDisk(Replica(segment: t.segment, offset: t.offset), range: 0..<t.size, into: mine)
                    if let want = t.checksum { // the writer's CRC32C, end to end
                        let got = LocalCopyTransport.checksum(mine, length: t.size)
                        guard got == want else {
                            operations.checksumFailures.add(1, ordering: .relaxed)
                            throw Self.checksumMismatch(t, Replica(segment: t.segment, offset: t.offset), got: got)
                        }
                        operations.checksumsVerified.add(1, ordering: .relaxed)
                    }
                    return t.size
                }
                out.withLock { $0.append((i, r)) }
            }
        }
        let helpers = (1..<min(Self.diskReadThreads, reads.count)).compactMap { _ in try? BackgroundThread(work) }
        work()
        for h in helpers { h.join() }
        return out.withLock { $0 }
    }

    /// Threads one batch reads disk tier copies on.
    static let diskReadThreads = 4

    /// Whether a copy from `t`'s replica that has just ended ended inside the lease: the bytes
    /// it copied are the object's. Counts the copies that did not (their bytes must be thrown
    /// away). A held version (embedded store) always is.
    ///
    /// Why this is enough: the master frees a version's space only once every hold on it has
    /// ended, and a remote reader's hold lasts until it releases it (after this check) or
    /// until the lease it was granted with ends; the only exception is the segment itself
    /// going, and a remounted segment takes no new object for a lease TTL
    /// (`ObjectTable.mount(readyAt:)`). So the bytes under a replica are the object's until
    /// the lease ends at the latest, and the reader's deadline (`RemoteMaster.leaseEnd`) is
    /// earlier.
    @inline(__always)
    func leaseHeld(_ t: ReadTicket) -> Bool {
        guard t.leaseEnd != 0 else { return true }
        atomicMemoryFence(ordering: .sequentiallyConsistent) // every load of the copy before the clock is read
        if monotonicClock() < t.leaseEnd { return true }
        operations.readsExpired.add(1, ordering: .relaxed)
        return false
    }

    /// Test hook: `KVSTORE_TEST_READ_PAUSE_US` pauses every read under a remote lease this
    /// long between the lease and the copy (a reader descheduled at the worst moment).
    static let testReadPause: UInt32 = Environment.integer("KVSTORE_TEST_READ_PAUSE_US") ?? 0

    /// Writes store a CRC32C unless their options say not to (`Store(checksum=True)`); set
    /// once when the store is created, before its handle is shared.
    public let checksumDefault = Atomic<Bool>(false)
    public var checksumByDefault: Bool { checksumDefault.load(ordering: .relaxed) }

    /// Test hook: `KVSTORE_TEST_WRITE_PAUSE_US` pauses every write to a remote master this
    /// long between its start and its copy.
    static let testWritePause: UInt32 = Environment.integer("KVSTORE_TEST_WRITE_PAUSE_US") ?? 0

    /// The error of a read whose copy outlived its lease `tries` times in a row.
    public static func leaseExpired(_ t: ReadTicket, tries: Int) -> KVError {
        KVError(
            .transfer,
            "the read outlived its lease \(tries) time\(tries == 1 ? "" : "s") (object of \(t.size) bytes in segment \(t.segment)), "
                + "so its bytes were thrown away: the reader was paused or the copy was slower than the master's lease TTL")
    }

    private func heldBeginRead(key: ObjectKey) throws(KVError) -> ReadTicket {
        while true {
            switch try heldTryBeginRead(key: key) {
            case .found(let t): return t
            case .notFound: throw .notFound("object '\(key)' not found")
            case .busy: sched_yield()
            }
        }
    }

    private func heldTryBeginRead(key: ObjectKey) throws(KVError) -> ReadResult {
        let r = try master.acquireRead(key: key, host: directory.host)
        countLookup(r)
        return r
    }

    /// Counts a lookup's hit or miss.
    private func countLookup(_ r: ReadResult) {
        switch r {
        case .found: operations.hits.add(1, ordering: .relaxed)
        case .notFound: operations.misses.add(1, ordering: .relaxed)
        case .busy: break
        }
    }

    /// Throws `invalidArgument` when `destinations` hold fewer than `count` bytes of `ticket`'s object.
    private static func checkRoom(
        _ destinations: UnsafeBufferPointer<MemoryRegion>, for count: Int,
        of ticket: ReadTicket
    ) throws(KVError) {
        let room = TransferPlan.totalLength(destinations)
        guard room < count else { return }
        let what = count == ticket.size ? "an object of \(ticket.size) bytes" : "\(count) bytes"
        throw .invalidArgument("buffer of \(room) bytes is too small for \(what)")
    }

    func heldCopyOut(
        _ ticket: ReadTicket, range: Range<Int>, to destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint
    ) throws(KVError) -> Int {
        let n = try uncheckedCopyOut(ticket, range: range, to: destinations, memory: memory)
        guard leaseHeld(ticket) else { throw Self.leaseExpired(ticket, tries: 1) }
        return n
    }

    /// `heldCopyOut` without the lease check: the caller checks (`leaseHeld`).
    private func uncheckedCopyOut(
        _ ticket: ReadTicket, range: Range<Int>, to destinations: UnsafeBufferPointer<MemoryRegion>,
        memory: MemoryHint
    ) throws(KVError) -> Int {
        let locations = try locate(destinations, memory)
        var plan = DeviceCopyPlan()
        let n = try heldCopyOut(ticket, range: range, to: destinations, locations: locations, plan: &plan, owner: 0)
        if locations != nil, let e = run(plan, into: .callerMemory)[0] {
            throw e
        }
        return n
    }

    /// Copies bytes `range` of a held object into `destinations`, trying its replicas in
    /// order: host memory at once, device memory of a mapped segment into `plan` (the caller
    /// executes it). Returns `range.count`.
    private func heldCopyOut(
        _ ticket: ReadTicket, range: Range<Int>, to destinations: UnsafeBufferPointer<MemoryRegion>,
        locations: [MemoryLocation]?, plan: inout DeviceCopyPlan, owner: Int
    ) throws(KVError) -> Int {
        try Self.checkRoom(destinations, for: range.count, of: ticket)
        if ticket.leaseEnd != 0, Self.testReadPause > 0 { usleep(Self.testReadPause) }
        let verify = ticket.checksum != nil && range.lowerBound == 0 && range.count == ticket.size
        var r = Replica(segment: ticket.segment, offset: ticket.offset)
        var next = 0
        while true {
            do throws(KVError) {
                let crc = try read(
                    r, size: ticket.size, range: range, into: destinations, locations: locations, plan: &plan,
                    owner: owner, checksum: verify)
                if verify, let want = ticket.checksum {
                    // A copy that outlived its lease may hold reused space: the caller's lease
                    // check throws it away and reads again. Otherwise a difference is corruption.
                    if crc != want && !(ticket.leaseEnd != 0 && monotonicClock() >= ticket.leaseEnd) {
                        operations.checksumFailures.add(1, ordering: .relaxed)
                        throw Self.checksumMismatch(ticket, r, got: crc ?? 0)
                    }
                    if crc == want { operations.checksumsVerified.add(1, ordering: .relaxed) }
                }
                return range.count
            } catch  where (error.code == .transfer || error.code == .objectNotFound || error.code == .checksum) && next < ticket.fallbacks.count {
                r = ticket.fallbacks[next] // that replica's holder died or left: try the next one
                next += 1
            }
        }
    }

    /// Copies bytes `range` of replica `r` (of an object of `size` bytes) into `destinations`:
    /// from a mapped segment at once (host memory) or into `plan` (device memory); from a peer
    /// at once (device memory staged through host memory).
    /// With `checksum`, returns the CRC32C of the bytes read: in the copy's pass from a mapped
    /// segment into host memory, over the source before a planned device copy, over what
    /// arrived from a peer.
    private func read(
        _ r: Replica, size: Int, range: Range<Int>, into destinations: UnsafeBufferPointer<MemoryRegion>,
        locations: [MemoryLocation]?, plan: inout DeviceCopyPlan, owner: Int,
        checksum: Bool = false
    ) throws(KVError) -> UInt32? {
        if DiskDirectory.isDisk(r.segment) { // a disk tier's copy (the master lost the DRAM one)
            return try fetched(range.count, into: destinations, locations: locations, checksum: checksum) { (d) throws(KVError) in
                try directory.readDisk(r, range: range, into: d)
            }
        }
        switch try access(r.segment) {
        case .mapped(let s):
            let whole = try Self.region(of: s, r, size)
            let source = MemoryRegion(address: whole.address + UInt(range.lowerBound), length: range.count)
            if let locations {
                let crc =
                    checksum
                    ? withUnsafePointer(to: source) { LocalCopyTransport.checksum(UnsafeBufferPointer(start: $0, count: 1), length: source.length) } : nil
                plan.addRead(from: source, into: destinations, locations: locations, owner: owner)
                return crc
            }
            if checksum {
                return withUnsafePointer(to: source) { src in
                    transport.copyChecksummed(from: UnsafeBufferPointer(start: src, count: 1), to: destinations, into: .callerMemory).1
                }
            }
            copyHost(source, into: destinations)
            return nil
        case .peer(let p):
            return try fetched(range.count, into: destinations, locations: locations, checksum: checksum) { (d) throws(KVError) in
                try p.read(segment: r.segment, offset: r.offset + range.lowerBound, length: range.count, into: d)
            }
        }
    }

    /// Runs `fetch`, which fills host memory with `count` bytes: straight into `destinations`
    /// when they are host memory (`locations` nil), else into staging copied on to the
    /// devices. With `checksum`, returns the CRC32C of what arrived.
    private func fetched(
        _ count: Int, into destinations: UnsafeBufferPointer<MemoryRegion>, locations: [MemoryLocation]?, checksum: Bool,
        _ fetch: (UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> Void
    ) throws(KVError) -> UInt32? {
        guard let locations else {
            try fetch(destinations)
            return checksum ? LocalCopyTransport.checksum(destinations, length: count) : nil
        }
        var crc: UInt32? = nil
        try withStaging(count) { (staging) throws(KVError) in
            try withUnsafePointer(to: staging) { (s) throws(KVError) in
                let one = UnsafeBufferPointer(start: s, count: 1)
                try fetch(one)
                if checksum { crc = LocalCopyTransport.checksum(one, length: count) }
            }
            var h2d = DeviceCopyPlan()
            h2d.addRead(from: staging, into: destinations, locations: locations, owner: 0)
            if let e = run(h2d, into: .callerMemory)[0] { throw e }
        }
        return crc
    }

    /// The error of a whole-object read whose copy differed from the writer's CRC32C.
    static func checksumMismatch(_ t: ReadTicket, _ r: Replica, got: UInt32) -> KVError {
        KVError(
            .checksum,
            "checksum mismatch reading an object of \(t.size) bytes in segment \(r.segment) at offset \(r.offset): "
                + "CRC32C \(String(got, radix: 16)), its writer stored \(String(t.checksum ?? 0, radix: 16)); the bytes are corrupt and were not returned")
    }

    /// Runs `body` with `size` bytes of host memory, counted as staged.
    func withStaging(_ size: Int, _ body: (MemoryRegion) throws(KVError) -> Void) throws(KVError) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(size, 1), alignment: 64)
        defer { p.deallocate() }
        counters.bytesStaged.add(size, ordering: .relaxed)
        try body(MemoryRegion(p, length: size))
    }

    /// Host parts into a segment region: one copy per slice, no lookup, no plan.
    private func copyHost(_ parts: UnsafeBufferPointer<MemoryRegion>, into destination: MemoryRegion) {
        withUnsafePointer(to: destination) { d in
            _ = transport.copy(from: parts, to: UnsafeBufferPointer(start: d, count: 1), into: .segment)
        }
    }

    /// A segment region into host destinations; returns bytes copied.
    @discardableResult
    private func copyHost(_ source: MemoryRegion, into destinations: UnsafeBufferPointer<MemoryRegion>) -> Int {
        withUnsafePointer(to: source) { s in
            transport.copy(from: UnsafeBufferPointer(start: s, count: 1), to: destinations, into: .callerMemory)
        }
    }

    // MARK: queries and removal

    /// Whether `key` exists; an existing object is leased (so a `get` that follows finds it).
    public func exists(key: ObjectKey) throws(KVError) -> Bool {
        try enter()
        defer { leave() }
        return try master.lease(key: key) != nil
    }

    /// The size of `key` in bytes; leases the object.
    public func size(key: ObjectKey) throws(KVError) -> Int {
        try enter()
        defer { leave() }
        guard let n = try master.lease(key: key) else { throw .notFound("object '\(key)' not found") }
        return n
    }

    /// Removes `key`. A leased object is refused with `leaseHeld` unless `force`. Readers
    /// already copying finish with the bytes they hold; the space is freed when the last of
    /// them is done.
    public func remove(key: ObjectKey, force: Bool = false) throws(KVError) {
        try enter()
        defer { leave() }
        try master.remove(key: key, force: force)
        operations.removes.add(1, ordering: .relaxed)
    }

    /// `size` of several keys: each found object's size (leased), nil for a missing one.
    /// One master request per chunk of keys, not one per key.
    public func sizes(keys: [ObjectKey]) throws(KVError) -> [Int?] {
        try enter()
        defer { leave() }
        return try master.leases(keys: keys)
    }

    /// `remove` of several keys: one error per key (nil: removed). One master request per
    /// chunk of keys.
    public func remove(keys: [ObjectKey], force: Bool = false) throws(KVError) -> [KVError?] {
        try enter()
        defer { leave() }
        let errors = try master.remove(keys: keys, force: force)
        operations.removes.add(errors.lazy.filter { $0 == nil }.count, ordering: .relaxed)
        return errors
    }

    /// Read holds on several keys (see `beginRead`): one master request per chunk of keys.
    /// `notFound` for a missing key. Every ticket returned must be ended with `endRead`.
    public func beginReads(keys: [ObjectKey]) throws(KVError) -> [Result<ReadTicket, KVError>] {
        try enter()
        defer { leave() }
        var out: [Result<ReadTicket, KVError>] = []
        out.reserveCapacity(keys.count)
        try master.acquireReads(keys: keys, host: directory.host) { range, answers in
            for (key, r) in zip(keys[range], answers) {
                switch r {
                case .failure(let e): out.append(.failure(e))
                case .success(let found):
                    countLookup(found)
                    switch found {
                    case .found(let t): out.append(.success(t))
                    case .notFound: out.append(.failure(.notFound("object '\(key)' not found")))
                    case .busy: out.append(Result { () throws(KVError) in try heldBeginRead(key: key) }) // embedded only: wait for it alone
                    }
                }
            }
        }
        return out
    }

    /// Removes every object that is not leased (every object when `force`); returns how many.
    public func removeAll(force: Bool = false) throws(KVError) -> Int {
        try enter()
        defer { leave() }
        let n = try master.removeAll(force: force)
        operations.removes.add(n, ordering: .relaxed)
        return n
    }

    /// One page of the keys (of the cluster, for a connected client) in byte order after
    /// `after` (nil: the first page); at most `ObjectTable.keysPageBytes` of them. Walk the
    /// pages with the last key of each until `more` is false, like Redis SCAN.
    public func keysPage(after: ObjectKey?) throws(KVError) -> ObjectTable.KeysPage {
        try enter()
        defer { leave() }
        return try master.keysPage(after: after)
    }

    /// Every key, from all the pages.
    public func keys() throws(KVError) -> [ObjectKey] {
        var all: [ObjectKey] = []
        var after: ObjectKey? = nil
        while true {
            let page = try keysPage(after: after)
            all += page.keys
            guard page.more, let last = page.keys.last else { return all }
            after = last
        }
    }

    // MARK: buffers

    /// Records `region` as user memory at `location` ("cpu", "cuda:N"): later transfers find
    /// its device by address range, with no driver query. Throws `invalidArgument` when no
    /// such device exists, or when the registry can tell the memory lives elsewhere.
    public func registerBuffer(_ region: MemoryRegion, location: String) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        let snapshot = AcceleratorRegistry.snapshot
        // "cuda" without an index (an __cuda_array_interface__ buffer): the driver names it.
        let loc =
            location == "cuda"
            ? try Self.cudaLocation(of: region.address, snapshot: snapshot)
            : try MemoryLocation(parsing: location)
        _ = try snapshot.requireDevice(at: loc)
        if snapshot.hasAccelerator, let actual = try snapshot.classify(region.address), actual != loc {
            throw .invalidArgument("buffer at 0x\(String(region.address, radix: 16)) is \(actual) memory, not \(loc)")
        }
        try registry.register(region, location: loc)
    }

    public func unregisterBuffer(address: UInt) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        try registry.unregister(address: address)
    }

    // MARK: lifecycle

    public var isClosed: Bool { gate.isClosed }

    /// Refuses new operations, waits for those in flight, then leaves the cluster (when
    /// connected: unmount, stop serving) and releases the segment. Idempotent.
    public func close() {
        if gate.close() {
            (master as? TieredMaster)?.close()
            directory.close()
            registry.removeAll()
            segment?.unmap()
            deviceHolds.releaseAll()
        }
    }

    // MARK: cluster plumbing

    /// Enters an operation: passes the gate, then the directory's entry (a connected store
    /// reconnects a lost link and shares its data lock, which a reconnect waits for).
    @inline(__always)
    func enter() throws(KVError) {
        try gate.enter()
        do throws(KVError) {
            try directory.enterOperation()
        } catch {
            gate.leave()
            throw error
        }
    }

    @inline(__always)
    func leave() {
        directory.leaveOperation()
        gate.leave()
    }

    /// The segment to place a write's first replica in: this client's own, when it has one.
    var ownSegmentID: SegmentID? { directory.ownSegmentID }

    /// How to reach segment `seg` (`SegmentDirectory.access`).
    @inline(__always)
    func access(_ seg: SegmentID) throws(KVError) -> SegmentAccess { try directory.access(seg) }
}
