#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVSystem
import KVTransfer
import Synchronization

/// A master server reached over TCP: the `MasterLink` of a connected `StoreClient`.
///
/// One connection, one request at a time (a lock serialises callers); commits are pipelined
/// (sent without waiting; the master answers them only when they fail, and such an answer is
/// read, and counted in `commitFailures`, before the next answer). A heartbeat thread
/// keeps the client alive when it is idle.
///
/// Connection loss: the call that sees it fails with `transfer` and the connection is marked
/// lost; `reconnectIfNeeded()` (run at the start of each operation and by the heartbeat
/// thread) dials again, says hello and resumes this client's session (`resume`: its segment,
/// objects, writes in flight and holds are kept; pipelined commits that had no answer after
/// them are sent again). When the master no longer knows the session (it restarted, or the
/// client was away longer than the client TTL), it remounts this client's segment and
/// reports the objects in it (`index`, from the master's notices: `restore`) instead. Either
/// way it counts a reconnect. It runs under
/// `dataLock` held exclusively, so no copy into or out of segment memory is in flight while
/// segments change identity.
public final class RemoteMaster: MasterLink, @unchecked Sendable {
    /// Where the master is: fixed by the URL, or the leader etcd names (`Address`).
    public let address: Address
    private let dialed: Locked<(host: String, port: Int)>
    /// The master this client dials: the URL's, or the elected leader it last found in etcd.
    public var host: String { dialed.withLock { $0.host } }
    public var port: Int { dialed.withLock { $0.port } }
    /// Times this client moved to a newly elected leader (etcd), and the term of the one it uses.
    public let failovers = Atomic<Int>(0)
    public let term = Atomic<UInt64>(0)
    /// Lease TTL from the master's welcome; the rest are client-side defaults. Set once in init.
    public private(set) var policy = CachePolicy()
    public private(set) var clientTTL: Nanoseconds = 10_000_000_000
    /// Shared by every operation using segment memory; exclusive for a reconnect.
    public let dataLock = SharedLock()
    /// Times this client reconnected (a master restart or a lost connection).
    public let reconnects = Atomic<Int>(0)
    /// Pipelined commits the master refused (every segment of the write died meanwhile), or
    /// that were lost with a session the master no longer knew at the reconnect: those
    /// objects are not stored.
    public let commitFailures = Atomic<Int>(0)
    /// Objects of this client's segment a restarted master took back from its report.
    public let restoredObjects = Atomic<Int>(0)
    /// Reconnects that took the session back (`resume`), and pipelined commits they applied.
    public let resumes = Atomic<Int>(0)
    public let resumedCommits = Atomic<Int>(0)
    /// The master's write timeout (from its welcome): a writer starts no copy after its own
    /// deadline for a write (`WriteTicket.deadline`).
    public private(set) var writeTimeout: Nanoseconds = 300_000_000_000

    /// What a segment mount says (kept to remount after a reconnect).
    public struct Mount: Sendable {
        public var size: Int
        public var host: String
        public var sharePath: String
        public var endpoint: String
        /// The segment's shared-memory file (-1: none): passed with the mount on the master's
        /// local socket, where the master takes the capacity from the file, not from `size`.
        public var shareFD: Int32 = -1

        public init(size: Int, host: String, sharePath: String, endpoint: String, shareFD: Int32 = -1) {
            self.size = size
            self.host = host
            self.sharePath = sharePath
            self.endpoint = endpoint
            self.shareFD = shareFD
        }
    }

    struct Link: @unchecked Sendable {
        var socket: Socket?
        var nextID: UInt32 = 1
        var reader = FrameReader(maxPayload: WireFrameHeader.defaultMaxPayload, spinNanos: RemoteMaster.spinNanos)
        var lastRequest: Nanoseconds = 0
        var lastAttempt: Nanoseconds = 0
        var lastFailure = ""
        /// This side's address of the TCP connection (kept when the link moves to the local socket).
        var localHost = "127.0.0.1"
        /// Whether the link runs over the master's local (Unix-domain) socket.
        var local = false
        /// Whether this process sees the master's pid as the master does (checked on its
        /// local socket, whether or not the link then runs there).
        var sharesPIDs = false
        var mount: Mount?
        /// The term of the master `mount` was last mounted with (0: a master not elected).
        var mountTerm: UInt64 = 0
        /// The segment was drained (`drainSegment`): a remount drains it again.
        var drained = false
        /// This client's published KV layout (published again after a reconnect).
        var layout: PublishedLayout?
        var segment: SegmentID = 0
        var epoch = 0
        /// The lease TTL this connection's master grants (from its welcome): a restarted
        /// master may grant another.
        var leaseTTL: Nanoseconds = 0
        /// Writes started on this connection and not yet committed or aborted.
        /// ... with when each started (a slow one's commit is confirmed, see `slowCommit`).
        /// ... and, for a write into this client's own segment, its key and options (what it
        /// re-reports to a restarted master should its commit go unread: `unconfirmed`).
        var writes: [VersionHandle: (sentAt: Nanoseconds, own: (key: ObjectKey, options: WriteOptions)?)] = [:]
        /// Requests of streamed batches not yet answered, and answers read for them by
        /// another call (see `streamed`).
        var awaited: Set<UInt32> = []
        /// Read holds whose copies ended, sent with the next request (`release`).
        var releases: [VersionHandle] = []
        /// Read holds this connection's master granted and this client has not released (a
        /// hold from an earlier connection is never released on this one).
        var holds: [VersionHandle: Int] = [:]
        var parked: [UInt32: MasterResponse] = [:]
        /// The session this client holds at the master (its id and secret), for `resume`.
        var client: UInt64 = 0
        var secret: [UInt8] = []
        /// This connection's handshake nonces (what a `resume` proof signs), and the secret of
        /// the session its welcome began.
        var nonces: [UInt8] = []
        var welcomeSecret: [UInt8] = []
        /// Commits sent pipelined with no answer read after them (request id, write): they
        /// may have been lost with the connection, so a resume sends them again.
        var unconfirmed: [(id: UInt32, commit: PipelinedCommit, place: Replica, object: ObjectTable.Restored?)] = []
        /// Writes whose commit or abort could not be sent (the connection was lost): a resume
        /// aborts them.
        var orphans: [VersionHandle] = []
        /// The objects in this client's segment, by offset, as the master's `notices` told
        /// them: what it reports to a restarted master (`restore`).
        var index: [Int: ObjectTable.Restored] = [:]
        /// The number of the last notice about `segment` applied to `index`, and the last one
        /// confirmed to the master (which reuses freed space only once its owner confirmed
        /// hearing that it was freed: `ObjectTable.confirm`).
        var noticed: UInt64 = 0
        var confirmed: UInt64 = 0
    }

    /// At most this many unconfirmed commits and orphans are kept (then one round trip
    /// confirms the commits; the oldest orphans are left to the master's write timeout).
    static let maxUnconfirmed = MasterLimits.maxBatch

    private let link = Locked(Link())
    /// The token this client proves: the cluster's, or its tenant's.
    public let token: ClusterToken
    /// The data plane's key (segment and KV servers), set from each welcome.
    public let dataKey: ClusterToken
    /// The tenant named in the URL ("" for none).
    public let tenant: String
    private let name: String
    private let timeout: Double
    private let clock: Clock
    /// Called (under the link's lock) after each connect with the epoch, this client's segment
    /// id (0: none) and whether this process shares the master's view of process ids (checked
    /// on its local socket): only then may same-host routes use the pids the master verified.
    private let onConnect: @Sendable (Int, SegmentID, Bool) -> Void
    private var heartbeat: BackgroundThread?
    /// Runs on the heartbeat thread after each round (outside the link's lock); set before
    /// `startHeartbeat`.
    public var maintenance: (@Sendable () -> Void)?
    private let stopPipe: WakePipe

