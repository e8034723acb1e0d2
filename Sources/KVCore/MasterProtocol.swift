/// The master's control-plane messages (docs/architecture.md: the master owns metadata only; object
/// bytes move between clients). Each travels in one `WireFrameHeader` frame; a response
/// carries its request's id. Every request gets exactly one response, except `putCommit` and
/// `putAbort`: they are pipelined (sent without waiting; a connection's requests are handled
/// in order) and answered only when they fail (an `error` with their request id).
///
/// Durations on the wire are nanoseconds (u64); sizes and offsets u64; segment ids u32.
public enum MasterRequest: Sendable, Equatable {
    /// First message of a connection: the client's name, a fresh 32-byte nonce, and the
    /// tenant whose token it will prove ("" for the cluster's own token); answered by
    /// `challenge` (see `Authentication`).
    case hello(name: String, nonce: [UInt8], tenant: String)
    /// The client's proof of the token for this connection's nonces; answered by `welcome`.
    case prove(proof: [UInt8])
    /// Offers a segment of `size` bytes owned by this client: `host` identifies the machine
    /// (clients on the same host map `sharePath`); `endpoint` is where the owner serves reads
    /// and writes of it to other hosts.
    /// `reused`: this memory served reads under an earlier mount, granted by a master of that
    /// term (0: a master not elected); nil: fresh memory (see `MasterLogic`'s mount and
    /// `ObjectTable.mount(readyAt:)`).
    case mount(size: Int, host: String, sharePath: String, endpoint: String, reused: UInt64?)
    case unmount(segment: SegmentID)
    case heartbeat
    /// `options` travel as the C ABI's flags, durations in nanoseconds (0: not given); the
    /// master checks them with `WriteOptions.validate`.
    case putStart(key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions, preferred: SegmentID?)
    /// `checksum`: the CRC32C of the object's bytes when the writer computed one.
    case putCommit(handle: VersionHandle, checksum: UInt32? = nil)
    case putAbort(handle: VersionHandle)
    /// Leases `key` and returns its replicas (those on `host` first).
    case get(key: ObjectKey, host: String)
    case exists(key: ObjectKey)
    case size(key: ObjectKey)
    case remove(key: ObjectKey, force: Bool)
    case removeAll(force: Bool)
    case stats
    case segmentInfo(segment: SegmentID)
    /// `putStart` of up to `MasterLimits.maxBatch` objects with one mode and one set of
    /// options: one round trip for a whole batch. Answered by `putStartedBatch`, one result
    /// per item in order (a refused item does not stop the others).
    case putStartBatch(items: [BatchWrite], mode: WriteMode, options: WriteOptions, preferred: SegmentID?)
    /// `get` of up to `MasterLimits.maxBatch` keys; answered by `foundBatch`, one result per key.
    case getBatch(keys: [ObjectKey], host: String)
    /// Publishes a KV layout under its node id (the same client may publish it again; another
    /// client's node id is `objectExists`). It lives until unpublished or its client leaves.
    case publishLayout(PublishedLayout)
    /// The layout published under `node`; answered by `layout`.
    case fetchLayout(node: String)
    case unpublishLayout(node: String)
    /// One page of keys after `after` (nil: the first page), in byte order; answered by
    /// `keys`. No page is larger than `ObjectTable.keysPageBytes`.
    case listKeys(after: ObjectKey?)
    /// How many segments have been unmounted since the master started; answered by `value`.
    /// A client forgets its peers' mappings only when this changed (one round trip, not one
    /// per mapped segment).
    case unmountCount
    /// `size` of up to `MasterLimits.maxBatch` keys (each found object is leased); answered
    /// by `sizes`, one size per key (nil for an absent one).
    case sizeBatch(keys: [ObjectKey])
    /// `remove` of up to `MasterLimits.maxBatch` keys; answered by `values` (0 per removed key).
    case removeBatch(keys: [ObjectKey], force: Bool)
    /// Ends read holds (`FoundObject.hold`) of this client whose copies ended; pipelined, never
    /// answered (a hold that already ended is ignored).
    case release(holds: [VersionHandle])
    /// The client is leaving for good (its store closed): the master departs it at once
    /// instead of keeping its session for a resume. Answered by `ok`.
    case leave
    /// Sent right after `welcome` by a client whose earlier connection was lost: take back
    /// session `client` (its segments, objects, writes in flight, holds and layouts).
    /// `proof` is `Authentication.mac(key: session secret, message: client nonce ‖ server
    /// nonce of this connection)`, so a secret seen on the wire is no use on another
    /// connection. `commits` and `aborts` are writes the client finished on the lost
    /// connection without an answer after them (they may not have arrived): the master applies
    /// those still in flight. Answered by `value` (how many commits it applied); the fresh
    /// client id of this connection's welcome is dropped.
    case resume(client: UInt64, proof: [UInt8], commits: [PipelinedCommit], aborts: [VersionHandle])
    /// After a master restart: the objects in this client's `segment` (mounted with `reused`)
    /// as its owner knows them from the old master's `notices`, up to `MasterLimits.maxBatch` a
    /// request, ascending offsets; `last` on the final request (sent even when there is
    /// nothing to report): the segment takes new objects only after it. Answered by `values`:
    /// 1 per object taken back, 0 per one refused (`ObjectTable.restore`).
    case restore(segment: SegmentID, objects: [ObjectTable.Restored], last: Bool)
    /// The owner of `segment` has applied its notices up to number `through`
    /// (`ObjectTable.SegmentNotice.number`): space freed before them may be handed out again
    /// (`ObjectTable.confirm`). Pipelined, never answered.
    case confirmNotices(segment: SegmentID, through: UInt64)
    /// Begins copying `key`'s current version into `targets` (at most
    /// `ObjectTable.maxReplicas` distinct segments); with `drop`, a move: that segment's
    /// replica goes when the copy commits (`ObjectTable.beginCopy`). Answered by
    /// `copyStarted`; the client copies the bytes and ends it with `copyEnd`.
    case copyStart(key: ObjectKey, targets: [SegmentID], drop: SegmentID?)
    /// Ends replica copy `handle`: `commit` adds the copies (a move drops its source), else
    /// their space is freed. Answered by `ok`.
    case copyEnd(handle: UInt64, commit: Bool)
    /// The owner of `segment` is about to unmount it: it takes no new object from now on
    /// (`ObjectTable.drain`); what it holds stays readable. Answered by `ok`.
    case drain(segment: SegmentID)
    /// A disk tier's round (docs/architecture.md, "Disk tier (cluster)"): the owner of
    /// `segment` declares its tier (`disk`: the id its directory keeps; `capacity`), reports on the offers of its last round
    /// (`reports`, at most `MasterLimits.maxBatch`) and the files it dropped by itself
    /// (`dropped`, generations), and asks for up to `want` more objects of its segment to
    /// copy. Answered by `diskRound`.
    case diskRound(segment: SegmentID, disk: UInt64, capacity: Int, reports: [DiskReport], dropped: [UInt64], want: Int)
    /// Files of this client's disk tier to index again (after its restart or the master's),
    /// at most `MasterLimits.maxBatch` a request. Answered by `values`: 1 per file taken,
    /// 0 per file refused (its owner deletes it).
    case diskRestore(segment: SegmentID, files: [DiskFile])

