/// Settings of a master.
public struct MasterConfig: Sendable {
    /// Clients must present this token in `hello` (nil: no token; only for loopback masters).
    public var token: String?
    /// A client not heard from for this long is dead: its segments are unmounted.
    public var clientTTL: Nanoseconds = 10_000_000_000
    /// Leases and eviction; leases must be on (remote readers copy under the lease alone),
    /// and upserts never rewrite in place.
    public var cache: CachePolicy
    /// The local socket name the welcome advertises ("" for none; set by the network master).
    public var localSocket = ""
    /// The master's process id, in the welcome (0: not told; set by the network master).
    public var masterPID = 0
    /// Tenants by name, each with its own token: a client that proves a tenant's token sees
    /// only that tenant's keys and KV layouts (`Tenant`). The cluster's own token (`token`)
    /// sees everything.
    public var tenants: [String: String] = [:]
    /// What one client may hold at once.
    public var quotas = Quotas()
    /// Read-your-writes across connections: a read of a key with a write in flight waits up
    /// to this long for that write's commit (or abort) before it is answered (`mustWait`),
    /// so a put that returned on another host is seen even when its pipelined commit is still
    /// on the wire. 0: never wait.
    public var readWait: Nanoseconds = 50_000_000
    /// The first commit's sequence number (`ObjectTable.nextSeq`): the network master sets its
    /// wall-clock time in nanoseconds, so a restarted master's commits order after the old one's.
    public var sequenceBase: UInt64 = 1
    /// The leadership term of a master elected on etcd, in each welcome (0: not elected).
    public var term: UInt64 = 0

    /// Per-client limits: no client can exhaust the master's memory or hold space forever.
    public struct Quotas: Sendable {
        /// Segments one client may have mounted.
        public var segments = 64
        /// Writes started and not yet committed or aborted.
        public var writesInFlight = 65_536
        /// KV layouts (node ids) one client may publish.
        public var layouts = 64
        /// The share of the cluster's capacity one client's hard-pinned objects may take.
        public var hardPinShare = 0.5
        /// Read holds one client may have outstanding (a reader releases each when its copy
        /// ends; a hold not released ends with its lease).
        public var readsInFlight = 65_536
        /// A write not committed within this time is aborted (its space freed; a commit that
        /// arrives later is refused and counted by the writer in `commit_failures`).
        public var writeTimeout: Nanoseconds = 300_000_000_000
        public init() {}
    }

    public init(token: String? = nil, clientTTL: Nanoseconds = 10_000_000_000, cache: CachePolicy = CachePolicy()) {
        self.token = token
        self.clientTTL = clientTTL
        self.cache = cache
        self.cache.inPlaceUpserts = false
    }

    public func validate() throws(KVError) {
        try cache.validate()
        guard cache.leaseTTL > 0 else { throw .invalidArgument("a master needs read leases: lease TTL must be greater than 0") }
        guard clientTTL > 0 else { throw .invalidArgument("client TTL must be greater than 0") }
        guard quotas.segments > 0, quotas.writesInFlight > 0, quotas.layouts > 0, quotas.writeTimeout > 0,
            quotas.hardPinShare > 0, quotas.hardPinShare <= 1
        else {
            throw .invalidArgument("client quotas must be greater than 0")
        }
        for (name, token) in tenants {
            try Tenant.validate(name: name)
            guard token.utf8.count >= Authentication.minTokenLength else {
                throw .invalidArgument("tenant '\(name)': the token must be at least \(Authentication.minTokenLength) bytes")
            }
            guard token != self.token else { throw .invalidArgument("tenant '\(name)': its token must differ from the cluster's") }
        }
    }
}

/// The master's whole state and logic, without sockets: clients and their segments, writes
/// in flight, and the object table. The network master (KVMaster) feeds it decoded requests
/// with the connection's session; tests feed it directly with a hand-moved clock.
///
/// Not thread-safe: the server serialises calls.
public struct MasterLogic: Sendable {
    /// One connection's state: nil client until `hello` succeeds.
    public struct Session: Sendable {
        public var client: UInt64? = nil
        /// The handshake, name and tenant of a `hello` waiting for its `prove`.
        var challenge: (handshake: ServerHandshake, name: String, tenant: String)?
        /// The peer's process id as the kernel reports it (SO_PEERCRED of a local socket);
        /// 0 when unknown (TCP). Set by the server, never from a message.
        public var peerPID: Int32 = 0
        /// The peer's IPv4 address as the connection shows it (TCP; nil on the local socket).
        /// Set by the server, never from a message: a segment or KV endpoint this client
        /// announces must be on it.
        public var peerAddress: String? = nil
        /// Whether this connection came through the master's local (Unix-domain) socket; set
        /// by the server. A local client's `mount` must come with its segment's descriptor.
        public var local = false
        /// The size of the shared-memory file passed with this connection's `mount` (checked by
        /// the server: `SharedMemoryFile.check`); nil when none came. Set by the server.
        public var passedSegmentBytes: Int? = nil
        /// The tenant this connection proved (nil: the cluster's token).
        var tenant: Tenant? = nil
        /// Which attachment of its client this connection is (a resume on another
        /// connection moves the client there; this one's requests are then refused).
        public internal(set) var attachment: UInt64 = 0
        /// This connection's handshake nonces (client's, then master's): what a `resume`
        /// proof signs.
        var nonces: [UInt8] = []
        /// Whether its client has mounted a segment (it may have notices to hear).
        public internal(set) var ownsSegment = false
        public init() {}
    }

    struct Client: Sendable {
        var name: String
        var lastSeen: Nanoseconds
        /// Verified process id (0: unknown); see `Session.peerPID`.
        var pid: Int = 0
        var segments: Set<SegmentID> = []
        var writes: Set<VersionHandle> = []
        /// Its replica copies in flight (`copyStart`).
        var copies: Set<UInt64> = []
        /// The tenant it proved (nil: the cluster's token); a resume must prove the same.
        var tenant: Tenant? = nil
        /// The session secret (32 random bytes) a `resume` proves.
        var secret: [UInt8] = []
        /// Bumped by each resume: only the connection holding the latest may act.
        var attachment: UInt64 = 1
        /// Whether a connection is attached (false: lost; the session waits for a resume
        /// until the client TTL has passed since it was last heard from).
        var connected = true
    }

    /// What happened to a client that left or died.
    public struct Departure: Sendable, Equatable {
        public var client: UInt64
        public var name: String
        public var segments: [SegmentID]
        public var lostObjects: [ObjectKey]
        /// Its writes in flight: they keep their space until the write timeout (the writer
        /// may still be copying), then are aborted (`expireWrites`).
        public var abandonedWrites: Int
    }

    public let config: MasterConfig
    public private(set) var table: ObjectTable
    /// Until when this master surely leads (an elected one: `MasterElection.deadline`, set by
    /// `MasterServer` before it handles anything; `.max`: not elected). No lease it grants
    /// and no write window outlasts it (`granted`), so once a later leader is elected every
    /// reader and writer of this one is done with the segments: they take new objects at once
    /// when remounted under that leader (`mount`).
    public var leadershipEnd: Nanoseconds = .max

