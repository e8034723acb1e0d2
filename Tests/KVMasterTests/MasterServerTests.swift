import XCTest
import KVCore
import KVTestSupport
import KVTransfer
@testable import KVMaster
#if canImport(Glibc)
import Glibc
#endif

/// The master over real loopback sockets: requests and responses, a malformed frame closing
/// only its own connection, departures when a connection closes, and the HTTP endpoint.
final class MasterServerTests: XCTestCase {
    /// A blocking test client speaking the wire protocol.
    final class Client {
        let socket: Socket
        var nextID: UInt32 = 1
        init(port: Int) throws { socket = try Socket.connect(host: "127.0.0.1", port: port) }
        init(local name: String) throws { socket = try Socket.connectLocal(name: name) }

        func call(_ r: MasterRequest) throws -> MasterResponse {
            let id = nextID
            nextID += 1
            try send(WireWriter.frame(kind: r.kind, requestID: id, payload: r.encode()))
            var head = [UInt8](repeating: 0, count: WireFrameHeader.size)
            try head.withUnsafeMutableBytes { try socket.readExactly(into: $0) }
            let h = try head.withUnsafeBytes { try WireFrameHeader.decode($0) }
            XCTAssertEqual(h.requestID, id)
            var payload = [UInt8](repeating: 0, count: h.length)
            if h.length > 0 { try payload.withUnsafeMutableBytes { try socket.readExactly(into: $0) } }
            return try payload.withUnsafeBytes { try MasterResponse.decode(kind: h.kind, $0) }
        }

        func send(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try socket.writeAll($0) } }

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
            let (h, payload) = try socket.readFrame(maxPayload: 1 << 20, isKnown: MasterResponse.isResponseKind)
            return (h.requestID, try payload.withUnsafeBytes { try MasterResponse.decode(kind: h.kind, $0) })
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

    func start(token: String? = nil, localSocket: Bool = true) throws -> (MasterServer, TestThread, Logs) {
        var o = MasterServer.Options()
        o.localSocket = localSocket
        o.port = 0
        o.metricsPort = 0
        o.config = MasterConfig(token: token, clientTTL: 10_000_000_000)
        let logs = Logs()
        let server = try MasterServer(options: o, log: { logs.add($0) })
        let t = TestThread { server.run() }
        t.start()
        return (server, t, logs)
    }

