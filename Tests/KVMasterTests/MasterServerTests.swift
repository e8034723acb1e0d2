import XCTest
import Synchronization
import KVAccelerator
import KVCore
import KVSystem
import KVTestSupport
@testable import KVStore
import KVTransfer
@testable import KVMaster
#if canImport(Glibc)
import Glibc
#endif

/// The master over real loopback sockets: requests and responses, a malformed frame closing
/// only its own connection, departures when a connection closes, and the HTTP endpoint.
final class MasterServerTests: XCTestCase {
    /// A blocking test client speaking the wire protocol.
    final class Client: @unchecked Sendable {
        let socket: Socket
        var nextID: UInt32 = 1
        init(port: Int) throws { socket = try Socket.connect(host: "127.0.0.1", port: port) }
        init(local name: String) throws { socket = try Socket.connectLocal(name: name) }

        /// Notices the master sent this client (about segments it mounted).
        var notices: [ObjectTable.SegmentNotice] = []

        func call(_ r: MasterRequest) throws -> MasterResponse {
            let id = nextID
            nextID += 1
            try send(WireWriter.frame(kind: r.kind, requestID: id, payload: r.encode()))
            while true {
                var head = [UInt8](repeating: 0, count: WireFrameHeader.size)
                try head.withUnsafeMutableBytes { try socket.readExactly(into: $0) }
                let h = try head.withUnsafeBytes { try WireFrameHeader.decode($0) }
                var payload = [UInt8](repeating: 0, count: h.length)
                if h.length > 0 { try payload.withUnsafeMutableBytes { try socket.readExactly(into: $0) } }
                let answer = try payload.withUnsafeBytes { try MasterResponse.decode(kind: h.kind, $0) }
                if h.requestID == 0, case .notices(let ns) = answer { notices += ns; continue }
                XCTAssertEqual(h.requestID, id)
                return answer
            }
        }

        func send(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try socket.writeAll($0) } }

        /// The handshake with `token`: the master's answer to prove (a welcome or an error),
        /// or its error to hello. Checks the master's proof.
        func hello(
            token: String = MasterServerTests.token, name: String,
            expectedToken: String = MasterServerTests.token
        ) throws -> MasterResponse {
            let cn = Authentication.randomBytes(Authentication.nonceSize)
            let answer = try call(.hello(name: name, nonce: cn, tenant: ""))
            guard case let .challenge(sn, proof) = answer else { return answer }
            let t = Array(token.utf8)
            // The master proves the same token (checked only when this client holds it).
            let matches = proof == Authentication.proof(token: t, role: .server, clientNonce: cn, serverNonce: sn)
            XCTAssertEqual(matches, token == expectedToken)
            return try call(.prove(proof: Authentication.proof(token: t, role: .client, clientNonce: cn, serverNonce: sn)))
        }

        /// Sends a pipelined request (answered only when it fails); returns its id.
        @discardableResult
        func post(_ r: MasterRequest) throws -> UInt32 {
            let id = nextID
            nextID += 1
            try send(WireWriter.frame(kind: r.kind, requestID: id, payload: r.encode()))
            return id
        }

        /// The next answer, whatever its id.
        func next() throws -> (UInt32, MasterResponse) {
            while true {
                let (h, payload) = try socket.readFrame(maxPayload: 1 << 20, isKnown: MasterResponse.isResponseKind)
                let answer = try payload.withUnsafeBytes { try MasterResponse.decode(kind: h.kind, $0) }
                if h.requestID == 0, case .notices(let ns) = answer { notices += ns; continue }
                return (h.requestID, answer)
            }
        }

        /// True when the server closed the connection.
        func isClosedByPeer() -> Bool {
            var b: UInt8 = 0
            var tv = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(socket.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            return recv(socket.fd, &b, 1, 0) == 0
        }
    }

    final class Logs: @unchecked Sendable {
        private let lock = Locked([String]())
        func add(_ s: String) { lock.withLock { $0.append(s) } }
        var all: [String] { lock.withLock { $0 } }
    }

    static let token = "master-server-tests-token"

    func start(
        token: String = MasterServerTests.token, localSocket: Bool = true,
        _ adjust: (inout MasterServer.Options) -> Void = { _ in }
    ) throws -> (MasterServer, BackgroundThread, Logs) {
        try Self.start(token: token, localSocket: localSocket, adjust)
    }