    /// `ttl`, cut to what is left of the leadership at `now`.
    func granted(_ ttl: Nanoseconds, now: Nanoseconds) -> Nanoseconds {
        guard leadershipEnd != .max else { return ttl }
        return leadershipEnd > now ? min(ttl, leadershipEnd - now) : 0
    }
    var clients: [UInt64: Client] = [:]
    /// Copies of objects on clients' disk tiers (docs/architecture.md, "Disk tier (cluster)").
    public internal(set) var disk = DiskDirectory()
    /// How often each key was written or looked up, while any client has a disk tier: the
    /// reuse admission's answer (`DiskOffer.reused`), as the embedded tier's sketch.
    var sightings = FrequencySketch()
    var segmentInfo: [SegmentID: SegmentInfo] = [:]
    var segmentOwner: [SegmentID: UInt64] = [:]
    /// ... with the writer's process id where the kernel named it (0: a TCP client), so a
    /// write whose writer is stopped is not expired under it (`expireWrites`).
    var writes: [VersionHandle: (ticket: WriteTicket, client: UInt64, key: ObjectKey, started: Nanoseconds, pid: Int)] = [:]
    /// Read holds of remote readers, per (client, version): their ends, earliest first. A
    /// hold keeps the version's bytes until the reader says its copy ended (`release`) or
    /// its lease ends, whichever is first; a departed client's holds run to their end (its
    /// copies may still be running).
    var holds: [Hold: HoldEnds] = [:]
    /// Every hold in the order they end (all last one lease TTL, so the order they began).
    var holdEnds: [(end: Nanoseconds, hold: Hold)] = []
    var holdEndsHead = 0
    var holdCount: [UInt64: Int] = [:]
    /// Holds ended by their reader, and by their lease (a reader that died or never said).
    public private(set) var holdsReleased = 0
    public private(set) var holdsExpired = 0
    /// Segments mounted as memory that served reads before (held for a lease TTL).
    public private(set) var remounts = 0
    /// Sessions taken back by a client after its connection was lost, and resumes refused.
    public private(set) var resumedSessions = 0
    public private(set) var refusedResumes = 0
    /// Sessions whose connection closed while they held something (kept for a resume).
    public private(set) var detachedSessions = 0
    /// Pipelined commits applied by a resume (they may have been lost with the connection).
    public private(set) var resumedCommits = 0
    /// Writes of departed clients left to run out their write timeout.
    public private(set) var abandonedWrites = 0
    /// Clients that left with `leave`, for the server to log (`takeDepartures`).
    private var left: [Departure] = []

    struct Hold: Hashable, Sendable {
        var client: UInt64
        var version: VersionHandle
    }

    /// The ends of one client's holds on one version, earliest first: the first inline (one
    /// hold, the usual case, allocates nothing).
    struct HoldEnds: Sendable {
        var first: Nanoseconds
        var rest: [Nanoseconds] = []
    }
    /// Writes in flight per key.
    var writingKeys: [ObjectKey: Int] = [:]
    var nextClient: UInt64 = 1
    /// Published KV layouts (prefill→decode transfer), removed when their client leaves.
    var layouts = LayoutDirectory()
    /// Starts at a random value so that segment ids of two runs of a master do not meet: a
    /// client that kept a segment id across a master restart finds it unknown.
    var nextSegment = SegmentID.random(in: 1...(1 << 30))
    public private(set) var requests = 0
    /// Segments unmounted since this master started (clients prune their peers when it moves).
    public private(set) var unmounts = 0
    /// Writes aborted because they were not committed within the write timeout.
    public private(set) var expiredWrites = 0
    /// Replica copies in flight: their client and when they started (they expire as writes do).
    var copies: [UInt64: (client: UInt64, started: Nanoseconds)] = [:]
    public private(set) var copiesCommitted = 0
    public private(set) var copiesFailed = 0
    /// Handshakes refused (a wrong token, or a proof that does not match).
    public private(set) var refusedHandshakes = 0

    private let tokenBytes: [UInt8]
    private let dataKey: [UInt8]

    public init(config: MasterConfig) throws(KVError) {
        try config.validate()
        self.config = config
        tokenBytes = Array((config.token ?? "").utf8)
        dataKey = Authentication.dataKey(clusterToken: tokenBytes)
        table = ObjectTable(policy: config.cache)
        table.recordNotices = true
        table.nextSeq = max(1, config.sequenceBase)
    }

    /// Notices waiting for a client whose connection is lost (delivered after its resume).
    var pendingNotices: [UInt64: [ObjectTable.SegmentNotice]] = [:]
    /// A lost session whose notices pile past this is departed (its owner's index could no
    /// longer be kept whole).
    static let maxPendingNotices = 1 << 20

    /// Whether any notice waits (the server delivers within a millisecond). `mutating` so a
    /// server holding the service in a class property does not copy it per call (see `needsDrain`).
    /// The mounted segments for the master's HTTP service: each one's use and what its owner
    /// registered (nil for the embedded master's own segment).
    public func segmentReport() -> [(usage: SegmentUsage, info: SegmentInfo?)] {
        table.segmentUsage.map { ($0, segmentInfo[$0.segment]) }
    }

    public mutating func hasNotices() -> Bool { !pendingNotices.isEmpty || !table.notices.isEmpty }
    /// Moves the table's new notices to their owners' queues (a tenant's client hears of
    /// stored objects only when their keys are its tenant's: of another's, a blank notice
    /// that keeps the numbering whole).
    mutating func routeNotices() {
        for var n in table.takeNotices() {
            guard let owner = segmentOwner[n.segment], let c = clients.index(forKey: owner) else { continue }
            if let o = n.object, let prefix = clients[c].value.tenant?.prefix, !o.key.withUTF8({ $0.starts(with: prefix) }) {
                n.object = nil
                n.seq = 0
            }
            pendingNotices[owner, default: []].append(n)
        }
    }

    /// Whether write start `request` must wait for freed space its owners have not yet
    /// confirmed (see `ObjectTable.mustWaitForRoom`): a batch is held back whole before it is
    /// handled, so its later objects do not fail for want of room that is about to come back.
    public mutating func mustWaitForRoom(_ request: MasterRequest, now: Nanoseconds) -> Bool {
        let bytes: Int, options: WriteOptions
        switch request {
        case let .putStart(_, size, _, o, _): (bytes, options) = (SegmentAllocator.roundedLength(size), o)
        case let .putStartBatch(items, _, o, _): (bytes, options) = (items.reduce(0) { $0 + SegmentAllocator.roundedLength($1.size) }, o)
        default: return false
        }
        table.advance(now: now)
        return table.mustWaitForRoom(bytes * max(1, min(options.replicas, table.segmentCount)))
    }

    /// Writes the server held back until an owner confirmed freed space (`countSpaceWait`).
    public private(set) var writesWaitedForSpace = 0
    public mutating func countSpaceWait() { writesWaitedForSpace += 1 }