    /// A master URL: "kvstore://[tenant@]host:port" (or "host:port"; the port defaults to
    /// 50051), or "kvstore+etcd://[tenant@]etcd-host:port[,etcd-host:port...][/CLUSTER]": the
    /// leader elected on etcd for CLUSTER (default "kvstore"), found again at each reconnect.
    public struct Address: Sendable {
        public let tenant: String
        /// The master of a kvstore:// URL.
        public let fixed: (host: String, port: Int)?
        /// The etcd of a kvstore+etcd:// URL, and the cluster.
        public let etcd: EtcdClient?
        public let cluster: String

        public init(url: String) throws(KVError) {
            var rest = Substring(url)
            var etcd = false
            if rest.hasPrefix("kvstore://") {
                rest = rest.dropFirst("kvstore://".count)
            } else if rest.hasPrefix("kvstore+etcd://") {
                rest = rest.dropFirst("kvstore+etcd://".count); etcd = true
            } else if rest.contains("://") {
                throw .invalidArgument("master address '\(url)' must start with kvstore:// or kvstore+etcd://")
            }
            var t = ""
            if let at = rest.firstIndex(of: "@") {
                t = String(rest[..<at])
                rest = rest[rest.index(after: at)...]
                try Tenant.validate(name: t)
            }
            tenant = t
            if etcd {
                var name = "kvstore"
                if let slash = rest.firstIndex(of: "/") {
                    let path = rest[rest.index(after: slash)...]
                    rest = rest[..<slash]
                    if !path.isEmpty { name = String(path.hasSuffix("/") ? path.dropLast() : path) }
                }
                try MasterElectionKey.validate(cluster: name)
                cluster = name
                self.etcd = try EtcdClient(endpoints: String(rest), timeout: 1)
                fixed = nil
            } else {
                if rest.hasSuffix("/") { rest = rest.dropLast() }
                fixed = try Socket.endpoint(rest, defaultPort: 50051)
                self.etcd = nil
                cluster = ""
            }
        }

        /// The master to dial and its term (0 for a fixed master): for etcd, the leader as
        /// etcd names it now. Throws `transfer` when etcd cannot be reached or names none.
        public func resolve() throws(KVError) -> (host: String, port: Int, term: UInt64) {
            if let fixed { return (fixed.host, fixed.port, 0) }
            let etcd = etcd!
            guard let kv = try etcd.get(MasterElectionKey.leader(cluster: cluster)) else {
                throw KVError(.transfer, "cluster '\(cluster)' has no leader in etcd at \(etcd.description) (an election may be under way)")
            }
            let text = String(decoding: kv.value.prefix(300), as: UTF8.self)
            guard kv.value.count <= 300, let (h, p) = try? Socket.endpoint(Substring(text)) else {
                throw KVError(.transfer, "etcd names the leader of cluster '\(cluster)' as '\(text.prefix(80))', which is not host:port")
            }
            return (h, p, UInt64(kv.createRevision))
        }
    }

    /// Parses "kvstore://[tenant@]host:port" (or "host:port"; the port defaults to 50051).
    public static func parse(url: String) throws(KVError) -> (host: String, port: Int) {
        let (_, host, port) = try parseWithTenant(url: url)
        return (host, port)
    }

    /// The tenant ("" for none: the cluster's own token), host and port of a master URL (for
    /// kvstore+etcd://, the leader etcd names now).
    public static func parseWithTenant(url: String) throws(KVError) -> (tenant: String, host: String, port: Int) {
        let a = try Address(url: url)
        let (host, port, _) = try a.resolve()
        return (a.tenant, host, port)
    }

    /// Connects and says hello; throws `transfer` when the master cannot be reached and
    /// `invalidArgument` when it refuses the token.
    public convenience init(
        url: String, token: String?, name: String, timeout: Double = 10,
        clock: @escaping Clock = monotonicClock,
        onConnect: @escaping @Sendable (Int, SegmentID, Bool) -> Void = { _, _, _ in }
    ) throws(KVError) {
        let (tenant, h, p) = try Self.parseWithTenant(url: url)
        try self.init(
            url: url, token: ClusterToken(explicit: token, host: h, port: p, tenant: tenant), name: name, timeout: timeout,
            clock: clock, onConnect: onConnect)
    }

    /// Connects and authenticates with `token`; each welcome's data-plane key goes to `dataKey`.
    public init(
        url: String, token: ClusterToken, dataKey: ClusterToken = ClusterToken(""), name: String, timeout: Double = 10,
        clock: @escaping Clock = monotonicClock,
        onConnect: @escaping @Sendable (Int, SegmentID, Bool) -> Void = { _, _, _ in }
    ) throws(KVError) {
        address = try Address(url: url)
        tenant = address.tenant
        // `connect` resolves the master (for etcd: asks for the leader) and records it here.
        dialed = Locked(address.fixed ?? ("", 0))
        self.token = token
        self.dataKey = dataKey
        self.name = name
        self.timeout = timeout
        self.clock = clock
        self.onConnect = onConnect
        stopPipe = try WakePipe()
        let welcome = try link.withLock { (l: inout Link) throws(KVError) in try connect(&l).welcome }
        onConnect(1, 0, sharesPIDs)
        policy.leaseTTL = welcome.leaseTTL
        policy.inPlaceUpserts = false
        clientTTL = welcome.clientTTL
        if welcome.writeTimeout > 0 { writeTimeout = welcome.writeTimeout }
    }

    /// The connection's local address: where peers on other hosts can reach this client.
    public var localHost: String { link.withLock { $0.localHost } }

    /// Whether the connection runs over the master's local socket (same host), not TCP.
    public var isLocal: Bool { link.withLock { $0.local } }

    /// Whether this process shares the master's PID namespace (see `Link.sharesPIDs`).
    public var sharesPIDs: Bool { link.withLock { $0.sharesPIDs } }

    /// Mounts this client's segment; remembered for reconnects.
    public func mount(_ m: Mount) throws(KVError) -> SegmentID {
        try link.withLock { (l: inout Link) throws(KVError) -> SegmentID in
            try send(m, &l)
            onConnect(l.epoch, l.segment, l.sharesPIDs)
            return l.segment
        }
    }

    /// Starts the heartbeat thread (every quarter of the client TTL, when idle).
    public func startHeartbeat() throws(KVError) {
        heartbeat = try BackgroundThread { [unowned self] in self.heartbeatLoop() }
    }

    /// Stops the heartbeat, leaves (best effort: the master departs this client at once,
    /// unmounting its segment) and closes the connection. Idempotent.
    public func close() {
        stopPipe.wake()
        heartbeat?.join()
        heartbeat = nil
        link.withLock { l in
            if l.socket != nil { _ = try? self.expect(&l, .leave) }
            l.socket?.close()
            l.socket = nil
            l.mount = nil
        }
    }

    // MARK: MasterLink

