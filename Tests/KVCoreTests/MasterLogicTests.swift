import XCTest
import KVTestSupport
@testable import KVCore

/// The master's logic without sockets: sessions, segments, writes, reads, client death, and
/// the protocol codec, with time moved by hand.
final class MasterLogicTests: XCTestCase {
    static let s: Nanoseconds = 1_000_000_000

    func master(token: String? = nil) throws -> MasterLogic {
        try MasterLogic(config: MasterConfig(token: token, clientTTL: 10 * Self.s))
    }

    /// The handshake of a client holding `token`: hello, check the master's proof, prove.
    /// Returns the answer to prove (a welcome, or the refusal).
    @discardableResult
    static func authenticate(
        _ m: inout MasterLogic, _ session: inout MasterLogic.Session, token: String = "", name: String = "c",
        tenant: String = "", now: Nanoseconds = 0
    ) -> MasterResponse {
        let cn = Authentication.randomBytes(Authentication.nonceSize)
        let answer = m.handle(.hello(name: name, nonce: cn, tenant: tenant), session: &session, now: now)
        guard case let .challenge(sn, proof) = answer else { return answer }
        let t = Array(token.utf8)
        let real = tenant.isEmpty ? m.config.token : m.config.tenants[tenant]
        XCTAssertEqual(proof, Authentication.proof(token: real.map { Array($0.utf8) } ?? [], role: .server, clientNonce: cn, serverNonce: sn))
        return m.handle(.prove(proof: Authentication.proof(token: t, role: .client, clientNonce: cn, serverNonce: sn)), session: &session, now: now)
    }

    /// A connected client with one segment of `kib` KiB on `host`.
    func join(_ m: inout MasterLogic, _ name: String, host: String, kib: Int = 256, now: Nanoseconds = 0) -> (MasterLogic.Session, SegmentID) {
        var session = MasterLogic.Session()
        guard case .welcome = Self.authenticate(&m, &session, token: m.config.token ?? "", name: name, now: now) else { XCTFail(); return (session, 0) }
        guard
            case .mounted(let seg) = m.handle(
                .mount(size: kib << 10, host: host, sharePath: "/proc/1/fd/3", endpoint: "\(host):7000", reused: nil),
                session: &session, now: now)
        else { XCTFail(); return (session, 0) }
        return (session, seg)
    }

    func put(
        _ m: inout MasterLogic, _ session: inout MasterLogic.Session, _ key: ObjectKey, size: Int = 1000,
        replicas: Int = 1, preferred: SegmentID? = nil, now: Nanoseconds = 0
    ) -> [Replica] {
        guard
            case let .putStarted(w) = m.handle(
                .putStart(key: key, size: size, mode: .put, options: WriteOptions(replicas: replicas), preferred: preferred),
                session: &session, now: now)
        else { XCTFail("putStart"); return [] }
        XCTAssertFalse(w.inPlace)
        XCTAssertEqual(m.handle(.putCommit(handle: w.handle), session: &session, now: now), .ok)
        return w.replicas
    }

    func errorCode(_ r: MasterResponse) -> KVError.Code? {
        if case .error(let e) = r { return e.code }
        return nil
    }

    func testSessionsNeedHelloAndTheToken() throws {
        var m = try master(token: "secret")
        var s = MasterLogic.Session()
        XCTAssertEqual(errorCode(m.handle(.heartbeat, session: &s, now: 0)), .invalidArgument)
        XCTAssertEqual(
            errorCode(m.handle(.prove(proof: [UInt8](repeating: 0, count: 32)), session: &s, now: 0)), .invalidArgument,
            "prove before hello")
        XCTAssertEqual(errorCode(m.handle(.hello(name: "a", nonce: [1, 2, 3], tenant: ""), session: &s, now: 0)), .invalidArgument, "short nonce")
        XCTAssertEqual(errorCode(Self.authenticate(&m, &s, token: "wrong")), .invalidArgument)
        XCTAssertNil(s.client)
        XCTAssertEqual(m.handle(.stats, session: &s, now: 0).statsValue("refused_handshakes"), nil, "still not authenticated")
        var fresh = MasterLogic.Session()
        guard case .welcome(let w) = Self.authenticate(&m, &fresh, token: "secret") else { return XCTFail() }
        let (id, lease, ttl, local) = (w.client, w.leaseTTL, w.clientTTL, w.local)
        XCTAssertEqual(fresh.client, id)
        XCTAssertEqual(lease, 5 * Self.s)
        XCTAssertEqual(ttl, 10 * Self.s)
        XCTAssertEqual(local, "") // the service alone advertises no local socket
        XCTAssertEqual(errorCode(m.handle(.hello(name: "a", nonce: Authentication.randomBytes(32), tenant: ""), session: &fresh, now: 0)), .invalidArgument)
        XCTAssertEqual(m.handle(.heartbeat, session: &fresh, now: 0), .ok)
        XCTAssertEqual(m.handle(.stats, session: &fresh, now: 0).statsValue("refused_handshakes"), 1)
    }

    func testTheMastersProofNeedsTheToken() throws {
        var m = try master(token: "secret")
        var s = MasterLogic.Session()
        let cn = Authentication.randomBytes(32)
        guard case let .challenge(sn, proof) = m.handle(.hello(name: "a", nonce: cn, tenant: ""), session: &s, now: 0) else { return XCTFail() }
        XCTAssertEqual(proof, Authentication.proof(token: Array("secret".utf8), role: .server, clientNonce: cn, serverNonce: sn))
        XCTAssertNotEqual(proof, Authentication.proof(token: Array("secreT".utf8), role: .server, clientNonce: cn, serverNonce: sn))
        // The master's proof is never a valid client proof (labels differ): replaying it fails.
        XCTAssertEqual(errorCode(m.handle(.prove(proof: proof), session: &s, now: 0)), .invalidArgument)
        XCTAssertNil(s.client)
    }