    /// Times an owner's confirmation freed space (`confirmNotices`) or its last report let a
    /// remounted segment take objects: a write held back for room (`MasterServer`) is tried
    /// again when it changes.
    public private(set) var confirmations = 0
    /// Bytes freed that wait for their owners' confirmation (`ObjectTable.ledgers`).
    public var awaitingBytes: Int { table.awaitingBytes }
    /// ... and those bytes with remounted segments waiting for their owners' last report.
    public var comingBackBytes: Int { table.comingBackBytes }

    /// What connected owners must hear of their segments, grouped per client (at most
    /// `MasterLimits.maxBatch` a group): every queue with `all`, else only `requester`'s (its
    /// notices ride with its answer at no cost). The server takes them all each notice round
    /// (`MasterServer.noticeRound`), and at once when it holds a write back for room (freed space is handed out
    /// again only once its owner confirmed the notice: `ObjectTable.ledgers`). A lost
    /// session's queue waits for its resume.
    public mutating func takeNotices(now: Nanoseconds, all: Bool, requester: UInt64? = nil) -> [(client: UInt64, notices: [ObjectTable.SegmentNotice])] {
        routeNotices()
        if pendingNotices.isEmpty { return [] }
        var out: [(client: UInt64, notices: [ObjectTable.SegmentNotice])] = []
        for (id, ns) in pendingNotices where all || id == requester {
            guard let c = clients[id] else { pendingNotices[id] = nil; continue }
            if !c.connected {
                if ns.count > Self.maxPendingNotices { depart(client: id, now: now) }
                continue
            }
            pendingNotices[id] = nil
            var i = 0
            while i < ns.count {
                out.append((id, Array(ns[i..<min(i + MasterLimits.maxBatch, ns.count)])))
                i += MasterLimits.maxBatch
            }
        }
        return out
    }

    /// The token a hello for `tenant` must prove ("" : the cluster's).
    private func token(of tenant: String) throws(KVError) -> [UInt8] {
        if tenant.isEmpty { return tokenBytes }
        guard let t = config.tenants[tenant] else { throw .invalidArgument("this master has no tenant '\(tenant)'") }
        return Array(t.utf8)
    }

    /// Whether `request` of `session`'s client is about a key with a write in flight (the
    /// server then applies other connections' pipelined commits first); keys as the table
    /// holds them, inside the client's tenant.
    ///
    /// `mutating` only so that a server holding the service in a class property calls it in
    /// place: a non-mutating call copied the whole service (every table) per request.
    public mutating func needsDrain(_ request: MasterRequest, session: Session) -> Bool {
        if request.concernsEveryKey { return hasWritesInFlight }
        guard let tenant = session.tenant else { return request.anyKey(isWriting) }
        return request.anyKey { k in (try? tenant.key(k)).map(isWriting) ?? false }
    }

    public var clientCount: Int { clients.count }

    /// Whether `request` (of `session`) reads a key that has a write in flight: the server
    /// holds it back (at most `readWait`) until that write commits or aborts.
    public mutating func mustWait(_ request: MasterRequest, session: Session) -> Bool {
        guard config.readWait > 0, request.isRead, !writes.isEmpty, session.client != nil else { return false }
        return needsDrain(request, session: session)
    }

    /// Reads held back by `mustWait`, and those answered when the wait ran out.
    public private(set) var readsWaited = 0
    public private(set) var readWaitsExpired = 0

    /// Counts a read the server held back; `expired`: answered because the wait ran out.
    public mutating func countWait(expired: Bool) {
        readsWaited += 1
        if expired { readWaitsExpired += 1 }
    }

    /// Handles one request of a connection. A request before `hello` or a wrong token is an
    /// error response; the server closes the connection after an error to `hello`.
    public mutating func handle(_ request: MasterRequest, session: inout Session, now: Nanoseconds) -> MasterResponse {
        requests += 1
        do throws(KVError) {
            if case let .hello(name, nonce, tenant) = request {
                guard session.client == nil, session.challenge == nil else { throw .invalidArgument("hello was already sent on this connection") }
                let handshake = try ServerHandshake(clientNonce: nonce)
                let token = try self.token(of: tenant)
                session.challenge = (handshake, name, tenant)
                return .challenge(nonce: handshake.serverNonce, proof: handshake.serverProof(token: token))
            }
            if case let .prove(proof) = request {
                guard session.client == nil, let c = session.challenge else { throw .invalidArgument("prove must follow hello") }
                session.challenge = nil
                let proved = try token(of: c.tenant)
                guard c.handshake.accepts(clientProof: proof, token: proved) else {
                    refusedHandshakes += 1
                    throw .invalidArgument("the master refused the token" + (c.tenant.isEmpty ? "" : " of tenant '\(c.tenant)'"))
                }
                let id = nextClient
                nextClient += 1
                let secret = Authentication.randomBytes(32)
                session.tenant = c.tenant.isEmpty ? nil : Tenant(name: c.tenant)
                clients[id] = Client(name: c.name, lastSeen: now, pid: Int(max(0, session.peerPID)), tenant: session.tenant, secret: secret)
                session.client = id
                session.attachment = 1
                session.nonces = c.handshake.clientNonce + c.handshake.serverNonce
                let (cn, sn) = (c.handshake.clientNonce, c.handshake.serverNonce)
                return .welcome(
                    Welcome(
                        client: id, leaseTTL: config.cache.leaseTTL, clientTTL: config.clientTTL, local: config.localSocket,
                        pid: config.masterPID,
                        data: Authentication.mask(dataKey, token: proved, clientNonce: cn, serverNonce: sn),
                        session: Authentication.mask(secret, token: proved, clientNonce: cn, serverNonce: sn),
                        writeTimeout: config.quotas.writeTimeout, term: config.term))
            }
            guard let id = session.client, let client = clients[id] else {
                throw .invalidArgument(session.client == nil ? "the first request must be hello" : "this client was expired; reconnect")
            }
            guard client.attachment == session.attachment else {
                throw .invalidArgument("this session was resumed on another connection")
            }
            clients[id]!.lastSeen = now
            if case let .resume(old, proof, commits, aborts) = request {
                let answer = try resume(old, proof: proof, commits: commits, aborts: aborts, session: &session, now: now)
                session.ownsSegment = !(clients[session.client!]?.segments.isEmpty ?? true)
                return answer
            }
            if case .mount = request {
                let answer = try tenantDispatch(request, client: id, session: session, now: now)
                session.ownsSegment = true
                return answer
            }
            if case .leave = request {
                if let d = depart(client: id, now: now) { left.append(d) }
                return .ok
            }
            return try tenantDispatch(request, client: id, session: session, now: now)
        } catch {
            return .error(error)
        }
    }