    public func beginWrite(
        key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions,
        preferred: SegmentID?
    ) throws(KVError) -> WriteTicket {
        try link.withLock { (l: inout Link) throws(KVError) -> WriteTicket in
            let sentAt = clock()
            guard case .putStarted(let w) = try expect(&l, .putStart(key: key, size: size, mode: mode, options: options, preferred: preferred)) else {
                throw KVError(.internal, "unexpected answer to putStart")
            }
            return try started(w, key: key, size: size, options: options, sentAt: sentAt, &l)
        }
    }

    public func beginWrites(
        _ items: [BatchWrite], mode: WriteMode, options: WriteOptions, preferred: SegmentID?,
        started: (Range<Int>, [Result<WriteTicket, KVError>]) -> Void
    ) throws(KVError) {
        try streamed(
            items.count, { r in .putStartBatch(items: Array(items[r]), mode: mode, options: options, preferred: preferred) },
            decode: { (l: inout Link, range: Range<Int>, sentAt: Nanoseconds, answer: MasterResponse) throws(KVError) -> [Result<WriteTicket, KVError>] in
                guard case .putStartedBatch(let rs) = answer, rs.count == range.count else {
                    throw KVError(.internal, "unexpected answer to putStartBatch")
                }
                return zip(range, rs).map { i, r in
                    r.flatMap { w in
                        Result { () throws(KVError) in try self.started(w, key: items[i].key, size: items[i].size, options: options, sentAt: sentAt, &l) }
                    }
                }
            }, handle: started)
    }

    /// The ticket of a write the master started on this connection, asked for at `sentAt`
    /// (remembered until it is committed or aborted). Its deadline is the write timeout after
    /// `sentAt`, less a margin (as `leaseEnd`): the master, which started the write later,
    /// keeps its space at least that long, so a copy begun before the deadline lands in space
    /// that is still this write's.
    private func started(
        _ w: StartedWrite, key: ObjectKey, size: Int, options: WriteOptions, sentAt: Nanoseconds,
        _ l: inout Link
    ) throws(KVError) -> WriteTicket {
        var t = try w.ticket(size: size)
        t.deadline = Self.leaseEnd(sentAt: sentAt, ttl: writeTimeout)
        if w.window < writeTimeout { t.beginBy = Self.leaseEnd(sentAt: sentAt, ttl: w.window) }
        l.writes[t.handle] = (sentAt, t.segment == l.segment && l.segment != 0 ? (key, options) : nil)
        return t
    }

    /// A write older than this when it commits has its commit confirmed before the put
    /// returns: the master aborts writes not committed within its write timeout (300 s by
    /// default), and a pipelined commit it then refuses would otherwise be acknowledged and
    /// lost. A fifth of the master's write timeout when that is shorter (`slowCommitAfter`).
    public static let slowCommit: Nanoseconds = 60_000_000_000

    /// The age past which a write's commit is confirmed: `slowCommit`, or a fifth of the
    /// master's write timeout when that is less (a master run with `--write-timeout 1`).
    public var slowCommitAfter: Nanoseconds { min(Self.slowCommit, writeTimeout / 5) }

    /// Whether write `h` started more than `slowCommitAfter` ago.
    private func isSlow(_ h: VersionHandle, _ l: Link) -> Bool {
        let after = slowCommitAfter
        return l.writes[h].map { clock() &- $0.sentAt > after } ?? false
    }

    /// Waits until the master has handled everything sent before (one round trip); false when
    /// a pipelined commit was refused meanwhile.
    private func confirmCommits(_ l: inout Link) throws(KVError) -> Bool {
        let before = commitFailures.load(ordering: .relaxed)
        _ = try expect(&l, .heartbeat)
        return commitFailures.load(ordering: .relaxed) == before
    }

    static let refusedSlowWrite = KVError(.transfer, "the master refused this write's commit (it outlived the master's write timeout); it was not stored")

    public func commitWrite(_ t: WriteTicket) throws(KVError) {
        try link.withLock { (l: inout Link) throws(KVError) in
            let slow = isSlow(t.handle, l)
            var frames = WireWriter()
            guard pipeline(.putCommit(handle: t.handle, checksum: t.checksum), t, into: &frames, &l) else { throw Self.lostWrite }
            guard send(frames, &l) else {
                orphan([t.handle], &l)
                throw Self.lostWrite
            }
            try confirmIfMany(&l)
            if slow, try !confirmCommits(&l) { throw Self.refusedSlowWrite }
        }
    }

    public func abortWrite(_ t: WriteTicket) throws(KVError) {
        link.withLock { l in
            var frames = WireWriter()
            if pipeline(.putAbort(handle: t.handle), t, into: &frames, &l), !send(frames, &l) { orphan([t.handle], &l) }
        }
    }

    /// Sends the commits and aborts pipelined, in one write.
    public func finishWrites(commit: [WriteTicket], abort: [WriteTicket]) -> [KVError?] {
        link.withLock { (l: inout Link) -> [KVError?] in
            var frames = WireWriter()
            let slow = commit.map { isSlow($0.handle, l) }
            let aborted = abort.filter { a in pipeline(.putAbort(handle: a.handle), a, into: &frames, &l) }
            let sent = commit.map { c in pipeline(.putCommit(handle: c.handle, checksum: c.checksum), c, into: &frames, &l) }
            let delivered = send(frames, &l)
            if !delivered { orphan(aborted.map(\.handle) + zip(commit, sent).filter(\.1).map(\.0.handle), &l) }
            if delivered { try? confirmIfMany(&l) }
            // A refusal cannot be tied to one commit: every slow one is then reported unstored
            // (one that was stored after all is safe to write again).
            let confirmed = !delivered || !slow.contains(true) || ((try? confirmCommits(&l)) ?? false)
            return zip(sent, slow).map { s, isSlow in !(s && delivered) ? Self.lostWrite : (isSlow && !confirmed ? Self.refusedSlowWrite : nil) }
        }
    }

    static let lostWrite = KVError(.transfer, "the connection to the master was lost during this write; it was not stored")

    /// Appends the commit or abort `r` of write `h` to `frames` (pipelined: the master answers
    /// it only when it fails, and that answer is read before the next one). False when `h` is
    /// not a write of this connection (it was lost with an earlier connection).
    private func pipeline(_ r: MasterRequest, _ t: WriteTicket, into frames: inout WireWriter, _ l: inout Link) -> Bool {
        let h = t.handle
        guard let w = l.writes.removeValue(forKey: h) else { return false }
        frames.frame(kind: r.kind, requestID: l.nextID, payload: r.encode())
        if case let .putCommit(_, checksum) = r {
            // What a restarted master is told of a write into this client's own segment when its
            // commit may not have arrived (seq 1: below every commit the old master numbered, so
            // any report it noticed wins).
            let object = w.own.map { ObjectTable.Restored(key: $0.key, offset: t.offset, size: t.size, seq: 1, options: $0.options, checksum: checksum) }
            l.unconfirmed.append((l.nextID, PipelinedCommit(handle: h, checksum: checksum), Replica(segment: t.segment, offset: t.offset), object))
        }
        l.nextID &+= 1
        return true
    }

    /// Writes whose commit or abort was not sent (the connection was lost): they were
    /// reported unstored, so a resume aborts them.
    private func orphan(_ hs: [VersionHandle], _ l: inout Link) {
        l.unconfirmed.removeAll { u in hs.contains(u.commit.handle) }
        l.orphans += hs
        if l.orphans.count > Self.maxUnconfirmed { l.orphans.removeFirst(l.orphans.count - Self.maxUnconfirmed) }
    }

