#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVSystem

/// The network master: `MasterLogic` behind a TCP control plane, plus a small HTTP endpoint
/// serving Prometheus text at `/metrics` and `/health`.
///
/// One thread runs `run()`: a `poll` loop over the listeners and every connection, so the
/// service needs no lock. Each connection's requests are handled in arrival order. A frame
/// that does not decode (bad magic, version, kind, length or fields) closes that connection
/// with a logged reason; the master and every other connection carry on. A client that
/// leaves (`leave`), or whose connection closes while it holds nothing or its process is gone,
/// departs at once; a client whose connection is lost keeps its session for a resume, and a
/// silent or lost one departs after the client TTL (`MasterLogic.closed`).
///
/// `@unchecked Sendable`: all state is touched only by the thread in `run()`, except `stop()`,
/// which only writes to a pipe.
public final class MasterServer: @unchecked Sendable {
    public struct Options: Sendable {
        public var host = "127.0.0.1"
        public var port = 50051
        /// nil: no HTTP endpoint.
        public var metricsHost = "127.0.0.1"
        public var metricsPort: Int? = 9003
        public var config = MasterConfig()
        public var maxPayload = WireFrameHeader.defaultMaxPayload
        /// After serving a request, keep polling without sleeping this long (0: never spin).
        /// Waking a sleeping master costs the sender an inter-processor interrupt (tens of
        /// microseconds on a VM); 1 ms keeps it awake between the chunks of a streamed batch.
        public var spinNanos: Nanoseconds = 1_000_000
        /// Also listen on an abstract Unix-domain socket, advertised to clients in the welcome.
        public var localSocket = true
        /// Most connections at once (clients, HTTP and not yet authenticated ones); one more
        /// is answered with an error and closed. 0: from the file-descriptor limit.
        public var maxClients = 0
        /// A connection that has not authenticated within this time is closed.
        public var authTimeout: Nanoseconds = 5_000_000_000
        /// A connection whose unsent answers pass this many bytes is not read until they drain
        /// (a client that sends requests and never reads cannot grow the master's memory).
        public var outputSoftLimit = 4 << 20
        /// ... and is closed when they pass this many.
        public var outputHardLimit = 256 << 20
        /// Users (besides the master's own and root) whose processes may use the local socket.
        public var allowedUIDs: [UInt32] = []
        /// Where the token file is written (nil: `TokenFile.path(port:)`; "" for none).
        public var tokenFile: String? = nil
        /// Leader election on etcd (nil: a single master). See `MasterElection`.
        public var election: MasterElection.Options? = nil
        public init() {}

        /// Checks every setting (the command line and `MasterServer.init` both call it):
        /// ports, limits, a given token's length, and the service's configuration.
        public func validate() throws(KVError) {
            for (name, p) in [("port", port), ("metrics port", metricsPort ?? 0)] where !(0...65535).contains(p) {
                throw .invalidArgument("\(name) \(p) is out of range (0-65535)")
            }
            guard maxClients >= 0 else { throw .invalidArgument("max clients must be 0 (from the descriptor limit) or more, not \(maxClients)") }
            guard authTimeout > 0, outputSoftLimit > 0, outputHardLimit >= outputSoftLimit else {
                throw .invalidArgument("the connection limits must be positive, the hard one at least the soft one")
            }
            if let t = config.token, !t.isEmpty, t.utf8.count < Authentication.minTokenLength {
                throw .invalidArgument("the token must be at least \(Authentication.minTokenLength) bytes (a generated one has 64)")
            }
            try config.validate()
            if let e = election {
                try e.validate()
                guard port != 0 else { throw .invalidArgument("a master elected on etcd needs a fixed --port (clients find it there)") }
                guard !(e.advertise.isEmpty ? host : e.advertise).hasPrefix("0.") else {
                    throw .invalidArgument("a master listening on \(host) must say which address clients dial (--advertise)")
                }
                guard let t = config.token, !t.isEmpty else {
                    throw .invalidArgument("masters elected on etcd must all prove one token: give --token-file (or --token, or KVSTORE_MASTER_TOKEN)")
                }
            }
        }
    }