    /// `request` of client `id`, inside its session's tenant.
    private mutating func tenantDispatch(
        _ request: MasterRequest, client id: UInt64, session: Session,
        now: Nanoseconds
    ) throws(KVError) -> MasterResponse {
        if let address = session.peerAddress { try Self.checkEndpoint(of: request, from: address) }
        if session.local, case let .mount(size, _, _, _, _) = request {
            // Capacity is the file's, not a claim: a local client passes its segment's descriptor.
            guard let have = session.passedSegmentBytes else {
                throw .invalidArgument("a mount on the local socket must come with the segment's descriptor")
            }
            guard have >= size else {
                throw .invalidArgument("a mount of \(size) bytes came with a segment file of \(have) bytes")
            }
        }
        guard let tenant = session.tenant else { return try dispatch(request, client: id, tenant: nil, now: now) }
        return tenant.unscoped(try dispatch(try tenant.scoped(request), client: id, tenant: tenant, now: now))
    }

    /// Refuses a mount or layout whose endpoint (where other clients will connect and send
    /// bytes) is not on the address its TCP client connects from: a client cannot point the
    /// cluster's writers and readers at another machine or service.
    static func checkEndpoint(of request: MasterRequest, from address: String) throws(KVError) {
        let endpoint: String
        switch request {
        case let .mount(_, _, _, e, _): endpoint = e
        case let .publishLayout(p): endpoint = p.endpoint
        default: return
        }
        guard !endpoint.isEmpty else { return }
        let host = endpoint.lastIndex(of: ":").map { String(endpoint[..<$0]) } ?? endpoint
        guard host == address else {
            throw .invalidArgument("endpoint '\(endpoint)' is not on this client's address \(address) (as its connection shows)")
        }
    }

    /// `request` (already inside `tenant`'s namespace) of client `id`.
    private mutating func dispatch(_ request: MasterRequest, client id: UInt64, tenant: Tenant?, now: Nanoseconds) throws(KVError) -> MasterResponse {
        switch request {
        case .hello, .prove:
            throw .invalidArgument("this connection has already authenticated")
        case .resume, .leave:
            throw KVError(.internal, "handled before dispatch")
        case .heartbeat:
            return .ok
        case .unmountCount:
            return .value(unmounts)
        case let .mount(size, host, path, endpoint, reused):
            guard clients[id]!.segments.count < config.quotas.segments else {
                throw .noSpace("this client has \(config.quotas.segments) segments mounted, its quota")
            }
            let seg = nextSegment
            // Memory that served reads before (its owner lost the master) may still be read
            // under leases granted then: it takes new objects only once they have all ended.
            // Those of an earlier elected leader ended with its leadership, before this term began.
            let earlierLeader = reused.map { t in t != 0 && t < config.term } ?? false
            let hold = reused != nil && !earlierLeader
            // It also holds objects its owner is about to report (`restore`): nothing new
            // lands there before the last report, or the client TTL at the latest.
            try table.mount(
                segment: seg, capacity: size, readyAt: hold ? now &+ table.policy.leaseTTL : 0,
                indexBy: reused != nil ? now &+ config.clientTTL : 0, now: now)
            if reused != nil { remounts += 1 }
            nextSegment += 1
            if nextSegment >= DiskDirectory.segmentBit { nextSegment = 1 } // the bit marks disk segments
            // The pid is the one the kernel reported, whatever the client claims elsewhere.
            segmentInfo[seg] = SegmentInfo(segment: seg, size: size, host: host, sharePath: path, endpoint: endpoint, pid: clients[id]!.pid)
            segmentOwner[seg] = id
            clients[id]!.segments.insert(seg)
            return .mounted(segment: seg)
        case let .restore(seg, objects, last):
            guard segmentOwner[seg] == id else { throw .invalidArgument("segment \(seg) is not mounted by this client") }
            let prefix = tenant?.prefix
            var mine: [ObjectTable.Restored] = [], at: [Int] = []
            for (i, o) in objects.enumerated() where prefix.map({ p in o.key.withUTF8 { $0.starts(with: p) } }) ?? true {
                mine.append(o)
                at.append(i)
            }
            var results = [Result<Int, KVError>](repeating: .success(0), count: objects.count)
            for (i, ok) in zip(at, try table.restore(mine, segment: seg, last: last, now: now)) where ok { results[i] = .success(1) }
            if last { confirmations &+= 1 } // writes waiting for room try again
            return .values(results)
        case let .confirmNotices(seg, through):
            guard segmentOwner[seg] == id else { throw .invalidArgument("segment \(seg) is not mounted by this client") }
            if table.confirm(segment: seg, through: through) > 0 { confirmations &+= 1 }
            return .ok
        case let .copyStart(key, targets, drop):
            guard clients[id]!.copies.count < config.quotas.writesInFlight else {
                throw .noSpace("this client has \(config.quotas.writesInFlight) replica copies in flight, its quota")
            }
            let c = try table.beginCopy(key: key, to: targets, dropping: drop, now: now)
            copies[c.handle] = (id, now)
            clients[id]!.copies.insert(c.handle)
            return .copyStarted(
                c, lease: granted(table.policy.leaseTTL, now: now), window: granted(config.quotas.writeTimeout, now: now))
        case let .drain(seg):
            guard segmentOwner[seg] == id else { throw .invalidArgument("segment \(seg) is not mounted by this client") }
            try table.drain(segment: seg)
            return .ok
        case let .copyEnd(handle, commit):
            guard let c = copies[handle], c.client == id else { throw .invalidArgument("no replica copy \(handle) in flight for this client") }
            copies[handle] = nil
            clients[id]!.copies.remove(handle)
            guard commit else {
                try table.abortCopy(handle)
                return .ok
            }
            do throws(KVError) {
                try table.commitCopy(handle, now: now)
                copiesCommitted += 1
            } catch {
                copiesFailed += 1
                throw error
            }
            return .ok
        case let .unmount(seg):
            guard segmentOwner[seg] == id else { throw .invalidArgument("segment \(seg) is not mounted by this client") }
            _ = try unmount(seg, now: now)
            clients[id]!.segments.remove(seg)
            return .ok
        case let .putStart(key, size, mode, options, preferred):
            try options.validate()
            let t = try startWrite(key: key, size: size, mode: mode, options: options, preferred: preferred, client: id, now: now)
            return .putStarted(StartedWrite(t, window: granted(config.quotas.writeTimeout, now: now)))
        case let .putStartBatch(items, mode, options, preferred):
            try options.validate()
            return .putStartedBatch(
                items.map { i in
                    Result { () throws(KVError) in
                        StartedWrite(
                            try startWrite(key: i.key, size: i.size, mode: mode, options: options, preferred: preferred, client: id, now: now),
                            window: granted(config.quotas.writeTimeout, now: now))
                    }
                })
        case let .putCommit(handle, checksum):
            guard let w = writes[handle], w.client == id else { throw .invalidArgument("no write \(handle) in flight for this client") }
            forget(handle)
            clients[id]!.writes.remove(handle)
            var t = w.ticket
            t.checksum = checksum
            try table.commitWrite(t, now: now)
            if disk.anyTier { disk.drop(w.key) }
            return .ok
        case let .putAbort(handle):
            guard let w = writes[handle], w.client == id else { throw .invalidArgument("no write \(handle) in flight for this client") }
            forget(handle)
            clients[id]!.writes.remove(handle)
            try table.abortWrite(w.ticket, now: now)
            return .ok
        case let .get(key, host):
            return .found(try find(key, host: host, client: id, now: now))
        case let .getBatch(keys, host):
            return .foundBatch(keys.map { key in Result { () throws(KVError) in try find(key, host: host, client: id, now: now) } })
        case let .release(versions):
            for v in versions where release(Hold(client: id, version: v)) { holdsReleased += 1 }
            return .ok
        case let .exists(key):
            return .flag(lease(key, now: now) != nil)
        case let .size(key):
            guard let n = lease(key, now: now) else { throw .notFound("object '\(key)' not found") }
            return .value(n)
        case let .remove(key, force):
            try remove(key, force: force, now: now)
            return .ok
        case let .sizeBatch(keys):
            return .sizes(keys.map { key in lease(key, now: now) })
        case let .removeBatch(keys, force):
            return .values(
                keys.map { key in
                    Result { () throws(KVError) in
                        try remove(key, force: force, now: now); return 0
                    }
                })
        case let .removeAll(force):
            let diskOnly = disk.anyTier || disk.count > 0 ? disk.dropAll(prefix: tenant?.prefix) { table.cacheState(key: $0) != nil } : 0
            return .value(table.removeAll(force: force, prefix: tenant?.prefix, now: now) + diskOnly)
        case .stats:
            return statistics(now: now)
        case let .segmentInfo(seg):
            guard let info = segmentInfo[seg] else { throw .notFound("segment \(seg) is not mounted") }
            return .segment(info)
        case let .publishLayout(p):
            if layouts.count(of: id) >= config.quotas.layouts && (try? layouts.fetch(p.node)) == nil {
                throw .noSpace("this client has published \(config.quotas.layouts) KV layouts, its quota")
            }
            var verified = p
            verified.pid = clients[id]!.pid // same-host transfers target only a pid the kernel reported
            try layouts.publish(verified, owner: id)
            return .ok
        case let .fetchLayout(node):
            return .layout(try layouts.fetch(node))
        case let .unpublishLayout(node):
            try layouts.unpublish(node, owner: id)
            return .ok
        case let .listKeys(after):
            let page = keysPage(after: after, prefix: tenant?.prefix, now: now)
            return .keys(page.keys, more: page.more)
        case let .diskRound(seg, d, capacity, reports, dropped, want):
            guard segmentOwner[seg] == id else { throw .invalidArgument("segment \(seg) is not mounted by this client") }
            let first = !disk.anyTier
            let holder = disk.online[d]?.client
            let holderConnected = holder.flatMap { clients[$0]?.connected } ?? false
            try disk.declare(client: id, disk: d, segment: seg, capacity: capacity, holderConnected: holderConnected)
            if first { table.evictionLooksAhead = 16 } // eviction takes copied objects first
            return diskRound(seg, reports: reports, dropped: dropped, want: want, client: id, prefix: tenant?.prefix, now: now)
        case let .diskRestore(seg, files):
            guard segmentOwner[seg] == id else { throw .invalidArgument("segment \(seg) is not mounted by this client") }
            guard disk.disk(of: id) != nil else { throw .invalidArgument("this client has declared no disk tier (diskRound first)") }
            let prefix = tenant?.prefix
            return .values(
                files.map { f in
                    let mine = prefix.map { p in f.key.withUTF8 { $0.starts(with: p) } } ?? true
                    let taken =
                        mine
                        && disk.restore(
                            f.key, generation: f.generation, size: f.size, checksum: f.checksum,
                            expiresAt: f.ttlLeft.map { now &+ max($0, 1) } ?? 0, client: id,
                            inTable: table.cacheState(key: f.key) != nil || writingKeys[f.key] != nil)
                    return .success(taken ? 1 : 0)
                })
        }
    }