    /// Every request kind, numbered once (the wire numbers never change).
    public enum Kind: UInt16, CaseIterable {
        case hello = 1
        case mount = 2
        case unmount = 3
        case heartbeat = 4
        case putStart = 5
        case putCommit = 6
        case putAbort = 7
        case get = 8
        case exists = 9
        case size = 10
        case remove = 11
        case removeAll = 12
        case stats = 13
        case segmentInfo = 14
        case putStartBatch = 15
        case getBatch = 16
        case publishLayout = 17
        case fetchLayout = 18
        case unpublishLayout = 19
        case listKeys = 20
        case prove = 21
        case unmountCount = 22
        case sizeBatch = 23
        case removeBatch = 24
        case release = 25
        case leave = 26
        case resume = 27
        case restore = 28
        case confirmNotices = 29
        case copyStart = 30
        case copyEnd = 31
        case drain = 32
        case diskRound = 33
        case diskRestore = 34
    }

    public var requestKind: Kind {
        switch self {
        case .hello: .hello
        case .mount: .mount
        case .unmount: .unmount
        case .heartbeat: .heartbeat
        case .putStart: .putStart
        case .putCommit: .putCommit
        case .putAbort: .putAbort
        case .get: .get
        case .exists: .exists
        case .size: .size
        case .remove: .remove
        case .removeAll: .removeAll
        case .stats: .stats
        case .segmentInfo: .segmentInfo
        case .putStartBatch: .putStartBatch
        case .getBatch: .getBatch
        case .publishLayout: .publishLayout
        case .fetchLayout: .fetchLayout
        case .unpublishLayout: .unpublishLayout
        case .listKeys: .listKeys
        case .prove: .prove
        case .unmountCount: .unmountCount
        case .sizeBatch: .sizeBatch
        case .removeBatch: .removeBatch
        case .release: .release
        case .leave: .leave
        case .resume: .resume
        case .restore: .restore
        case .confirmNotices: .confirmNotices
        case .copyStart: .copyStart
        case .copyEnd: .copyEnd
        case .drain: .drain
        case .diskRound: .diskRound
        case .diskRestore: .diskRestore
        }
    }

    public var kind: UInt16 { requestKind.rawValue }

    public static func isRequestKind(_ k: UInt16) -> Bool { Kind(rawValue: k) != nil }

    /// The only kinds a master reads before a connection has authenticated.
    public static func isHandshakeKind(_ k: UInt16) -> Bool { k == Kind.hello.rawValue || k == Kind.prove.rawValue }

    /// Requests answered only when they fail.
    public var isPipelined: Bool {
        switch self {
        case .putCommit, .putAbort, .release, .confirmNotices: true
        default: false
        }
    }

    /// Requests that hand out space (held back while the room they need awaits its owners'
    /// confirmation: `MasterLogic.mustWaitForRoom`).
    public var allocates: Bool {
        switch self {
        case .putStart, .putStartBatch: true
        default: false
        }
    }

    /// Requests that read keys (a read of a key being written waits for its commit).
    public var isRead: Bool {
        switch self {
        case .get, .getBatch, .exists, .size, .sizeBatch, .copyStart: true
        default: false
        }
    }

    /// Requests about every object (a pipelined commit already sent by another client must
    /// be applied before them, like before a request naming its key).
    public var concernsEveryKey: Bool {
        switch self {
        case .removeAll, .listKeys, .stats: true
        default: false
        }
    }

    /// Whether any key the request is about satisfies `test`.
    public func anyKey(_ test: (ObjectKey) -> Bool) -> Bool {
        switch self {
        case let .putStart(key, _, _, _, _), let .get(key, _), let .exists(key), let .size(key), let .remove(key, _),
            let .copyStart(key, _, _):
            test(key)
        case let .putStartBatch(items, _, _, _): items.contains { test($0.key) }
        case let .getBatch(keys, _), let .sizeBatch(keys), let .removeBatch(keys, _): keys.contains(where: test)
        default: false
        }
    }
}

/// A disk tier's report on one offer (`diskRound`): the offered version, and the file it
/// was stored as (`stored`), or not.
public struct DiskReport: Sendable, Equatable {
    public var handle: VersionHandle
    public var generation: UInt64
    public var stored: Bool
    public init(handle: VersionHandle, generation: UInt64, stored: Bool) {
        self.handle = handle
        self.generation = generation
        self.stored = stored
    }
}