    func testOwnerPidsComeFromTheConnectionNeverFromAClaim() throws {
        var m = try master()
        var local = MasterLogic.Session()
        local.peerPID = 4242 // what the server read with SO_PEERCRED
        guard case .welcome = Self.authenticate(&m, &local) else { return XCTFail() }
        guard case .mounted(let seg) = m.handle(.mount(size: 1 << 20, host: "h", sharePath: "s", endpoint: "e", reused: nil), session: &local, now: 0) else {
            return XCTFail()
        }
        var claimed = Self.published
        claimed.pid = 1 // a claim of another process's pid
        XCTAssertEqual(m.handle(.publishLayout(claimed), session: &local, now: 0), .ok)
        var (tcp, tcpSeg) = join(&m, "tcp", host: "h") // no peer credentials: pid unknown
        guard case .segment(let info) = m.handle(.segmentInfo(segment: seg), session: &tcp, now: 0) else { return XCTFail() }
        XCTAssertEqual(info.pid, 4242)
        guard case .layout(let p) = m.handle(.fetchLayout(node: "n"), session: &tcp, now: 0) else { return XCTFail() }
        XCTAssertEqual(p.pid, 4242)
        guard case .segment(let other) = m.handle(.segmentInfo(segment: tcpSeg), session: &tcp, now: 0) else { return XCTFail() }
        XCTAssertEqual(other.pid, 0)
        var theirs = Self.published
        theirs.node = "t"
        theirs.pid = 4242
        XCTAssertEqual(m.handle(.publishLayout(theirs), session: &tcp, now: 0), .ok)
        guard case .layout(let q) = m.handle(.fetchLayout(node: "t"), session: &local, now: 0) else { return XCTFail() }
        XCTAssertEqual(q.pid, 0, "a TCP client cannot name a pid")
    }