    static func start(
        token: String = MasterServerTests.token, localSocket: Bool = true,
        _ adjust: (inout MasterServer.Options) -> Void = { _ in }
    ) throws -> (MasterServer, BackgroundThread, Logs) {
        var o = MasterServer.Options()
        o.localSocket = localSocket
        o.port = 0
        o.metricsPort = 0
        o.tokenFile = ""
        o.config = MasterConfig(token: token, clientTTL: 10_000_000_000)
        adjust(&o)
        let logs = Logs()
        let server = try MasterServer(options: o, log: { logs.add($0) })
        let t = try BackgroundThread { server.run() }
        return (server, t, logs)
    }

    func testHTTPQueryValuesArePercentDecoded() {
        XCTAssertEqual(MasterServer.queryValue("segment=kvstore-segment-7", "segment"), "kvstore-segment-7")
        XCTAssertEqual(MasterServer.queryValue("a=1&segment=x%2Fy+z&b=2", "segment"), "x/y z")
        XCTAssertEqual(MasterServer.queryValue("segment=%zz%4", "segment"), "%zz%4") // bad escapes stay as they are
        XCTAssertNil(MasterServer.queryValue("segments=1&x", "segment"))
        XCTAssertNil(MasterServer.queryValue("", "segment"))
    }

    func testRequestsOverTCP() throws {
        let (server, thread, _) = try start()
        defer { server.stop(); thread.join() }
        let c = try Client(port: server.port)
        guard case .welcome = try c.hello(name: "t") else { return XCTFail() }
        guard case .mounted(let seg) = try c.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "127.0.0.1:1", reused: nil)) else {
            return XCTFail()
        }
        guard case .putStarted(let w) = try c.call(.putStart(key: "k", size: 100, mode: .put, options: WriteOptions(replicas: 1), preferred: seg)) else {
            return XCTFail()
        }
        let (h, rs) = (w.handle, w.replicas)
        XCTAssertEqual(rs.first?.segment, seg)
        try c.post(.putCommit(handle: h)) // no answer when it succeeds
        guard case .found(let f) = try c.call(.get(key: "k", host: "h")) else { return XCTFail() }
        XCTAssertEqual(f.size, 100)
        XCTAssertEqual(f.replicas, rs)
        XCTAssertNotEqual(f.hold, 0, "a hold the reader releases when its copy ends")
        let bad = try c.post(.putCommit(handle: h)) // a second commit fails: answered
        let (id, answer) = try c.next()
        XCTAssertEqual(id, bad)
        guard case .error(let e) = answer else { return XCTFail("\(answer)") }
        XCTAssertEqual(e.code, .invalidArgument)
        XCTAssertEqual(try c.call(.exists(key: "missing")), .flag(false))
    }

    func testLocalSocketServesTheSameMaster() throws {
        let (server, thread, _) = try start(token: "s3cret-s3cret-s3cret")
        defer { server.stop(); thread.join() }
        let tcp = try Client(port: server.port)
        guard case .welcome(let w) = try tcp.hello(token: "s3cret-s3cret-s3cret", name: "tcp", expectedToken: "s3cret-s3cret-s3cret") else { return XCTFail() }
        let name = w.local
        XCTAssertTrue(name.hasPrefix("kvstore-master."), name)
        guard case .mounted(let seg) = try tcp.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "127.0.0.1:1", reused: nil)) else {
            return XCTFail()
        }
        // The local socket checks the token too, and a refused hello closes it.
        let refused = try Client(local: name)
        guard case .error(let e) = try refused.hello(token: "nope", name: "x", expectedToken: "s3cret-s3cret-s3cret") else { return XCTFail() }
        XCTAssertEqual(e.code, .invalidArgument)
        XCTAssertTrue(refused.isClosedByPeer())
        // Same table: a write over the local socket is seen over TCP.
        let local = try Client(local: name)
        guard case .welcome(let w2) = try local.hello(token: "s3cret-s3cret-s3cret", name: "local", expectedToken: "s3cret-s3cret-s3cret") else {
            return XCTFail()
        }
        let again = w2.local
        XCTAssertEqual(again, name)
        guard case .putStarted(let w) = try local.call(.putStart(key: "k", size: 10, mode: .put, options: WriteOptions(replicas: 1), preferred: seg)) else {
            return XCTFail()
        }
        try local.post(.putCommit(handle: w.handle))
        XCTAssertEqual(try tcp.call(.exists(key: "k")), .flag(true))
        // A malformed frame closes only that local connection.
        let bad = try Client(local: name)
        try bad.send(WireWriter.frame(kind: 999, requestID: 1, payload: []))
        XCTAssertTrue(bad.isClosedByPeer())
        XCTAssertEqual(try local.call(.heartbeat), .ok)
        XCTAssertThrowsError(try Socket.connectLocal(name: name + ".other")) { XCTAssertEqual(($0 as? KVError)?.code, .transfer) }
        XCTAssertThrowsError(try Socket.connectLocal(name: "")) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
    }

    func testLocalSocketCanBeTurnedOff() throws {
        let (server, thread, logs) = try start(localSocket: false)
        defer { server.stop(); thread.join() }
        let c = try Client(port: server.port)
        guard case .welcome(let w) = try c.hello(name: "t") else { return XCTFail() }
        let name = w.local
        XCTAssertEqual(name, "")
        // A client closing while holding nothing leaves quietly (clients moving to the local
        // socket do that with their TCP connection); one holding a segment is logged.
        let held = try Client(port: server.port)
        _ = try held.hello(name: "held")
        _ = try held.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "127.0.0.1:1", reused: nil))
        c.socket.close()
        XCTAssertEqual(try held.call(.leave), .ok)
        held.socket.close()
        for _ in 0..<200 where !logs.all.contains(where: { $0.contains("'held' left") }) { usleep(10_000) }
        XCTAssertTrue(logs.all.contains { $0.contains("'held' left") })
        XCTAssertFalse(logs.all.contains { $0.contains("'t' left") || $0.contains("client 1)") }, "\(logs.all)")
    }

    func testMalformedFrameClosesOnlyItsConnection() throws {
        let (server, thread, logs) = try start()
        defer { server.stop(); thread.join() }
        let good = try Client(port: server.port)
        guard case .welcome = try good.hello(name: "good") else { return XCTFail() }
        guard case .mounted = try good.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "127.0.0.1:1", reused: nil)) else { return XCTFail() }
        let bad = [
            Array("GET / HTTP/1.1\r\n\r\n".utf8), // not our protocol
            WireWriter.frame(kind: 999, requestID: 1, payload: []), // unknown kind
            WireWriter.frame(kind: MasterRequest.heartbeat.kind, requestID: 1, payload: [1]), // trailing bytes
            Array(WireWriter.frame(kind: 1, requestID: 1, payload: []).prefix(12)) + [0xFF, 0xFF, 0xFF, 0x7F] // 2 GiB length
        ]
        for b in bad {
            let c = try Client(port: server.port)
            try c.send(b)
            XCTAssertTrue(c.isClosedByPeer(), "\(b.prefix(8))")
        }
        XCTAssertEqual(try good.call(.heartbeat), .ok, "other clients are unaffected")
        XCTAssertTrue(logs.all.contains { $0.contains("malformed message") })
    }

    func testLeavingDepartsAtOnceAndALostConnectionKeepsItsSession() throws {
        let (server, thread, logs) = try start()
        defer { server.stop(); thread.join() }
        let a = try Client(port: server.port), b = try Client(port: server.port), lost = try Client(port: server.port)
        _ = try a.hello(name: "a")
        _ = try b.hello(name: "b")
        _ = try lost.hello(name: "lost")
        guard case .mounted(let seg) = try a.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "127.0.0.1:1", reused: nil)) else {
            return XCTFail()
        }
        guard case .mounted(let kept) = try lost.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "127.0.0.1:1", reused: nil)) else {
            return XCTFail()
        }
        guard case .putStarted(let w) = try a.call(.putStart(key: "k", size: 10, mode: .put, options: WriteOptions(replicas: 1), preferred: seg)) else {
            return XCTFail()
        }
        let h = w.handle
        try a.post(.putCommit(handle: h))
        XCTAssertEqual(try b.call(.exists(key: "k")), .flag(true)) // applied before b's question
        // A TCP connection that closes (a partition, a client's timeout) keeps its session
        // for a resume: its segment stays mounted until the client TTL.
        lost.socket.close()
        usleep(100_000)
        guard case .segment = try b.call(.segmentInfo(segment: kept)) else { return XCTFail("a lost connection departed its client") }
        guard case .stats(let st) = try b.call(.stats) else { return XCTFail() }
        XCTAssertEqual(st.first { $0.name == "sessions_waiting" }?.value, 1)
        XCTAssertEqual(try a.call(.leave), .ok)
        a.socket.close()
        var gone = false
        for _ in 0..<100 where !gone {
            usleep(10_000)
            gone =
                try b.call(.segmentInfo(segment: seg)) != .segment(SegmentInfo(segment: seg, size: 1 << 20, host: "h", sharePath: "p", endpoint: "127.0.0.1:1"))
        }
        XCTAssertTrue(gone)
        XCTAssertEqual(try b.call(.exists(key: "k")), .flag(false))
        XCTAssertTrue(logs.all.contains { $0.contains("'a' left (it closed its store)") && $0.contains("1 objects lost") }, "\(logs.all)")
    }

    func testTokenRules() throws {
        var o = MasterServer.Options()
        o.host = "0.0.0.0"
        o.port = 0
        o.metricsPort = nil
        o.tokenFile = ""
        XCTAssertEqual(try MasterServer(options: o).token.count, 64, "no token given: one is generated")
        o.config.token = "short"
        XCTAssertThrowsError(try MasterServer(options: o)) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        let (server, thread, _) = try start(token: "s3cret-s3cret-s3cret")
        defer { server.stop(); thread.join() }
        let c = try Client(port: server.port)
        guard case .error(let e) = try c.hello(token: "nope", name: "x", expectedToken: "s3cret-s3cret-s3cret") else { return XCTFail() }
        XCTAssertTrue(e.message.contains("token"))
        XCTAssertTrue(c.isClosedByPeer())
    }

    func testHealthAndMetricsOverHTTP() throws {
        let (server, thread, _) = try start()
        defer { server.stop(); thread.join() }
        func get(_ path: String) throws -> String {
            let s = try Socket.connect(host: "127.0.0.1", port: server.metricsPort!)
            try Array("GET \(path) HTTP/1.1\r\nHost: x\r\n\r\n".utf8).withUnsafeBytes { try s.writeAll($0) }
            var out: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buf.withUnsafeMutableBytes { recv(s.fd, $0.baseAddress, 4096, 0) }
                if n <= 0 { break }
                out += buf[0..<n]
            }
            return String(decoding: out, as: UTF8.self)
        }
        XCTAssertTrue(try get("/health").hasSuffix("\r\n\r\nok\n"))
        let m = try get("/metrics")
        XCTAssertTrue(m.contains("# TYPE kvstore_objects gauge\nkvstore_objects 0\n"))
        XCTAssertTrue(m.contains("kvstore_clients 0"))
        XCTAssertTrue(try get("/nope").hasPrefix("HTTP/1.1 404"))
    }
}