/// A file of a disk tier as its owner registers it (`diskRestore`).
public struct DiskFile: Sendable, Equatable {
    public var key: ObjectKey
    public var generation: UInt64
    public var size: Int
    public var checksum: UInt32?
    /// Nanoseconds of TTL left; nil: none.
    public var ttlLeft: Nanoseconds?
    public init(key: ObjectKey, generation: UInt64, size: Int, checksum: UInt32?, ttlLeft: Nanoseconds?) {
        self.key = key
        self.generation = generation
        self.size = size
        self.checksum = checksum
        self.ttlLeft = ttlLeft
    }
}

/// An object a disk tier is asked to copy (`diskRound`): held for the client (release the
/// hold with `release` once its bytes are read), at `offset` of the client's own segment.
public struct DiskOffer: Sendable, Equatable {
    public var key: ObjectKey
    public var handle: VersionHandle
    public var offset: Int
    public var size: Int
    public var checksum: UInt32?
    /// Nanoseconds of TTL left; nil: none.
    public var ttlLeft: Nanoseconds?
    /// Seen at least twice (written, read or looked up: the master's count-min sketch of
    /// every client's calls); the reuse admission takes only these.
    public var reused: Bool
    public init(key: ObjectKey, handle: VersionHandle, offset: Int, size: Int, checksum: UInt32?, ttlLeft: Nanoseconds?, reused: Bool) {
        self.key = key
        self.handle = handle
        self.offset = offset
        self.size = size
        self.checksum = checksum
        self.ttlLeft = ttlLeft
        self.reused = reused
    }
}

/// A commit as a client sent it (see `putCommit`), kept to be sent again by a `resume`.
public struct PipelinedCommit: Sendable, Equatable {
    public var handle: VersionHandle
    public var checksum: UInt32?
    public init(handle: VersionHandle, checksum: UInt32? = nil) {
        self.handle = handle
        self.checksum = checksum
    }
}

/// One object of a `putStartBatch`.
public struct BatchWrite: Sendable, Equatable {
    public var key: ObjectKey
    public var size: Int
    public init(key: ObjectKey, size: Int) {
        self.key = key
        self.size = size
    }
}

/// A started write as a master describes it (the writer knows the size).
public struct StartedWrite: Sendable, Equatable {
    public var handle: VersionHandle
    public var inPlace: Bool
    public var replicas: [Replica]
    /// How long from the master's answer the writer may begin copies: the write timeout, or
    /// less when the master's leadership may end sooner (`MasterLogic.leadershipEnd`).
    public var window: Nanoseconds
    public init(handle: VersionHandle, inPlace: Bool, replicas: [Replica], window: Nanoseconds) {
        self.handle = handle
        self.inPlace = inPlace
        self.replicas = replicas
        self.window = window
    }

    public init(_ t: WriteTicket, window: Nanoseconds) { self.init(handle: t.handle, inPlace: t.inPlace, replicas: t.replicas, window: window) }

    /// The writer's ticket for `size` bytes; `internal` when the master named no replica.
    public func ticket(size: Int) throws(KVError) -> WriteTicket {
        guard !replicas.isEmpty else { throw KVError(.internal, "the master started a write with no replica") }
        return WriteTicket(handle: handle, size: size, inPlace: inPlace, replicas: replicas)
    }
}

/// A leased object as a master describes it: its size and replicas (the preferred first).
public struct FoundObject: Sendable, Equatable {
    public var size: Int
    public var replicas: [Replica]
    /// The reader's hold on the version (release it with `release` once the copy ended).
    public var hold: VersionHandle
    /// The writer's CRC32C of the bytes (nil: none).
    public var checksum: UInt32?
    /// The lease's length from the master's answer: the master's lease TTL, or less when its
    /// leadership may end sooner (`MasterLogic.leadershipEnd`). A copy must end within it.
    public var lease: Nanoseconds
    public init(size: Int, replicas: [Replica], hold: VersionHandle = 0, checksum: UInt32? = nil, lease: Nanoseconds) {
        self.size = size
        self.replicas = replicas
        self.hold = hold
        self.checksum = checksum
        self.lease = lease
    }

    /// A reader's ticket: the first replica, the others as fallbacks, the master's hold as
    /// the handle (released with `release`); the copy must end by `leaseEnd` (see
    /// `ReadTicket`). `internal` when the master named no replica.
    public func ticket(leaseEnd: Nanoseconds) throws(KVError) -> ReadTicket {
        guard let first = replicas.first else { throw KVError(.internal, "the master found an object with no replica") }
        // A disk tier's copy is checked by its owner (key, generation, CRC32C) as it is read:
        // no deadline to keep.
        return ReadTicket(
            handle: hold, segment: first.segment, offset: first.offset, size: size, fallbacks: Array(replicas.dropFirst()),
            leaseEnd: DiskDirectory.isDisk(first.segment) ? 0 : leaseEnd, checksum: checksum)
    }
}

/// What a master tells a client that proved its token.
public struct Welcome: Sendable, Equatable {
    /// The client's id (its session).
    public var client: UInt64
    public var leaseTTL: Nanoseconds
    /// A client not heard from for this long is departed; it is also how long a session
    /// whose connection was lost waits for a `resume`.
    public var clientTTL: Nanoseconds
    /// An abstract Unix-domain socket name on which the master also listens ("" for none);
    /// a client on the same host and network namespace moves its connection there.
    public var local: String
    /// The master's process id, so that a client on the local socket can tell that it sees
    /// the master's pid as the master does (one PID namespace): only then are the pids the
    /// master verifies meaningful to it.
    public var pid: Int
    /// The data plane's secret (`Authentication.dataKey`), masked for this handshake
    /// (`Authentication.mask` with the token the client proved).
    public var data: [UInt8]
    /// The session's secret (32 random bytes), masked the same way: it proves a `resume`.
    public var session: [UInt8]
    /// A write not committed within this time is aborted and its space reused: a writer
    /// starts no copy after its own deadline (`WriteTicket.deadline`).
    public var writeTimeout: Nanoseconds
    /// The leadership term of a master elected on etcd (the revision that created its leader
    /// key; 0: not elected). A client that found the leader in etcd refuses another term.
    public var term: UInt64