    func testEndpointsOfTCPClientsMustBeOnTheAddressTheyConnectFrom() throws {
        var m = try master()
        var tcp = MasterLogic.Session()
        tcp.peerAddress = "10.0.0.7" // what the server read with getpeername
        guard case .welcome = Self.authenticate(&m, &tcp) else { return XCTFail() }
        // Another machine's (or service's) address: refused, nothing mounted or published.
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .mount(size: 1 << 20, host: "h", sharePath: "", endpoint: "10.0.0.8:7000", reused: nil),
                    session: &tcp, now: 0)), .invalidArgument)
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .mount(size: 1 << 20, host: "h", sharePath: "", endpoint: "10.0.0.70:7000", reused: nil),
                    session: &tcp, now: 0)), .invalidArgument, "a prefix of the address is not the address")
        XCTAssertEqual(m.handle(.stats, session: &tcp, now: 0).statsValue("segments"), 0)
        var elsewhere = Self.published
        elsewhere.endpoint = "192.168.1.1:7100"
        XCTAssertEqual(errorCode(m.handle(.publishLayout(elsewhere), session: &tcp, now: 0)), .invalidArgument)
        XCTAssertEqual(errorCode(m.handle(.fetchLayout(node: elsewhere.node), session: &tcp, now: 0)), .objectNotFound)
        // Its own address is accepted.
        guard
            case .mounted = m.handle(
                .mount(size: 1 << 20, host: "h", sharePath: "", endpoint: "10.0.0.7:7000", reused: nil),
                session: &tcp, now: 0)
        else { return XCTFail() }
        var own = Self.published
        own.endpoint = "10.0.0.7:7100"
        XCTAssertEqual(m.handle(.publishLayout(own), session: &tcp, now: 0), .ok)
        // A local client (the kernel vouches for its uid; no address) is not checked.
        var local = MasterLogic.Session()
        local.peerPID = 4242
        local.local = true
        guard case .welcome = Self.authenticate(&m, &local) else { return XCTFail() }
        local.passedSegmentBytes = 1 << 20
        guard
            case .mounted = m.handle(
                .mount(size: 1 << 20, host: "h", sharePath: "", endpoint: "10.0.0.9:7000", reused: nil),
                session: &local, now: 0)
        else { return XCTFail() }
    }

    func testALocalMountTakesItsCapacityFromThePassedFileNotFromTheClaim() throws {
        var m = try master()
        var local = MasterLogic.Session()
        local.peerPID = 4242
        local.local = true
        guard case .welcome = Self.authenticate(&m, &local) else { return XCTFail() }
        let mount = MasterRequest.mount(size: 1 << 30, host: "h", sharePath: "s", endpoint: "127.0.0.1:7000", reused: nil)
        XCTAssertEqual(errorCode(m.handle(mount, session: &local, now: 0)), .invalidArgument, "no descriptor came with it")
        local.passedSegmentBytes = 1 << 20 // what the server found with fstat
        guard case .error(let e) = m.handle(mount, session: &local, now: 0) else { return XCTFail() }
        XCTAssertEqual(e.code, .invalidArgument)
        XCTAssertTrue(e.message.contains("1048576"), e.message)
        XCTAssertEqual(m.handle(.stats, session: &local, now: 0).statsValue("capacity"), 0, "nothing mounted")
        local.passedSegmentBytes = 1 << 30
        guard case .mounted = m.handle(mount, session: &local, now: 0) else { return XCTFail() }
    }

    func testTenantsSeeOnlyTheirOwnKeysAndLayouts() throws {
        var config = MasterConfig(token: "the-cluster-token", clientTTL: 10 * Self.s)
        config.tenants = ["acme": "acme-token-0123456789", "beta": "beta-token-0123456789"]
        var m = try MasterLogic(config: config)
        var admin = MasterLogic.Session(), acme = MasterLogic.Session(), beta = MasterLogic.Session()
        guard case .welcome = Self.authenticate(&m, &admin, token: "the-cluster-token") else { return XCTFail() }
        guard case .welcome = Self.authenticate(&m, &acme, token: "acme-token-0123456789", tenant: "acme") else { return XCTFail() }
        guard case .welcome = Self.authenticate(&m, &beta, token: "beta-token-0123456789", tenant: "beta") else { return XCTFail() }
        var wrong = MasterLogic.Session(), unknown = MasterLogic.Session()
        XCTAssertEqual(
            errorCode(Self.authenticate(&m, &wrong, token: "beta-token-0123456789", tenant: "acme")), .invalidArgument,
            "another tenant's token")
        XCTAssertEqual(errorCode(Self.authenticate(&m, &unknown, token: "x", tenant: "nobody")), .invalidArgument)
        guard case .mounted = m.handle(.mount(size: 1 << 20, host: "h", sharePath: "s", endpoint: "e", reused: nil), session: &admin, now: 0) else {
            return XCTFail()
        }
        _ = put(&m, &acme, "k")
        _ = put(&m, &beta, "k") // the same name, another object
        _ = put(&m, &beta, "only-beta")
        XCTAssertEqual(m.handle(.exists(key: "only-beta"), session: &acme, now: 0), .flag(false))
        XCTAssertEqual(m.handle(.exists(key: "k"), session: &acme, now: 0), .flag(true))
        XCTAssertEqual(m.handle(.listKeys(after: nil), session: &acme, now: 0), .keys(["k"], more: false))
        XCTAssertEqual(m.handle(.listKeys(after: nil), session: &beta, now: 0), .keys(["k", "only-beta"], more: false))
        XCTAssertEqual(m.handle(.listKeys(after: nil), session: &admin, now: 0), .keys(["acme/k", "beta/k", "beta/only-beta"], more: false))
        XCTAssertEqual(m.handle(.exists(key: "beta/k"), session: &acme, now: 0), .flag(false), "no way out of the namespace")
        // remove_all of a tenant empties its namespace only.
        XCTAssertEqual(m.handle(.removeAll(force: true), session: &beta, now: 0), .value(2))
        XCTAssertEqual(m.handle(.exists(key: "k"), session: &acme, now: 0), .flag(true))
        // Keys too long once prefixed are refused with the tenant's limit.
        let long = try ObjectKey(String(repeating: "x", count: ObjectKey.maxBytes - 2))
        guard case .error(let e) = m.handle(.exists(key: long), session: &acme, now: 0) else { return XCTFail() }
        XCTAssertTrue(e.message.contains("within tenant 'acme'"), e.message)
        // KV node ids are namespaced the same way.
        XCTAssertEqual(m.handle(.publishLayout(Self.published), session: &acme, now: 0), .ok)
        XCTAssertEqual(m.handle(.publishLayout(Self.published), session: &beta, now: 0), .ok, "'n' in beta is another node")
        guard case .layout(let p) = m.handle(.fetchLayout(node: "n"), session: &acme, now: 0) else { return XCTFail() }
        XCTAssertEqual(p.node, "n")
        guard case .layout(let q) = m.handle(.fetchLayout(node: "acme/n"), session: &admin, now: 0) else { return XCTFail() }
        XCTAssertEqual(q.node, "acme/n")
        // Every member gets the same data-plane key, masked for its own handshake.
        var keys: [[UInt8]] = []
        for (token, tenant) in [("the-cluster-token", ""), ("acme-token-0123456789", "acme")] {
            var s = MasterLogic.Session()
            let cn = Authentication.randomBytes(32)
            guard case let .challenge(sn, _) = m.handle(.hello(name: "k", nonce: cn, tenant: tenant), session: &s, now: 0) else { return XCTFail() }
            let t = Array(token.utf8)
            guard
                case let .welcome(welcomed) = m.handle(
                    .prove(proof: Authentication.proof(token: t, role: .client, clientNonce: cn, serverNonce: sn)),
                    session: &s, now: 0)
            else { return XCTFail() }
            let data = welcomed.data
            XCTAssertNotEqual(data, Authentication.dataKey(clusterToken: Array("the-cluster-token".utf8)), "never in the clear")
            keys.append(Authentication.mask(data, token: t, clientNonce: cn, serverNonce: sn))
        }
        XCTAssertEqual(keys[0], Authentication.dataKey(clusterToken: Array("the-cluster-token".utf8)))
        XCTAssertEqual(keys[0], keys[1])
        var bad = MasterConfig(token: "the-cluster-token")
        bad.tenants = ["a/b": "a-token-0123456789"]
        XCTAssertThrowsError(try MasterLogic(config: bad))
        bad.tenants = ["ab": "short"]
        XCTAssertThrowsError(try MasterLogic(config: bad))
        XCTAssertNil(m.table.invariantViolation())
    }

    func testQuotasBoundWhatOneClientHolds() throws {
        var config = MasterConfig(clientTTL: 10 * Self.s)
        config.quotas.segments = 2
        config.quotas.writesInFlight = 3
        config.quotas.layouts = 1
        config.quotas.writeTimeout = 2 * Self.s
        var m = try MasterLogic(config: config)
        var (a, _) = join(&m, "a", host: "h")
        XCTAssertEqual(errorCode(m.handle(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "e", reused: nil), session: &a, now: 0)), nil)
        XCTAssertEqual(errorCode(m.handle(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "e", reused: nil), session: &a, now: 0)), .noSpace)
        for i in 0..<3 {
            guard case .putStarted = m.handle(.putStart(key: "w\(i)", size: 100, mode: .put, options: .default, preferred: nil), session: &a, now: 0) else {
                return XCTFail()
            }
        }
        XCTAssertEqual(errorCode(m.handle(.putStart(key: "w3", size: 100, mode: .put, options: .default, preferred: nil), session: &a, now: 0)), .noSpace)
        // Never committed: aborted after the write timeout, and their space is free again.
        XCTAssertEqual(m.expireWrites(now: 1 * Self.s), 0)
        XCTAssertEqual(m.expireWrites(now: 3 * Self.s, hold: { _ in true }), 0, "a stopped writer's writes wait for it")
        XCTAssertEqual(m.expireWrites(now: 3 * Self.s), 3)
        XCTAssertEqual(m.handle(.stats, session: &a, now: 3 * Self.s).statsValue("writes_in_flight"), 0)
        XCTAssertEqual(m.handle(.stats, session: &a, now: 3 * Self.s).statsValue("bytes_used"), 0)
        XCTAssertEqual(m.handle(.stats, session: &a, now: 3 * Self.s).statsValue("expired_writes"), 3)
        guard case .putStarted = m.handle(.putStart(key: "w3", size: 100, mode: .put, options: .default, preferred: nil), session: &a, now: 3 * Self.s) else {
            return XCTFail()
        }
        XCTAssertEqual(m.handle(.publishLayout(Self.published), session: &a, now: 0), .ok)
        XCTAssertEqual(m.handle(.publishLayout(Self.published), session: &a, now: 0), .ok, "replacing its own is no new layout")
        var other = Self.published
        other.node = "n2"
        XCTAssertEqual(errorCode(m.handle(.publishLayout(other), session: &a, now: 0)), .noSpace)
        XCTAssertNil(m.table.invariantViolation())
    }

    func testHardPinsCountAgainstTheirWritersQuota() throws {
        var m = try master() // hardPinShare 0.5 by default
        var (a, segA) = join(&m, "a", host: "h", kib: 1024)
        var (b, segB) = join(&m, "b", host: "h", kib: 1024) // 2 MiB in all: 1 MiB of pins each
        func pin(_ s: inout MasterLogic.Session, _ key: ObjectKey, _ kib: Int) -> MasterResponse {
            guard
                case .putStarted(let w) = m.handle(
                    .putStart(
                        key: key, size: kib << 10, mode: .put, options: WriteOptions(hardPin: true),
                        preferred: nil), session: &s, now: 0)
            else {
                return m.handle(
                    .putStart(key: key, size: kib << 10, mode: .put, options: WriteOptions(hardPin: true), preferred: nil),
                    session: &s, now: 0)
            }
            return m.handle(.putCommit(handle: w.handle), session: &s, now: 0)
        }
        XCTAssertEqual(pin(&a, "a1", 600), .ok)
        XCTAssertEqual(errorCode(pin(&a, "a2", 600)), .noSpace, "a's quota is half the capacity")
        XCTAssertEqual(pin(&b, "b1", 600), .ok, "another client's quota is its own")
        XCTAssertEqual(m.handle(.remove(key: "a1", force: true), session: &b, now: 0), .ok)
        // Its owner heard (the space is handed out again only then).
        XCTAssertEqual(m.handle(.confirmNotices(segment: segA, through: .max), session: &a, now: 0), .ok)
        XCTAssertEqual(m.handle(.confirmNotices(segment: segB, through: .max), session: &b, now: 0), .ok)
        XCTAssertEqual(pin(&a, "a2", 600), .ok, "removing a pinned object frees its writer's quota")
        XCTAssertEqual(m.table.hardPinnedByOwner.values.reduce(0, +), 1200 << 10)
        XCTAssertNil(m.table.invariantViolation())
    }

    func testTheUnmountCountMovesWhenASegmentGoes() throws {
        var m = try master()
        var (a, seg) = join(&m, "a", host: "h")
        let (b, _) = join(&m, "b", host: "h")
        XCTAssertEqual(m.handle(.unmountCount, session: &a, now: 0), .value(0))
        XCTAssertEqual(m.handle(.unmount(segment: seg), session: &a, now: 0), .ok)
        XCTAssertEqual(m.handle(.unmountCount, session: &a, now: 0), .value(1))
        m.depart(client: b.client!, now: 0)
        XCTAssertEqual(m.handle(.unmountCount, session: &a, now: 0), .value(2))
    }

    func testMountedCapacityCannotOverflow() throws {
        var config = MasterConfig(clientTTL: 10 * Self.s)
        config.quotas.segments = 1 << 20
        var m = try MasterLogic(config: config)
        var (a, _) = join(&m, "a", host: "h")
        var refused = 0
        for _ in 0..<32_768 { // 2^48 bytes each: their sum would pass Int.max
            if errorCode(m.handle(.mount(size: 1 << 48, host: "h", sharePath: "p", endpoint: "e", reused: nil), session: &a, now: 0)) == .noSpace {
                refused += 1
            }
        }
        XCTAssertGreaterThan(refused, 32_000)
        let capacity = m.handle(.stats, session: &a, now: 0).statsValue("capacity")!
        XCTAssertLessThanOrEqual(capacity, 1 << 56)
        XCTAssertGreaterThan(capacity, 0)
    }

    func testConfigNeedsLeases() {
        var c = MasterConfig()
        c.cache.leaseTTL = 0
        XCTAssertThrowsError(try MasterLogic(config: c)) { XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument) }
        XCTAssertFalse(MasterConfig().cache.inPlaceUpserts)
    }

    func testPutGetPrefersTheReadersHost() throws {
        var m = try master()
        var (a, segA) = join(&m, "a", host: "h1")
        var (b, segB) = join(&m, "b", host: "h2")
        let rs = put(&m, &a, "k", replicas: 2, preferred: segA)
        XCTAssertEqual(rs.map(\.segment), [segA, segB])
        guard case .found(let forB) = m.handle(.get(key: "k", host: "h2"), session: &b, now: 1) else { return XCTFail() }
        XCTAssertEqual(forB.size, 1000)
        XCTAssertEqual(forB.replicas.map(\.segment), [segB, segA], "the reader's own host first")
        XCTAssertEqual(m.handle(.exists(key: "k"), session: &b, now: 1), .flag(true))
        XCTAssertEqual(m.handle(.exists(key: "nope"), session: &b, now: 1), .flag(false))
        XCTAssertEqual(m.handle(.size(key: "k"), session: &b, now: 1), .value(1000))
        XCTAssertEqual(errorCode(m.handle(.get(key: "nope", host: "h2"), session: &b, now: 1)), .objectNotFound)
        XCTAssertEqual(errorCode(m.handle(.remove(key: "k", force: false), session: &b, now: 1)), .leaseHeld)
        XCTAssertEqual(m.handle(.remove(key: "k", force: true), session: &b, now: 1), .ok)
        guard case .segment(let info) = m.handle(.segmentInfo(segment: segA), session: &b, now: 1) else { return XCTFail() }
        XCTAssertEqual(info.host, "h1")
        XCTAssertEqual(info.endpoint, "h1:7000")
    }

    func testUpsertsNeverRewriteInPlaceOnAMaster() throws {
        var m = try master()
        var (a, _) = join(&m, "a", host: "h1")
        _ = put(&m, &a, "k")
        guard
            case let .putStarted(w) = m.handle(
                .putStart(key: "k", size: 1000, mode: .upsert, options: WriteOptions(replicas: 1), preferred: nil), session: &a, now: 0)
        else { return XCTFail() }
        XCTAssertFalse(w.inPlace)
        XCTAssertEqual(m.handle(.putCommit(handle: w.handle), session: &a, now: 0), .ok)
    }

    func testWritesBelongToTheirClient() throws {
        var m = try master()
        var (a, _) = join(&m, "a", host: "h1")
        var (b, _) = join(&m, "b", host: "h1")
        guard
            case let .putStarted(w) = m.handle(
                .putStart(
                    key: "k", size: 10, mode: .put, options: WriteOptions(replicas: 1),
                    preferred: nil), session: &a, now: 0)
        else { return XCTFail() }
        let h = w.handle
        XCTAssertEqual(errorCode(m.handle(.putCommit(handle: h), session: &b, now: 0)), .invalidArgument)
        XCTAssertEqual(errorCode(m.handle(.putCommit(handle: h + 1), session: &a, now: 0)), .invalidArgument)
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .putStart(key: "x", size: 10, mode: .put, options: WriteOptions(hardPin: true, softPinTTL: 5, replicas: 1), preferred: nil), session: &a,
                    now: 0)), .invalidArgument)
        XCTAssertEqual(errorCode(m.handle(.unmount(segment: 999), session: &a, now: 0)), .invalidArgument)
        XCTAssertEqual(m.handle(.putAbort(handle: h), session: &a, now: 0), .ok)
        XCTAssertEqual(m.handle(.exists(key: "k"), session: &a, now: 0), .flag(false))
    }

    func testSilentClientsExpireAndTakeOnlyUnreplicatedObjects() throws {
        var m = try master()
        var (a, segA) = join(&m, "a", host: "h1")
        var (b, _) = join(&m, "b", host: "h2")
        _ = put(&m, &a, "onA", preferred: segA)
        _ = put(&m, &a, "both", replicas: 2)
        guard
            case .putStarted = m.handle(
                .putStart(
                    key: "pending", size: 10, mode: .put, options: WriteOptions(replicas: 1),
                    preferred: segA), session: &a, now: 0)
        else { return XCTFail() }
        // b keeps talking, a goes silent.
        for t in stride(from: Self.s, through: 10 * Self.s, by: Int(Self.s)) {
            XCTAssertEqual(m.handle(.heartbeat, session: &b, now: t), .ok)
            XCTAssertTrue(m.expireClients(now: t).isEmpty, "a is within its TTL at \(t / Self.s) s")
        }
        let gone = m.expireClients(now: 10 * Self.s + 1)
        XCTAssertEqual(gone.count, 1)
        XCTAssertEqual(gone.first?.name, "a")
        XCTAssertEqual(gone.first?.segments, [segA])
        XCTAssertEqual(gone.first?.lostObjects, ["onA"])
        XCTAssertEqual(gone.first?.abandonedWrites, 1)
        XCTAssertEqual(errorCode(m.handle(.get(key: "onA", host: "h2"), session: &b, now: 11 * Self.s)), .objectNotFound)
        guard case .found(let both) = m.handle(.get(key: "both", host: "h2"), session: &b, now: 11 * Self.s) else { return XCTFail() }
        XCTAssertEqual(both.replicas.count, 1)
        XCTAssertEqual(m.handle(.exists(key: "pending"), session: &b, now: 11 * Self.s), .flag(false))
        XCTAssertEqual(errorCode(m.handle(.heartbeat, session: &a, now: 11 * Self.s)), .invalidArgument, "a must reconnect")
        XCTAssertEqual(m.clientCount, 1)
        XCTAssertNil(m.table.invariantViolation())
    }

    /// A batch is answered item by item: a refused item does not stop the others, every
    /// started write is this client's to commit, and reads prefer the reader's host.
    func testBatchesAnswerEachItem() throws {
        var m = try master()
        var (a, segA) = join(&m, "a", host: "h1", kib: 64)
        var (b, segB) = join(&m, "b", host: "h2", kib: 64)
        _ = put(&m, &a, "old")
        let items = [
            BatchWrite(key: "x", size: 1000), BatchWrite(key: "old", size: 10), BatchWrite(key: "huge", size: 1 << 20),
            BatchWrite(key: "y", size: 2000)
        ]
        guard
            case .putStartedBatch(let rs) = m.handle(
                .putStartBatch(items: items, mode: .put, options: WriteOptions(replicas: 2), preferred: segB),
                session: &b, now: 0)
        else { return XCTFail() }
        XCTAssertEqual(rs.count, 4)
        var handles: [VersionHandle] = []
        for (i, r) in rs.enumerated() {
            switch (i, r) {
            case (0, .success(let w)), (3, .success(let w)):
                XCTAssertEqual(w.replicas.map(\.segment), [segB, segA])
                handles.append(w.handle)
            case (1, .failure(let e)): XCTAssertEqual(e.code, .objectExists)
            case (2, .failure(let e)): XCTAssertEqual(e.code, .noSpace)
            default: XCTFail("item \(i): \(r)")
            }
        }
        XCTAssertTrue(m.isWriting("x"))
        XCTAssertEqual(errorCode(m.handle(.putCommit(handle: handles[0]), session: &a, now: 0)), .invalidArgument, "not a's write")
        for h in handles { XCTAssertEqual(m.handle(.putCommit(handle: h), session: &b, now: 0), .ok) }
        XCTAssertFalse(m.isWriting("x"))
        guard case .foundBatch(let found) = m.handle(.getBatch(keys: ["y", "nope", "x"], host: "h1"), session: &a, now: 0) else { return XCTFail() }
        XCTAssertEqual(found.count, 3)
        guard case .success(let y) = found[0], case .failure(let missing) = found[1], case .success(let x) = found[2] else { return XCTFail("\(found)") }
        XCTAssertEqual(y.size, 2000)
        XCTAssertEqual(x.replicas.first?.segment, segA, "the reader's host first")
        XCTAssertEqual(missing.code, .objectNotFound)
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .putStartBatch(items: items, mode: .put, options: WriteOptions(replicas: 0), preferred: nil),
                    session: &a, now: 0)), .invalidArgument, "bad options refuse the whole batch")
        XCTAssertEqual(m.handle(.stats, session: &a, now: 0).statsValue("writes_in_flight"), 0)
        XCTAssertNil(m.table.invariantViolation())
    }

    // MARK: codec

    static let requests: [MasterRequest] = [
        .hello(name: "n", nonce: [1, 2, 3], tenant: "acme"), .prove(proof: [9, 8]),
        .mount(size: 1 << 30, host: "h", sharePath: "/proc/1/fd/4", endpoint: "h:1", reused: 0),
        .mount(size: 1 << 30, host: "h", sharePath: "", endpoint: "h:1", reused: 1 << 40),
        .mount(size: 1, host: "", sharePath: "", endpoint: "", reused: nil),
        .unmount(segment: 3), .heartbeat, .unmountCount,
        .putStart(key: "k", size: 5, mode: .upsert, options: WriteOptions(hardPin: false, softPinTTL: 7, ttl: 9, replicas: 2), preferred: 4),
        .putStart(key: "k", size: 5, mode: .put, options: WriteOptions(hardPin: true, replicas: 1), preferred: nil),
        .putCommit(handle: 1 << 40), .putAbort(handle: 2), .get(key: "k", host: "h"), .exists(key: "é"), .size(key: "k"),
        .remove(key: "k", force: true), .removeAll(force: false), .stats, .segmentInfo(segment: 9),
        .putStartBatch(
            items: [BatchWrite(key: "a", size: 1), BatchWrite(key: "b", size: 1 << 20)], mode: .put,
            options: WriteOptions(ttl: 3, replicas: 2), preferred: 7),
        .putStartBatch(items: [], mode: .upsert, options: .default, preferred: nil),
        .getBatch(keys: ["a", "b", "é"], host: "h"),
        .publishLayout(MasterLogicTests.published), .fetchLayout(node: "n"), .unpublishLayout(node: "é"), .listKeys(after: nil),
        .listKeys(after: "req/1"), .sizeBatch(keys: ["a", "é"]), .sizeBatch(keys: []), .removeBatch(keys: ["a"], force: true),
        .copyStart(key: "k", targets: [2, 3], drop: 1), .copyStart(key: "é", targets: [7], drop: nil), .copyEnd(handle: 1 << 40, commit: true),
        .copyEnd(handle: 2, commit: false), .drain(segment: 5)
    ]
    static let published = PublishedLayout(
        node: "n",
        layout: try! KVLayout([
            KVBufferDescriptor(layer: 0, kind: .key, address: 4096, length: 8192, bytesPerBlock: 4096),
            KVBufferDescriptor(layer: 0, kind: .value, address: 4096, length: 4096, bytesPerBlock: 4096, location: MemoryLocation(kind: .cuda, index: 1))
        ]),
        host: "h", pid: 7, endpoint: "127.0.0.1:9")
    static let responses: [MasterResponse] = [
        .ok, .error(KVError(.leaseHeld, "held")),
        .welcome(Welcome(client: 1, leaseTTL: 2, clientTTL: 3, local: "kvstore-master.1", pid: 77, data: [5, 6], session: [7], writeTimeout: 8)),
        .mounted(segment: 4),
        .putStarted(StartedWrite(handle: 5, inPlace: true, replicas: [Replica(segment: 1, offset: 64)], window: 7)),
        .found(FoundObject(size: 6, replicas: [], lease: 1_000)),
        .flag(true), .value(-7), .stats([Statistic("objects", 1), Statistic("bytes_used", 2)]),
        .segment(SegmentInfo(segment: 1, size: 2, host: "h", sharePath: "p", endpoint: "e", pid: 31)),
        .putStartedBatch([
            .success(StartedWrite(handle: 3, inPlace: false, replicas: [Replica(segment: 2, offset: 128)], window: 300_000_000_000)),
            .failure(KVError(.noSpace, "full"))
        ]),
        .foundBatch([
            .failure(KVError(.objectNotFound, "gone")),
            .success(FoundObject(size: 9, replicas: [Replica(segment: 1, offset: 0), Replica(segment: 2, offset: 64)], lease: 5_000_000_000))
        ]),
        .layout(MasterLogicTests.published), .keys(["a", "é", "req/1"], more: true), .keys([], more: false),
        .copyStarted(
            ReplicaCopy(handle: 4, size: 9, sources: [Replica(segment: 1, offset: 64)], targets: [Replica(segment: 2, offset: 0)], checksum: 7),
            lease: 5, window: 6),
        .copyStarted(ReplicaCopy(handle: 1, size: 1, sources: [], targets: [], checksum: nil), lease: 0, window: 0),
        .challenge(nonce: [1, 2], proof: [3]), .values([.success(0), .success(1 << 40), .failure(KVError(.objectNotFound, "gone"))]), .sizes([3, nil, 0]),
        .sizes([])
    ]

    func testKeyBatchesAnswerPerKeyAndLeaseWhatTheyFind() throws {
        var m = try master()
        var (a, _) = join(&m, "a", host: "h")
        _ = put(&m, &a, "k", size: 10)
        XCTAssertEqual(m.handle(.sizeBatch(keys: ["k", "missing"]), session: &a, now: 1), .sizes([10, nil]))
        guard case .values(let removed) = m.handle(.removeBatch(keys: ["k", "missing"], force: false), session: &a, now: 2) else { return XCTFail() }
        XCTAssertEqual(removed[0].failureCode, .leaseHeld, "sizeBatch leased it")
        XCTAssertEqual(removed[1].failureCode, .objectNotFound)
        guard case .values(let forced) = m.handle(.removeBatch(keys: ["k"], force: true), session: &a, now: 3) else { return XCTFail() }
        XCTAssertEqual(try forced[0].get(), 0)
        XCTAssertNil(m.table.invariantViolation())
    }

    func testARemoteReadHoldsTheBytesUntilReleasedOrItsLeaseEnds() throws {
        var m = try master()
        var (a, _) = join(&m, "a", host: "h")
        _ = put(&m, &a, "k", size: 10)
        // Bytes in use, less those freed and waiting for the owner's confirmation.
        func live() -> Int { m.table.usedBytes - m.awaitingBytes }
        let used = live()
        guard case .found(let f) = m.handle(.get(key: "k", host: "h"), session: &a, now: 1), f.hold != 0 else { return XCTFail() }
        XCTAssertEqual(m.handle(.remove(key: "k", force: true), session: &a, now: 2), .ok)
        XCTAssertEqual(live(), used, "held by the reader")
        XCTAssertEqual(m.handle(.release(holds: [f.hold, f.hold, 12345]), session: &a, now: 3), .ok, "extra and unknown ones are ignored")
        XCTAssertEqual(live(), 0, "freed once the reader released it")
        // A hold that is never released ends with its lease.
        _ = put(&m, &a, "k", size: 10, now: 4)
        guard case .found = m.handle(.get(key: "k", host: "h"), session: &a, now: 5) else { return XCTFail() }
        XCTAssertEqual(m.handle(.remove(key: "k", force: true), session: &a, now: 6), .ok)
        XCTAssertEqual(m.expireHolds(now: 5 + m.table.policy.leaseTTL - 1), 0)
        XCTAssertEqual(live(), used)
        XCTAssertEqual(m.expireHolds(now: 5 + m.table.policy.leaseTTL), 1)
        XCTAssertEqual(live(), 0)
        XCTAssertEqual(m.handle(.stats, session: &a, now: 7).statsValue("read_holds_released"), 1)
        XCTAssertEqual(m.handle(.stats, session: &a, now: 7).statsValue("read_holds_expired"), 1)
        XCTAssertEqual(m.handle(.stats, session: &a, now: 7).statsValue("read_holds"), 0)
        XCTAssertNil(m.table.invariantViolation())
    }

    /// An elected master grants no lease or write window past its leadership, so a later
    /// leader can hand out space in segments remounted from its term at once.
    func testAnElectedLeaderGrantsNothingPastItsLeadershipAndItsSuccessorHoldsNothingBack() throws {
        func elected(_ term: UInt64) throws -> MasterLogic {
            var c = MasterConfig(token: nil, clientTTL: 10 * Self.s)
            c.term = term
            return try MasterLogic(config: c)
        }
        var m = try elected(10)
        var (a, seg) = join(&m, "a", host: "h")
        _ = put(&m, &a, "k")
        let ttl = m.table.policy.leaseTTL
        func found(_ now: Nanoseconds) -> FoundObject? {
            if case .found(let f) = m.handle(.get(key: "k", host: "h"), session: &a, now: now) { return f }
            return nil
        }
        func window(_ now: Nanoseconds) -> Nanoseconds? {
            guard case .putStarted(let w) = m.handle(.putStart(key: "w\(now)", size: 10, mode: .put, options: .default, preferred: nil), session: &a, now: now)
            else { return nil }
            return w.window
        }
        XCTAssertEqual(found(1)?.lease, ttl, "a master not told of a leadership end grants the whole TTL")
        XCTAssertEqual(window(1), m.config.quotas.writeTimeout)
        // As `MasterServer` does: the end is set before anything is handled.
        m = try elected(10)
        m.leadershipEnd = 2 * Self.s
        (a, seg) = join(&m, "a", host: "h")
        _ = put(&m, &a, "k")
        XCTAssertEqual(found(Self.s + Self.s / 2)?.lease, Self.s / 2)
        XCTAssertEqual(window(Self.s + Self.s / 2), Self.s / 2)
        XCTAssertEqual(found(3 * Self.s)?.lease, 0, "past the leadership: a lease no copy can use")
        XCTAssertEqual(window(3 * Self.s), 0, "and a write whose copies may not begin")
        // The master's own hold ends with the cut lease, not the TTL.
        XCTAssertEqual(m.handle(.remove(key: "k", force: true), session: &a, now: 3 * Self.s), .ok)
        m.leadershipEnd = .max
        XCTAssertEqual(m.expireHolds(now: 2 * Self.s - 1), 0)
        XCTAssertEqual(m.expireHolds(now: 2 * Self.s), 1)
        XCTAssertEqual(found(4 * Self.s)?.lease, nil, "removed")
        _ = seg

        // Remounted memory: held for a lease TTL unless it last served an earlier elected leader.
        for (term, reused, held) in [(10, UInt64?.some(9), false), (10, 10, true), (10, 0, true), (0, 0, true), (10, nil, false)] as [(UInt64, UInt64?, Bool)] {
            var n = try elected(term)
            var s = MasterLogic.Session()
            guard case .welcome = Self.authenticate(&n, &s, name: "b") else { return XCTFail() }
            guard case .mounted(let b) = n.handle(.mount(size: 1 << 20, host: "h", sharePath: "p", endpoint: "h:1", reused: reused), session: &s, now: 0)
            else { return XCTFail() }
            if reused != nil { // before its owner's last report, no remounted segment takes anything
                XCTAssertEqual(errorCode(n.handle(.putStart(key: "x", size: 4096, mode: .put, options: .default, preferred: b), session: &s, now: 1)), .noSpace)
                XCTAssertEqual(n.handle(.restore(segment: b, objects: [], last: true), session: &s, now: 1), .values([]))
            }
            let answer = n.handle(.putStart(key: "x", size: 4096, mode: .put, options: .default, preferred: b), session: &s, now: 1)
            XCTAssertEqual(errorCode(answer), held ? .noSpace : nil, "term \(term), memory of term \(String(describing: reused))")
            XCTAssertEqual(n.handle(.stats, session: &s, now: 1).statsValue("remounts"), reused == nil ? 0 : 1)
            XCTAssertNil(n.table.invariantViolation())
        }
    }

    func testReplicaCopiesBelongToTheirClient() throws {
        var m = try master()
        var (a, segA) = join(&m, "a", host: "h")
        var (b, segB) = join(&m, "b", host: "h")
        _ = put(&m, &a, "k", preferred: segA)
        guard case .copyStarted(let c, let lease, let window) = m.handle(.copyStart(key: "k", targets: [segB], drop: segA), session: &a, now: 1)
        else { return XCTFail("copyStart") }
        XCTAssertEqual(c.targets.map(\.segment), [segB])
        XCTAssertEqual(lease, m.table.policy.leaseTTL)
        XCTAssertEqual(window, m.config.quotas.writeTimeout)
        XCTAssertEqual(m.handle(.stats, session: &a, now: 1).statsValue("replica_copies_in_flight"), 1)
        XCTAssertEqual(errorCode(m.handle(.copyEnd(handle: c.handle, commit: true), session: &b, now: 2)), .invalidArgument, "not b's")
        XCTAssertEqual(m.handle(.copyEnd(handle: c.handle, commit: true), session: &a, now: 2), .ok)
        XCTAssertEqual(m.table.replicas(key: "k")?.map(\.segment), [segB], "moved")
        XCTAssertEqual(m.handle(.stats, session: &a, now: 2).statsValue("replica_copies_committed"), 1)
        // A copy the client never ends expires with the write timeout, and frees its space.
        guard case .copyStarted(let d, _, _) = m.handle(.copyStart(key: "k", targets: [segA], drop: nil), session: &b, now: 3)
        else { return XCTFail("copyStart") }
        XCTAssertEqual(m.expireWrites(now: 3 + m.config.quotas.writeTimeout), 0)
        XCTAssertEqual(m.expireWrites(now: 4 + m.config.quotas.writeTimeout), 1)
        XCTAssertEqual(errorCode(m.handle(.copyEnd(handle: d.handle, commit: true), session: &b, now: 5)), .invalidArgument)
        XCTAssertEqual(m.table.replicas(key: "k")?.map(\.segment), [segB])
        XCTAssertNil(m.table.invariantViolation())

        // A drained segment takes nothing new; only its owner may drain it.
        XCTAssertEqual(errorCode(m.handle(.drain(segment: segA), session: &b, now: 6)), .invalidArgument)
        XCTAssertEqual(m.handle(.drain(segment: segB), session: &b, now: 6), .ok)
        for i in 0..<8 { XCTAssertEqual(put(&m, &a, "d\(i)", preferred: segB).map(\.segment), [segA], "not into the drained one") }
        XCTAssertEqual(errorCode(m.handle(.copyStart(key: "d0", targets: [segB], drop: nil), session: &a, now: 7)), .invalidArgument)
        XCTAssertNotNil(m.table.replicas(key: "k"), "what it holds stays")
    }

    func testAReaderThatNeverReleasesIsBoundedAndItsHoldsEndWithTheirLeases() throws {
        var config = MasterConfig(token: nil, clientTTL: 10 * Self.s)
        config.quotas.readsInFlight = 3
        var m = try MasterLogic(config: config)
        var (a, _) = join(&m, "a", host: "h")
        _ = put(&m, &a, "k", size: 10)
        for t in 1...3 { guard case .found = m.handle(.get(key: "k", host: "h"), session: &a, now: Nanoseconds(t)) else { return XCTFail() } }
        XCTAssertEqual(errorCode(m.handle(.get(key: "k", host: "h"), session: &a, now: 4)), .noSpace, "the client's limit")
        XCTAssertEqual(m.handle(.sizeBatch(keys: ["k"]), session: &a, now: 4), .sizes([10]), "exists takes no hold")
        XCTAssertEqual(m.expireHolds(now: 3 + m.table.policy.leaseTTL), 3)
        guard case .found = m.handle(.get(key: "k", host: "h"), session: &a, now: 5 + m.table.policy.leaseTTL) else { return XCTFail() }
        XCTAssertNil(m.table.invariantViolation())
    }

    func testLayoutsArePublishedPerClientAndLeaveWithIt() throws {
        var m = try master()
        var (sa, _) = join(&m, "a", host: "h1")
        var (sb, _) = join(&m, "b", host: "h2")
        XCTAssertEqual(m.handle(.publishLayout(Self.published), session: &sa, now: 0), .ok)
        XCTAssertEqual(errorCode(m.handle(.publishLayout(Self.published), session: &sb, now: 0)), .objectExists)
        var seen = Self.published
        seen.pid = 0 // the master keeps the pid it verified (none for a session without peer credentials)
        XCTAssertEqual(m.handle(.fetchLayout(node: "n"), session: &sb, now: 0), .layout(seen))
        XCTAssertEqual(errorCode(m.handle(.unpublishLayout(node: "n"), session: &sb, now: 0)), .objectNotFound)
        XCTAssertEqual(errorCode(m.handle(.fetchLayout(node: "other"), session: &sb, now: 0)), .objectNotFound)
        m.depart(client: sa.client!, now: 0)
        XCTAssertEqual(errorCode(m.handle(.fetchLayout(node: "n"), session: &sb, now: 0)), .objectNotFound)
        XCTAssertEqual(m.handle(.publishLayout(Self.published), session: &sb, now: 0), .ok)
        XCTAssertEqual(m.handle(.unpublishLayout(node: "n"), session: &sb, now: 0), .ok)
    }

    func testEveryMessageRoundTrips() throws {
        for r in Self.requests {
            let back = try r.encode().withUnsafeBytes { b in try MasterRequest.decode(kind: r.kind, b) }
            XCTAssertEqual(back, r)
        }
        for r in Self.responses {
            let back = try r.encode().withUnsafeBytes { b in try MasterResponse.decode(kind: r.kind, b) }
            XCTAssertEqual(back, r)
        }
    }

    /// A batch over `MasterLimits.maxBatch` items, or a bad result tag, does not decode.
    func testBatchLimitsAreEnforced() {
        let tooMany = MasterRequest.getBatch(keys: Array(repeating: "k", count: MasterLimits.maxBatch + 1), host: "h")
        XCTAssertThrowsError(try tooMany.encode().withUnsafeBytes { try MasterRequest.decode(kind: tooMany.kind, $0) }) {
            XCTAssertTrue(($0 as? KVError)?.message.contains("exceeds") ?? false, "\($0)")
        }
        let writes = MasterRequest.putStartBatch(
            items: Array(repeating: BatchWrite(key: "k", size: 1), count: MasterLimits.maxBatch + 1),
            mode: .put, options: .default, preferred: nil)
        XCTAssertThrowsError(try writes.encode().withUnsafeBytes { try MasterRequest.decode(kind: writes.kind, $0) })
        var bytes = MasterResponse.foundBatch([.failure(KVError(.objectNotFound, "x"))]).encode()
        bytes[4] = 7 // the result tag after the count
        XCTAssertThrowsError(try bytes.withUnsafeBytes { try MasterResponse.decode(kind: 111, $0) }) {
            XCTAssertTrue(($0 as? KVError)?.message.contains("tag") ?? false, "\($0)")
        }
    }

    /// Random and mutated frames, decoded and (when they decode) handled on random sessions:
    /// nothing traps, every failure is a typed error, and the table stays consistent.
    func testFuzzedRequestsNeverBreakTheMaster() throws {
        var m = try master()
        var rng = SplitMix64(seed: 99)
        var sessions = (0..<4).map { _ in MasterLogic.Session() }
        var decoded = 0
        for i in 0..<30_000 {
            let now = Nanoseconds(i) * 1_000_000
            var bytes: [UInt8]
            var kind = UInt16(rng.next() % 20)
            if rng.next() % 3 == 0 {
                bytes = (0..<Int(rng.next() % 64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                let base = Self.requests[Int(rng.next() % UInt64(Self.requests.count))]
                kind = base.kind
                bytes = base.encode()
                if !bytes.isEmpty && rng.next() % 2 == 0 { bytes[Int(rng.next() % UInt64(bytes.count))] ^= UInt8(truncatingIfNeeded: rng.next() | 1) }
            }
            let s = Int(rng.next() % 4)
            do {
                let req = try bytes.withUnsafeBytes { b in try MasterRequest.decode(kind: kind, b) }
                decoded += 1
                let resp = m.handle(req, session: &sessions[s], now: now)
                _ = try resp.encode().withUnsafeBytes { b in try MasterResponse.decode(kind: resp.kind, b) }
            } catch {
                XCTAssertEqual((error as? KVError)?.code, .invalidArgument)
            }
            if i % 1000 == 0 {
                _ = m.expireClients(now: now)
                if let v = m.table.invariantViolation() { return XCTFail("step \(i): \(v)") }
            }
        }
        XCTAssertGreaterThan(decoded, 1000)
    }
}

extension MasterResponse {
    func statsValue(_ name: String) -> Int? {
        guard case .stats(let all) = self else { return nil }
        return all.first { $0.name == name }?.value
    }
}

extension Result where Failure == KVError {
    var failureCode: KVError.Code? {
        if case .failure(let e) = self { return e.code }
        return nil
    }
}