    /// A lease on `key`'s DRAM copy, else its disk copy's size (nil: neither).
    private mutating func lease(_ key: ObjectKey, now: Nanoseconds) -> Int? {
        if disk.anyTier { sightings.add(FrequencySketch.hash(key)) }
        if let n = table.lease(key: key, now: now) { return n }
        return disk.count > 0 ? disk.served(key, now: now)?.size : nil
    }

    /// Removes `key` from DRAM and the disk tiers (a copy on a disk that is away included, so
    /// it does not come back with it); `objectNotFound` only when neither had it.
    private mutating func remove(_ key: ObjectKey, force: Bool, now: Nanoseconds) throws(KVError) {
        guard disk.count > 0 || disk.anyTier else { return try table.remove(key: key, force: force, now: now) }
        do throws(KVError) {
            try table.remove(key: key, force: force, now: now)
        } catch  where error.code == .objectNotFound {
            guard disk.drop(key) else { throw error }
            return
        }
        disk.drop(key)
    }

    /// A page of keys in DRAM or on a connected disk tier.
    private mutating func keysPage(after: ObjectKey?, prefix: [UInt8]?, now: Nanoseconds) -> ObjectTable.KeysPage {
        let page = table.keysPage(after: after, prefix: prefix, now: now)
        guard disk.count > 0 else { return page }
        let limit = ObjectTable.keysPageBytes / 5
        let onDisk = disk.keys(after: after, prefix: prefix, limit: limit)
        return page.merged(with: onDisk, lowerMore: onDisk.count == limit)
    }

    /// Most objects one `diskRound` offers, and the most bytes of them.
    static let offersPerRound = 256
    static let offerBytesPerRound = 256 << 20
    /// Versions one round's walk of the eviction end looks at, at most (it runs on the
    /// master's only thread).
    static let diskWalk = 16_384