    /// One round trip when many commits went out with no answer after them, so a resume
    /// never has more than `maxUnconfirmed` to send again.
    private func confirmIfMany(_ l: inout Link) throws(KVError) {
        if l.unconfirmed.count >= Self.maxUnconfirmed { _ = try expect(&l, .heartbeat) }
    }

    /// Writes `frames` after the queued hold releases and notice confirmation (nothing to
    /// write is a success); false when the connection is lost.
    private func send(_ pipelined: WireWriter, _ l: inout Link) -> Bool {
        var frames = WireWriter()
        takeReleases(into: &frames, &l)
        takeConfirmation(into: &frames, &l)
        frames.append(pipelined)
        guard !frames.bytes.isEmpty else { return true }
        guard let s = l.socket else { return false }
        do throws(KVError) {
            try rethrowingKVError { try frames.bytes.withUnsafeBytes { try s.writeAll($0) } }
            return true
        } catch {
            _ = lost(&l, error)
            return false
        }
    }

    public func acquireReads(
        keys: [ObjectKey], host: String,
        found: (Range<Int>, [Result<ReadResult, KVError>]) -> Void
    ) throws(KVError) {
        try streamed(
            keys.count, { r in .getBatch(keys: Array(keys[r]), host: host) },
            decode: { (l: inout Link, range: Range<Int>, sentAt: Nanoseconds, answer: MasterResponse) throws(KVError) -> [Result<ReadResult, KVError>] in
                guard case .foundBatch(let rs) = answer, rs.count == range.count else {
                    throw KVError(.internal, "unexpected answer to getBatch")
                }
                for case .success(let f) in rs where f.hold != 0 { l.holds[f.hold, default: 0] += 1 }
                let ttl = l.leaseTTL
                return rs.map { r in
                    switch r { // a missing object is `.notFound`, not an error
                    case .success(let f):
                        Result { () throws(KVError) in .found(try f.ticket(leaseEnd: Self.leaseEnd(sentAt: sentAt, ttl: min(ttl, f.lease)))) }
                    case .failure(let e) where e.code == .objectNotFound: .success(.notFound)
                    case .failure(let e): .failure(e)
                    }
                }
            }, handle: found)
    }

    public func beginCopy(key: ObjectKey, to targets: [SegmentID], dropping: SegmentID?) throws(KVError) -> CopyTicket {
        try link.withLock { (l: inout Link) throws(KVError) -> CopyTicket in
            let sentAt = clock()
            guard case let .copyStarted(c, lease, window) = try expect(&l, .copyStart(key: key, targets: targets, drop: dropping)) else {
                throw KVError(.internal, "unexpected answer to copyStart")
            }
            return CopyTicket(
                copy: c, leaseEnd: Self.leaseEnd(sentAt: sentAt, ttl: min(l.leaseTTL, lease)),
                beginBy: Self.leaseEnd(sentAt: sentAt, ttl: min(writeTimeout, window)),
                deadline: Self.leaseEnd(sentAt: sentAt, ttl: writeTimeout))
        }
    }

    public func endCopy(_ handle: UInt64, commit: Bool) throws(KVError) {
        _ = try call(.copyEnd(handle: handle, commit: commit))
    }

    /// Drains this client's segment, now and after every remount (`reconnectIfNeeded`).
    public func drainSegment() throws(KVError) {
        try link.withLock { (l: inout Link) throws(KVError) in
            guard l.segment != 0 else { throw KVError(.invalidArgument, "this client has no segment to drain") }
            _ = try expect(&l, .drain(segment: l.segment))
            l.drained = true
        }
    }

    /// The reader's deadline for a lease asked for at `sentAt` (this client's clock): the
    /// master starts the lease when it handles the request, after `sentAt`, so a copy that
    /// ends before `sentAt + leaseTTL` ended inside the lease. The margin (1/32 of the TTL,
    /// at least 1 ms) covers the two clocks' rates (NTP slews at most 0.05%) and the few
    /// instructions a CPU may run ahead of its loads.
    public static func leaseEnd(sentAt: Nanoseconds, ttl: Nanoseconds) -> Nanoseconds {
        let margin = max(ttl / 32, 1_000_000)
        return ttl > margin ? sentAt &+ (ttl - margin) : sentAt
    }

    /// Keys per request of a batch with nothing to copy (`sizeBatch`, `removeBatch`): at most
    /// 1 MiB of keys a request, and few round trips (10,000 keys: 10).
    static let keysChunk = 1024

    /// `lease` of several keys: each key's size, or nil when it is absent. One request per
    /// `keysChunk` keys, the next sent before this one's answer is read.
    public func leases(keys: [ObjectKey]) throws(KVError) -> [Int?] {
        var out: [Int?] = []
        out.reserveCapacity(keys.count)
        try streamed(
            keys.count, firstChunk: Self.keysChunk, chunk: Self.keysChunk, { r in .sizeBatch(keys: Array(keys[r])) },
            decode: { (_: inout Link, range: Range<Int>, _: Nanoseconds, answer: MasterResponse) throws(KVError) -> [Int?] in
                guard case .sizes(let ns) = answer, ns.count == range.count else { throw KVError(.internal, "unexpected answer to sizeBatch") }
                return ns
            }, handle: { _, ns in out.append(contentsOf: ns) })
        return out
    }

    /// `remove` of several keys: one error per key (nil: removed). Chunked like `leases`.
    public func remove(keys: [ObjectKey], force: Bool) throws(KVError) -> [KVError?] {
        try keyBatches(keys, "removeBatch") { .removeBatch(keys: $0, force: force) }.map { r in
            if case .failure(let e) = r { e } else { nil }
        }
    }

    /// The `values` answers of `request` for `keys`, `keysChunk` keys per request.
    private func keyBatches(
        _ keys: [ObjectKey], _ name: String,
        _ request: ([ObjectKey]) -> MasterRequest
    ) throws(KVError) -> [Result<Int, KVError>] {
        var out: [Result<Int, KVError>] = []
        out.reserveCapacity(keys.count)
        try streamed(
            keys.count, firstChunk: Self.keysChunk, chunk: Self.keysChunk, { r in request(Array(keys[r])) },
            decode: { (_: inout Link, range: Range<Int>, _: Nanoseconds, answer: MasterResponse) throws(KVError) -> [Result<Int, KVError>] in
                guard case .values(let rs) = answer, rs.count == range.count else { throw KVError(.internal, "unexpected answer to \(name)") }
                return rs
            }, handle: { _, rs in out.append(contentsOf: rs) })
        return out
    }

    /// Items per request of a streamed batch: small enough that the first answer comes
    /// quickly and the caller's copies of one chunk overlap the master's work on the next.
    static let streamChunk = 32
    static let firstChunk = 8