    public init(
        client: UInt64, leaseTTL: Nanoseconds, clientTTL: Nanoseconds, local: String, pid: Int, data: [UInt8],
        session: [UInt8] = [], writeTimeout: Nanoseconds = 0, term: UInt64 = 0
    ) {
        self.client = client
        self.leaseTTL = leaseTTL
        self.clientTTL = clientTTL
        self.local = local
        self.pid = pid
        self.data = data
        self.session = session
        self.writeTimeout = writeTimeout
        self.term = term
    }
}

/// One named statistic of the master.
public struct Statistic: Sendable, Equatable {
    public var name: String
    public var value: Int

    public init(_ name: String, _ value: Int) {
        self.name = name
        self.value = value
    }
}

/// One segment as clients find it.
public struct SegmentInfo: Sendable, Equatable {
    public var segment: SegmentID
    public var size: Int
    public var host: String
    /// Where its owner hands the segment's descriptor to members on its host (an abstract
    /// Unix-domain socket name; "" for none).
    public var sharePath: String
    public var endpoint: String
    /// The owner's process id as the kernel told the master (SO_PEERCRED on its local
    /// socket), never as the owner claimed it; 0 when unknown (the owner uses TCP). Readers
    /// map the segment only from a process with this id.
    public var pid: Int

    public init(segment: SegmentID, size: Int, host: String, sharePath: String, endpoint: String, pid: Int = 0) {
        self.segment = segment
        self.size = size
        self.host = host
        self.sharePath = sharePath
        self.endpoint = endpoint
        self.pid = pid
    }
}

public enum MasterResponse: Sendable, Equatable {
    case ok
    case error(KVError)
    /// The answer to a correct `prove` (see `Welcome`).
    case welcome(Welcome)
    case mounted(segment: SegmentID)
    case putStarted(StartedWrite)
    case found(FoundObject)
    case flag(Bool)
    case value(Int)
    case stats([Statistic])
    case segment(SegmentInfo)
    /// One result per item of a batch request, in order.
    case putStartedBatch([Result<StartedWrite, KVError>])
    case foundBatch([Result<FoundObject, KVError>])
    case layout(PublishedLayout)
    /// A page of keys; `more`: keys after the last one remain (ask again after it).
    case keys([ObjectKey], more: Bool)
    /// The master's nonce and its proof of the token (it answers `hello`).
    case challenge(nonce: [UInt8], proof: [UInt8])
    /// One number or error per item of a batch (`sizeBatch`, `removeBatch`).
    case values([Result<Int, KVError>])
    /// Unsolicited (request id 0): what changed in the segments this client owns — objects
    /// stored there and objects gone — so that it can tell a restarted master
    /// (`restore`). At most `MasterLimits.maxBatch` a frame.
    case notices([ObjectTable.SegmentNotice])
    /// The answer to `sizeBatch`: each key's size, nil when it is absent (8 bytes a key, no
    /// error text: `batch_exists` of 10,000 keys is mostly this).
    case sizes([Int?])
    /// The answer to `copyStart`: the copy, with how long the client may read its sources
    /// (as `FoundObject.lease`) and begin writing its targets (as `StartedWrite.window`).
    case copyStarted(ReplicaCopy, lease: Nanoseconds, window: Nanoseconds)
    /// The answer to `diskRound`: objects to copy, and files to delete (generations).
    case diskRound(offers: [DiskOffer], forget: [UInt64])

    /// Every answer kind, numbered once.
    public enum Kind: UInt16, CaseIterable {
        case ok = 100
        case error = 101
        case welcome = 102
        case mounted = 103
        case putStarted = 104
        case found = 105
        case flag = 106
        case value = 107
        case stats = 108
        case segment = 109
        case putStartedBatch = 110
        case foundBatch = 111
        case layout = 112
        case keys = 113
        case challenge = 114
        case values = 115
        case notices = 116
        case sizes = 117
        case copyStarted = 118
        case diskRound = 119
    }

    public var responseKind: Kind {
        switch self {
        case .ok: .ok
        case .error: .error
        case .welcome: .welcome
        case .mounted: .mounted
        case .putStarted: .putStarted
        case .found: .found
        case .flag: .flag
        case .value: .value
        case .stats: .stats
        case .segment: .segment
        case .putStartedBatch: .putStartedBatch
        case .foundBatch: .foundBatch
        case .layout: .layout
        case .keys: .keys
        case .challenge: .challenge
        case .values: .values
        case .notices: .notices
        case .sizes: .sizes
        case .copyStarted: .copyStarted
        case .diskRound: .diskRound
        }
    }

    public var kind: UInt16 { responseKind.rawValue }

    public static func isResponseKind(_ k: UInt16) -> Bool { Kind(rawValue: k) != nil }

    /// The kind of `notices` (sent unasked, request id 0).
    public static let noticesKind = Kind.notices.rawValue

    /// The kind of `error`; its payload is also the error frame of the segment servers.
    public static let errorKind = Kind.error.rawValue
}

// MARK: - codec

/// Limits a master enforces on what it decodes.
public enum MasterLimits {
    public static let maxString = 4096
    /// A client's name (it appears in the master's log lines).
    public static let maxName = 256
    /// Largest frame a master reads before the connection has authenticated.
    public static let maxPreAuthPayload = 512
    public static let maxSize = 1 << 48
    public static let maxStats = 256
    /// Items in one `putStartBatch` or `getBatch` (clients split larger batches).
    public static let maxBatch = 4096
}

extension MasterRequest {
    /// A counted list of keys (what `decodeKeys` reads).
    static func encodeKeys(_ keys: [ObjectKey], _ w: inout WireWriter) {
        // Room for all of them at once (a chunk of 1,024 keys grew the buffer ten times).
        w.reserve(4 + keys.reduce(0) { $0 + 4 + $1.count })
        w.count(keys.count)
        for k in keys { w.key(k) }
    }

