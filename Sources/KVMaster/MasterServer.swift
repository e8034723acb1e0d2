#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVStore
import KVTransfer

/// The network master: `MasterService` behind a TCP control plane, plus a small HTTP endpoint
/// serving Prometheus text at `/metrics` and `/health`.
///
/// One thread runs `run()`: a `poll` loop over the listeners and every connection, so the
/// service needs no lock. Each connection's requests are handled in arrival order. A frame
/// that does not decode (bad magic, version, kind, length or fields) closes that connection
/// with a logged reason; the master and every other connection carry on. A closed control
/// connection departs its client at once (segments unmounted, writes aborted); a silent one
/// departs after the client TTL.
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
        public init() {}
    }

    final class Connection {
        let socket: Socket
        let http: Bool
        var input: [UInt8] = []
        var output: [UInt8] = []
        var sent = 0
        var session = MasterService.Session()
        var closeAfterFlush = false
        init(_ s: Socket, http: Bool) { socket = s; self.http = http }
    }

    public let options: Options
    private let listener: Socket
    /// The abstract Unix-domain listener advertised in the welcome (nil: none).
    private let localListener: Socket?
    private let httpListener: Socket?
    private var wake: (read: Int32, write: Int32) = (-1, -1)
    private var service: MasterService
    private var connections: [Int32: Connection] = [:]
    /// Where every read lands before its bytes join a connection's input (allocated once).
    private var scratch = [UInt8](repeating: 0, count: 1 << 16)
    private let clock: Clock
    private let log: @Sendable (String) -> Void
    /// The ports actually bound (useful with port 0).
    public let port: Int
    public let metricsPort: Int?

    /// Binds the listeners. Refuses a non-loopback address without a token.
    public init(options: Options, clock: @escaping Clock = monotonicClock,
                log: @escaping @Sendable (String) -> Void = MasterServer.logToStandardError) throws(KVError) {
        if !Socket.isLoopback(options.host) && (options.config.token ?? "").isEmpty {
            throw .invalidArgument("binding \(options.host) (not loopback) needs a token that clients must present")
        }
        self.options = options
        listener = try Socket.listen(host: options.host, port: options.port)
        listener.setNonBlocking()
        port = listener.localPort
        // Clients on this host and network namespace move their connection to a local socket
        // (a loopback TCP round trip costs twice a Unix-domain one). Its name is unique per run.
        var config = options.config
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
        service = try MasterService(config: config)
        if let mp = options.metricsPort {
            let h = try Socket.listen(host: options.metricsHost, port: mp)
            h.setNonBlocking()
            httpListener = h
            metricsPort = h.localPort
        } else {
            httpListener = nil
            metricsPort = nil
        }
        var fds: [Int32] = [0, 0]
        try SystemCall.check("pipe", pipe(&fds))
        wake = (fds[0], fds[1])
        _ = fcntl(wake.read, F_SETFL, O_NONBLOCK)
        self.clock = clock
        self.log = log
    }

    /// Writes "kvstore-master: <line>" to standard error.
    public static let logToStandardError: @Sendable (String) -> Void = { line in
        let text = "kvstore-master: \(line)\n"
        _ = text.withCString { write(2, $0, strlen($0)) }
    }

    deinit {
        if wake.read >= 0 { close(wake.read); close(wake.write) }
    }

    /// The token in `KVSTORE_MASTER_TOKEN`, if set and not empty.
    public static func environmentToken() -> String? {
        guard let v = getenv("KVSTORE_MASTER_TOKEN"), v.pointee != 0 else { return nil }
        return String(cString: v)
    }

    /// The write end of the stop pipe of the server that handles signals (one per process).
    nonisolated(unsafe) private static var signalPipe: Int32 = -1

    /// The signal handlers `stopOnSignals` replaced.
    public typealias SavedSignals = (interrupt: sigaction, terminate: sigaction)

    /// Makes SIGINT and SIGTERM stop this server (`run()` returns and the process can exit
    /// cleanly, closing every connection). Returns the handlers it replaced.
    @discardableResult
    public func stopOnSignals() -> SavedSignals {
        Self.signalPipe = wake.write
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
    public func stop() {
        var b: UInt8 = 1
        _ = write(wake.write, &b, 1)
    }

    /// Serves until `stop()`.
    public func run() {
        log("listening on \(options.host):\(port)" + (metricsPort.map { ", metrics on \(options.metricsHost):\($0)" } ?? ""))
        var lastSweep = clock()
        var lastActivity: Nanoseconds = 0
        let listeners = [(listener, false)] + (localListener.map { [($0, false)] } ?? []) + (httpListener.map { [($0, true)] } ?? [])
        var fds: [pollfd] = []
        while true {
            fds.removeAll(keepingCapacity: true)
            fds.append(pollfd(fd: wake.read, events: Int16(POLLIN), revents: 0))
            for (l, _) in listeners { fds.append(pollfd(fd: l.fd, events: Int16(POLLIN), revents: 0)) }
            for (fd, c) in connections {
                fds.append(pollfd(fd: fd, events: Int16(POLLIN) | (c.sent < c.output.count ? Int16(POLLOUT) : 0), revents: 0))
            }
            // Right after a request, poll without sleeping for a short while: the next
            // request of a busy client is picked up without a scheduler wake-up.
            let busy = clock() &- lastActivity < options.spinNanos
            let n = poll(&fds, nfds_t(fds.count), busy ? 0 : 250)
            if n < 0 && errno != EINTR { log("poll failed: errno \(errno)"); break }
            if n > 0 { lastActivity = clock() }
            if fds[0].revents != 0 { break }
            for (i, (l, http)) in listeners.enumerated() where fds[i + 1].revents != 0 { acceptAll(l, http: http) }
            for p in fds.dropFirst(1 + listeners.count) where p.revents != 0 {
                guard let c = connections[p.fd] else { continue }
                if p.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { readFrom(c) }
                if connections[p.fd] != nil { flush(c) }
            }
            let now = clock()
            if now &- lastSweep >= 1_000_000_000 {
                lastSweep = now
                for d in service.expireClients(now: now) {
                    logDeparture(d, why: "silent for longer than the client TTL")
                    // Its connection (if still open) ends too: the client sees that and reconnects.
                    for c in connections.values where c.session.client == d.client { drop(c, reason: nil) }
                }
                service.advance(now: now)
            }
        }
        for c in connections.values { drop(c, reason: nil) }
        log("stopped")
    }

    // MARK: connections

    private func acceptAll(_ l: Socket, http: Bool) {
        while true {
            do throws(KVError) {
                guard let s = try l.accept() else { return }
                connections[s.fd] = Connection(s, http: http)
            } catch {
                log("accept failed: \(error.message)")
                return
            }
        }
    }

    private func readFrom(_ c: Connection) {
        while true {
            let n: Int?
            do {
                n = try scratch.withUnsafeMutableBytes { b in try c.socket.readAvailable(into: b) }
            } catch { return drop(c, reason: (error as? KVError)?.message ?? "\(error)") }
            guard let n else { break }
            if n == 0 { return drop(c, reason: c.http ? nil : Self.closedByClient) }
            c.input += scratch[0..<n]
            if n < scratch.count { break }   // drained for now; poll says when more arrives
            if c.input.count > options.maxPayload + WireFrameHeader.size { break }
        }
        if c.http { return serveHTTP(c) }
        var consumed = 0
        defer { if consumed > 0 { c.input.removeFirst(consumed) } }
        while c.input.count - consumed >= WireFrameHeader.size {
            do {
                let (header, request) = try c.input.withUnsafeBytes { (all) throws -> (WireFrameHeader, MasterRequest?) in
                    let rest = UnsafeRawBufferPointer(rebasing: all[consumed...])
                    let h = try WireFrameHeader.decode(rest, maxPayload: options.maxPayload, isKnown: MasterRequest.isRequestKind)
                    guard rest.count >= WireFrameHeader.size + h.length else { return (h, nil) }
                    let payload = UnsafeRawBufferPointer(rebasing: rest[WireFrameHeader.size..<WireFrameHeader.size + h.length])
                    return (h, try MasterRequest.decode(kind: h.kind, payload))
                }
                guard let request else { break }
                consumed += WireFrameHeader.size + header.length
                let wasWelcomed = c.session.client != nil
                if !draining, request.anyKey({ service.isWriting($0) }) || (request.concernsEveryKey && service.hasWritesInFlight) {
                    drainOthers(except: c)
                }
                let response = service.handle(request, session: &c.session, now: clock())
                if response == .ok, request.isPipelined { continue }   // answered only when it fails
                c.output += WireWriter.frame(kind: response.kind, requestID: header.requestID, payload: response.encode())
                // Answer at once: a client streaming a batch has its next chunk queued behind
                // this one and copies this chunk's objects while the master starts the next.
                if c.input.count - consumed > WireFrameHeader.size {
                    flush(c)
                    if connections[c.socket.fd] !== c { return }   // the flush failed and dropped it
                }
                if case .hello = request, !wasWelcomed, case .error(let e) = response {
                    c.closeAfterFlush = true
                    log("refused a client: \(e.message)")
                }
            } catch {
                consumed = c.input.count
                return drop(c, reason: "malformed message: \((error as? KVError)?.message ?? "\(error)")")
            }
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

    /// Closes `c` and departs its client. A client that closes its connection holding
    /// nothing (no segment, no write in flight) leaves without a log line: every client on
    /// this host does that with its first (TCP) connection when it moves to the local socket.
    private func drop(_ c: Connection, reason: String?) {
        connections[c.socket.fd] = nil
        let d = c.session.client.flatMap { service.depart(client: $0, now: clock()) }
        let holdingNothing = d.map { $0.segments.isEmpty && $0.lostObjects.isEmpty && $0.abortedWrites == 0 } ?? true
        if let reason, !(holdingNothing && reason == Self.closedByClient) {
            log("closing connection \(c.socket.fd)" + (c.session.client.map { " (client \($0))" } ?? "") + ": \(reason)")
        }
        if let d, !holdingNothing { logDeparture(d, why: "its connection closed") }
        c.socket.close()
    }

    private func logDeparture(_ d: MasterService.Departure, why: String) {
        log("client \(d.client) '\(d.name)' left (\(why)): unmounted segments \(d.segments), \(d.lostObjects.count) objects lost, \(d.abortedWrites) writes aborted")
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
        let path = parts.count >= 2 && parts[0] == "GET" ? String(parts[1]) : ""
        let (status, body, type): (String, String, String)
        switch path {
        case "/health": (status, body, type) = ("200 OK", "ok\n", "text/plain")
        case "/metrics": (status, body, type) = ("200 OK", metricsText(), "text/plain; version=0.0.4")
        default: (status, body, type) = ("404 Not Found", "not found\n", "text/plain")
        }
        c.output += Array("HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)".utf8)
        c.closeAfterFlush = true
        flush(c)
    }

    /// The statistics in Prometheus text format.
    func metricsText() -> String {
        guard case .stats(let pairs) = service.statistics(now: clock()) else { return "" }
        var out = ""
        for p in pairs {
            out += "# TYPE kvstore_\(p.name) gauge\nkvstore_\(p.name) \(p.value)\n"
        }
        return out
    }
}