    func testRequestsOverTCP() throws {
        let (server, thread, _) = try start()
        defer { server.stop(); thread.join() }
        let c = try Client(port: server.port)
        guard case .welcome = try c.call(.hello(token: "", name: "t")) else { return XCTFail() }
        guard case .mounted(let seg) = try c.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "e")) else { return XCTFail() }
        guard case .putStarted(let w) = try c.call(.putStart(key: "k", size: 100, mode: .put, options: WriteOptions(replicas: 1), preferred: seg)) else { return XCTFail() }
        let (h, rs) = (w.handle, w.replicas)
        XCTAssertEqual(rs.first?.segment, seg)
        try c.post(.putCommit(handle: h))                       // no answer when it succeeds
        XCTAssertEqual(try c.call(.get(key: "k", host: "h")), .found(FoundObject(size: 100, replicas: rs)))
        let bad = try c.post(.putCommit(handle: h))             // a second commit fails: answered
        let (id, answer) = try c.next()
        XCTAssertEqual(id, bad)
        guard case .error(let e) = answer else { return XCTFail("\(answer)") }
        XCTAssertEqual(e.code, .invalidArgument)
        XCTAssertEqual(try c.call(.exists(key: "missing")), .flag(false))
    }

    func testLocalSocketServesTheSameMaster() throws {
        let (server, thread, _) = try start(token: "s3cret")
        defer { server.stop(); thread.join() }
        let tcp = try Client(port: server.port)
        guard case .welcome(_, _, _, let name) = try tcp.call(.hello(token: "s3cret", name: "tcp")) else { return XCTFail() }
        XCTAssertTrue(name.hasPrefix("kvstore-master."), name)
        guard case .mounted(let seg) = try tcp.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "e")) else { return XCTFail() }
        // The local socket checks the token too, and a refused hello closes it.
        let refused = try Client(local: name)
        guard case .error(let e) = try refused.call(.hello(token: "nope", name: "x")) else { return XCTFail() }
        XCTAssertEqual(e.code, .invalidArgument)
        XCTAssertTrue(refused.isClosedByPeer())
        // Same table: a write over the local socket is seen over TCP.
        let local = try Client(local: name)
        guard case .welcome(_, _, _, let again) = try local.call(.hello(token: "s3cret", name: "local")) else { return XCTFail() }
        XCTAssertEqual(again, name)
        guard case .putStarted(let w) = try local.call(.putStart(key: "k", size: 10, mode: .put, options: WriteOptions(replicas: 1), preferred: seg)) else { return XCTFail() }
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
        guard case .welcome(_, _, _, let name) = try c.call(.hello(token: "", name: "t")) else { return XCTFail() }
        XCTAssertEqual(name, "")
        // A client closing while holding nothing leaves quietly (clients moving to the local
        // socket do that with their TCP connection); one holding a segment is logged.
        let held = try Client(port: server.port)
        _ = try held.call(.hello(token: "", name: "held"))
        _ = try held.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "e"))
        c.socket.close()
        held.socket.close()
        for _ in 0..<200 where !logs.all.contains(where: { $0.contains("'held' left") }) { usleep(10_000) }
        XCTAssertTrue(logs.all.contains { $0.contains("'held' left") })
        XCTAssertFalse(logs.all.contains { $0.contains("'t' left") || $0.contains("client 1)") }, "\(logs.all)")
    }

    func testMalformedFrameClosesOnlyItsConnection() throws {
        let (server, thread, logs) = try start()
        defer { server.stop(); thread.join() }
        let good = try Client(port: server.port)
        guard case .welcome = try good.call(.hello(token: "", name: "good")) else { return XCTFail() }
        guard case .mounted = try good.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "e")) else { return XCTFail() }
        let bad = [
            Array("GET / HTTP/1.1\r\n\r\n".utf8),                                           // not our protocol
            WireWriter.frame(kind: 999, requestID: 1, payload: []),                            // unknown kind
            WireWriter.frame(kind: MasterRequest.heartbeat.kind, requestID: 1, payload: [1]),  // trailing bytes
            Array(WireWriter.frame(kind: 1, requestID: 1, payload: []).prefix(12)) + [0xFF, 0xFF, 0xFF, 0x7F],  // 2 GiB length
        ]
        for b in bad {
            let c = try Client(port: server.port)
            try c.send(b)
            XCTAssertTrue(c.isClosedByPeer(), "\(b.prefix(8))")
        }
        XCTAssertEqual(try good.call(.heartbeat), .ok, "other clients are unaffected")
        XCTAssertTrue(logs.all.contains { $0.contains("malformed message") })
    }

    func testClosedConnectionDepartsItsClient() throws {
        let (server, thread, logs) = try start()
        defer { server.stop(); thread.join() }
        let a = try Client(port: server.port), b = try Client(port: server.port)
        _ = try a.call(.hello(token: "", name: "a"))
        _ = try b.call(.hello(token: "", name: "b"))
        guard case .mounted(let seg) = try a.call(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "e")) else { return XCTFail() }
        guard case .putStarted(let w) = try a.call(.putStart(key: "k", size: 10, mode: .put, options: WriteOptions(replicas: 1), preferred: seg)) else { return XCTFail() }
        let h = w.handle
        try a.post(.putCommit(handle: h))
        XCTAssertEqual(try b.call(.exists(key: "k")), .flag(true))   // applied before b's question
        a.socket.close()
        var gone = false
        for _ in 0..<100 where !gone {
            usleep(10_000)
            gone = try b.call(.segmentInfo(segment: seg)) != .segment(SegmentInfo(segment: seg, size: 1 << 20, host: "h", sharePath: "p", endpoint: "e"))
        }
        XCTAssertTrue(gone)
        XCTAssertEqual(try b.call(.exists(key: "k")), .flag(false))
        XCTAssertTrue(logs.all.contains { $0.contains("'a' left") && $0.contains("1 objects lost") })
    }

    func testTokenAndNonLoopbackRule() throws {
        var o = MasterServer.Options()
        o.host = "0.0.0.0"
        o.port = 0
        o.metricsPort = nil
        XCTAssertThrowsError(try MasterServer(options: o)) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        let (server, thread, _) = try start(token: "s3cret")
        defer { server.stop(); thread.join() }
        let c = try Client(port: server.port)
        guard case .error(let e) = try c.call(.hello(token: "nope", name: "x")) else { return XCTFail() }
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