    /// A counted list of at most `MasterLimits.maxBatch` keys.
    static func decodeKeys(_ r: inout WireReader) throws(KVError) -> [ObjectKey] {
        let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 5, "batch keys")
        var keys: [ObjectKey] = []
        keys.reserveCapacity(n)
        for _ in 0..<n { keys.append(try r.key()) }
        return keys
    }

    /// One restored object: key, offset, size, seq, options (as a write's), checksum.
    static func encodeRestored(_ o: ObjectTable.Restored, _ w: inout WireWriter) {
        w.key(o.key); w.u64(UInt64(o.offset)); w.u64(UInt64(o.size)); w.u64(o.seq)
        w.bool(o.options.hardPin); w.u64(o.options.softPinTTL ?? 0); w.u64(o.options.ttl ?? 0)
        encodeChecksum(o.checksum, &w)
    }

    static func decodeRestored(_ r: inout WireReader) throws(KVError) -> ObjectTable.Restored {
        let key = try r.key()
        let offset = try r.size(max: MasterLimits.maxSize, "offset"), size = try r.size(max: MasterLimits.maxSize, "size")
        let seq = try r.u64()
        let hard = try r.bool()
        let soft = try r.u64(), ttl = try r.u64()
        return ObjectTable.Restored(
            key: key, offset: offset, size: size, seq: seq,
            options: WriteOptions(hardPin: hard, softPinTTL: soft == 0 ? nil : soft, ttl: ttl == 0 ? nil : ttl),
            checksum: try decodeChecksum(&r))
    }

    /// An optional CRC32C: a flag byte, then the value when set.
    static func encodeChecksum(_ c: UInt32?, _ w: inout WireWriter) {
        w.bool(c != nil)
        if let c { w.u32(c) }
    }

    static func decodeChecksum(_ r: inout WireReader) throws(KVError) -> UInt32? {
        try r.bool() ? try r.u32() : nil
    }

    static func decodeCommits(_ r: inout WireReader) throws(KVError) -> [PipelinedCommit] {
        let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 9, "commits")
        var out: [PipelinedCommit] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(PipelinedCommit(handle: try r.u64(), checksum: try decodeChecksum(&r))) }
        return out
    }

    /// A counted list of at most `MasterLimits.maxBatch` version handles.
    static func decodeHandles(_ r: inout WireReader, _ what: String) throws(KVError) -> [VersionHandle] {
        let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 8, what)
        var out: [VersionHandle] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try r.u64()) }
        return out
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        switch self {
        case let .hello(name, nonce, tenant): w.string(name); w.bytes(nonce); w.string(tenant)
        case let .prove(proof): w.bytes(proof)
        case let .mount(size, host, path, endpoint, reused):
            w.u64(UInt64(size)); w.string(host); w.string(path); w.string(endpoint); w.bool(reused != nil)
            if let reused { w.u64(reused) }
        case let .unmount(segment): w.u32(segment)
        case .heartbeat, .stats, .unmountCount, .leave: break
        case let .listKeys(after):
            w.bool(after != nil)
            if let after { w.key(after) }
        case let .putStart(key, size, mode, options, preferred):
            w.key(key); w.u64(UInt64(size))
            Self.encodeWrite(&w, mode, options, preferred)
        case let .putCommit(handle, checksum): w.u64(handle); Self.encodeChecksum(checksum, &w)
        case let .putAbort(handle): w.u64(handle)
        case let .get(key, host): w.key(key); w.string(host)
        case let .exists(key), let .size(key): w.key(key)
        case let .remove(key, force): w.key(key); w.bool(force)
        case let .removeAll(force): w.bool(force)
        case let .segmentInfo(segment): w.u32(segment)
        case let .publishLayout(p): p.encode(into: &w)
        case let .fetchLayout(node), let .unpublishLayout(node): w.string(node)
        case let .putStartBatch(items, mode, options, preferred):
            Self.encodeWrite(&w, mode, options, preferred)
            w.count(items.count)
            for i in items { w.key(i.key); w.u64(UInt64(i.size)) }
        case let .getBatch(keys, host):
            w.string(host)
            Self.encodeKeys(keys, &w)
        case let .sizeBatch(keys):
            Self.encodeKeys(keys, &w)
        case let .removeBatch(keys, force):
            w.bool(force)
            Self.encodeKeys(keys, &w)
        case let .release(holds):
            w.count(holds.count)
            for h in holds { w.u64(h) }
        case let .confirmNotices(segment, through):
            w.u32(segment)
            w.u64(through)
        case let .copyStart(key, targets, drop):
            w.key(key)
            w.count(targets.count)
            for t in targets { w.u32(t) }
            w.bool(drop != nil)
            if let drop { w.u32(drop) }
        case let .copyEnd(handle, commit):
            w.u64(handle)
            w.bool(commit)
        case let .drain(segment): w.u32(segment)
        case let .diskRound(segment, disk, capacity, reports, dropped, want):
            w.u32(segment); w.u64(disk); w.u64(UInt64(capacity)); w.u32(UInt32(clamping: want))
            w.count(reports.count)
            for r in reports { w.u64(r.handle); w.u64(r.generation); w.bool(r.stored) }
            w.count(dropped.count)
            for g in dropped { w.u64(g) }
        case let .diskRestore(segment, files):
            w.u32(segment)
            w.count(files.count)
            for f in files {
                w.key(f.key); w.u64(f.generation); w.u64(UInt64(f.size)); Self.encodeChecksum(f.checksum, &w); w.u64(f.ttlLeft ?? 0)
            }
        case let .restore(segment, objects, last):
            w.u32(segment)
            w.count(objects.count)
            for o in objects { Self.encodeRestored(o, &w) }
            w.bool(last)
        case let .resume(client, proof, commits, aborts):
            w.u64(client); w.bytes(proof)
            w.count(commits.count)
            for c in commits { w.u64(c.handle); Self.encodeChecksum(c.checksum, &w) }
            w.count(aborts.count)
            for h in aborts { w.u64(h) }
        }
        return w.bytes
    }

    private static func encodeWrite(_ w: inout WireWriter, _ mode: WriteMode, _ options: WriteOptions, _ preferred: SegmentID?) {
        w.u8(mode == .put ? 0 : 1)
        w.bool(options.hardPin); w.u64(options.softPinTTL ?? 0); w.u64(options.ttl ?? 0)
        w.u8(UInt8(clamping: options.replicas)); w.bool(preferred != nil); w.u32(preferred ?? 0)
    }

    private static func decodeWrite(_ r: inout WireReader) throws(KVError) -> (WriteMode, WriteOptions, SegmentID?) {
        let mode: WriteMode
        switch try r.u8() {
        case 0: mode = .put
        case 1: mode = .upsert
        case let v: throw .invalidArgument("bad write mode \(v)")
        }
        let hard = try r.bool()
        let soft = try r.u64(), ttl = try r.u64()
        let replicas = Int(try r.u8())
        let hasPreferred = try r.bool()
        let preferred = try r.u32()
        return (
            mode, WriteOptions(hardPin: hard, softPinTTL: soft == 0 ? nil : soft, ttl: ttl == 0 ? nil : ttl, replicas: replicas),
            hasPreferred ? preferred : nil
        )
    }

    /// Decodes the payload of a frame of `kind`; throws `invalidArgument` naming the problem.
    public static func decode(kind: UInt16, _ b: UnsafeRawBufferPointer) throws(KVError) -> MasterRequest {
        var r = WireReader(b)
        let m: MasterRequest
        guard let k = Kind(rawValue: kind) else { throw .invalidArgument("unknown request kind \(kind)") }
        switch k {
        case .hello:
            m = .hello(
                name: try r.string(max: MasterLimits.maxName, "name"), nonce: Array(try r.bytes(max: 64, "nonce")),
                tenant: try r.string(max: Tenant.maxNameBytes, "tenant"))
        case .prove: m = .prove(proof: Array(try r.bytes(max: 64, "proof")))
        case .unmountCount: m = .unmountCount
        case .mount:
            m = .mount(
                size: try r.size(max: MasterLimits.maxSize, "segment size"), host: try r.string(max: MasterLimits.maxString, "host"),
                sharePath: try r.string(max: MasterLimits.maxString, "share path"),
                endpoint: try r.string(max: MasterLimits.maxString, "endpoint"), reused: try r.bool() ? try r.u64() : nil)
        case .unmount: m = .unmount(segment: try r.u32())
        case .heartbeat: m = .heartbeat
        case .putStart:
            let key = try r.key()
            let size = try r.size(max: MasterLimits.maxSize, "value size")
            let (mode, options, preferred) = try decodeWrite(&r)
            m = .putStart(key: key, size: size, mode: mode, options: options, preferred: preferred)
        case .putCommit: m = .putCommit(handle: try r.u64(), checksum: try Self.decodeChecksum(&r))
        case .putAbort: m = .putAbort(handle: try r.u64())
        case .get: m = .get(key: try r.key(), host: try r.string(max: MasterLimits.maxString, "host"))
        case .exists: m = .exists(key: try r.key())
        case .size: m = .size(key: try r.key())
        case .remove: m = .remove(key: try r.key(), force: try r.bool())
        case .removeAll: m = .removeAll(force: try r.bool())
        case .stats: m = .stats
        case .segmentInfo: m = .segmentInfo(segment: try r.u32())
        case .putStartBatch:
            let (mode, options, preferred) = try decodeWrite(&r)
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 13, "batch items")
            var items: [BatchWrite] = []
            items.reserveCapacity(n)
            for _ in 0..<n { items.append(BatchWrite(key: try r.key(), size: try r.size(max: MasterLimits.maxSize, "value size"))) }
            m = .putStartBatch(items: items, mode: mode, options: options, preferred: preferred)
        case .getBatch:
            let host = try r.string(max: MasterLimits.maxString, "host")
            m = .getBatch(keys: try Self.decodeKeys(&r), host: host)
        case .sizeBatch: m = .sizeBatch(keys: try Self.decodeKeys(&r))
        case .removeBatch:
            let force = try r.bool()
            m = .removeBatch(keys: try Self.decodeKeys(&r), force: force)
        case .release: m = .release(holds: try Self.decodeHandles(&r, "holds"))
        case .leave: m = .leave
        case .confirmNotices: m = .confirmNotices(segment: try r.u32(), through: try r.u64())
        case .copyStart:
            let key = try r.key()
            let n = try r.count(max: ObjectTable.maxReplicas, minElementSize: 4, "target segments")
            var targets: [SegmentID] = []
            for _ in 0..<n { targets.append(try r.u32()) }
            m = .copyStart(key: key, targets: targets, drop: try r.bool() ? try r.u32() : nil)
        case .copyEnd: m = .copyEnd(handle: try r.u64(), commit: try r.bool())
        case .drain: m = .drain(segment: try r.u32())
        case .diskRound:
            let segment = try r.u32()
            let disk = try r.u64()
            let capacity = try r.size(max: MasterLimits.maxSize, "disk capacity")
            let want = Int(try r.u32())
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 17, "disk reports")
            var reports: [DiskReport] = []
            reports.reserveCapacity(n)
            for _ in 0..<n { reports.append(DiskReport(handle: try r.u64(), generation: try r.u64(), stored: try r.bool())) }
            let d = try r.count(max: MasterLimits.maxBatch, minElementSize: 8, "dropped files")
            var dropped: [UInt64] = []
            dropped.reserveCapacity(d)
            for _ in 0..<d { dropped.append(try r.u64()) }
            m = .diskRound(segment: segment, disk: disk, capacity: capacity, reports: reports, dropped: dropped, want: want)
        case .diskRestore:
            let segment = try r.u32()
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 30, "disk files")
            var files: [DiskFile] = []
            files.reserveCapacity(n)
            for _ in 0..<n {
                let key = try r.key()
                let generation = try r.u64(), size = try r.size(max: MasterLimits.maxSize, "size")
                let checksum = try Self.decodeChecksum(&r)
                let ttl = try r.u64()
                files.append(DiskFile(key: key, generation: generation, size: size, checksum: checksum, ttlLeft: ttl == 0 ? nil : ttl))
            }
            m = .diskRestore(segment: segment, files: files)
        case .restore:
            let segment = try r.u32()
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 40, "restored objects")
            var objects: [ObjectTable.Restored] = []
            objects.reserveCapacity(n)
            for _ in 0..<n { objects.append(try Self.decodeRestored(&r)) }
            m = .restore(segment: segment, objects: objects, last: try r.bool())
        case .resume:
            m = .resume(
                client: try r.u64(), proof: Array(try r.bytes(max: 64, "proof")),
                commits: try Self.decodeCommits(&r), aborts: try Self.decodeHandles(&r, "aborts"))
        case .publishLayout: m = .publishLayout(try PublishedLayout.decode(&r))
        case .fetchLayout: m = .fetchLayout(node: try r.string(max: MasterLimits.maxString, "node id"))
        case .unpublishLayout: m = .unpublishLayout(node: try r.string(max: MasterLimits.maxString, "node id"))
        case .listKeys: m = .listKeys(after: try r.bool() ? try r.key() : nil)
        }
        try r.finish("request \(kind)")
        return m
    }
}