    /// One round of a client's disk tier (`MasterRequest.diskRound`).
    private mutating func diskRound(
        _ seg: SegmentID, reports: [DiskReport], dropped: [UInt64], want: Int,
        client id: UInt64, prefix: [UInt8]?, now: Nanoseconds
    ) -> MasterResponse {
        for r in reports {
            // The hold ends with the report at the latest (the client releases it sooner).
            if release(Hold(client: id, version: r.handle)) { holdsReleased += 1 }
            // A version evicted meanwhile keeps its copy (that is the point); one written over
            // or removed meanwhile does not (`DiskDirectory.drop` withdrew the offer).
            if disk.report(r.handle, generation: r.generation, stored: r.stored, client: id) != nil {
                table.decide(r.handle, .copied)
            } else if !r.stored {
                table.decide(r.handle, .refused)
            }
        }
        for g in dropped { disk.dropped(client: id, generation: g) }
        var offers: [DiskOffer] = []
        let room = min(want, Self.offersPerRound, DiskDirectory.maxOffersPerClient - disk.offers(of: id))
        if room > 0, holdCount[id, default: 0] + room <= config.quotas.readsInFlight {
            table.advance(now: now)
            let margin = max(table.capacity / 4, 4096)
            if table.usedBytes > Int(Double(table.capacity) * table.policy.highWatermark) - margin {
                var bytes = 0
                for c in table.coldest(bytes: margin, in: seg, walk: Self.diskWalk, skip: { disk.isOffered($0) }) {
                    if offers.count >= room || bytes >= Self.offerBytesPerRound { break }
                    if let p = prefix, !c.key.withUTF8({ $0.starts(with: p) }) { continue }
                    guard let (t, expiresAt) = table.holdInPlace(c.handle, now: now) else { continue }
                    guard t.segment == seg else { try? table.releaseRead(c.handle); continue }
                    var ttl: Nanoseconds? = nil
                    if let e = expiresAt {
                        guard e > now else { try? table.releaseRead(c.handle); continue }
                        ttl = e - now
                    }
                    addHold(client: id, version: c.handle, now: now)
                    disk.offer(c.handle, key: c.key, client: id, size: t.size, checksum: t.checksum, expiresAt: expiresAt ?? 0)
                    let reused = sightings.estimate(FrequencySketch.hash(c.key)) >= 2
                    offers.append(
                        DiskOffer(key: c.key, handle: c.handle, offset: t.offset, size: t.size, checksum: t.checksum, ttlLeft: ttl, reused: reused))
                    bytes += t.size
                }
            }
        }
        return .diskRound(offers: offers, forget: disk.takeForget(id))
    }

    /// Leases `key` and lists its replicas, those on `host` first.
    private mutating func find(_ key: ObjectKey, host: String, client: UInt64, now: Nanoseconds) throws(KVError) -> FoundObject {
        guard holdCount[client, default: 0] < config.quotas.readsInFlight else {
            throw .noSpace("this client has \(config.quotas.readsInFlight) reads in flight, its quota")
        }
        if disk.anyTier { sightings.add(FrequencySketch.hash(key)) }
        guard let (size, replicas, handle, checksum) = table.holdReplicas(key: key, now: now, first: { self.segmentInfo[$0]?.host == host }) else {
            // Not in DRAM: a disk tier's copy, read from its owner's disk segment (no hold:
            // the owner checks the file's generation and CRC32C before sending a byte).
            if disk.count > 0, let (e, replica) = disk.hit(key, now: now) {
                return FoundObject(
                    size: e.size, replicas: [replica], hold: 0, checksum: e.checksum, lease: granted(table.policy.leaseTTL, now: now))
            }
            throw .notFound("object '\(key)' not found")
        }
        let lease = addHold(client: client, version: handle, now: now)
        return FoundObject(size: size, replicas: replicas, hold: handle, checksum: checksum, lease: lease)
    }

    /// Records `client`'s hold on `version` (taken in the table) until it releases it or a
    /// lease TTL passes; returns the lease granted.
    @discardableResult
    private mutating func addHold(client: UInt64, version: VersionHandle, now: Nanoseconds) -> Nanoseconds {
        let h = Hold(client: client, version: version)
        let lease = granted(table.policy.leaseTTL, now: now)
        let end = now &+ lease
        if holds[h] == nil { holds[h] = HoldEnds(first: end) } else { holds[h]!.rest.append(end) }
        holdEnds.append((end, h))
        holdCount[client, default: 0] += 1
        return lease
    }

    /// Ends `client`'s earliest hold on `version`; false when it has none (it already ended).
    @discardableResult
    private mutating func release(_ h: Hold) -> Bool {
        guard let ends = holds[h] else { return false }
        holds[h] = ends.rest.isEmpty ? nil : HoldEnds(first: ends.rest[0], rest: Array(ends.rest.dropFirst()))
        if holdCount[h.client]! == 1 { holdCount[h.client] = nil } else { holdCount[h.client]! -= 1 }
        try? table.releaseRead(h.version)
        return true
    }

    /// Ends the holds whose lease has ended by `now`; returns how many.
    @discardableResult
    public mutating func expireHolds(now: Nanoseconds) -> Int {
        var n = 0
        while holdEndsHead < holdEnds.count, holdEnds[holdEndsHead].end <= now {
            let (end, h) = holdEnds[holdEndsHead]
            holdEndsHead += 1
            if let ends = holds[h], ends.first <= end { release(h); n += 1 }
        }
        holdsExpired += n
        if holdEndsHead > 4096 && holdEndsHead * 2 > holdEnds.count { // drop the consumed front
            holdEnds.removeFirst(holdEndsHead)
            holdEndsHead = 0
        }
        return n
    }

    private mutating func startWrite(
        key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions, preferred: SegmentID?,
        client id: UInt64, now: Nanoseconds
    ) throws(KVError) -> WriteTicket {
        guard clients[id]!.writes.count < config.quotas.writesInFlight else {
            throw .noSpace("this client has \(config.quotas.writesInFlight) writes in flight, its quota: commit or abort some first")
        }
        if disk.anyTier { sightings.add(FrequencySketch.hash(key)) }
        if mode == .put, disk.count > 0, disk.served(key, now: now) != nil {
            throw .exists("object '\(key)' already exists (on a disk tier)")
        }
        let limit = Int(Double(table.capacity) * config.quotas.hardPinShare)
        let t = try table.beginWrite(
            key: key, size: size, mode: mode, options: options, replicas: options.replicas,
            preferred: preferred, owner: id, ownerHardPinLimit: limit, now: now)
        writes[t.handle] = (t, id, key, now, clients[id]!.pid)
        writingKeys[key, default: 0] += 1
        clients[id]!.writes.insert(t.handle)
        return t
    }

    /// The master's statistics (what `stats` returns and `/metrics` shows).
    public mutating func statistics(now: Nanoseconds) -> MasterResponse {
        table.advance(now: now)
        let s = table.statistics
        return .stats([
            Statistic("objects", s.objects), Statistic("object_bytes", s.objectBytes), Statistic("bytes_used", s.usedBytes), Statistic("capacity", s.capacity),
            Statistic("hard_pinned_bytes", s.hardPinnedBytes), Statistic("soft_pinned_bytes", s.softPinnedBytes),
            Statistic("evicted_objects", s.evictedObjects), Statistic("evicted_bytes", s.evictedBytes), Statistic("expired_objects", s.expiredObjects),
            Statistic("leases_active", s.activeLeases), Statistic("segments", table.segmentCount), Statistic("clients", clients.count),
            Statistic("writes_in_flight", writes.count), Statistic("requests", requests),
            Statistic("kv_layouts", layouts.count), Statistic("expired_writes", expiredWrites),
            Statistic("replica_copies_in_flight", copies.count), Statistic("replica_copies_committed", copiesCommitted),
            Statistic("replica_copies_failed", copiesFailed),
            Statistic("refused_handshakes", refusedHandshakes),
            Statistic("read_holds", holdCount.values.reduce(0, +)), Statistic("read_holds_released", holdsReleased),
            Statistic("read_holds_expired", holdsExpired), Statistic("remounts", remounts),
            Statistic("sessions_resumed", resumedSessions), Statistic("sessions_refused", refusedResumes),
            Statistic("sessions_detached", detachedSessions), Statistic("sessions_waiting", clients.values.count { !$0.connected }),
            Statistic("commits_resumed", resumedCommits), Statistic("writes_abandoned", abandonedWrites),
            Statistic("reads_waited", readsWaited), Statistic("read_waits_expired", readWaitsExpired),
            Statistic("bytes_awaiting_owner", table.awaitingBytes), Statistic("writes_waited_for_space", writesWaitedForSpace),
            Statistic("puts_superseded", table.supersededPuts),
            Statistic("objects_restored", table.restoredObjects), Statistic("restores_refused", table.refusedRestores),
            Statistic("disk_tiers", disk.online.count), Statistic("disk_capacity", disk.capacity),
            Statistic("disk_objects", disk.count), Statistic("disk_bytes", disk.bytes), Statistic("disk_hits", disk.hits),
            Statistic("disk_copies", disk.copies), Statistic("disk_reports_refused", disk.refusedReports),
            Statistic("disk_restored", disk.restored), Statistic("disk_restores_refused", disk.refusedRestores),
            Statistic("evicted_before_disk_copy", table.evictedUndecided)
        ])
    }

