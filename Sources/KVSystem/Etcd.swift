#if canImport(Glibc)
import Glibc
#endif
import KVCore
import Synchronization

/// One key of etcd, as its range and txn answers give it.
public struct EtcdKeyValue: Sendable, Equatable {
    public var key: [UInt8]
    public var value: [UInt8]
    /// The revision that created the key: unique per creation, it names a leadership term.
    public var createRevision: Int64
    public var modRevision: Int64
    /// The lease the key is attached to (0: none).
    public var lease: Int64

    public init(key: [UInt8], value: [UInt8], createRevision: Int64, modRevision: Int64, lease: Int64) {
        self.key = key
        self.value = value
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.lease = lease
    }
}

/// A client of etcd's v3 API through its JSON gateway (HTTP/1.1 on the client port, etcd 3.4
/// and later): the few calls master election and discovery need. Each call is one short HTTP
/// request on a fresh loopback or LAN connection (a few per second at most), tried on each
/// endpoint in turn from the last one that answered. Everything etcd answers is checked: the
/// status, the length (at most `maxResponse`), the JSON and every field used.
public final class EtcdClient: Sendable {
    public let endpoints: [(host: String, port: Int)]
    /// Seconds one HTTP exchange (connect, send, answer) may take on one endpoint.
    public let timeout: Double
    private let preferred = Atomic<Int>(0)
    /// Largest answer read (the calls here get a few hundred bytes).
    public static let maxResponse = 1 << 20
    public static let defaultPort = 2379

