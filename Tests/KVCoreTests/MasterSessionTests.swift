import XCTest
import KVTestSupport
@testable import KVCore

/// Sessions that survive a lost connection (`resume`), clients that leave, and fenced
/// writers (a departed writer's space is kept until its write timeout), with time moved by hand.
final class MasterSessionTests: XCTestCase {
    static let s: Nanoseconds = 1_000_000_000
    let token = "the-cluster-token"

    func master(writeTimeout: Nanoseconds = 300 * MasterSessionTests.s) throws -> MasterLogic {
        var c = MasterConfig(token: token, clientTTL: 10 * Self.s)
        c.quotas.writeTimeout = writeTimeout
        return try MasterLogic(config: c)
    }

    /// A new connection's handshake; returns its session and the session secret the welcome
    /// carried (unmasked as a client does).
    func connect(_ m: inout MasterLogic, pid: Int32 = 0, now: Nanoseconds = 0) -> (MasterLogic.Session, [UInt8]) {
        var session = MasterLogic.Session()
        session.peerPID = pid
        let cn = Authentication.randomBytes(Authentication.nonceSize)
        guard case let .challenge(sn, _) = m.handle(.hello(name: "c", nonce: cn, tenant: ""), session: &session, now: now),
            case let .welcome(w) = m.handle(
                .prove(proof: Authentication.proof(token: Array(token.utf8), role: .client, clientNonce: cn, serverNonce: sn)),
                session: &session, now: now)
        else {
            XCTFail("handshake")
            return (session, [])
        }
        XCTAssertEqual(w.writeTimeout, m.config.quotas.writeTimeout)
        XCTAssertEqual(w.session.count, 32)
        let secret = Authentication.mask(w.session, token: Array(token.utf8), clientNonce: cn, serverNonce: sn)
        XCTAssertEqual(secret, m.clients[w.client]!.secret, "the welcome carries the session secret, masked")
        XCTAssertNotEqual(w.session, secret, "never in the clear")
        return (session, secret)
    }

    func mount(_ m: inout MasterLogic, _ s: inout MasterLogic.Session, kib: Int = 256, now: Nanoseconds = 0) -> SegmentID {
        guard
            case .mounted(let seg) = m.handle(
                .mount(size: kib << 10, host: "h", sharePath: "", endpoint: "h:1", reused: nil),
                session: &s, now: now)
        else { XCTFail("mount"); return 0 }
        return seg
    }

    func start(
        _ m: inout MasterLogic, _ s: inout MasterLogic.Session, _ key: ObjectKey, size: Int = 1000,
        preferred: SegmentID? = nil, now: Nanoseconds = 0
    ) -> StartedWrite? {
        guard
            case .putStarted(let w) = m.handle(
                .putStart(key: key, size: size, mode: .put, options: .default, preferred: preferred),
                session: &s, now: now)
        else { return nil }
        return w
    }

    func proof(_ secret: [UInt8], _ s: MasterLogic.Session) -> [UInt8] { HMACSHA256.mac(key: secret, message: s.nonces) }

    func found(_ m: inout MasterLogic, _ s: inout MasterLogic.Session, _ key: ObjectKey, now: Nanoseconds) -> Bool {
        if case .found = m.handle(.get(key: key, host: "h"), session: &s, now: now) { return true }
        return false
    }