/// The master under hostile connections: nothing but a small handshake before
/// authentication, a deadline for it, a connection cap, bounded answers to clients that
/// never read, and its token file.
final class MasterServerLimitTests: XCTestCase {
    typealias Client = MasterServerTests.Client

    func start(_ adjust: (inout MasterServer.Options) -> Void) throws -> (MasterServer, BackgroundThread, MasterServerTests.Logs) {
        try MasterServerTests.start(adjust)
    }

    func testOnlyASmallHandshakeIsReadBeforeAuthentication() throws {
        let (server, thread, logs) = try start { _ in }
        defer { server.stop(); thread.join() }
        // A request other than hello, even a well-formed one, closes the connection unread.
        let early = try Client(port: server.port)
        try early.post(.heartbeat)
        XCTAssertTrue(early.isClosedByPeer())
        // A hello larger than the pre-authentication limit is refused by its header alone.
        let big = try Client(port: server.port)
        try big.send(WireWriter.frame(kind: 1, requestID: 1, payload: [UInt8](repeating: 0, count: MasterLimits.maxPreAuthPayload + 1)))
        XCTAssertTrue(big.isClosedByPeer())
        let wrong = try Client(port: server.port)
        guard case .error = try wrong.hello(token: "not-the-token-at-all", name: "x") else { return XCTFail() }
        XCTAssertTrue(wrong.isClosedByPeer(), "one guess per connection")
        let good = try Client(port: server.port)
        guard case .welcome = try good.hello(name: "good") else { return XCTFail() }
        XCTAssertTrue(logs.all.contains { $0.contains("did not authenticate") })
    }