    /// Asks for `count` items in chunks (`request` builds a chunk's request): chunk k+1 is
    /// sent before chunk k's answer is handled, so the master works while `handle` runs.
    /// `decode` runs under the connection's lock, `handle` outside it (it may ask the master
    /// for a segment's address: an answer meant for this batch is then parked for it).
    private func streamed<R>(
        _ count: Int, firstChunk: Int = RemoteMaster.firstChunk, chunk: Int = RemoteMaster.streamChunk,
        _ request: (Range<Int>) -> MasterRequest,
        decode: (inout Link, Range<Int>, Nanoseconds, MasterResponse) throws(KVError) -> [R],
        handle: (Range<Int>, [R]) -> Void
    ) throws(KVError) {
        // A small first chunk, so copying starts soon; then chunks of `chunk`.
        let first = min(count, firstChunk)
        let chunks =
            (first > 0 ? [0..<first] : [])
            + stride(from: first, to: count, by: chunk).map { $0..<min($0 + chunk, count) }
        guard !chunks.isEmpty else { return }
        var ids: [UInt32] = []
        ids.reserveCapacity(chunks.count)
        var sentAt: [Nanoseconds] = [] // when each chunk's request left (before it was written)
        sentAt.reserveCapacity(chunks.count)
        var received = 0
        defer { // after a failure: the answer to the chunk already sent is read and dropped
            link.withLock { l in for id in ids[received...] where l.socket != nil { _ = try? receive(&l, id) } }
        }
        for (k, range) in chunks.enumerated() {
            let results = try link.withLock { (l: inout Link) throws(KVError) -> [R] in
                if k == 0 {
                    sentAt.append(clock())
                    ids.append(try send(&l, request(range), awaited: true))
                }
                if k + 1 < chunks.count {
                    sentAt.append(clock())
                    ids.append(try send(&l, request(chunks[k + 1]), awaited: true))
                }
                let answer = try receive(&l, ids[k])
                received += 1
                if case .error(let e) = answer { throw e }
                return try decode(&l, range, sentAt[k], answer)
            }
            handle(range, results)
        }
    }

    public func acquireRead(key: ObjectKey, host: String) throws(KVError) -> ReadResult {
        do throws(KVError) {
            let (answer, end) = try link.withLock { (l: inout Link) throws(KVError) in
                let sentAt = clock()
                let answer = try expect(&l, .get(key: key, host: host))
                if case .found(let f) = answer, f.hold != 0 { l.holds[f.hold, default: 0] += 1 }
                let lease = if case .found(let f) = answer { min(l.leaseTTL, f.lease) } else { l.leaseTTL }
                return (answer, Self.leaseEnd(sentAt: sentAt, ttl: lease))
            }
            guard case .found(let f) = answer else { throw KVError(.internal, "unexpected answer to get") }
            return .found(try f.ticket(leaseEnd: end))
        } catch  where error.code == .objectNotFound {
            return .notFound
        }
    }

    /// Queues the end of read hold `handle` (0: none): it goes out with the next request,
    /// at once when many are queued. The master ends it with its lease anyway.
    public func releaseRead(_ handle: VersionHandle) throws(KVError) {
        guard handle != 0 else { return }
        link.withLock { l in
            guard let n = l.holds[handle] else { return }
            l.holds[handle] = n == 1 ? nil : n - 1
            l.releases.append(handle)
            if l.releases.count >= Self.releaseBatch { _ = send(WireWriter(), &l) }
        }
    }

    /// Queued hold releases that are sent without waiting for another request.
    static let releaseBatch = 256

    /// Appends the queued hold releases to `frames` (before the request they ride with).
    private func takeReleases(into frames: inout WireWriter, _ l: inout Link) {
        guard !l.releases.isEmpty, l.socket != nil else { return }
        var i = 0
        while i < l.releases.count { // a request carries at most maxBatch
            let chunk = Array(l.releases[i..<min(i + MasterLimits.maxBatch, l.releases.count)])
            let r = MasterRequest.release(holds: chunk)
            frames.frame(kind: r.kind, requestID: l.nextID, payload: r.encode())
            l.nextID &+= 1
            i += chunk.count
        }
        l.releases.removeAll(keepingCapacity: true)
    }

    /// Appends a confirmation of the notices applied since the last one (`confirmNotices`).
    private func takeConfirmation(into frames: inout WireWriter, _ l: inout Link) {
        guard l.noticed > l.confirmed, l.segment != 0, l.socket != nil else { return }
        let r = MasterRequest.confirmNotices(segment: l.segment, through: l.noticed)
        frames.frame(kind: r.kind, requestID: l.nextID, payload: r.encode())
        l.nextID &+= 1
        l.confirmed = l.noticed
    }

    public func lease(key: ObjectKey) throws(KVError) -> Int? {
        do throws(KVError) {
            guard case .value(let n) = try call(.size(key: key)) else { throw KVError(.internal, "unexpected answer to size") }
            return n
        } catch  where error.code == .objectNotFound {
            return nil
        }
    }

    public func remove(key: ObjectKey, force: Bool) throws(KVError) {
        _ = try call(.remove(key: key, force: force))
    }

    public func removeAll(force: Bool) throws(KVError) -> Int {
        guard case .value(let n) = try call(.removeAll(force: force)) else { throw KVError(.internal, "unexpected answer to removeAll") }
        return n
    }

    public func publishLayout(_ p: PublishedLayout) throws(KVError) {
        try link.withLock { (l: inout Link) throws(KVError) in
            _ = try expect(&l, .publishLayout(p))
            l.layout = p
        }
    }

    public func keysPage(after: ObjectKey?) throws(KVError) -> ObjectTable.KeysPage {
        guard case let .keys(ks, more) = try call(.listKeys(after: after)) else { throw KVError(.internal, "unexpected answer to listKeys") }
        let page = ObjectTable.KeysPage(keys: ks, more: more)
        try page.validate(after: after)
        return page
    }

    public func fetchLayout(node: String) throws(KVError) -> PublishedLayout {
        guard case .layout(let p) = try call(.fetchLayout(node: node)) else { throw KVError(.internal, "unexpected answer to fetchLayout") }
        return p
    }

    public func unpublishLayout(node: String) throws(KVError) {
        try link.withLock { (l: inout Link) throws(KVError) in
            if l.layout?.node == node { l.layout = nil }
            _ = try expect(&l, .unpublishLayout(node: node))
        }
    }

    /// The cluster's table counters, from the master.
    public func statistics() throws(KVError) -> CacheStatistics {
        guard case .stats(let s) = try call(.stats) else { throw KVError(.internal, "unexpected answer to stats") }
        return CacheStatistics(s)
    }

    /// Segments the master has unmounted since it started, and the epoch the answer belongs to.
    public func unmountCount() throws(KVError) -> (Int, Int) {
        try link.withLock { (l: inout Link) throws(KVError) -> (Int, Int) in
            guard case .value(let n) = try expect(&l, .unmountCount) else { throw KVError(.internal, "unexpected answer to unmountCount") }
            return (n, l.epoch)
        }
    }

    /// One round of this client's disk tier (`MasterRequest.diskRound`); returns the answer
    /// and the epoch it belongs to. The offers' holds are this client's to release
    /// (`releaseRead`) once their bytes are read.
    func diskRound(
        segment: SegmentID, disk: UInt64, capacity: Int, reports: [DiskReport], dropped: [UInt64], want: Int
    ) throws(KVError) -> (offers: [DiskOffer], forget: [UInt64], epoch: Int) {
        try link.withLock { (l: inout Link) throws(KVError) -> ([DiskOffer], [UInt64], Int) in
            let answer = try expect(
                &l, .diskRound(segment: segment, disk: disk, capacity: capacity, reports: reports, dropped: dropped, want: want))
            guard case let .diskRound(offers, forget) = answer else { throw KVError(.internal, "unexpected answer to diskRound") }
            for o in offers { l.holds[o.handle, default: 0] += 1 }
            return (offers, forget, l.epoch)
        }
    }

    /// Registers disk tier files again (`MasterRequest.diskRestore`); one flag per file
    /// (false: refused, delete it).
    func diskRestore(segment: SegmentID, files: [DiskFile]) throws(KVError) -> [Bool] {
        try link.withLock { (l: inout Link) throws(KVError) -> [Bool] in
            guard case let .values(rs) = try expect(&l, .diskRestore(segment: segment, files: files)), rs.count == files.count else {
                throw KVError(.internal, "unexpected answer to diskRestore")
            }
            return rs.map { (try? $0.get()) == 1 }
        }
    }