    /// Endpoints from "http://h:p,h:p" or "h:p,h:p" (each may carry http://; the port
    /// defaults to 2379). Throws `invalidArgument` for anything else.
    public static func parseEndpoints(_ text: Substring) throws(KVError) -> [(host: String, port: Int)] {
        var out: [(String, Int)] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            var p = part
            if p.hasPrefix("http://") { p = p.dropFirst("http://".count) }
            if p.hasSuffix("/") { p = p.dropLast() }
            guard !p.isEmpty, !p.contains("/"), !p.contains("://") else {
                throw .invalidArgument("'\(part)' is not an etcd endpoint (http://a.b.c.d:port; https is not supported)")
            }
            out.append(try Socket.endpoint(p, defaultPort: defaultPort))
        }
        guard !out.isEmpty, out.count <= 16 else { throw .invalidArgument("give 1 to 16 etcd endpoints, not \(out.count)") }
        return out
    }

    public init(endpoints: String, timeout: Double = 1) throws(KVError) {
        self.endpoints = try Self.parseEndpoints(Substring(endpoints))
        guard timeout > 0, timeout <= 60 else { throw .invalidArgument("the etcd timeout must be between 0 and 60 seconds") }
        self.timeout = timeout
    }

    /// Says which endpoints this client uses (for messages).
    public var description: String { endpoints.map { "\($0.host):\($0.port)" }.joined(separator: ",") }

    // MARK: calls

    /// The key's current value, or nil when it does not exist.
    public func get(_ key: [UInt8]) throws(KVError) -> EtcdKeyValue? {
        let r = try post("/v3/kv/range", "{\"key\":\(Self.b64(key))}")
        return try Self.firstKeyValue(r)
    }

    /// A new lease of `ttl` seconds; returns its id and the TTL etcd granted (it may raise a
    /// short one to its minimum).
    public func grant(ttl: Int) throws(KVError) -> (id: Int64, ttl: Int) {
        let r = try post("/v3/lease/grant", "{\"TTL\":\(ttl)}")
        guard let id = r["ID"]?.int64, id != 0, let t = r["TTL"]?.int64, t > 0, t <= 1 << 31 else {
            throw KVError(.transfer, "etcd answered a lease grant without a lease\(Self.reason(r))")
        }
        return (id, Int(t))
    }

    /// Renews a lease; returns its TTL in seconds, 0 when etcd no longer has it.
    public func keepAlive(_ id: Int64) throws(KVError) -> Int {
        let r = try post("/v3/lease/keepalive", "{\"ID\":\"\(id)\"}")
        // The gateway streams this call: each answer is wrapped in "result".
        guard let result = r["result"] else { throw KVError(.transfer, "etcd answered a keepalive without a result\(Self.reason(r))") }
        guard let field = result["TTL"] else { return 0 } // etcd leaves out a zero TTL: the lease is gone
        guard let t = field.int64, t >= 0, t <= 1 << 31 else { throw KVError(.transfer, "etcd answered a keepalive with a bad TTL") }
        return Int(t)
    }

    /// Ends a lease (and deletes its keys). A lease etcd no longer has is not an error.
    public func revoke(_ id: Int64) throws(KVError) {
        _ = try post("/v3/lease/revoke", "{\"ID\":\"\(id)\"}", okErrors: ["lease not found"])
    }

    /// Creates `key` = `value` under `lease` if the key does not exist. Returns the revision
    /// that created it (won), or the key as it stands (lost; nil when it vanished meanwhile).
    public func create(_ key: [UInt8], value: [UInt8], lease: Int64) throws(KVError) -> (won: Int64?, current: EtcdKeyValue?) {
        let k = Self.b64(key)
        let body =
            "{\"compare\":[{\"key\":\(k),\"target\":\"CREATE\",\"result\":\"EQUAL\",\"create_revision\":\"0\"}],"
            + "\"success\":[{\"request_put\":{\"key\":\(k),\"value\":\(Self.b64(value)),\"lease\":\"\(lease)\"}}],"
            + "\"failure\":[{\"request_range\":{\"key\":\(k)}}]}"
        let r = try post("/v3/kv/txn", body)
        guard let responses = r["responses"]?.array, responses.count == 1 else {
            throw KVError(.transfer, "etcd answered a transaction without its one response\(Self.reason(r))")
        }
        if r["succeeded"]?.bool == true {
            guard let rev = r["header"]?["revision"]?.int64, rev > 0 else { throw KVError(.transfer, "etcd answered a put without a revision") }
            return (rev, nil)
        }
        guard let range = responses[0]["response_range"] else { throw KVError(.transfer, "etcd answered a failed transaction without the key") }
        return (nil, try Self.firstKeyValue(range))
    }

    /// Deletes `key` if it is still the one created at `revision` (a leader stepping down
    /// never deletes its successor's key). Returns whether it deleted it.
    @discardableResult
    public func delete(_ key: [UInt8], ifCreatedAt revision: Int64) throws(KVError) -> Bool {
        let k = Self.b64(key)
        let body =
            "{\"compare\":[{\"key\":\(k),\"target\":\"CREATE\",\"result\":\"EQUAL\",\"create_revision\":\"\(revision)\"}],"
            + "\"success\":[{\"request_delete_range\":{\"key\":\(k)}}]}"
        return try post("/v3/kv/txn", body)["succeeded"]?.bool == true
    }

    // MARK: parsing

    static func b64(_ bytes: [UInt8]) -> String { "\"" + Base64.encode(bytes) + "\"" }

    static func reason(_ r: JSONValue) -> String {
        (r["message"]?.string ?? r["error"]?.string).map { ": \($0.prefix(200))" } ?? ""
    }

    /// The first of a range answer's keys (nil when it has none).
    static func firstKeyValue(_ r: JSONValue) throws(KVError) -> EtcdKeyValue? {
        guard let kvs = r["kvs"] else { return nil }
        guard let a = kvs.array, let first = a.first else {
            if kvs.array != nil { return nil }
            throw KVError(.transfer, "etcd answered a range with kvs that are not a list")
        }
        guard let k = first["key"]?.string.flatMap(Base64.decode),
            let create = first["create_revision"]?.int64, create > 0,
            let mod = first["mod_revision"]?.int64, mod >= create
        else {
            throw KVError(.transfer, "etcd answered a range with a malformed key")
        }
        // etcd leaves out empty values and zero leases.
        guard let v = first["value"].map({ $0.string.flatMap(Base64.decode) }) ?? [],
            let lease = first["lease"].map({ $0.int64 }) ?? 0
        else {
            throw KVError(.transfer, "etcd answered a range with a malformed value or lease")
        }
        return EtcdKeyValue(key: k, value: v, createRevision: create, modRevision: mod, lease: lease)
    }

    // MARK: HTTP

    /// POSTs `body` to `path` on each endpoint in turn until one answers; returns its JSON.
    /// An answer that is an etcd error throws `transfer` with etcd's message (unless the
    /// message contains one of `okErrors`: then the answer is returned).
    func post(_ path: String, _ body: String, okErrors: [String] = []) throws(KVError) -> JSONValue {
        let n = endpoints.count
        let first = preferred.load(ordering: .relaxed)
        var last = KVError(.transfer, "no etcd endpoint")
        for k in 0..<n {
            let i = (first + k) % n
            let (host, port) = endpoints[i]
            let status: Int, json: JSONValue
            do throws(KVError) {
                (status, json) = try Self.exchange(host: host, port: port, path: path, body: body, timeout: timeout)
            } catch {
                last = KVError(.transfer, "etcd at \(host):\(port): \(error.message)")
                continue
            }
            preferred.store(i, ordering: .relaxed)
            if status == 200 { return json }
            let message = json["message"]?.string ?? json["error"]?.string ?? "HTTP status \(status)"
            if okErrors.contains(where: { message.contains($0) }) { return json }
            throw KVError(.transfer, "etcd at \(host):\(port) refused \(path): \(message.prefix(200))")
        }
        throw last
    }

    /// One HTTP/1.1 exchange on a fresh connection: the status and the JSON answer.
    static func exchange(host: String, port: Int, path: String, body: String, timeout: Double) throws(KVError) -> (Int, JSONValue) {
        let s = try Socket.connect(host: host, port: port, timeout: timeout)
        defer { s.close() }
        s.setTimeout(timeout)
        let request =
            "POST \(path) HTTP/1.1\r\nHost: \(host):\(port)\r\nContent-Type: application/json\r\n"
            + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body
        try rethrowingKVError { try Array(request.utf8).withUnsafeBytes { try s.writeAll($0) } }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        let deadline = monotonicClock() &+ Nanoseconds(timeout * 1e9)
        while true {
            let n = try rethrowingKVError { try chunk.withUnsafeMutableBytes { try s.readAvailable(into: $0) } }
            guard let n else { throw KVError(.transfer, "no answer within \(timeout) s") }
            if n == 0 { break }
            answer += chunk[0..<n]
            guard answer.count <= maxResponse else { throw KVError(.transfer, "answer longer than \(maxResponse) bytes") }
            guard monotonicClock() < deadline else { throw KVError(.transfer, "no full answer within \(timeout) s") }
            if (try? HTTPResponse.parse(answer)) != nil { break } // complete (etcd may keep the connection)
        }
        guard let r = try HTTPResponse.parse(answer) else { throw KVError(.transfer, "the answer ended early") }
        return (r.status, try JSONValue.parse(r.body))
    }
}