    static func now() -> Nanoseconds {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Nanoseconds(ts.tv_sec) * 1_000_000_000 + Nanoseconds(ts.tv_nsec)
    }

    func testAConnectionThatDoesNotAuthenticateIsClosed() throws {
        let (server, thread, _) = try start { $0.authTimeout = 300_000_000 }
        defer { server.stop(); thread.join() }
        let idle = try Client(port: server.port)
        let half = try Client(port: server.port)
        try half.send(Array(WireWriter.frame(kind: 1, requestID: 1, payload: [UInt8](repeating: 0, count: 40)).prefix(20)))
        let started = Self.now()
        XCTAssertTrue(idle.isClosedByPeer())
        XCTAssertTrue(half.isClosedByPeer())
        XCTAssertLessThan(Self.now() - started, 1_500_000_000)
        let good = try Client(port: server.port)
        guard case .welcome = try good.hello(name: "good") else { return XCTFail() }
        usleep(600_000)
        XCTAssertEqual(try good.call(.heartbeat), .ok, "an authenticated client has no deadline")
    }

    func testConnectionsPastTheCapAreRefused() throws {
        let (server, thread, logs) = try start { $0.maxClients = 3 }
        defer { server.stop(); thread.join() }
        XCTAssertEqual(server.maxClients, 3)
        let held = try (0..<3).map { _ in try Client(port: server.port) }
        guard case .welcome = try held[0].hello(name: "a") else { return XCTFail() }
        let extra = try Client(port: server.port)
        let (_, answer) = try extra.next()
        guard case .error(let e) = answer else { return XCTFail("\(answer)") }
        XCTAssertTrue(e.message.contains("--max-clients"), e.message)
        XCTAssertTrue(extra.isClosedByPeer())
        XCTAssertEqual(try held[0].call(.heartbeat), .ok)
        held[1].socket.close()
        var admitted = false
        for _ in 0..<100 where !admitted {
            usleep(10_000)
            let c = try Client(port: server.port)
            if case .welcome? = try? c.hello(name: "later") { admitted = true }
        }
        XCTAssertTrue(admitted, "room again once a connection closed")
        XCTAssertTrue(logs.all.contains { $0.contains("--max-clients") })
        XCTAssertGreaterThan(MasterServer.defaultMaxClients(), 16)
    }