    /// The connection limit when `maxClients` is 0: the file-descriptor limit less room for
    /// the listeners, logs and the metrics endpoint, at most 65,536.
    static func defaultMaxClients() -> Int {
        var r = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &r) == 0 else { return 1000 }
        let soft = r.rlim_cur == rlim_t.max ? 65_536 : Int(clamping: r.rlim_cur) // RLIM_INFINITY
        return max(16, min(65_536, soft - 32))
    }

    final class Connection {
        let socket: Socket
        let http: Bool
        let accepted: Nanoseconds
        var input: [UInt8] = []
        var output: [UInt8] = []
        var sent = 0
        var session = MasterLogic.Session()
        var closeAfterFlush = false
        /// A descriptor the client attached to its bytes (local socket only; at most one kept,
        /// closed once its `mount` is handled or the connection ends): its segment's file.
        var passedFD: Int32 = -1
        /// Requests answered on this connection (a descriptor is read only with the first ones).
        var handled = 0
        func takePassedFD() -> Int32 { defer { passedFD = -1 }; return passedFD }
        deinit { if passedFD >= 0 { close(passedFD) } }
        /// A read held back until a write of its key commits, or `until` (`MasterLogic.mustWait`);
        /// or a write held back for room until an owner confirms freed space (`space`: the
        /// service's confirmations then). The connection's later requests wait behind it, so
        /// answers stay in order.
        var parked: (header: WireFrameHeader, request: MasterRequest, until: Nanoseconds, space: Int?)?
        init(_ s: Socket, http: Bool, accepted: Nanoseconds) { socket = s; self.http = http; self.accepted = accepted }
        var pending: Int { output.count - sent }
        var authenticated: Bool { session.client != nil }
    }

    public let options: Options
    private let listener: Socket
    /// The abstract Unix-domain listener advertised in the welcome (nil: none).
    private let localListener: Socket?
    private let httpListener: Socket?
    private let wake: WakePipe
    private var service: MasterLogic
    private var connections: [Int32: Connection] = [:]
    /// Where every read lands before its bytes join a connection's input (allocated once).
    private var scratch = [UInt8](repeating: 0, count: 1 << 16)
    private let clock: Clock
    private let log: @Sendable (String) -> Void
    private var limited = RateLimitedLog()
    /// The ports actually bound (useful with port 0).
    public let port: Int
    public let metricsPort: Int?
    /// The connection cap in force.
    public let maxClients: Int
    /// The token clients must prove (given, or generated at start).
    public let token: String
    /// The file this master wrote its token to (nil: none).
    public let tokenPath: String?
    /// accept() failed for lack of descriptors: the listeners rest until then.
    private var acceptPausedUntil: Nanoseconds = 0
    private var refusedConnections = 0

    /// Binds the listeners. Without a token in the configuration, generates one; writes the
    /// token to this user's token file for the port (0600), where same-user clients find it.
    public init(
        options: Options, clock: @escaping Clock = monotonicClock,
        log: @escaping @Sendable (String) -> Void = MasterServer.logToStandardError
    ) throws(KVError) {
        try options.validate()
        var config = options.config
        if (config.token ?? "").isEmpty { config.token = Authentication.newToken() }
        token = config.token!
        config.masterPID = Int(getpid())
        self.options = options
        maxClients = options.maxClients > 0 ? options.maxClients : Self.defaultMaxClients()
        listener = try Socket.listen(host: options.host, port: options.port)
        listener.setNonBlocking()
        port = listener.localPort
        if options.tokenFile == "" {
            tokenPath = nil
        } else {
            var path = options.tokenFile ?? ""
            if path.isEmpty { path = try TokenFile.path(port: port) }
            try TokenFile.write(token, to: path)
            tokenPath = path
        }
        // Clients on this host and network namespace move their connection to a local socket
        // (a loopback TCP round trip costs twice a Unix-domain one). Its name is unique per run.
        if options.localSocket {
            let name = "kvstore-master.\(getpid()).\(port).\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
            do throws(KVError) {
                let l = try Socket.listenLocal(name: name)
                l.setNonBlocking()
                localListener = l
                config.localSocket = name
            } catch {
                localListener = nil
                log("no local socket (clients on this host use TCP): \(error.message)")
            }
        } else {
            localListener = nil
        }
        // Commits are numbered from the wall clock, so a restarted master's come after the old
        // one's (a restore keeps the higher of two reports of a key).
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        config.sequenceBase = UInt64(max(1, now.tv_sec)) &* 1_000_000_000 &+ UInt64(max(0, now.tv_nsec))
        service = try MasterLogic(config: config)
        if let mp = options.metricsPort {
            let h = try Socket.listen(host: options.metricsHost, port: mp)
            h.setNonBlocking()
            httpListener = h
            metricsPort = h.localPort
        } else {
            httpListener = nil
            metricsPort = nil
        }
        wake = try WakePipe()
        self.clock = clock
        self.log = log
    }

    /// The master's logger: "kvstore-master: <line>" on standard error, rate-limited, level
    /// from `KVSTORE_LOG_LEVEL`.
    public static let logger = Logger(prefix: "kvstore-master")

    /// Writes "kvstore-master: <line>" to standard error (through `logger`, at level info).
    public static let logToStandardError: @Sendable (String) -> Void = { line in logger.info(line) }

    deinit {
        if let tokenPath { TokenFile.remove(tokenPath, ifHolding: token) }
    }

    /// The token in `KVSTORE_MASTER_TOKEN`, if set and not empty.
    public static func environmentToken() -> String? { TokenFile.environmentToken() }

    /// The token an operator gave: `given` (a command-line flag, "" for none), else the
    /// 0600 file `file` ("" for none), else `KVSTORE_MASTER_TOKEN`; nil: generate one.
    public static func token(given: String, file: String) throws(KVError) -> String? {
        if !given.isEmpty { return given }
        if !file.isEmpty {
            guard let t = TokenFile.read(file) else {
                throw .invalidArgument(
                    "cannot read a token from \(file): it must exist, belong to this user, be readable by no one else (chmod 600) and not be empty")
            }
            return t
        }
        return environmentToken()
    }

    /// Tenants from "NAME:TOKEN_FILE" items (each may also hold several, comma-separated);
    /// each token is read from its file like `--token-file`.
    public static func tenants(_ items: [String]) throws(KVError) -> [String: String] {
        var out: [String: String] = [:]
        for item in items.flatMap({ $0.split(separator: ",") }) {
            guard let colon = item.firstIndex(of: ":") else { throw .invalidArgument("tenant '\(item)' must be NAME:TOKEN_FILE") }
            let name = String(item[..<colon]), file = String(item[item.index(after: colon)...])
            try Tenant.validate(name: name)
            guard out[name] == nil else { throw .invalidArgument("tenant '\(name)' is given twice") }
            guard let t = try token(given: "", file: file) else { throw .invalidArgument("tenant '\(name)' needs a token file") }
            out[name] = t
        }
        return out
    }

    /// "1001,1002" as uids.
    public static func uids(_ text: String) throws(KVError) -> [UInt32] {
        try text.split(separator: ",").map { (part) throws(KVError) -> UInt32 in
            guard let v = UInt32(part.trimmingPrefix(" ")) else { throw .invalidArgument("'\(part)' is not a uid") }
            return v
        }
    }

    /// The write end of the stop pipe of the server that handles signals (one per process).
    nonisolated(unsafe) private static var signalPipe: Int32 = -1

    /// The signal handlers `stopOnSignals` replaced.
    public typealias SavedSignals = (interrupt: sigaction, terminate: sigaction)

    /// Makes SIGINT and SIGTERM stop this server (`run()` returns and the process can exit
    /// cleanly, closing every connection). Returns the handlers it replaced.
    @discardableResult
    public func stopOnSignals() -> SavedSignals { Self.stopOnSignals(writingTo: wake.writeFD) }

    /// Makes SIGINT and SIGTERM write a byte to `fd` (a pipe); returns the handlers replaced.
    @discardableResult
    public static func stopOnSignals(writingTo fd: Int32) -> SavedSignals {
        signalPipe = fd
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in
            var b: UInt8 = 1
            _ = write(MasterServer.signalPipe, &b, 1)
        }
        var oldInt = sigaction(), oldTerm = sigaction()
        sigaction(SIGINT, &action, &oldInt)
        sigaction(SIGTERM, &action, &oldTerm)
        return (oldInt, oldTerm)
    }

    /// Puts back the handlers `stopOnSignals` replaced.
    public static func restoreSignals(_ saved: SavedSignals) {
        var s = saved
        sigaction(SIGINT, &s.interrupt, nil)
        sigaction(SIGTERM, &s.terminate, nil)
    }

    /// Makes `run()` return soon. Thread-safe.
    public func stop() { wake.wake() }

    /// Why `run()` returned.
    public enum Ended: Sendable, Equatable {
        case stopped
        /// The fence's deadline passed: this master may no longer be the leader.
        case fenced
    }

    /// For a master elected on etcd: the monotonic time until which it may serve
    /// (`MasterElection.deadline`). `run()` reads it before handling anything that arrived,
    /// and returns `.fenced`, closing every connection, once it has passed. Set before `run()`.
    public var fence: (@Sendable () -> Nanoseconds)?

    /// The longest `run()` sleeps in poll while fenced, so a passed deadline is seen soon.
    static let fencePollMillis: Int32 = 10

    /// Serves until `stop()` (or, with a `fence`, until its deadline passes).
    @discardableResult
    public func run() -> Ended {
        var ended = Ended.stopped
        log("listening on \(options.host):\(port)" + (metricsPort.map { ", metrics on \(options.metricsHost):\($0)" } ?? ""))
        var lastSweep = clock()
        var lastActivity: Nanoseconds = 0
        var spin = SpinBackoff(spinNanos: Int(options.spinNanos))
        let listeners = [(listener, false)] + (localListener.map { [($0, false)] } ?? []) + (httpListener.map { [($0, true)] } ?? [])
        var fds: [pollfd] = []
        while true {
            fds.removeAll(keepingCapacity: true)
            fds.append(pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0))
            // Out of descriptors: the listeners rest a moment instead of spinning in accept.
            let loopStart = clock()
            let accepting = loopStart >= acceptPausedUntil
            for (l, _) in listeners { fds.append(pollfd(fd: accepting ? l.fd : -1, events: Int16(POLLIN), revents: 0)) }
            for (fd, c) in connections {
                // Answers piled up: stop reading this connection until they drain.
                let reading = c.pending <= options.outputSoftLimit && c.parked == nil
                fds.append(pollfd(fd: fd, events: (reading ? Int16(POLLIN) : 0) | (c.pending > 0 ? Int16(POLLOUT) : 0), revents: 0))
            }
            // Right after a request, poll without sleeping for a short while: the next
            // request of a busy client is picked up without a scheduler wake-up. Not while
            // the machine is busy (`SpinBackoff`).
            let busy = Int(loopStart &- lastActivity) < spin.budget(now: Int(loopStart))
            let idle: Int32 = fence == nil ? 250 : Self.fencePollMillis
            let n = poll(&fds, nfds_t(fds.count), busy ? 0 : parked.isEmpty && !service.hasNotices() ? idle : 1)
            if n < 0 && errno != EINTR { log("poll failed: errno \(errno)"); break }
            // Fenced: nothing that arrived is handled once the lease may have ended.
            if let fence {
                let end = fence()
                if clock() >= end { ended = .fenced; break }
                service.leadershipEnd = end // no lease or write window granted now outlasts it
            }
            if n > 0 { lastActivity = clock() }
            if fds[0].revents != 0 { break }
            for (i, (l, http)) in listeners.enumerated() where fds[i + 1].revents != 0 { acceptAll(l, http: http) }
            for p in fds.dropFirst(1 + listeners.count) where p.revents != 0 {
                guard let c = connections[p.fd] else { continue }
                if p.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { readFrom(c) }
                if connections[p.fd] != nil { flush(c) }
                // Drained below the soft limit: handle the requests that waited meanwhile.
                if connections[p.fd] === c, !c.input.isEmpty, c.pending <= options.outputSoftLimit, !c.http { handleInput(c) }
            }
            if !parked.isEmpty { resumeParked() }
            let now = clock()
            if now &- lastSweep >= 250_000_000 {
                lastSweep = now
                for c in Array(connections.values) where !c.authenticated && now &- c.accepted > options.authTimeout {
                    drop(c, reason: nil)
                    limited.log("auth-timeout", now: now, log) { "closed a connection that did not authenticate within \(options.authTimeout / 1_000_000) ms" }
                }
                service.expireHolds(now: now)
                if service.expireWrites(now: now, hold: { pid in self.writerHeld(pid, now: now) }) > 0 {
                    limited.log("expired-writes", now: now, log) {
                        "aborted writes not committed within \(options.config.quotas.writeTimeout / 1_000_000_000) s"
                    }
                }
                for d in service.expireClients(now: now) {
                    logDeparture(d, why: "silent for longer than the client TTL")
                    // Its connection (if still open) ends too: the client sees that and reconnects.
                    for c in connections.values where c.session.client == d.client { drop(c, reason: nil) }
                }
                service.advance(now: now)
            }
            deliverNotices(all: false)
        }
        for c in connections.values { drop(c, reason: nil) }
        if let tokenPath { TokenFile.remove(tokenPath, ifHolding: token) } // (deinit covers a server never run)
        log(ended == .fenced ? "stopped serving: the leadership may have passed to another master" : "stopped")
        return ended
    }

    // MARK: connections

    private func acceptAll(_ l: Socket, http: Bool) {
        while true {
            let s: Socket
            do throws(KVError) {
                guard let a = try l.accept() else { return }
                s = a
            } catch {
                // Out of descriptors or memory (nothing else fails here): rest the listeners.
                let now = clock()
                acceptPausedUntil = now + 100_000_000
                limited.log("accept", now: now, log) { "accept failed: \(error.message)" }
                return
            }
            // Local peers are who the kernel says they are (SO_PEERCRED), read once.
            let cred = l === localListener ? s.peerCredentials : nil
            if l === localListener, let refusal = refusePeer(cred) {
                refusedConnections += 1
                limited.log("peer-uid", now: clock(), log) { refusal }
                refuse(s, refusal)
                continue
            }
            guard connections.count < maxClients else {
                refusedConnections += 1
                limited.log("max-clients", now: clock(), log) { "refused a connection: \(self.maxClients) connections are open (--max-clients)" }
                refuse(s, "the master has \(maxClients) connections open, its limit (--max-clients)")
                continue
            }
            let c = Connection(s, http: http, accepted: clock())
            c.session.peerPID = cred?.pid ?? 0
            if l !== localListener { c.session.peerAddress = s.peerHost ?? "" } else { c.session.local = true }
            connections[s.fd] = c
        }
    }

    /// Why a process on the local socket may not connect (nil: it may): only the master's
    /// own user, root and `allowedUIDs`, as the kernel reports them (SO_PEERCRED).
    private func refusePeer(_ cred: (pid: Int32, uid: UInt32, gid: UInt32)?) -> String? {
        guard let cred else { return "refused a local connection whose peer credentials are unknown" }
        let uid = cred.uid
        if uid == geteuid() || uid == 0 || options.allowedUIDs.contains(uid) { return nil }
        return "refused a local connection from uid \(uid) (pid \(cred.pid)): only uid \(geteuid()), root and --allow-uid may connect"
    }

    /// Best effort: tells a refused peer why, then closes.
    private func refuse(_ s: Socket, _ why: String) {
        let f = WireWriter.frame(
            kind: MasterResponse.errorKind, requestID: 0,
            payload: MasterResponse.error(KVError(.invalidArgument, why)).encode())
        _ = f.withUnsafeBytes { try? s.writeAvailable($0) }
        s.close()
    }

    /// A local client's mount, and its file, must come within this many requests of a new
    /// connection (a client sends hello, prove, perhaps a refused resume and the releases and
    /// confirmations it had queued, then mount: at most six).
    static let descriptorRequests = 16

    private func readFrom(_ c: Connection) {
        while true {
            let n: Int?
            do {
                if c.session.local && !c.session.ownsSegment && c.handled < Self.descriptorRequests {
                    // Early in a connection, until it has mounted, a local client may pass its
                    // segment's file (recvmsg); afterwards plain reads (a descriptor sent then
                    // is closed by the kernel), so a pure client's requests cost what they did.
                    var fd: Int32 = -1
                    n = try scratch.withUnsafeMutableBytes { b in try c.socket.readAvailable(into: b, descriptor: &fd) }
                    if fd >= 0 {
                        let old = c.passedFD
                        if old >= 0 { close(old) } // one kept: the latest
                        c.passedFD = fd
                    }
                } else {
                    n = try scratch.withUnsafeMutableBytes { b in try c.socket.readAvailable(into: b) }
                }
            } catch { return drop(c, reason: (error as? KVError)?.message ?? "\(error)") }
            guard let n else { break }
            if n == 0 { return drop(c, reason: c.http ? nil : Self.closedByClient) }
            c.input += scratch[0..<n]
            if n < scratch.count { break } // drained for now; poll says when more arrives
            if c.input.count > maxPayload(c) + WireFrameHeader.size { break }
        }
        if c.http { return serveHTTP(c) }
        handleInput(c)
    }

    /// Largest frame `c` may send now: tiny until it has authenticated.
    private func maxPayload(_ c: Connection) -> Int {
        c.authenticated ? options.maxPayload : MasterLimits.maxPreAuthPayload
    }

    /// Handles the whole frames in `c`'s input, until its unsent answers pass the soft limit
    /// (the rest waits until they drain).
    private func handleInput(_ c: Connection) {
        var consumed = 0
        defer { if consumed > 0 { c.input.removeFirst(consumed) } }
        while c.input.count - consumed >= WireFrameHeader.size {
            if c.pending > options.outputSoftLimit || c.parked != nil { break }
            do {
                let limit = maxPayload(c)
                let authenticated = c.authenticated
                let (header, request) = try c.input.withUnsafeBytes { (all) throws -> (WireFrameHeader, MasterRequest?) in
                    let rest = UnsafeRawBufferPointer(rebasing: all[consumed...])
                    // Before authentication only handshake frames are decoded, and only small ones.
                    let h = try WireFrameHeader.decode(
                        rest, maxPayload: limit,
                        isKnown: { k in
                            authenticated ? MasterRequest.isRequestKind(k) : MasterRequest.isHandshakeKind(k)
                        })
                    guard rest.count >= WireFrameHeader.size + h.length else { return (h, nil) }
                    let payload = UnsafeRawBufferPointer(rebasing: rest[WireFrameHeader.size..<WireFrameHeader.size + h.length])
                    return (h, try MasterRequest.decode(kind: h.kind, payload))
                }
                guard let request else { break }
                consumed += WireFrameHeader.size + header.length
                let wasWelcomed = c.authenticated
                if !draining, service.needsDrain(request, session: c.session) {
                    drainOthers(except: c)
                    if connections[c.socket.fd] !== c { return }
                }
                if service.mustWait(request, session: c.session) {
                    // Its key's write has not committed yet, though its put may have returned
                    // on another host with the commit still on the wire: wait for it (bounded).
                    c.parked = (header, request, clock() &+ service.config.readWait, nil)
                    parked.insert(c.socket.fd)
                    break
                }
                if request.allocates, service.mustWaitForRoom(request, now: clock()) {
                    // Before handling it, so no object of a batch fails for want of room.
                    parkForRoom(c, header, request, until: nil)
                    break
                }
                guard let response = respond(c, header, request) else {
                    if connections[c.socket.fd] !== c { return }
                    continue // a pipelined request that succeeded: no answer
                }
                // Answer at once: a client streaming a batch has its next chunk queued behind
                // this one and copies this chunk's objects while the master starts the next.
                if c.input.count - consumed > WireFrameHeader.size {
                    flush(c)
                    if connections[c.socket.fd] !== c { return } // the flush failed and dropped it
                }
                if !wasWelcomed, case .error(let e) = response {
                    // A failed handshake ends the connection: one guess per connection.
                    c.closeAfterFlush = true
                    consumed = c.input.count
                    limited.log("refused", now: clock(), log) { "refused a client: \(e.message)" }
                    flush(c)
                    return
                }
            } catch {
                consumed = c.input.count
                let why = "malformed message: \((error as? KVError)?.message ?? "\(error)")"
                if c.authenticated { return drop(c, reason: why, keepSession: false) }
                drop(c, reason: nil)
                limited.log("malformed", now: clock(), log) { "closing a connection that did not authenticate: \(why)" }
                return
            }
        }
    }

    /// Handles `request` of `c` and queues its answer. nil when there is none (a pipelined
    /// request that succeeded) or `c` was dropped.
    private func respond(
        _ c: Connection, _ header: WireFrameHeader, _ request: MasterRequest,
        waitForSpaceUntil: Nanoseconds? = 0
    ) -> MasterResponse? {
        var refused: KVError? = nil
        if case let .mount(size, _, _, _, _) = request, c.session.local {
            // The capacity a local client mounts is its file's (checked here, told to the service).
            let fd = c.takePassedFD()
            if fd >= 0 {
                do throws(KVError) { c.session.passedSegmentBytes = try SharedMemoryFile.check(fd, holding: size) } catch { refused = error }
                close(fd)
            }
        }
        let response = refused.map { MasterResponse.error($0) } ?? service.handle(request, session: &c.session, now: clock())
        c.handled += 1
        c.session.passedSegmentBytes = nil
        if let until = waitForSpaceUntil, request.allocates, case .error(let e) = response, e.code == .noSpace,
            service.comingBackBytes > 0
        {
            // The room it lacked (fragmented, or in segments it may not use) may be what the
            // confirmations bring back: try again then. The failed try changed nothing.
            parkForRoom(c, header, request, until: until == 0 ? nil : until)
            return nil
        }
        // The requester's own notices ride with this answer; everyone's go out within a
        // notice round (the loop, `noticeRound`), or at once when a write is held back for room.
        if c.session.ownsSegment { deliverNotices(all: false, requester: c) }
        if connections[c.socket.fd] !== c { return nil }
        if case .welcome = response, let id = c.session.client { owners[id] = c }
        if case .resume = request, case .value = response, let id = c.session.client { owners[id] = c }
        if response == .ok, request.isPipelined { return nil } // answered only when it fails
        if case .leave = request {
            for d in service.takeDepartures() where !(d.segments.isEmpty && d.lostObjects.isEmpty && d.abandonedWrites == 0) {
                logDeparture(d, why: "it closed its store")
            }
        }
        if case .resume = request, case .value = response, let id = c.session.client {
            // The session moved here: a connection still holding it (a partition the master
            // did not see) ends, without touching the session.
            for other in Array(connections.values) where other !== c && other.session.client == id { drop(other, reason: nil) }
            log("client \(id) resumed its session on connection \(c.socket.fd)")
        }
        c.output += WireWriter.frame(kind: response.kind, requestID: header.requestID, payload: response.encode())
        if c.pending > options.outputHardLimit {
            drop(c, reason: "its unread answers passed \(options.outputHardLimit) bytes")
            return nil
        }
        return response
    }

    /// How often notices go to every owner (an idle one wakes for them: `RemoteMaster`);
    /// at once when a write is held back for the room they free.
    static let noticeRound: Nanoseconds = 5_000_000

    /// When notices last went to every owner.
    private var noticesSent: Nanoseconds = 0

    /// Sends owners what changed in their segments (`MasterLogic.takeNotices`): `requester`'s
    /// are queued ahead of its answer (one write for both); everyone's are written at once
    /// when `all`, or when a notice round has passed since they last were.
    private func deliverNotices(all: Bool, requester: Connection? = nil) {
        guard service.hasNotices() else { return }
        let now = clock()
        let everyone = all || now &- noticesSent >= Self.noticeRound
        if everyone { noticesSent = now }
        let batches = service.takeNotices(now: now, all: everyone, requester: requester?.session.client)
        for (client, notices) in batches {
            let frame = WireWriter.frame(kind: MasterResponse.noticesKind, requestID: 0, payload: MasterResponse.notices(notices).encode())
            if let r = requester, r.session.client == client, service.isCurrent(r.session) {
                r.output += frame
                continue
            }
            guard let c = owners[client], connections[c.socket.fd] === c, service.isCurrent(c.session) else { continue }
            c.output += frame
            flush(c)
        }
    }

    /// Each client's current connection (for notices), kept when a session is welcomed or
    /// resumed.
    private var owners: [UInt64: Connection] = [:]

    /// Holds `c`'s write start back until an owner's confirmation brings back room freed
    /// moments ago (its index must not list what went before the space is reused:
    /// `ObjectTable.ledgers`), or until `until` (nil: `spaceWait` from now, a new wait). The
    /// owners hear their notices now, so they confirm soon.
    private func parkForRoom(_ c: Connection, _ header: WireFrameHeader, _ request: MasterRequest, until: Nanoseconds?) {
        if until == nil { service.countSpaceWait() }
        c.parked = (header, request, until ?? clock() &+ Self.spaceWait, service.confirmations)
        parked.insert(c.socket.fd)
        deliverNotices(all: true)
    }

    /// Connections with a read or write held back (`Connection.parked`).
    private var parked: Set<Int32> = []

    /// The longest a write waits for owners to confirm freed space before its `noSpace`
    /// goes out (an owner confirms within its heartbeat thread's notice round, 5 ms).
    static let spaceWait: Nanoseconds = 200_000_000

    /// Answers the held-back reads whose key's write has ended, or whose wait ran out, then
    /// goes on with the requests queued behind them.
    private func resumeParked() {
        let now = clock()
        for fd in Array(parked) {
            guard let c = connections[fd], let p = c.parked else {
                parked.remove(fd)
                continue
            }
            let expired = now >= p.until
            if let space = p.space {
                guard expired || service.confirmations != space else { continue }
                if !expired, service.mustWaitForRoom(p.request, now: now) { // not yet: wait for the next
                    c.parked = (p.header, p.request, p.until, service.confirmations)
                    continue
                }
            } else {
                guard expired || !service.mustWait(p.request, session: c.session) else { continue }
            }
            c.parked = nil
            parked.remove(fd)
            if p.space == nil { service.countWait(expired: expired) }
            _ = respond(c, p.header, p.request, waitForSpaceUntil: p.space == nil || expired ? nil : p.until)
            guard connections[fd] === c else { continue }
            flush(c)
            if connections[fd] === c, !c.input.isEmpty { handleInput(c) }
        }
    }

    /// Set while `drainOthers` runs (it does not nest).
    private var draining = false

    /// Reads and handles whatever the other connections have sent already: a pipelined
    /// commit that reached this machine before the request being handled is applied first.
    private func drainOthers(except c: Connection) {
        draining = true
        defer { draining = false }
        for other in Array(connections.values) where other !== c && !other.http {
            readFrom(other)
        }
    }

    private func flush(_ c: Connection) {
        while c.sent < c.output.count {
            let n: Int
            do {
                n = try c.output.withUnsafeBytes { b in try c.socket.writeAvailable(UnsafeRawBufferPointer(rebasing: b[c.sent...])) }
            } catch { return drop(c, reason: (error as? KVError)?.message ?? "\(error)") }
            if n == 0 { return }
            c.sent += n
        }
        c.output.removeAll(keepingCapacity: true)
        c.sent = 0
        if c.closeAfterFlush { drop(c, reason: nil) }
    }

    static let closedByClient = "closed by the client"

    /// Closes `c`. Its client departs at once when it held nothing, or its process is gone
    /// (a local connection whose pid no longer exists), or `keepSession` is false (the master
    /// closes a misbehaving connection); otherwise its session waits for a resume until the
    /// client TTL (`MasterLogic.closed`). A client that closes its connection holding
    /// nothing leaves without a log line: every client on this host does that with its first
    /// (TCP) connection when it moves to the local socket.
    private func drop(_ c: Connection, reason: String?, keepSession: Bool = true) {
        connections[c.socket.fd] = nil
        parked.remove(c.socket.fd)
        if let id = c.session.client, owners[id] === c { owners[id] = nil }
        let pid = c.session.peerPID
        let gone = !keepSession || (pid > 0 && Self.processExiting(pid))
        let d = service.closed(c.session, peerGone: gone, now: clock())
        let holdingNothing = d.map { $0.segments.isEmpty && $0.lostObjects.isEmpty && $0.abandonedWrites == 0 } ?? true
        if let reason, !(holdingNothing && reason == Self.closedByClient) {
            log("closing connection \(c.socket.fd)" + (c.session.client.map { " (client \($0))" } ?? "") + ": \(reason)")
        }
        if let d, !holdingNothing { logDeparture(d, why: "its connection closed") }
        c.socket.close()
    }

    /// Whether process `pid` (of this PID namespace) is gone or exiting: no /proc entry, a
    /// zombie, or the kernel's PF_EXITING flag set (it is set before an exiting process's
    /// descriptors close, so a peer that died is seen as such when its socket's EOF arrives).
    /// Writer processes (pid) last seen stopped, and when.
    private var stoppedWriters: [Int: Nanoseconds] = [:]

    /// Whether a stale write of writer `pid` must wait (`MasterLogic.expireWrites`): the
    /// process is stopped now, or was within the last half second (after SIGCONT, a copy it
    /// had begun finishes first). Unknown pids (TCP writers) and gone processes: no.
    private func writerHeld(_ pid: Int, now: Nanoseconds) -> Bool {
        guard pid > 0, let state = Self.processState(Int32(pid)) else { stoppedWriters[pid] = nil; return false }
        if state == UInt8(ascii: "T") || state == UInt8(ascii: "t") {
            stoppedWriters[pid] = now
            return true
        }
        if let seen = stoppedWriters[pid], now &- seen < 500_000_000 { return true }
        stoppedWriters[pid] = nil
        return false
    }

    /// The state letter of process `pid` (/proc/pid/stat: R, S, D, T, t, Z, ...); nil when it is gone.
    static func processState(_ pid: Int32) -> UInt8? {
        let fd = open("/proc/\(pid)/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 1024)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0, let paren = buf[0..<n].lastIndex(of: UInt8(ascii: ")")), paren + 2 < n else { return nil }
        return buf[paren + 2]
    }

    static func processExiting(_ pid: Int32) -> Bool {
        let fd = open("/proc/\(pid)/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 1024)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0, let paren = buf[0..<n].lastIndex(of: UInt8(ascii: ")")) else { return true }
        // After "pid (comm)": state ppid pgrp session tty_nr tpgid flags ...
        let fields = buf[(paren + 1)..<n].split(separator: UInt8(ascii: " "))
        guard fields.count > 6, let state = fields[0].first else { return true }
        if state == UInt8(ascii: "Z") || state == UInt8(ascii: "X") { return true }
        let flags = UInt64(String(decoding: fields[6], as: UTF8.self)) ?? 0
        return flags & 0x4 != 0 // PF_EXITING
    }

    private func logDeparture(_ d: MasterLogic.Departure, why: String) {
        log(
            "client \(d.client) '\(d.name)' left (\(why)): unmounted segments \(d.segments), \(d.lostObjects.count) objects lost, \(d.abandonedWrites) writes abandoned"
        )
    }

    // MARK: HTTP

    private func serveHTTP(_ c: Connection) {
        guard let end = c.input.firstRange(of: Array("\r\n\r\n".utf8)) else {
            if c.input.count > 8192 { drop(c, reason: "HTTP request head too large") }
            return
        }
        let head = String(decoding: c.input[..<end.lowerBound], as: UTF8.self)
        c.input.removeAll()
        let parts = head.split(separator: " ", maxSplits: 2)
        let target = parts.count >= 2 && parts[0] == "GET" ? String(parts[1]) : ""
        let (path, query) =
            target.firstIndex(of: "?").map { (String(target[..<$0]), String(target[target.index(after: $0)...])) }
            ?? (target, "")
        let (status, body, type): (String, String, String)
        let text = "text/plain; version=0.0.4"
        switch path {
        case "/health": (status, body, type) = ("200 OK", "ok\n", "text/plain")
        case "/metrics": (status, body, type) = ("200 OK", metricsText(), text)
        case "/get_all_segments": (status, body, type) = ("200 OK", segmentsText(), text)
        case "/query_segment":
            if let line = segmentText(named: Self.queryValue(query, "segment")) {
                (status, body, type) = ("200 OK", line, text)
            } else {
                (status, body, type) = ("404 Not Found", "segment not found\n", "text/plain")
            }
        case "/get_segments_detail": (status, body, type) = ("200 OK", segmentsJSON(), "application/json; charset=utf-8")
        default: (status, body, type) = ("404 Not Found", "not found\n", "text/plain")
        }
        c.output += Array("HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)".utf8)
        c.closeAfterFlush = true
        flush(c)
    }

    // Mooncake's segment endpoints (its master's HTTP service; SGLang's check_server polls
    // /get_all_segments until it is not empty). Segments are named as the Mooncake drop-in's
    // replica descriptors name them. Keys are not listed here: that needs a member's token.

    static func segmentName(_ id: SegmentID) -> String { "kvstore-segment-\(id)" }

    /// The value of `name` in a URL query ("a=1&b=2"), percent-decoded; nil when absent.
    static func queryValue(_ query: String, _ name: String) -> String? {
        for pair in query.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            guard kv.count == 2, kv[0] == name else { continue }
            var out: [UInt8] = []
            var bytes = Array(kv[1].utf8)[...]
            while let b = bytes.popFirst() {
                if b == UInt8(ascii: "%"), bytes.count >= 2, let v = UInt8(String(decoding: bytes.prefix(2), as: UTF8.self), radix: 16) {
                    out.append(v)
                    bytes = bytes.dropFirst(2)
                } else {
                    out.append(b == UInt8(ascii: "+") ? UInt8(ascii: " ") : b)
                }
            }
            return String(decoding: out, as: UTF8.self)
        }
        return nil
    }

    /// The mounted segments' names, one per line ("" when none).
    func segmentsText() -> String {
        service.segmentReport().map { Self.segmentName($0.usage.segment) + "\n" }.joined()
    }

    /// One segment's name, bytes used and capacity; nil when no mounted segment has that name.
    func segmentText(named name: String?) -> String? {
        guard let name, let r = service.segmentReport().first(where: { Self.segmentName($0.usage.segment) == name }) else { return nil }
        return "\(name)\nUsed(bytes): \(r.usage.used)\nCapacity(bytes): \(r.usage.capacity)\n"
    }

    /// Every mounted segment in Mooncake's /get_segments_detail form.
    func segmentsJSON() -> String {
        let report = service.segmentReport()
        let items = report.map { r -> String in
            let pct = r.usage.capacity > 0 ? Double(r.usage.used) * 100 / Double(r.usage.capacity) : 0
            let endpoint = JSONValue.quote(r.info?.endpoint ?? "")
            let host = JSONValue.quote(r.info?.host ?? "")
            return "{\"segment_name\":\"\(Self.segmentName(r.usage.segment))\",\"segment_id\":\"\(r.usage.segment)\",\"host\":\(host),"
                + "\"size_bytes\":\(r.usage.capacity),\"te_endpoint\":\(endpoint),\"protocol\":\"tcp\",\"status\":\"MOUNTED\","
                + "\"allocator_used_bytes\":\(r.usage.used),\"allocator_capacity_bytes\":\(r.usage.capacity),"
                + "\"allocator_usage_percent\":\(Double(Int(pct * 100)) / 100)}"
        }
        return "{\"total_segments\":\(report.count),\"segments\":[\(items.joined(separator: ","))]}\n"
    }

    /// The statistics in Prometheus text format.
    func metricsText() -> String {
        guard case .stats(let pairs) = service.statistics(now: clock()) else { return "" }
        var out = ""
        let extra = [
            Statistic("connections", connections.count), Statistic("refused_connections", refusedConnections),
            Statistic("term", Int(clamping: options.config.term))
        ]
        for p in pairs + extra {
            out += "# TYPE kvstore_\(p.name) gauge\nkvstore_\(p.name) \(p.value)\n"
        }
        return out
    }
}

/// Log lines that repeat (a refused client, a failing accept) at most once a second per kind,
/// with a count of the ones left out: an attacker cannot flood the log.
struct RateLimitedLog {
    private var last: [String: (at: Nanoseconds, suppressed: Int)] = [:]

    mutating func log(_ kind: String, now: Nanoseconds, _ sink: (String) -> Void, _ line: () -> String) {
        if let l = last[kind], now &- l.at < 1_000_000_000 {
            last[kind]!.suppressed += 1
            return
        }
        let suppressed = last[kind]?.suppressed ?? 0
        last[kind] = (now, 0)
        sink(line() + (suppressed > 0 ? " (and \(suppressed) similar in the last second)" : ""))
    }
}