    /// The link's epoch now (it moves at every reconnect).
    var epoch: Int { link.withLock { $0.epoch } }

    /// Where segment `seg` lives, and the epoch the answer belongs to.
    public func segmentInfo(_ seg: SegmentID) throws(KVError) -> (SegmentInfo, Int) {
        try link.withLock { (l: inout Link) throws(KVError) -> (SegmentInfo, Int) in
            guard case .segment(let info) = try expect(&l, .segmentInfo(segment: seg)) else {
                throw KVError(.internal, "unexpected answer to segmentInfo")
            }
            return (info, l.epoch)
        }
    }

    /// Least time between two attempts to reach a lost master.
    static let retryInterval: Nanoseconds = 200_000_000

    /// Dials the master again when the connection was lost (at most every 200 ms): waits for
    /// operations using segment memory, reconnects, remounts. A call that comes within 200 ms
    /// of a failed attempt (the heartbeat thread's, during an election, say) waits for the
    /// next attempt rather than failing at once. Throws `transfer` while the master stays
    /// unreachable.
    public func reconnectIfNeeded() throws(KVError) {
        var (lost, since, why) = link.withLock { l in (l.socket == nil, clock() &- l.lastAttempt, l.lastFailure) }
        guard lost else { return }
        if since < Self.retryInterval {
            let pause = UInt32((Self.retryInterval - since) / 1000) + 1
            _ = WaitHooks.waiting { usleep(pause) } // the GIL is released meanwhile
            (lost, since, why) = link.withLock { l in (l.socket == nil, clock() &- l.lastAttempt, l.lastFailure) }
            guard lost else { return }
            // Another thread's attempt failed meanwhile: report it rather than dial again.
            if since < Self.retryInterval { throw KVError(.transfer, "the master at \(host):\(port) is unreachable (\(why)); retrying") }
        }
        dataLock.lockExclusive()
        defer { dataLock.unlock() }
        try link.withLock { (l: inout Link) throws(KVError) in
            guard l.socket == nil else { return }
            let resumed = try connect(&l).resumed
            _ = reconnects.add(1, ordering: .relaxed)
            if !resumed {
                if let m = l.mount {
                    try send(m, &l)
                    try restoreIndex(&l)
                    if l.drained { _ = try expect(&l, .drain(segment: l.segment)) }
                }
                // The layout's memory and server outlive the master: publish it again (another
                // client may have taken the node id meanwhile: then it stays unpublished).
                if let p = l.layout, (try? expect(&l, .publishLayout(p))) == nil { l.layout = nil }
            }
            onConnect(l.epoch, l.segment, l.sharesPIDs)
            Logger.shared.info(
                "reconnected to the master at \(host):\(port) (reconnect \(reconnects.load(ordering: .relaxed)))"
                    + (resumed
                        ? "; resumed this client's session: its segment and objects are kept"
                        : l.mount != nil ? "; this client's segment was remounted as \(l.segment), \(l.index.count) of its objects re-registered" : ""))
        }
    }

    /// Reports this client's segment's objects (`index`) to a master that restarted, in
    /// ascending offsets; forgets those it refused.
    private func restoreIndex(_ l: inout Link) throws(KVError) {
        let all = l.index.values.sorted { $0.offset < $1.offset }
        var i = 0
        repeat { // at least one request: the last one lets the segment take new objects
            let chunk = Array(all[i..<min(i + MasterLimits.maxBatch, all.count)])
            let last = i + chunk.count == all.count
            guard case .values(let rs) = try expect(&l, .restore(segment: l.segment, objects: chunk, last: last)), rs.count == chunk.count else {
                throw KVError(.internal, "unexpected answer to restore")
            }
            for (o, r) in zip(chunk, rs) {
                if case .success(1) = r { _ = restoredObjects.add(1, ordering: .relaxed) } else { l.index[o.offset] = nil }
            }
            i += chunk.count
        } while i < all.count
    }

    /// Handles the frames that are already here, without waiting: notices, and answers to
    /// pipelined requests that failed (an idle owner's heartbeat thread calls it when the
    /// connection turns readable, so notices never pile up unread).
    /// Returns false when the connection turned out closed or broken.
    @discardableResult
    private func drainReady(_ l: inout Link) -> Bool {
        guard let s = l.socket else { return false }
        while true {
            let next: (WireFrameHeader, [UInt8])?
            do throws(KVError) { next = try l.reader.nextIfReady(s, isKnown: MasterResponse.isResponseKind) } catch { return false }
            guard let frame = next else { return true }
            guard let answer = try? frame.1.withUnsafeBytes({ (b) throws(KVError) in try MasterResponse.decode(kind: frame.0.kind, b) }) else { return false }
            let rid = frame.0.requestID
            if rid == 0, case .notices(let ns) = answer { Self.apply(ns, &l); continue }
            if !l.unconfirmed.isEmpty { l.unconfirmed.removeAll { u in Int32(bitPattern: rid &- u.id) >= 0 } }
            if l.awaited.contains(rid) { l.parked[rid] = answer } else { _ = commitFailures.add(1, ordering: .relaxed) }
        }
    }

    /// Applies the master's notices about this client's segment to `index`. A notice that
    /// does not fit the segment (a master that lies, or a bug) is dropped: the index never
    /// holds more entries than the segment has granules.
    ///
    /// Notices are numbered per segment. One numbered past the next expected says some were
    /// lost (with a connection): the index may then list objects whose space was reused, so
    /// it is dropped (a restarted master then gets nothing from this client rather than a
    /// wrong object). The numbers applied are confirmed to the master (`takeConfirmation`).
    static func apply(_ notices: [ObjectTable.SegmentNotice], _ l: inout Link) {
        guard l.segment != 0, let size = l.mount?.size else { return }
        for n in notices where n.segment == l.segment {
            if n.number <= l.noticed { continue } // heard already
            if n.number != l.noticed &+ 1 { l.index.removeAll() }
            l.noticed = n.number
            guard n.offset >= 0, n.offset < size, n.offset % SegmentAllocator.granule == 0 else { continue }
            if let o = n.object {
                guard o.offset == n.offset, o.size > 0, o.size <= size - n.offset else { continue }
                l.index[n.offset] = o
                // The master applied this commit: the index now follows it (not re-reported).
                // (The offset is compared first: reading `object` copies it, key and all, and
                // this runs for every notice over every unconfirmed commit.)
                l.unconfirmed.withUnsafeMutableBufferPointer { u in
                    for i in u.indices where u[i].place.offset == n.offset && u[i].object != nil { u[i].object = nil }
                }
            } else if l.index[n.offset]?.seq == n.seq {
                l.index[n.offset] = nil
            }
        }
    }

    // MARK: connection

    /// One request and its answer; throws the master's error.
    private func call(_ r: MasterRequest) throws(KVError) -> MasterResponse {
        try link.withLock { (l: inout Link) throws(KVError) in try expect(&l, r) }
    }