    func testAClientThatNeverReadsIsPausedNotBuffered() throws {
        let (server, thread, _) = try start { o in
            o.outputSoftLimit = 64 << 10
            o.outputHardLimit = 1 << 20
        }
        defer { server.stop(); thread.join() }
        let greedy = try Client(port: server.port)
        guard case .welcome = try greedy.hello(name: "greedy") else { return XCTFail() }
        // 20,000 stats requests (~8 MB of answers), sent without reading any answer.
        let n = 20_000
        var frames = WireWriter()
        for i in 0..<n { frames.frame(kind: MasterRequest.stats.kind, requestID: UInt32(100 + i), payload: []) }
        let bytes = frames.bytes
        let sender = try BackgroundThread { try? bytes.withUnsafeBytes { try greedy.socket.writeAll($0) } }
        usleep(300_000)
        let other = try Client(port: server.port)
        guard case .welcome = try other.hello(name: "other") else { return XCTFail() }
        XCTAssertEqual(try other.call(.heartbeat), .ok, "the master keeps serving others")
        // Reading now gets every answer: the master paused the connection instead of dropping it.
        var got = 0
        while got < n {
            let (id, answer) = try greedy.next()
            XCTAssertEqual(id, UInt32(100 + got))
            guard case .stats = answer else { return XCTFail("\(answer)") }
            got += 1
        }
        sender.join()
    }

    func testTheTokenFileIsPrivateAndRemovedAtStop() throws {
        let dir = "/tmp/kvstore-master-tests-\(getpid())"
        mkdir(dir, 0o700)
        defer { rmdir(dir) }
        let path = dir + "/t.token"
        let (server, thread, _) = try start { $0.tokenFile = path }
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        XCTAssertEqual(TokenFile.read(path), server.token)
        server.stop()
        thread.join()
        XCTAssertNotEqual(stat(path, &st), 0, "removed when the master stops")
        chmod(dir, 0o755)
        XCTAssertNil(TokenFile.read(path))
    }
}