extension MasterResponse {
    public func encode() -> [UInt8] {
        var w = WireWriter()
        func replicas(_ rs: [Replica]) {
            w.count(rs.count)
            for r in rs { w.u32(r.segment); w.u64(UInt64(r.offset)) }
        }
        func error(_ e: KVError) {
            w.u32(UInt32(bitPattern: e.code.rawValue)); w.string(String(decoding: e.message.utf8.prefix(MasterLimits.maxString - 8), as: UTF8.self))
        }
        func started(_ s: StartedWrite) { w.u64(s.handle); w.bool(s.inPlace); replicas(s.replicas); w.u64(s.window) }
        func found(_ f: FoundObject) {
            w.u64(UInt64(f.size)); replicas(f.replicas); w.u64(f.hold); MasterRequest.encodeChecksum(f.checksum, &w); w.u64(f.lease)
        }
        func results<V>(_ rs: [Result<V, KVError>], _ value: (V) -> Void) {
            w.count(rs.count)
            for r in rs {
                switch r {
                case .success(let v): w.u8(0); value(v)
                case .failure(let e): w.u8(1); error(e)
                }
            }
        }
        switch self {
        case .ok: break
        case let .error(e): error(e)
        case let .welcome(v):
            w.u64(v.client); w.u64(v.leaseTTL); w.u64(v.clientTTL); w.string(v.local); w.u64(UInt64(v.pid)); w.bytes(v.data)
            w.bytes(v.session); w.u64(v.writeTimeout); w.u64(v.term)
        case let .mounted(segment): w.u32(segment)
        case let .putStarted(s): started(s)
        case let .found(f): found(f)
        case let .flag(v): w.bool(v)
        case let .value(v): w.i64(Int64(v))
        case let .stats(pairs):
            w.count(pairs.count)
            for p in pairs { w.string(p.name); w.i64(Int64(p.value)) }
        case let .segment(s): w.u32(s.segment); w.u64(UInt64(s.size)); w.string(s.host); w.string(s.sharePath); w.string(s.endpoint); w.u64(UInt64(s.pid))
        case let .putStartedBatch(rs): results(rs, started)
        case let .foundBatch(rs): results(rs, found)
        case let .layout(p): p.encode(into: &w)
        case let .keys(ks, more): w.bool(more); w.count(ks.count); for k in ks { w.key(k) }
        case let .challenge(nonce, proof): w.bytes(nonce); w.bytes(proof)
        case let .values(rs): results(rs) { w.i64(Int64($0)) }
        case let .sizes(ns):
            w.count(ns.count)
            for n in ns { w.u64(n.map { UInt64($0) } ?? UInt64.max) }
        case let .copyStarted(c, lease, window):
            w.u64(c.handle); w.u64(UInt64(c.size)); replicas(c.sources); replicas(c.targets)
            MasterRequest.encodeChecksum(c.checksum, &w); w.u64(lease); w.u64(window)
        case let .diskRound(offers, forget):
            w.count(offers.count)
            for o in offers {
                w.key(o.key); w.u64(o.handle); w.u64(UInt64(o.offset)); w.u64(UInt64(o.size))
                MasterRequest.encodeChecksum(o.checksum, &w); w.u64(o.ttlLeft ?? 0); w.bool(o.reused)
            }
            w.count(forget.count)
            for g in forget { w.u64(g) }
        case let .notices(ns):
            w.count(ns.count)
            for n in ns {
                w.u32(n.segment); w.u64(UInt64(n.offset)); w.u64(n.seq); w.u64(n.number); w.bool(n.object != nil)
                if let o = n.object { MasterRequest.encodeRestored(o, &w) }
            }
        }
        return w.bytes
    }