    private mutating func unmount(_ seg: SegmentID, now: Nanoseconds) throws(KVError) -> ObjectTable.UnmountReport {
        let report = try table.unmount(segment: seg, now: now)
        unmounts += 1
        segmentInfo[seg] = nil
        segmentOwner[seg] = nil
        return report
    }

    /// A client left (`leave`), died or stayed away past its grace period: its segments are
    /// unmounted (objects without another replica are lost) and its layouts unpublished.
    /// Its writes in flight are not aborted yet: the writer may still be copying (a process
    /// the master lost sight of is not necessarily stopped), so their space stays taken until
    /// the write timeout, past the writer's own deadline (`expireWrites`); their commits are
    /// refused (the session is gone), so their bytes never become visible. nil when unknown.
    @discardableResult
    public mutating func depart(client id: UInt64, now: Nanoseconds) -> Departure? {
        guard let c = clients.removeValue(forKey: id) else { return nil }
        layouts.depart(id)
        disk.depart(id, now: now)
        var d = Departure(client: id, name: c.name, segments: c.segments.sorted(), lostObjects: [], abandonedWrites: c.writes.count)
        abandonedWrites += c.writes.count
        for seg in d.segments {
            if let r = try? unmount(seg, now: now) { d.lostObjects += r.lostObjects }
        }
        return d
    }

    /// The clients that left with `leave` since the last call (for the server's log).
    public mutating func takeDepartures() -> [Departure] {
        defer { left.removeAll() }
        return left
    }

    /// The connection of `session` closed. `peerGone`: the server knows the peer process
    /// has exited (a local connection whose pid is gone). A client holding nothing, or whose
    /// process is gone, departs at once; otherwise its session waits for a `resume` until the
    /// client TTL has passed (a lost TCP connection is often a short partition, and departing
    /// would lose every object in its segments). Returns the departure, if any.
    public mutating func closed(_ session: Session, peerGone: Bool, now: Nanoseconds) -> Departure? {
        guard let id = session.client, let c = clients[id], c.attachment == session.attachment else { return nil }
        let holding = !c.segments.isEmpty || !c.writes.isEmpty || !c.copies.isEmpty || holdCount[id] != nil || layouts.count(of: id) > 0
        if peerGone || !holding { return depart(client: id, now: now) }
        clients[id]!.connected = false
        clients[id]!.lastSeen = now
        detachedSessions += 1
        return nil
    }

    /// Whether `session` is its client's current connection (not one a resume moved away from).
    public mutating func isCurrent(_ session: Session) -> Bool {
        guard let id = session.client, let c = clients[id] else { return false }
        return c.attachment == session.attachment
    }

    /// Moves session `old` to this connection (see `MasterRequest.resume`).
    private mutating func resume(
        _ old: UInt64, proof: [UInt8], commits: [PipelinedCommit], aborts: [VersionHandle],
        session: inout Session, now: Nanoseconds
    ) throws(KVError) -> MasterResponse {
        let id = session.client!
        let fresh = clients[id]!
        guard fresh.segments.isEmpty, fresh.writes.isEmpty, holdCount[id] == nil, layouts.count(of: id) == 0 else {
            throw .invalidArgument("resume must be the first request after welcome")
        }
        guard old != id, let o = clients[old] else { // (a restarted master may give the same id again)
            refusedResumes += 1
            throw .notFound("session \(old) is gone (its grace period ended, it left, or the master restarted)")
        }
        // A session whose process the kernel named (a local connection) resumes only from
        // that process; one the master knew only by TCP may come back on either.
        guard o.tenant == fresh.tenant, o.pid == 0 || o.pid == fresh.pid,
            Authentication.constantTimeEqual(proof, HMACSHA256.mac(key: o.secret, message: session.nonces))
        else {
            refusedResumes += 1
            throw .invalidArgument("the master refused to resume session \(old): wrong proof, tenant or process")
        }
        clients[id] = nil
        clients[old]!.attachment += 1
        clients[old]!.connected = true
        clients[old]!.lastSeen = now
        session.client = old
        session.attachment = clients[old]!.attachment
        resumedSessions += 1
        for h in aborts {
            guard let w = writes[h], w.client == old else { continue }
            forget(h)
            clients[old]!.writes.remove(h)
            try? table.abortWrite(w.ticket, now: now)
        }
        var applied = 0
        for c in commits {
            guard let w = writes[c.handle], w.client == old else { continue }
            forget(c.handle)
            clients[old]!.writes.remove(c.handle)
            var t = w.ticket
            t.checksum = c.checksum
            if (try? table.commitWrite(t, now: now)) != nil {
                applied += 1
                if disk.anyTier { disk.drop(w.key) }
            }
        }
        resumedCommits += applied
        return .value(applied)
    }

    /// Clients not heard from within the client TTL, departed; returns what each left behind.
    public mutating func expireClients(now: Nanoseconds) -> [Departure] {
        let dead = clients.filter { now > $0.value.lastSeen && now - $0.value.lastSeen > config.clientTTL }.keys.sorted()
        return dead.compactMap { depart(client: $0, now: now) }
    }

    /// Drops write `h` from the writes in flight.
    @discardableResult
    private mutating func forget(_ h: VersionHandle) -> (ticket: WriteTicket, client: UInt64, key: ObjectKey, started: Nanoseconds, pid: Int)? {
        guard let w = writes.removeValue(forKey: h) else { return nil }
        if writingKeys[w.key]! == 1 { writingKeys[w.key] = nil } else { writingKeys[w.key]! -= 1 }
        return w
    }

    /// Whether a write of `key` has started and not yet committed or aborted. The server
    /// reads every connection's pending input before answering a request about such a key,
    /// so a commit already sent (pipelined) is seen by whoever asks after the put returned.
    public func isWriting(_ key: ObjectKey) -> Bool { writingKeys[key] != nil }