/// The master's command line (shared by kvstore-master and kvstore master): every flag's wrong
/// values are refused with the flag named, and nothing starts.
final class MasterCommandLineTests: XCTestCase {
    func testWrongValuesAreRefusedNamingTheFlag() {
        let bad: [([String], String)] = [
            (["--port"], "--port needs a value"), (["--port", "x"], "--port needs an integer"), (["--port", "70000"], "out of range"),
            (["--metrics-port", "-2"], "--metrics-port"), (["--max-clients", "-1"], "--max-clients"),
            (["--allow-uid", "root"], "not a uid"), (["--tenant", "nocolon"], "NAME:TOKEN_FILE"),
            (["--tenant", "a/b:/nonexistent"], "tenant name"), (["--token", "short"], "at least 16"),
            (["--token-file", "/nonexistent/token"], "cannot read a token"), (["--client-ttl", "nan"], "--client-ttl"),
            (["--lease-ttl", "-1"], "lease TTL"), (["--eviction-ratio", "2"], "eviction ratio"),
            (["--default_kv_lease_ttl", "zero"], "--default_kv_lease_ttl"), (["--bogus"], "unknown argument"),
            (["--write-timeout", "0"], "write_timeout"), (["--write-timeout", "-5"], "write_timeout"),
            (["--write-timeout", "inf"], "--write-timeout"), (["--read-wait", "-1"], "--read-wait"),
            (["--read-wait", "61"], "--read-wait"), (["--read-wait", "soon"], "--read-wait")
        ]
        for (args, words) in bad {
            XCTAssertThrowsError(try MasterCommandLine.parse(args), "\(args)") { e in
                let message = (e as? KVError)?.message ?? ""
                XCTAssertEqual((e as? KVError)?.code, .invalidArgument, "\(args)")
                XCTAssertTrue(message.contains(words), "\(args): \(message)")
            }
        }
    }

    func testWriteTimeoutAndReadWaitReachTheConfig() throws {
        guard case .run(let o) = try MasterCommandLine.parse(["--write-timeout", "2.5", "--read-wait", "0", "--token", "a-token-of-16+bytes"]) else {
            return XCTFail()
        }
        XCTAssertEqual(o.config.quotas.writeTimeout, 2_500_000_000)
        XCTAssertEqual(o.config.readWait, 0)
        guard case .run(let d) = try MasterCommandLine.parse(["--token", "a-token-of-16+bytes"]) else { return XCTFail() }
        XCTAssertEqual(d.config.quotas.writeTimeout, 300_000_000_000)
        XCTAssertEqual(d.config.readWait, 50_000_000)
    }

    func testBothSpellingsAndEqualsFormsParse() throws {
        guard
            case .run(let o) = try MasterCommandLine.parse([
                "--rpc_port=0", "--metrics_port", "-1", "--token", "a-token-of-16+bytes",
                "--allow-uid", "7,8", "--default_kv_lease_ttl", "250", "--max-clients=9"
            ])
        else { return XCTFail() }
        XCTAssertEqual(o.port, 0)
        XCTAssertNil(o.metricsPort)
        XCTAssertEqual(o.allowedUIDs, [7, 8])
        XCTAssertEqual(o.maxClients, 9)
        XCTAssertEqual(o.config.cache.leaseTTL, 250_000_000)
        guard case .help(let text) = try MasterCommandLine.parse(["--port", "1", "--help"], program: "x") else { return XCTFail() }
        XCTAssertTrue(text.hasPrefix("usage: x"))
    }