/// An HTTP/1.1 response as far as `EtcdClient` needs it: status, and the body framed by
/// Content-Length or chunked encoding. Bounded by the caller's buffer; strict on syntax.
public struct HTTPResponse: Sendable, Equatable {
    public var status: Int
    public var body: [UInt8]

    /// The response in `bytes`, nil while it is incomplete; throws `transfer` when it can
    /// never be one.
    public static func parse(_ bytes: [UInt8]) throws(KVError) -> HTTPResponse? {
        let crlfcrlf: [UInt8] = [13, 10, 13, 10]
        guard let headEnd = find(crlfcrlf, in: bytes, from: 0) else {
            guard bytes.count <= 16 << 10 else { throw KVError(.transfer, "HTTP headers longer than 16 KiB") }
            return nil
        }
        let head = String(decoding: bytes[0..<headEnd], as: UTF8.self)
        let lines = head.split(separator: "\r\n", omittingEmptySubsequences: false)
        let statusLine = lines[0].split(separator: " ", maxSplits: 2)
        guard statusLine.count >= 2, statusLine[0].hasPrefix("HTTP/1."), let status = Int(statusLine[1]), (100...599).contains(status) else {
            throw KVError(.transfer, "not an HTTP response")
        }
        var length: Int? = nil, chunked = false
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { throw KVError(.transfer, "bad HTTP header line") }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].drop { $0 == " " }
            if name == "content-length" {
                guard let v = Int(value), v >= 0, length == nil else { throw KVError(.transfer, "bad Content-Length") }
                length = v
            } else if name == "transfer-encoding" {
                chunked = value.lowercased().contains("chunked")
            }
        }
        var i = headEnd + 4
        if chunked {
            var body: [UInt8] = []
            while true {
                guard let lineEnd = find([13, 10], in: bytes, from: i) else { return nil }
                let sizeText = String(decoding: bytes[i..<lineEnd], as: UTF8.self).split(separator: ";").first ?? ""
                guard sizeText.count <= 8, let size = Int(sizeText.trimmingPrefix(" "), radix: 16), size >= 0 else {
                    throw KVError(.transfer, "bad chunk size")
                }
                i = lineEnd + 2
                if size == 0 { return HTTPResponse(status: status, body: body) } // trailers are not read
                guard bytes.count >= i + size + 2 else { return nil }
                body += bytes[i..<i + size]
                guard bytes[i + size] == 13, bytes[i + size + 1] == 10 else { throw KVError(.transfer, "bad chunk end") }
                i += size + 2
            }
        }
        guard let length else {
            throw KVError(.transfer, "HTTP response with neither Content-Length nor chunks")
        }
        guard bytes.count >= i + length else { return nil }
        return HTTPResponse(status: status, body: Array(bytes[i..<i + length]))
    }

    static func find(_ needle: [UInt8], in bytes: [UInt8], from: Int) -> Int? {
        guard bytes.count >= needle.count else { return nil }
        var i = from
        while i + needle.count <= bytes.count {
            if bytes[i] == needle[0] && Array(bytes[i..<i + needle.count]) == needle { return i }
            i += 1
        }
        return nil
    }
}

/// Where a cluster's elected master is named in etcd: shared by the masters that stand for
/// election (`MasterElection`) and the clients that find the leader (`RemoteMaster.Address`).
public enum MasterElectionKey {
    /// Cluster names: 1 to 64 letters, digits, '.', '_' or '-'.
    public static func validate(cluster: String) throws(KVError) {
        let ok =
            !cluster.isEmpty && cluster.utf8.count <= 64
            && cluster.utf8.allSatisfy { c in (c >= 0x30 && c <= 0x39) || (c | 0x20 >= 0x61 && c | 0x20 <= 0x7A) || c == 0x2E || c == 0x5F || c == 0x2D }
        guard ok else { throw .invalidArgument("cluster name '\(cluster.prefix(80))' must be 1-64 letters, digits, '.', '_' or '-'") }
    }

    /// The key whose value is the leader's address ("host:port") and whose creation revision
    /// is its term.
    public static func leader(cluster: String) -> [UInt8] { Array("/kvstore/\(cluster)/leader".utf8) }
}