    /// Mounts `m` on this connection and remembers it (for remounts after a reconnect).
    private func send(_ m: Mount, _ l: inout Link) throws(KVError) {
        // A remount (after a reconnect) says so, and under which term the memory last served:
        // readers may still copy under that master's leases.
        let reused = l.mount != nil ? l.mountTerm : nil
        let request = MasterRequest.mount(size: m.size, host: m.host, sharePath: m.sharePath, endpoint: m.endpoint, reused: reused)
        let answer = try receive(&l, try send(&l, request, attaching: l.local ? m.shareFD : -1))
        if case .error(let e) = answer { throw e }
        guard case .mounted(let seg) = answer else {
            throw KVError(.internal, "unexpected answer to mount")
        }
        l.mount = m
        l.mountTerm = term.load(ordering: .relaxed)
        l.segment = seg
        l.noticed = 0 // a new segment id: its notices are numbered from 1
        l.confirmed = 0
    }

    /// Sends `r`, reads the pipelined answers before it, returns its answer; throws the
    /// master's error.
    private func expect(_ l: inout Link, _ r: MasterRequest) throws(KVError) -> MasterResponse {
        let response = try receive(&l, try send(&l, r))
        if case .error(let e) = response { throw e }
        return response
    }

    /// Sends `r`; returns its request id. `awaited`: its answer may be read by another call
    /// first, which parks it.
    /// `attaching`: a descriptor sent with the request's bytes (local socket only; -1: none).
    private func send(_ l: inout Link, _ r: MasterRequest, awaited: Bool = false, attaching fd: Int32 = -1) throws(KVError) -> UInt32 {
        guard let s = l.socket else {
            throw KVError(.transfer, "the connection to the master at \(host):\(port) was lost (\(l.lastFailure))")
        }
        var frames = WireWriter()
        takeReleases(into: &frames, &l)
        takeConfirmation(into: &frames, &l)
        let id = l.nextID
        l.nextID &+= 1
        do throws(KVError) {
            if fd >= 0 {
                frames.frame(kind: r.kind, requestID: id, payload: r.encode())
                try rethrowingKVError { try frames.bytes.withUnsafeBytes { try s.writeAll($0, attaching: fd) } }
            } else if frames.bytes.isEmpty {
                try s.writeFrame(kind: r.kind, requestID: id, payload: r.encode())
            } else {
                frames.frame(kind: r.kind, requestID: id, payload: r.encode())
                try rethrowingKVError { try frames.bytes.withUnsafeBytes { try s.writeAll($0) } }
            }
        } catch {
            throw lost(&l, error)
        }
        if awaited { l.awaited.insert(id) }
        return id
    }

    /// Reads answers until the one to request `id` (the ones before it answer pipelined
    /// commits and aborts that failed).
    private func receive(_ l: inout Link, _ id: UInt32) throws(KVError) -> MasterResponse {
        if let parked = l.parked.removeValue(forKey: id) {
            l.awaited.remove(id)
            return parked
        }
        guard let s = l.socket else {
            throw KVError(.transfer, "the connection to the master at \(host):\(port) was lost (\(l.lastFailure))")
        }
        do throws(KVError) {
            while true {
                let (rid, answer) = try readResponse(s, &l.reader)
                if rid == 0, case .notices(let ns) = answer {
                    Self.apply(ns, &l)
                    continue
                }
                // The master answers in order: every commit sent before `rid` was handled.
                if !l.unconfirmed.isEmpty { l.unconfirmed.removeAll { u in Int32(bitPattern: rid &- u.id) >= 0 } }
                if rid == id {
                    l.lastRequest = clock()
                    l.awaited.remove(id)
                    return answer
                }
                if l.awaited.contains(rid) { l.parked[rid] = answer; continue } // a streamed batch's
                _ = commitFailures.add(1, ordering: .relaxed)
            }
        } catch {
            throw lost(&l, error)
        }
    }

    /// How long a call spins for the master's answer before blocking (a loopback or LAN
    /// round trip fits; it saves a scheduler wake-up per request).
    static let spinNanos = 200_000

    private func readResponse(_ s: Socket, _ reader: inout FrameReader) throws(KVError) -> (UInt32, MasterResponse) {
        let (h, payload) = try reader.next(s, isKnown: MasterResponse.isResponseKind)
        return (h.requestID, try rethrowingKVError { try payload.withUnsafeBytes { try MasterResponse.decode(kind: h.kind, $0) } })
    }

    /// Marks the connection lost; returns the error for the caller. Writes, holds and
    /// releases are kept for a resume (`connect` drops them when the session is gone). The
    /// notices the master sent before it went are read first (they may be all that is left of
    /// what its segment holds).
    private func lost(_ l: inout Link, _ e: KVError) -> KVError {
        drainReady(&l)
        l.socket?.close()
        l.socket = nil
        l.awaited.removeAll()
        l.parked.removeAll()
        l.lastFailure = e.message
        return KVError(.transfer, "lost the connection to the master at \(host):\(port): \(e.message)")
    }

    /// Dials and says hello, then resumes this client's session when it had one; returns the
    /// welcome and whether the session was resumed. When the welcome names a local socket
    /// this process can reach (same host and network namespace), the link moves there: hello
    /// again on it, then the TCP connection closes (`KVSTORE_MASTER_LOCAL=0`: stay on TCP).
    private func connect(_ l: inout Link) throws(KVError) -> (welcome: Welcome, resumed: Bool) {
        l.lastAttempt = clock()
        token.reload() // a restarted master wrote a new token file
        do throws(KVError) {
            // A master elected on etcd: dial the leader etcd names now.
            let (host, port, term) = try address.resolve()
            dialed.withLock { $0 = (host, port) }
            let s = try Socket.connect(host: host, port: port, timeout: min(timeout, 5))
            guard !token.bytes.isEmpty else {
                s.close()
                let file = (try? TokenFile.path(port: port)).map { " (or run as the master's user on its host: it writes \($0))" } ?? ""
                throw KVError(.invalidArgument, "no token for the master at \(host):\(port): pass token=... or set KVSTORE_MASTER_TOKEN\(file)")
            }
            l.localHost = s.localHost
            var welcome = try hello(s, &l)
            // The local socket is taken only when the process listening there is the master
            // as this process sees it (same pid: one PID namespace), so that the pids the
            // master verifies name the same processes here.
            // A client kept on TCP (KVSTORE_MASTER_LOCAL=0) still checks, and closes the socket.
            var probe: Socket? = nil
            if !welcome.local.isEmpty, let u = try? Socket.connectLocal(name: welcome.local),
                let cred = u.peerCredentials, Int(cred.pid) == welcome.pid
            {
                probe = u
            }
            l.sharesPIDs = probe != nil
            if let u = probe, Self.useLocalSocket {
                let tcp = l.socket
                if let w = try? hello(u, &l) {
                    welcome = w
                    l.local = true
                    tcp?.close()
                } else {
                    l.socket = tcp // the local socket failed: stay on the TCP connection
                }
            }
            // Identity from the connection: the master that answered must hold the term etcd
            // named (an address can outlive its leader; a new process may listen there).
            guard address.etcd == nil || welcome.term == term else {
                throw KVError(.transfer, "the master at \(host):\(port) is in term \(welcome.term), not the leader etcd names (term \(term))")
            }
            let previousTerm = self.term.exchange(welcome.term, ordering: .relaxed)
            let newTerm = previousTerm != 0 && previousTerm != welcome.term
            if newTerm {
                _ = failovers.add(1, ordering: .relaxed)
                Logger.shared.info("cluster '\(address.cluster)' elected a new leader at \(host):\(port) (term \(welcome.term))")
            }
            l.epoch += 1
            l.leaseTTL = welcome.leaseTTL
            // A new leader never knows a session of an earlier term (it began empty).
            let resumed = newTerm ? false : try resume(&l)
            if resumed {
                _ = resumes.add(1, ordering: .relaxed)
            } else { // a new session: nothing of the old one exists at this master
                // Commits with no answer after them: those the master applied were noticed (into
                // this client's own segment, then re-registered); the others may be missing.
                // Commits into this client's own segment are re-registered whatever became of them
                // (seq 1: a version the old master noticed wins).
                // Only those the master never noticed (`object` left set): their space cannot have
                // been reused since.
                for u in l.unconfirmed where u.place.segment == l.segment && l.index[u.place.offset] == nil {
                    if let o = u.object { l.index[u.place.offset] = o }
                }
                let unknown = l.unconfirmed.filter { u in u.place.segment != l.segment }.count
                if unknown > 0 {
                    _ = commitFailures.add(unknown, ordering: .relaxed)
                    Logger.shared.warning(
                        "\(unknown) commits sent just before the connection was lost may not have reached the master, which no longer knows this client: those objects may be missing"
                    )
                }
                l.client = welcome.client
                l.secret = l.welcomeSecret
                l.segment = 0
                l.noticed = 0
                l.confirmed = 0
                l.writes.removeAll()
                l.holds.removeAll()
                l.releases.removeAll()
            }
            l.unconfirmed.removeAll()
            l.orphans.removeAll()
            return (welcome, resumed)
        } catch {
            l.socket?.close()
            l.socket = nil
            l.lastFailure = error.message
            if error.code == .invalidArgument { throw error } // a refused token
            throw KVError(
                .transfer, "cannot reach the master at \(host):\(port)\(address.etcd == nil ? "" : " (cluster '\(address.cluster)')"): \(error.message)")
        }
    }