    func testElectionFlags() throws {
        guard
            case .run(let o) = try MasterCommandLine.parse([
                "--etcd", "http://127.0.0.1:2379,127.0.0.2:2380", "--cluster_id", "prod",
                "--etcd-ttl", "1", "--advertise", "10.0.0.5", "--host", "0.0.0.0",
                "--token", "a-token-of-16+bytes"
            ])
        else { return XCTFail() }
        XCTAssertEqual(
            o.election,
            MasterElection.Options(
                endpoints: "http://127.0.0.1:2379,127.0.0.2:2380", cluster: "prod", ttl: 1,
                advertise: "10.0.0.5"))
        guard case .run(let plain) = try MasterCommandLine.parse(["--token", "a-token-of-16+bytes"]) else { return XCTFail() }
        XCTAssertNil(plain.election)
        let bad: [([String], String)] = [
            (["--etcd", "http://127.0.0.1:2379"], "one token"),
            (["--cluster", "x", "--token", "a-token-of-16+bytes"], "need --etcd"),
            (["--etcd", "http://127.0.0.1:2379", "--etcd-ttl", "301", "--token", "a-token-of-16+bytes"], "1 to 300"),
            (["--etcd", "http://127.0.0.1:2379", "--port", "0", "--token", "a-token-of-16+bytes"], "fixed --port"),
            (["--etcd", "http://127.0.0.1:2379", "--host", "0.0.0.0", "--token", "a-token-of-16+bytes"], "--advertise"),
            (["--etcd", "ftp://x", "--token", "a-token-of-16+bytes"], "etcd endpoint"),
            (["--etcd", "http://127.0.0.1:2379", "--cluster", "a b", "--token", "a-token-of-16+bytes"], "cluster name")
        ]
        for (args, words) in bad {
            XCTAssertThrowsError(try MasterCommandLine.parse(args), "\(args)") { e in
                XCTAssertTrue(((e as? KVError)?.message ?? "").contains(words), "\(args): \(e)")
            }
        }
    }

    /// A leader believes a renewal only up to the TTL etcd granted: a lying or confused etcd
    /// answering a longer one cannot stretch the fence; a tiny TTL leaves no serving time.
    func testTheLeaseDeadlineNeverOutrunsTheGrantedTTL() {
        XCTAssertEqual(MasterElection.deadline(sent: 1_000, answered: 1, granted: 1), 1_000 + 900_000_000)
        XCTAssertEqual(MasterElection.deadline(sent: 1_000, answered: 1 << 31, granted: 2), 1_000 + 1_800_000_000, "capped")
        XCTAssertEqual(MasterElection.deadline(sent: 1_000, answered: 0, granted: 2), 1_000, "lease gone")
        XCTAssertEqual(MasterElection.deadline(sent: 1_000, answered: -5, granted: 2), 1_000)
    }

    /// The process state the master reads before expiring a local writer's writes: a stopped
    /// process is 'T', a running or sleeping one is not, a gone one has none.
    func testProcessStateSeesAStoppedWriter() throws {
        var pid: pid_t = 0
        let args: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/sleep"), strdup("30"), nil]
        defer { args.forEach { free($0) } }
        XCTAssertEqual(posix_spawn(&pid, "/bin/sleep", nil, nil, args, nil), 0)
        defer { kill(pid, SIGKILL); var st: Int32 = 0; waitpid(pid, &st, 0) }
        XCTAssertNotEqual(MasterServer.processState(pid), UInt8(ascii: "T"))
        kill(pid, SIGSTOP)
        var state: UInt8? = nil
        for _ in 0..<200 { state = MasterServer.processState(pid); if state == UInt8(ascii: "T") { break }; usleep(5000) }
        XCTAssertEqual(state, UInt8(ascii: "T"))
        kill(pid, SIGCONT)
        XCTAssertNil(MasterServer.processState(Int32.max))
    }

    /// A fenced master stops serving once its deadline passes: it closes every connection and
    /// answers nothing that arrives after (`run` returns `.fenced`).
    func testAFencedMasterStopsServingAtItsDeadline() throws {
        let deadline = Atomic<UInt64>(monotonicClock() &+ 10_000_000_000)
        var o = MasterServer.Options()
        o.port = 0
        o.metricsPort = nil
        o.tokenFile = ""
        o.config = MasterConfig(token: MasterServerTests.token, clientTTL: 10_000_000_000)
        let fenced = try MasterServer(options: o, log: { _ in })
        fenced.fence = { deadline.load(ordering: .relaxed) }
        let ended = Locked<MasterServer.Ended?>(nil)
        let t = try BackgroundThread { ended.withLock { $0 = fenced.run() } }
        let c = try MasterServerTests.Client(port: fenced.port)
        guard case .welcome = try c.hello(name: "t") else { return XCTFail() }
        XCTAssertNoThrow(try c.call(.heartbeat))
        deadline.store(monotonicClock(), ordering: .relaxed) // the lease may have passed
        t.join()
        defer { fenced.stop() }
        XCTAssertEqual(ended.withLock { $0 }, .fenced)
        XCTAssertThrowsError(try c.call(.heartbeat)) // closed, unanswered
    }
}