    func testALostConnectionKeepsTheSessionUntilItResumes() throws {
        var m = try master()
        let (a0, secret) = connect(&m)
        var a = a0
        let seg = mount(&m, &a)
        let oldID = a.client!
        guard let done = start(&m, &a, "kept", preferred: seg), let pending = start(&m, &a, "pending", preferred: seg),
            let dropped = start(&m, &a, "dropped", preferred: seg)
        else { return XCTFail() }
        XCTAssertEqual(m.handle(.putCommit(handle: done.handle), session: &a, now: 0), .ok)
        var (b, _) = connect(&m)

        XCTAssertNil(m.closed(a, peerGone: false, now: 1 * Self.s), "a lost connection does not depart a client holding a segment")
        XCTAssertEqual(m.detachedSessions, 1)
        XCTAssertTrue(found(&m, &b, "kept", now: 2 * Self.s), "its objects stay readable meanwhile")

        var (a2, _) = connect(&m, now: 3 * Self.s)
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .resume(client: oldID, proof: proof([UInt8](repeating: 1, count: 32), a2), commits: [], aborts: []),
                    session: &a2, now: 3 * Self.s)), .invalidArgument, "a wrong proof")
        XCTAssertEqual(m.refusedResumes, 1)
        var (a3, _) = connect(&m, now: 3 * Self.s)
        XCTAssertEqual(
            m.handle(
                .resume(client: oldID, proof: proof(secret, a3), commits: [PipelinedCommit(handle: pending.handle, checksum: 7)], aborts: [dropped.handle]),
                session: &a3, now: 3 * Self.s), .value(1), "the commit sent before the loss is applied")
        XCTAssertEqual(a3.client, oldID)
        XCTAssertTrue(found(&m, &b, "pending", now: 4 * Self.s))
        XCTAssertFalse(found(&m, &b, "dropped", now: 4 * Self.s), "the write reported lost is aborted")
        XCTAssertEqual(
            m.handle(.putCommit(handle: done.handle), session: &a3, now: 4 * Self.s).kind, MasterResponse.errorKind,
            "a commit already applied is not applied twice")
        XCTAssertEqual(m.handle(.heartbeat, session: &a3, now: 5 * Self.s), .ok)
        XCTAssertEqual(m.handle(.segmentInfo(segment: seg), session: &a3, now: 5 * Self.s).kind, 109, "the segment stayed mounted")
        XCTAssertEqual(
            errorCode(m.handle(.heartbeat, session: &a, now: 5 * Self.s)), .invalidArgument,
            "the old connection's session moved: it may not act")
        XCTAssertNil(m.closed(a, peerGone: false, now: 5 * Self.s), "closing the old connection leaves the resumed session alone")
        XCTAssertEqual(m.handle(.heartbeat, session: &a3, now: 5 * Self.s), .ok)
        XCTAssertEqual(m.resumedSessions, 1)
        XCTAssertEqual(m.clientCount, 3, "a (now on a3), b, and a2 (its resume was refused: a session of its own); a3's fresh id was dropped")
        XCTAssertNil(m.table.invariantViolation())
    }

    func testASessionNotResumedWithinTheClientTTLDeparts() throws {
        var m = try master()
        let (a0, secret) = connect(&m)
        var a = a0
        let seg = mount(&m, &a)
        guard let w = start(&m, &a, "k", preferred: seg) else { return XCTFail() }
        XCTAssertEqual(m.handle(.putCommit(handle: w.handle), session: &a, now: 0), .ok)
        XCTAssertNil(m.closed(a, peerGone: false, now: 0))
        XCTAssertTrue(m.expireClients(now: 10 * Self.s).isEmpty)
        let gone = m.expireClients(now: 10 * Self.s + 1)
        XCTAssertEqual(gone.map(\.lostObjects), [["k"]])
        var (late, _) = connect(&m, now: 11 * Self.s)
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .resume(client: a.client!, proof: proof(secret, late), commits: [], aborts: []),
                    session: &late, now: 11 * Self.s)), .objectNotFound)
        XCTAssertEqual(m.handle(.heartbeat, session: &late, now: 11 * Self.s), .ok, "a refused resume leaves the new session usable")
    }

    func testResumeChecksTheProcessAndComesFirst() throws {
        var m = try master()
        let (a0, secret) = connect(&m, pid: 100)
        var a = a0
        _ = mount(&m, &a)
        XCTAssertNil(m.closed(a, peerGone: false, now: 0))
        var (other, _) = connect(&m, pid: 200)
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .resume(client: a.client!, proof: proof(secret, other), commits: [], aborts: []),
                    session: &other, now: 0)), .invalidArgument, "another process may not take the session")
        var (busy, _) = connect(&m, pid: 100)
        _ = mount(&m, &busy)
        XCTAssertEqual(
            errorCode(
                m.handle(
                    .resume(client: a.client!, proof: proof(secret, busy), commits: [], aborts: []),
                    session: &busy, now: 0)), .invalidArgument, "resume must come first")
        var (same, _) = connect(&m, pid: 100)
        XCTAssertEqual(m.handle(.resume(client: a.client!, proof: proof(secret, same), commits: [], aborts: []), session: &same, now: 0), .value(0))
    }

    func testLeavingOrAGoneProcessDepartsAtOnce() throws {
        var m = try master()
        var (a, _) = connect(&m)
        _ = mount(&m, &a)
        XCTAssertEqual(m.handle(.leave, session: &a, now: 0), .ok)
        XCTAssertEqual(m.takeDepartures().count, 1)
        XCTAssertEqual(m.table.segmentCount, 0)
        XCTAssertEqual(errorCode(m.handle(.heartbeat, session: &a, now: 0)), .invalidArgument)
        var (b, _) = connect(&m)
        _ = mount(&m, &b)
        XCTAssertNotNil(m.closed(b, peerGone: true, now: 0), "a connection whose process is gone departs it")
        let (c, _) = connect(&m)
        XCTAssertNotNil(m.closed(c, peerGone: false, now: 0), "a client holding nothing departs when its connection closes")
        XCTAssertEqual(m.clientCount, 0)
    }

    /// Fenced writers: the space of a departed writer's write stays taken until the write
    /// timeout, so a writer the master lost sight of never copies into another object's space.
    func testADepartedWritersSpaceIsKeptUntilTheWriteTimeout() throws {
        var m = try master(writeTimeout: 30 * Self.s)
        var (owner, _) = connect(&m)
        let seg = mount(&m, &owner, kib: 64)
        var (writer, _) = connect(&m)
        guard let w = start(&m, &writer, "stale", size: 64 << 10, preferred: seg) else { return XCTFail() }
        let d = m.depart(client: writer.client!, now: 1 * Self.s)
        XCTAssertEqual(d?.abandonedWrites, 1)
        XCTAssertNil(
            start(&m, &owner, "new", size: 64 << 10, preferred: seg, now: 2 * Self.s),
            "the abandoned write's space is not given to another object")
        XCTAssertEqual(
            errorCode(m.handle(.putCommit(handle: w.handle), session: &writer, now: 3 * Self.s)), .invalidArgument,
            "the departed writer's commit is refused")
        XCTAssertEqual(m.expireWrites(now: 30 * Self.s), 0)
        XCTAssertEqual(m.expireWrites(now: 30 * Self.s + 1), 1)
        guard let n = start(&m, &owner, "new", size: 64 << 10, preferred: seg, now: 31 * Self.s) else { return XCTFail("space freed") }
        XCTAssertEqual(m.handle(.putCommit(handle: n.handle), session: &owner, now: 31 * Self.s), .ok)
        XCTAssertFalse(found(&m, &owner, "stale", now: 31 * Self.s))
        XCTAssertNil(m.table.invariantViolation())
    }

    /// A put whose key an upsert wrote meanwhile is not refused (its commit was pipelined, its
    /// caller told success): it counts as written just before the upsert, which replaced it.
    func testAPutThatLostARaceToAnUpsertIsNotRefused() throws {
        var m = try master()
        var (a, _) = connect(&m)
        let seg = mount(&m, &a)
        guard let put = start(&m, &a, "k", size: 100, preferred: seg) else { return XCTFail() }
        guard
            case .putStarted(let up) = m.handle(
                .putStart(key: "k", size: 200, mode: .upsert, options: .default, preferred: seg),
                session: &a, now: 0)
        else { return XCTFail() }
        XCTAssertEqual(m.handle(.putCommit(handle: up.handle), session: &a, now: 0), .ok)
        XCTAssertEqual(m.handle(.putCommit(handle: put.handle), session: &a, now: 0), .ok)
        XCTAssertEqual(m.handle(.size(key: "k"), session: &a, now: 0), .value(200), "the upsert's value stays")
        XCTAssertEqual(m.table.supersededPuts, 1)
        XCTAssertNil(m.table.invariantViolation())
    }

    func testReadsOfAKeyBeingWrittenWaitForItsCommit() throws {
        var m = try master()
        var (a, _) = connect(&m)
        let seg = mount(&m, &a)
        guard let w = start(&m, &a, "k", preferred: seg) else { return XCTFail() }
        for r in [
            MasterRequest.get(key: "k", host: "h"), .exists(key: "k"), .size(key: "k"), .getBatch(keys: ["x", "k"], host: "h"),
            .sizeBatch(keys: ["k"])
        ] {
            XCTAssertTrue(m.mustWait(r, session: a), "\(r)")
        }
        XCTAssertFalse(m.mustWait(.get(key: "other", host: "h"), session: a))
        XCTAssertFalse(m.mustWait(.remove(key: "k", force: false), session: a), "only reads wait")
        XCTAssertEqual(m.handle(.putCommit(handle: w.handle), session: &a, now: 0), .ok)
        XCTAssertFalse(m.mustWait(.get(key: "k", host: "h"), session: a))
        var c = MasterConfig(token: token)
        c.readWait = 0
        var off = try MasterLogic(config: c)
        var (b, _) = connect(&off)
        let seg2 = mount(&off, &b)
        _ = start(&off, &b, "k", preferred: seg2)
        XCTAssertFalse(off.mustWait(.get(key: "k", host: "h"), session: b), "--read-wait 0: never")
    }

    /// A restore names only the client's own segment; a restored object is readable at once,
    /// and the owner hears of later changes (notices) for its segment only.
    func testRestoreIsOwnedAndNoticed() throws {
        var m = try master()
        var (a, _) = connect(&m)
        var (b, _) = connect(&m)
        let segA = mount(&m, &a)
        let obj = ObjectTable.Restored(key: "k", offset: 0, size: 100, seq: 5, options: .default, checksum: nil)
        XCTAssertEqual(
            errorCode(m.handle(.restore(segment: segA, objects: [obj], last: true), session: &b, now: 0)), .invalidArgument,
            "another client's segment")
        XCTAssertEqual(m.handle(.restore(segment: segA, objects: [obj], last: true), session: &a, now: 0), .values([.success(1)]))
        XCTAssertTrue(found(&m, &b, "k", now: 0))
        XCTAssertEqual(m.handle(.remove(key: "k", force: true), session: &b, now: 0), .ok)
        let batches = m.takeNotices(now: 0, all: true)
        XCTAssertEqual(batches.map(\.client), [a.client!], "only the owner hears")
        XCTAssertEqual(batches.first?.notices.first?.seq, 5)
        XCTAssertNil(batches.first?.notices.first?.object, "a removal")
        // Only the owner confirms what it heard (the space is then handed out again: `ObjectTable`).
        let number = try XCTUnwrap(batches.first?.notices.last?.number)
        XCTAssertEqual(errorCode(m.handle(.confirmNotices(segment: segA, through: number), session: &b, now: 0)), .invalidArgument)
        XCTAssertEqual(m.handle(.confirmNotices(segment: segA, through: number), session: &a, now: 0), .ok)
    }

    /// A tenant's client restores only its tenant's keys, and hears only of them; forged
    /// reports (another tenant's key, an oversized list) are refused and leave the table as it was.
    func testATenantRestoresAndHearsOnlyItsOwnKeys() throws {
        var c = MasterConfig(token: token, clientTTL: 10 * Self.s)
        c.tenants = ["acme": "acme-token-0123456789"]
        var m = try MasterLogic(config: c)
        var t = MasterLogic.Session()
        let cn = Authentication.randomBytes(Authentication.nonceSize)
        guard case let .challenge(sn, _) = m.handle(.hello(name: "t", nonce: cn, tenant: "acme"), session: &t, now: 0),
            case .welcome = m.handle(
                .prove(
                    proof: Authentication.proof(
                        token: Array("acme-token-0123456789".utf8), role: .client,
                        clientNonce: cn, serverNonce: sn)), session: &t, now: 0)
        else {
            return XCTFail("tenant handshake")
        }
        let seg = mount(&m, &t)
        let mine = ObjectTable.Restored(key: "acme/k", offset: 0, size: 64, seq: 5, options: .default, checksum: nil)
        let theirs = ObjectTable.Restored(key: "other/k", offset: 64, size: 64, seq: 6, options: .default, checksum: nil)
        XCTAssertEqual(m.handle(.restore(segment: seg, objects: [mine, theirs], last: true), session: &t, now: 0), .values([.success(1), .success(0)]))
        XCTAssertEqual(m.table.objectCount, 1)
        XCTAssertNil(m.table.size(key: "other/k"), "another tenant's key cannot be forged")
        // An admin writes another tenant's key into this tenant's segment: the owner hears nothing of it.
        var (admin, _) = connect(&m)
        guard let w = start(&m, &admin, "other/x", size: 64, preferred: seg) else { return XCTFail() }
        XCTAssertEqual(m.handle(.putCommit(handle: w.handle), session: &admin, now: 0), .ok)
        XCTAssertTrue(m.takeNotices(now: 0, all: true).allSatisfy { $0.notices.allSatisfy { $0.object == nil } })
        var tooMany = WireWriter()
        tooMany.u32(seg); tooMany.count(MasterLimits.maxBatch + 1)
        XCTAssertThrowsError(try tooMany.bytes.withUnsafeBytes { try MasterRequest.decode(kind: MasterRequest.Kind.restore.rawValue, $0) })
    }

    /// Message kinds are numbered once (`Kind`); the numbers are the wire format and never move.
    func testMessageKindNumbersAreStable() {
        XCTAssertEqual(MasterRequest.Kind.allCases.map(\.rawValue), Array(1...34))
        XCTAssertEqual(MasterResponse.Kind.allCases.map(\.rawValue), Array(100...119))
        XCTAssertEqual(MasterRequest.heartbeat.kind, 4)
        XCTAssertEqual(MasterRequest.restore(segment: 1, objects: [], last: false).kind, 28)
        XCTAssertEqual(MasterResponse.errorKind, 101)
        XCTAssertEqual(MasterResponse.notices([]).kind, 116)
        XCTAssertEqual(MasterResponse.sizes([]).kind, 117)
        XCTAssertTrue(MasterRequest.isHandshakeKind(1) && MasterRequest.isHandshakeKind(21) && !MasterRequest.isHandshakeKind(2))
        XCTAssertEqual(MasterRequest.confirmNotices(segment: 1, through: 1).kind, 29)
        XCTAssertEqual(MasterRequest.copyStart(key: "k", targets: [1], drop: nil).kind, 30)
        XCTAssertEqual(MasterRequest.copyEnd(handle: 1, commit: true).kind, 31)
        XCTAssertEqual(MasterRequest.drain(segment: 1).kind, 32)
        XCTAssertEqual(MasterRequest.diskRound(segment: 1, disk: 1, capacity: 1, reports: [], dropped: [], want: 0).kind, 33)
        XCTAssertEqual(MasterRequest.diskRestore(segment: 1, files: []).kind, 34)
        XCTAssertEqual(MasterResponse.diskRound(offers: [], forget: []).kind, 119)
        XCTAssertFalse(MasterRequest.isRequestKind(35) || MasterResponse.isResponseKind(120) || MasterRequest.isRequestKind(0))
    }

    /// `sizes` (the answer to `sizeBatch`): 8 bytes a key, absent as all ones; a size past
    /// `MasterLimits.maxSize` or a list past `maxBatch` is refused.
    func testSizesRoundTripAndAreBounded() throws {
        let r = MasterResponse.sizes([0, nil, 4096, MasterLimits.maxSize, nil])
        XCTAssertEqual(try r.encode().withUnsafeBytes { try MasterResponse.decode(kind: r.kind, $0) }, r)
        var big = WireWriter()
        big.count(1); big.u64(UInt64(MasterLimits.maxSize) + 1)
        XCTAssertThrowsError(try big.bytes.withUnsafeBytes { try MasterResponse.decode(kind: 117, $0) })
        var long = WireWriter()
        long.count(MasterLimits.maxBatch + 1)
        for _ in 0...MasterLimits.maxBatch { long.u64(1) }
        XCTAssertThrowsError(try long.bytes.withUnsafeBytes { try MasterResponse.decode(kind: 117, $0) })
        var short = WireWriter()
        short.count(3); short.u64(1)
        XCTAssertThrowsError(try short.bytes.withUnsafeBytes { try MasterResponse.decode(kind: 117, $0) })
    }

    func testSessionMessagesRoundTrip() throws {
        for r in [
            MasterRequest.leave, .confirmNotices(segment: 3, through: 1 << 40),
            .resume(client: 7, proof: [1, 2, 3], commits: [PipelinedCommit(handle: 4), PipelinedCommit(handle: 5, checksum: 9)], aborts: [6])
        ] {
            XCTAssertEqual(try r.encode().withUnsafeBytes { try MasterRequest.decode(kind: r.kind, $0) }, r)
        }
        // A forged confirmation: cut short, or with bytes after it.
        let confirm = MasterRequest.confirmNotices(segment: 3, through: 9)
        for bad in [Array(confirm.encode().dropLast()), confirm.encode() + [0]] {
            XCTAssertThrowsError(try bad.withUnsafeBytes { try MasterRequest.decode(kind: confirm.kind, $0) })
        }
        var w = WireWriter()
        w.u64(1); w.bytes([0]); w.count(MasterLimits.maxBatch + 1)
        XCTAssertThrowsError(try w.bytes.withUnsafeBytes { try MasterRequest.decode(kind: 27, $0) }, "a bounded list")
    }

    func errorCode(_ r: MasterResponse) -> KVError.Code? {
        if case .error(let e) = r { return e.code }
        return nil
    }
}