    /// Takes back the session this client held (`l.client`) on the new connection; false
    /// when there was none or the master no longer knows it (it restarted, or the client TTL
    /// passed). Throws only when the connection fails.
    private func resume(_ l: inout Link) throws(KVError) -> Bool {
        guard l.client != 0, !l.secret.isEmpty else { return false }
        let r = MasterRequest.resume(
            client: l.client, proof: HMACSHA256.mac(key: l.secret, message: l.nonces),
            commits: l.unconfirmed.suffix(MasterLimits.maxBatch).map(\.commit),
            aborts: Array(l.orphans.suffix(MasterLimits.maxBatch)))
        do throws(KVError) {
            guard case .value(let n) = try expect(&l, r) else { throw KVError(.internal, "unexpected answer to resume") }
            _ = resumedCommits.add(n, ordering: .relaxed)
            return true
        } catch  where l.socket != nil {
            Logger.shared.warning("the master did not resume this client's session: \(error.message)")
            return false // the master refused: a new session
        }
    }

    /// Makes `s` the link's socket and says hello on it.
    private func hello(_ s: Socket, _ l: inout Link) throws(KVError) -> Welcome {
        s.setTimeout(timeout)
        l.socket = s
        l.local = false
        l.nextID = 1
        l.reader = FrameReader(maxPayload: WireFrameHeader.defaultMaxPayload, spinNanos: Self.spinNanos)
        let secret = token.bytes
        let handshake = ClientHandshake()
        guard case let .challenge(sn, proof) = try expect(&l, .hello(name: name, nonce: handshake.clientNonce, tenant: tenant)) else {
            throw KVError(.internal, "unexpected answer to hello")
        }
        // The master proves the token first: a process holding the master's port without it
        // (after a crash) learns nothing and gets no proof of ours.
        guard let answer = handshake.answer(serverNonce: sn, serverProof: proof, token: secret) else {
            let which = tenant.isEmpty ? "the cluster token" : "the token of tenant '\(tenant)'"
            throw KVError(
                .invalidArgument,
                "the server at \(host):\(port) could not prove \(which): it is not this cluster's master, or the token differs (\(token.hint))")
        }
        let welcome: MasterResponse
        do throws(KVError) {
            welcome = try expect(&l, .prove(proof: answer))
        } catch  where error.code == .invalidArgument {
            throw KVError(.invalidArgument, "\(error.message) (\(token.hint))")
        }
        guard case let .welcome(w) = welcome, w.data.count == 32, w.session.count == 32 else {
            throw KVError(.internal, "unexpected answer to prove")
        }
        dataKey.set(Authentication.mask(w.data, token: secret, clientNonce: handshake.clientNonce, serverNonce: sn))
        l.welcomeSecret = Authentication.mask(w.session, token: secret, clientNonce: handshake.clientNonce, serverNonce: sn)
        l.nonces = handshake.clientNonce + sn
        return w
    }

    /// False when `KVSTORE_MASTER_LOCAL=0`: stay on TCP even on the master's host.
    static var useLocalSocket: Bool {
        Environment.string("KVSTORE_MASTER_LOCAL") != "0"
    }

    /// How often the heartbeat thread reads notices that arrived while no call was reading
    /// (an owner that makes no calls still hears of its segment before the kernel's socket
    /// buffer fills: `drainReady`). It never waits for the link: a call in progress reads them.
    static let noticeDrainNanos: Nanoseconds = 5_000_000

    private func heartbeatLoop() {
        let interval = max(Int32(clientTTL / 4_000_000), 20) // ms
        var nextRound = clock() &+ Nanoseconds(interval) * 1_000_000
        while true {
            // Without a connection, dial again soon (a restarted master wants its segments
            // and their objects back quickly; `reconnectIfNeeded` paces the attempts).
            let connected = link.withLockIfFree { $0.socket != nil } ?? true
            if !connected { nextRound = min(nextRound, clock() &+ 100_000_000) }
            let untilRound = Int(bitPattern: UInt(nextRound &- clock()))
            let wait = min(max(0, untilRound), Int(Self.noticeDrainNanos))
            // An idle client (no request for a drain round: a holder, typically) also wakes
            // when the master writes (it sends notices every 5 ms, and at once when a write
            // waits for room they free): they are applied and confirmed at once. A busy one
            // is not woken by its own answers (that halved 4 KiB puts).
            let idle =
                link.withLockIfFree { l in
                    l.socket.map { s in clock() &- l.lastRequest >= Self.noticeDrainNanos ? s.fd : -1 } ?? -1
                } ?? -1
            var fds = [pollfd(fd: stopPipe.readFD, events: Int16(POLLIN), revents: 0), pollfd(fd: idle, events: Int16(POLLIN), revents: 0)]
            if poll(&fds, 2, Int32((wait + 999_999) / 1_000_000)) > 0, fds[0].revents != 0 { return }
            _ = link.withLockIfFree { l in
                guard l.socket != nil else { return }
                guard drainReady(&l) else { return _ = lost(&l, KVError(.transfer, "the master closed the connection")) }
                if l.noticed > l.confirmed { _ = send(WireWriter(), &l) } // confirms what it applied
            }
            guard clock() >= nextRound else { continue }
            nextRound = clock() &+ Nanoseconds(interval) * 1_000_000
            do throws(KVError) {
                try reconnectIfNeeded()
                try link.withLock { (l: inout Link) throws(KVError) in
                    guard l.socket != nil, clock() &- l.lastRequest >= Nanoseconds(interval) * 1_000_000 else { return }
                    _ = try expect(&l, .heartbeat)
                }
            } catch {
                // Lost or unreachable: the next round (or the next operation) tries again.
            }
            maintenance?()
        }
    }
}