/// Token files: only this user's, readable by no one else.
final class TokenFileTests: XCTestCase {
    func testFilesAndDirectoriesOthersCouldReadOrPlantAreRefused() throws {
        let dir = "/tmp/kvstore-tokenfile-tests-\(getpid())"
        mkdir(dir, 0o700)
        defer { unlink(dir + "/t"); unlink(dir + "/sub/master-1.token"); rmdir(dir + "/sub"); rmdir(dir) }
        let path = dir + "/t"
        try TokenFile.write("a-token-of-16+bytes", to: path)
        XCTAssertEqual(TokenFile.read(path), "a-token-of-16+bytes")
        chmod(path, 0o644)
        XCTAssertNil(TokenFile.read(path), "readable by others: refused")
        chmod(path, 0o600)
        symlink(path, dir + "/link")
        defer { unlink(dir + "/link") }
        XCTAssertNil(TokenFile.read(dir + "/link"), "a symbolic link is not followed")
        // A runtime directory others may write to is refused.
        mkdir(dir + "/sub", 0o755)
        chmod(dir + "/sub", 0o755)
        setenv("KVSTORE_RUNTIME_DIR", dir + "/sub", 1)
        defer { unsetenv("KVSTORE_RUNTIME_DIR") }
        XCTAssertThrowsError(try TokenFile.path(port: 1)) { XCTAssertTrue(($0 as? KVError)?.message.contains("must be 700") ?? false) }
        chmod(dir + "/sub", 0o700)
        XCTAssertEqual(try TokenFile.path(port: 1), dir + "/sub/master-1.token")
    }
}

/// A write that outlives the master's write timeout: the master aborts it, and the client must
/// not acknowledge it (its commit is pipelined; for a slow write it is confirmed first).
final class SlowWriteTests: XCTestCase {
    final class FakeClock: @unchecked Sendable {
        let now = Locked<Nanoseconds>(1_000_000_000)
    }

    func testASlowWritesCommitIsConfirmedNotAcknowledgedBlindly() throws {
        let (server, thread, _) = try MasterServerTests.start { $0.config.quotas.writeTimeout = 1_000_000_000 }
        defer { server.stop(); thread.join() }
        let time = FakeClock()
        let remote = try RemoteMaster(
            url: "kvstore://127.0.0.1:\(server.port)", token: MasterServerTests.token, name: "slow",
            clock: { time.now.withLock { $0 } })
        defer { remote.close() }
        let segment = try HostSegment(size: 1 << 20, shared: true)
        defer { segment.unmap() }
        _ = try remote.mount(RemoteMaster.Mount(size: 1 << 20, host: "h", sharePath: "", endpoint: "127.0.0.1:1", shareFD: segment.fd))
        XCTAssertEqual(remote.slowCommitAfter, 200_000_000, "a fifth of a 1 s write timeout")
        let fast = try remote.beginWrite(key: "fast", size: 100, mode: .put, options: .default, preferred: nil)
        try remote.commitWrite(fast)
        let slow = try remote.beginWrite(key: "slow", size: 100, mode: .put, options: .default, preferred: nil)
        time.now.withLock { $0 += RemoteMaster.slowCommit + 1 } // the copy took over a minute...
        usleep(1_600_000) // ...and the master gave up on it
        XCTAssertThrowsError(try remote.commitWrite(slow)) { XCTAssertEqual(($0 as? KVError)?.code, .transfer) }
        XCTAssertNil(try remote.lease(key: "slow"), "never stored, and the put was not acknowledged")
        XCTAssertEqual(try remote.lease(key: "fast"), 100)
        // The same through the batch path.
        let batch = try remote.beginWrite(key: "slow-batch", size: 100, mode: .put, options: .default, preferred: nil)
        time.now.withLock { $0 += RemoteMaster.slowCommit + 1 }
        usleep(1_600_000)
        XCTAssertEqual(remote.finishWrites(commit: [batch], abort: []).first??.code, .transfer)
    }
}