    public static func decode(kind: UInt16, _ b: UnsafeRawBufferPointer) throws(KVError) -> MasterResponse {
        var r = WireReader(b)
        func replicas() throws(KVError) -> [Replica] {
            let n = try r.count(max: ObjectTable.maxReplicas, minElementSize: 12, "replicas")
            var out: [Replica] = []
            for _ in 0..<n { out.append(Replica(segment: try r.u32(), offset: try r.size(max: MasterLimits.maxSize, "offset"))) }
            return out
        }
        func error() throws(KVError) -> KVError {
            let raw = Int32(bitPattern: try r.u32())
            guard let code = KVError.Code(rawValue: raw) else { throw .invalidArgument("unknown error code \(raw)") }
            return KVError(code, try r.string(max: MasterLimits.maxString, "error message"))
        }
        func started() throws(KVError) -> StartedWrite {
            StartedWrite(handle: try r.u64(), inPlace: try r.bool(), replicas: try replicas(), window: try r.u64())
        }
        func found() throws(KVError) -> FoundObject {
            FoundObject(
                size: try r.size(max: MasterLimits.maxSize), replicas: try replicas(), hold: try r.u64(),
                checksum: try MasterRequest.decodeChecksum(&r), lease: try r.u64())
        }
        func results<V>(_ value: () throws(KVError) -> V) throws(KVError) -> [Result<V, KVError>] {
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 5, "batch results")
            var out: [Result<V, KVError>] = []
            out.reserveCapacity(n)
            for _ in 0..<n {
                switch try r.u8() {
                case 0: out.append(.success(try value()))
                case 1: out.append(.failure(try error()))
                case let t: throw .invalidArgument("bad batch result tag \(t)")
                }
            }
            return out
        }
        let m: MasterResponse
        guard let k = Kind(rawValue: kind) else { throw .invalidArgument("unknown response kind \(kind)") }
        switch k {
        case .ok: m = .ok
        case .error: m = .error(try error())
        case .welcome:
            m = .welcome(
                Welcome(
                    client: try r.u64(), leaseTTL: try r.u64(), clientTTL: try r.u64(),
                    local: try r.string(max: MasterLimits.maxString, "local socket"), pid: try r.size(max: Int(Int32.max), "pid"),
                    data: Array(try r.bytes(max: 64, "data key")), session: Array(try r.bytes(max: 64, "session secret")),
                    writeTimeout: try r.u64(), term: try r.u64()))
        case .mounted: m = .mounted(segment: try r.u32())
        case .putStarted: m = .putStarted(try started())
        case .found: m = .found(try found())
        case .flag: m = .flag(try r.bool())
        case .value: m = .value(Int(try r.i64()))
        case .stats:
            let n = try r.count(max: MasterLimits.maxStats, minElementSize: 12, "statistics")
            var pairs: [Statistic] = []
            for _ in 0..<n { pairs.append(Statistic(try r.string(max: 64, "statistic name"), Int(try r.i64()))) }
            m = .stats(pairs)
        case .segment:
            m = .segment(
                SegmentInfo(
                    segment: try r.u32(), size: try r.size(max: MasterLimits.maxSize),
                    host: try r.string(max: MasterLimits.maxString, "host"),
                    sharePath: try r.string(max: MasterLimits.maxString, "share path"),
                    endpoint: try r.string(max: MasterLimits.maxString, "endpoint"),
                    pid: try r.size(max: Int(Int32.max), "pid")))
        case .putStartedBatch: m = .putStartedBatch(try results(started))
        case .foundBatch: m = .foundBatch(try results(found))
        case .layout: m = .layout(try PublishedLayout.decode(&r))
        case .keys:
            let more = try r.bool()
            let n = try r.count(max: ObjectTable.keysPageBytes / 5, minElementSize: 5, "keys")
            var ks: [ObjectKey] = []
            ks.reserveCapacity(n)
            for _ in 0..<n { ks.append(try r.key()) }
            m = .keys(ks, more: more)
        case .challenge: m = .challenge(nonce: Array(try r.bytes(max: 64, "nonce")), proof: Array(try r.bytes(max: 64, "proof")))
        case .values: m = .values(try results { () throws(KVError) in Int(try r.i64()) })
        case .sizes:
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 8, "sizes")
            var ns: [Int?] = []
            ns.reserveCapacity(n)
            for _ in 0..<n {
                let v = try r.u64()
                if v == UInt64.max { ns.append(nil); continue }
                guard v <= UInt64(MasterLimits.maxSize) else { throw KVError(.invalidArgument, "size \(v) is out of range") }
                ns.append(Int(v))
            }
            m = .sizes(ns)
        case .copyStarted:
            let handle = try r.u64()
            let size = try r.size(max: MasterLimits.maxSize, "size")
            let sources = try replicas(), targets = try replicas()
            let c = ReplicaCopy(handle: handle, size: size, sources: sources, targets: targets, checksum: try MasterRequest.decodeChecksum(&r))
            m = .copyStarted(c, lease: try r.u64(), window: try r.u64())
        case .diskRound:
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 39, "disk offers")
            var offers: [DiskOffer] = []
            offers.reserveCapacity(n)
            for _ in 0..<n {
                let key = try r.key()
                let handle = try r.u64()
                let offset = try r.size(max: MasterLimits.maxSize, "offset"), size = try r.size(max: MasterLimits.maxSize, "size")
                let checksum = try MasterRequest.decodeChecksum(&r)
                let ttl = try r.u64()
                offers.append(
                    DiskOffer(key: key, handle: handle, offset: offset, size: size, checksum: checksum, ttlLeft: ttl == 0 ? nil : ttl, reused: try r.bool()))
            }
            let f = try r.count(max: DiskDirectory.forgetPerRound, minElementSize: 8, "files to forget")
            var forget: [UInt64] = []
            forget.reserveCapacity(f)
            for _ in 0..<f { forget.append(try r.u64()) }
            m = .diskRound(offers: offers, forget: forget)
        case .notices:
            let n = try r.count(max: MasterLimits.maxBatch, minElementSize: 29, "notices")
            var ns: [ObjectTable.SegmentNotice] = []
            ns.reserveCapacity(n)
            for _ in 0..<n {
                let segment = try r.u32(), offset = try r.size(max: MasterLimits.maxSize, "offset"), seq = try r.u64(), number = try r.u64()
                let object = try r.bool() ? try MasterRequest.decodeRestored(&r) : nil
                ns.append(ObjectTable.SegmentNotice(segment: segment, offset: offset, seq: seq, object: object, number: number))
            }
            m = .notices(ns)
        }
        try r.finish("response \(kind)")
        return m
    }
}