    /// Whether any write has started and not yet committed or aborted.
    public var hasWritesInFlight: Bool { !writes.isEmpty }

    /// Runs the table's timers (leases, pins, TTLs) due by `now`.
    public mutating func advance(now: Nanoseconds) { table.advance(now: now) }

    /// Aborts writes started longer than the write timeout ago (a writer that never commits
    /// cannot hold space forever); returns how many.
    @discardableResult
    ///
    /// `hold(pid)`: whether a stale write of that writer process (pid > 0: on this host, named
    /// by the kernel) must wait: the network master holds writes whose writer is stopped
    /// (SIGSTOP, a debugger) or was moments ago, since a copy it began before its deadline
    /// resumes with it, and the space must not belong to another object by then.
    public mutating func expireWrites(now: Nanoseconds, hold: (Int) -> Bool = { _ in false }) -> Int {
        let stale = writes.filter { now > $0.value.started && now - $0.value.started > config.quotas.writeTimeout }
            .filter { !hold($0.value.pid) }.keys
        for h in stale {
            guard let w = forget(h) else { continue }
            clients[w.client]?.writes.remove(h)
            try? table.abortWrite(w.ticket, now: now)
        }
        // Replica copies too: the copier may still be writing until its deadline.
        let staleCopies = copies.filter { now > $0.value.started && now - $0.value.started > config.quotas.writeTimeout }.keys
        for h in staleCopies {
            clients[copies[h]!.client]?.copies.remove(h)
            copies[h] = nil
            try? table.abortCopy(h)
        }
        expiredWrites += stale.count + staleCopies.count
        return stale.count + staleCopies.count
    }
}

extension CacheStatistics {
    /// The table counters a master's `stats` answer carries (absent ones 0; a remote reader
    /// holds no read tickets and sees no free-block layout).
    public init(_ stats: [Statistic]) {
        var all: [String: Int] = [:]
        for s in stats where all[s.name] == nil { all[s.name] = s.value }
        self.init(
            objects: all["objects", default: 0], objectBytes: all["object_bytes", default: 0],
            usedBytes: all["bytes_used", default: 0], capacity: all["capacity", default: 0],
            activeReaders: 0, activeLeases: all["leases_active", default: 0],
            hardPinnedBytes: all["hard_pinned_bytes", default: 0], softPinnedBytes: all["soft_pinned_bytes", default: 0],
            evictedObjects: all["evicted_objects", default: 0], evictedBytes: all["evicted_bytes", default: 0],
            expiredObjects: all["expired_objects", default: 0], freeBlocks: 0, largestFreeBlock: 0)
    }
}

/// A tenant: clients that prove its token work inside its namespace. Their keys and KV node
/// ids are stored as "<name>/<key>" and shown to them without the prefix; listing and
/// `removeAll` reach only the tenant's own keys. Tenants are isolated from each other; the
/// cluster's own token sees (and may remove) every key, prefixes included.
public struct Tenant: Sendable, Equatable {
    public static let maxNameBytes = 64
    public let name: String
    /// "<name>/" as bytes.
    public let prefix: [UInt8]

    public init(name: String) {
        self.name = name
        prefix = Array(name.utf8) + [UInt8(ascii: "/")]
    }

    /// Names are 1 to 64 of A-Z a-z 0-9 . _ - (no "/": namespaces never overlap).
    public static func validate(name: String) throws(KVError) {
        let ok =
            !name.isEmpty && name.utf8.count <= maxNameBytes
            && name.utf8.allSatisfy { c in
                (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2E || c == 0x5F || c == 0x2D
            }
        guard ok else { throw .invalidArgument("tenant name '\(name)' must be 1 to \(maxNameBytes) of A-Z a-z 0-9 . _ -") }
    }

    /// `k` inside the namespace; `invalidArgument` when the prefix makes it too long.
    public func key(_ k: ObjectKey) throws(KVError) -> ObjectKey {
        let full = k.withUTF8 { prefix + Array($0) }
        guard full.count <= ObjectKey.maxBytes else {
            throw .invalidArgument("key is \(k.count) bytes; within tenant '\(name)' the limit is \(ObjectKey.maxBytes - prefix.count) bytes")
        }
        return full.withUnsafeBytes { ObjectKey(unchecked: $0) }
    }

    /// `k` without the namespace (it must be inside it).
    func strip(_ k: ObjectKey) -> ObjectKey {
        k.withUTF8 { b in ObjectKey(unchecked: UnsafeRawBufferPointer(rebasing: b[prefix.count...])) }
    }

    func node(_ n: String) -> String { name + "/" + n }

    func scopedKeys(_ keys: [ObjectKey]) throws(KVError) -> [ObjectKey] {
        var scoped: [ObjectKey] = []
        scoped.reserveCapacity(keys.count)
        for k in keys { scoped.append(try key(k)) }
        return scoped
    }

    /// `r` with every key and node id inside the namespace.
    func scoped(_ r: MasterRequest) throws(KVError) -> MasterRequest {
        switch r {
        case let .putStart(k, size, mode, options, preferred):
            return .putStart(key: try key(k), size: size, mode: mode, options: options, preferred: preferred)
        case let .putStartBatch(items, mode, options, preferred):
            var scoped: [BatchWrite] = []
            scoped.reserveCapacity(items.count)
            for i in items { scoped.append(BatchWrite(key: try key(i.key), size: i.size)) }
            return .putStartBatch(items: scoped, mode: mode, options: options, preferred: preferred)
        case let .get(k, host): return .get(key: try key(k), host: host)
        case let .copyStart(k, targets, drop): return .copyStart(key: try key(k), targets: targets, drop: drop)
        case let .getBatch(keys, host):
            var scoped: [ObjectKey] = []
            scoped.reserveCapacity(keys.count)
            for k in keys { scoped.append(try key(k)) }
            return .getBatch(keys: scoped, host: host)
        case let .exists(k): return .exists(key: try key(k))
        case let .size(k): return .size(key: try key(k))
        case let .remove(k, force): return .remove(key: try key(k), force: force)
        case let .sizeBatch(keys): return .sizeBatch(keys: try scopedKeys(keys))
        case let .removeBatch(keys, force): return .removeBatch(keys: try scopedKeys(keys), force: force)
        case let .listKeys(after): return .listKeys(after: try after.map { (k) throws(KVError) in try key(k) })
        case let .publishLayout(p):
            var q = p
            q.node = node(p.node)
            return .publishLayout(q)
        case let .fetchLayout(n): return .fetchLayout(node: node(n))
        case let .unpublishLayout(n): return .unpublishLayout(node: node(n))
        default: return r
        }
    }

    /// An answer with keys and node ids shown inside the namespace.
    func unscoped(_ r: MasterResponse) -> MasterResponse {
        switch r {
        case let .keys(ks, more): return .keys(ks.map(strip), more: more)
        case let .layout(p):
            var q = p
            q.node = String(p.node.dropFirst(name.count + 1))
            return .layout(q)
        default: return r
        }
    }
}
