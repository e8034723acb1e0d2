import XCTest
import KVTestSupport
@testable import KVCore

/// The master's side of the cluster disk tier (`DiskDirectory`, `MasterLogic.diskRound`):
/// offers of the owner's coldest objects, reports, one version across tiers, disks that go
/// away and come back, and the messages' bounds.
extension MasterSessionTests {
    static let disk: UInt64 = 0xD15C

    /// One disk tier round of `s` (declaring disk `disk`); the answer.
    func round(
        _ m: inout MasterLogic, _ s: inout MasterLogic.Session, _ seg: SegmentID, reports: [DiskReport] = [],
        dropped: [UInt64] = [], want: Int = 64, disk: UInt64 = MasterSessionTests.disk, now: Nanoseconds = 0
    ) -> (offers: [DiskOffer], forget: [UInt64]) {
        let r = m.handle(
            .diskRound(segment: seg, disk: disk, capacity: 1 << 30, reports: reports, dropped: dropped, want: want),
            session: &s, now: now)
        guard case let .diskRound(offers, forget) = r else {
            XCTFail("diskRound: \(r)")
            return ([], [])
        }
        return (offers, forget)
    }

    func write(_ m: inout MasterLogic, _ s: inout MasterLogic.Session, _ key: ObjectKey, upsert: Bool = false, now: Nanoseconds = 0) {
        guard
            case .putStarted(let w) = m.handle(
                .putStart(key: key, size: 4096, mode: upsert ? .upsert : .put, options: .default, preferred: nil),
                session: &s, now: now)
        else { return XCTFail("putStart \(key)") }
        XCTAssertEqual(m.handle(.putCommit(handle: w.handle), session: &s, now: now), .ok)
        // The owner hears of freed space (and confirms): eviction's room is handed out again.
        for (_, ns) in m.takeNotices(now: now, all: true) {
            if let last = ns.last { _ = m.handle(.confirmNotices(segment: last.segment, through: last.number), session: &s, now: now) }
        }
    }

    func replica(_ m: inout MasterLogic, _ s: inout MasterLogic.Session, _ key: ObjectKey, now: Nanoseconds = 0) -> Replica? {
        guard case .found(let f) = m.handle(.get(key: key, host: "h"), session: &s, now: now) else { return nil }
        return f.replicas.first
    }

    /// A 256 KiB segment filled past its high watermark less the offload margin: the coldest
    /// objects are offered, under a hold, with their place in the owner's segment.
    func testTheOwnersColdestObjectsAreOfferedAndACopyIsServedOnceDRAMLostIt() throws {
        var m = try master()
        var (a, _) = connect(&m)
        let seg = mount(&m, &a)
        XCTAssertTrue(round(&m, &a, seg).offers.isEmpty, "an empty segment has nothing to copy")
        for i in 0..<50 { write(&m, &a, ObjectKey("k\(i)")) }
        let offers = round(&m, &a, seg).offers
        XCTAssertEqual(offers.first?.key, "k0", "the coldest first")
        XCTAssertEqual(offers.first?.size, 4096)
        XCTAssertTrue(offers.allSatisfy { !$0.reused })
        let again = round(&m, &a, seg).offers
        XCTAssertTrue(again.allSatisfy { o in !offers.contains { $0.key == o.key } }, "not offered twice")
        var reports = [DiskReport(handle: offers[0].handle, generation: 100, stored: true)]
        reports += (offers.dropFirst() + again).map { DiskReport(handle: $0.handle, generation: 0, stored: false) }
        _ = round(&m, &a, seg, reports: reports)
        XCTAssertEqual(m.disk.count, 1)
        XCTAssertEqual(replica(&m, &a, "k0")?.segment, seg, "DRAM first while it has the object")
        var now: Nanoseconds = 6 * Self.s // past the read's lease
        m.expireHolds(now: now) // as the server does each poll: the read's hold has ended
        for i in 50..<120 { write(&m, &a, ObjectKey("k\(i)"), now: now) }
        XCTAssertNil(m.table.size(key: "k0"), "evicted from DRAM")
        XCTAssertEqual(replica(&m, &a, "k0", now: now), Replica(segment: DiskDirectory.diskSegment(of: seg), offset: 100))
        XCTAssertEqual(m.handle(.exists(key: "k0"), session: &a, now: now), .flag(true))
        XCTAssertEqual(m.handle(.size(key: "k0"), session: &a, now: now), .value(4096))
        XCTAssertNil(replica(&m, &a, "k1", now: now), "refused or never copied: gone with DRAM")
        guard case let .keys(ks, _) = m.handle(.listKeys(after: nil), session: &a, now: now) else { return XCTFail() }
        XCTAssertTrue(ks.contains("k0"))
        now += Self.s
        XCTAssertEqual(m.handle(.stats, session: &a, now: now).statsValue("disk_objects"), 1)
        XCTAssertEqual(m.handle(.stats, session: &a, now: now).statsValue("disk_hits"), 1)
    }

    /// A commit or removal drops the copy and tells its owner to delete the file; a copy
    /// reported after a commit of its key is refused and deleted; a put never overwrites it.
    func testANewerVersionOrARemovalIsNeverUndoneByACopy() throws {
        var m = try master()
        var (a, _) = connect(&m)
        let seg = mount(&m, &a)
        for i in 0..<50 { write(&m, &a, ObjectKey("k\(i)")) }
        let offers = round(&m, &a, seg).offers
        XCTAssertGreaterThanOrEqual(offers.count, 3)
        write(&m, &a, offers[2].key, upsert: true) // a commit between the offer and its report
        let answer = round(
            &m, &a, seg,
            reports: [
                DiskReport(handle: offers[0].handle, generation: 100, stored: true),
                DiskReport(handle: offers[1].handle, generation: 101, stored: true),
                DiskReport(handle: offers[2].handle, generation: 102, stored: true)
            ], want: 0)
        XCTAssertEqual(answer.forget, [102], "the stale copy is deleted, never indexed")
        XCTAssertEqual(m.disk.count, 2)
        let start = m.handle(.putStart(key: offers[0].key, size: 10, mode: .put, options: .default, preferred: nil), session: &a, now: 0)
        XCTAssertEqual(errorCode(start), .objectExists)
        write(&m, &a, offers[0].key, upsert: true)
        XCTAssertEqual(m.handle(.remove(key: offers[1].key, force: true), session: &a, now: 0), .ok)
        XCTAssertEqual(Set(round(&m, &a, seg, want: 0).forget), [100, 101])
        XCTAssertEqual(m.disk.count, 0)
        XCTAssertTrue(round(&m, &a, seg, want: 0).forget.isEmpty, "each file once")
        // The owner's own drops: the entry goes, nothing to delete.
        let more = round(&m, &a, seg).offers
        _ = round(&m, &a, seg, reports: [DiskReport(handle: more[0].handle, generation: 200, stored: true)], want: 0)
        XCTAssertEqual(m.disk.count, 1)
        XCTAssertTrue(round(&m, &a, seg, dropped: [200], want: 0).forget.isEmpty)
        XCTAssertEqual(m.disk.count, 0)
    }

    /// A disk whose client left keeps its entries offline: not served, still dropped by
    /// removals and commits. When a process declares that disk again, only files still
    /// indexed are taken back; a master that never knew the disk takes what nobody holds.
    func testADiskThatWasAwayGetsBackOnlyWhatDidNotChange() throws {
        var m = try master()
        var (a, _) = connect(&m)
        let seg = mount(&m, &a)
        for i in 0..<50 { write(&m, &a, ObjectKey("k\(i)")) }
        let offers = round(&m, &a, seg).offers
        _ = round(
            &m, &a, seg, reports: offers.prefix(3).enumerated().map { DiskReport(handle: $1.handle, generation: UInt64(100 + $0), stored: true) }, want: 0)
        XCTAssertEqual(m.disk.count, 3)
        XCTAssertEqual(m.handle(.leave, session: &a, now: 0), .ok)
        var (b, _) = connect(&m)
        let segB = mount(&m, &b)
        let (k0, k1, k2) = (offers[0].key, offers[1].key, offers[2].key)
        XCTAssertNil(replica(&m, &b, k0), "its disk is away")
        XCTAssertEqual(m.handle(.exists(key: k0), session: &b, now: 0), .flag(false))
        XCTAssertEqual(m.handle(.remove(key: k1, force: false), session: &b, now: 0), .ok, "the removal reaches the away copy")
        write(&m, &b, k2) // a put: the away copy is not in its way, and is dropped by the commit
        var (a2, _) = connect(&m)
        let seg2 = mount(&m, &a2)
        let files = [k0, k1, k2, "never"].enumerated().map { i, k in DiskFile(key: k, generation: UInt64(100 + i), size: 4096, checksum: nil, ttlLeft: nil) }
        XCTAssertEqual(errorCode(m.handle(.diskRestore(segment: seg2, files: files), session: &a2, now: 0)), .invalidArgument, "declare first")
        _ = round(&m, &a2, seg2, want: 0)
        XCTAssertEqual(m.handle(.diskRestore(segment: seg2, files: files), session: &a2, now: 0), .values([.success(1), .success(0), .success(0), .success(0)]))
        XCTAssertEqual(replica(&m, &b, k0), Replica(segment: DiskDirectory.diskSegment(of: seg2), offset: 100))
        XCTAssertEqual(replica(&m, &b, k2)?.segment, segB)
        // Another connected client cannot claim the disk.
        XCTAssertEqual(
            errorCode(m.handle(.diskRound(segment: segB, disk: Self.disk, capacity: 1, reports: [], dropped: [], want: 0), session: &b, now: 0)),
            .invalidArgument)
        // A master that never knew the disk (restarted) takes files for keys nobody holds.
        var fresh = try master()
        var (c, _) = connect(&fresh)
        let segC = mount(&fresh, &c)
        write(&fresh, &c, "in-dram")
        _ = round(&fresh, &c, segC, disk: 0xBEEF)
        let back = fresh.handle(
            .diskRestore(
                segment: segC,
                files: [
                    DiskFile(key: "x", generation: 1, size: 10, checksum: 7, ttlLeft: nil),
                    DiskFile(key: "in-dram", generation: 2, size: 10, checksum: nil, ttlLeft: nil)
                ]),
            session: &c, now: 0)
        XCTAssertEqual(back, .values([.success(1), .success(0)]))
        XCTAssertEqual(replica(&fresh, &c, "x"), Replica(segment: DiskDirectory.diskSegment(of: segC), offset: 1))
    }

    func testDiskMessagesRoundTripAndAreBounded() throws {
        let requests: [MasterRequest] = [
            .diskRound(
                segment: 3, disk: 9, capacity: 1 << 40, reports: [DiskReport(handle: 5, generation: 6, stored: true)], dropped: [7, 8],
                want: 64),
            .diskRestore(
                segment: 3,
                files: [
                    DiskFile(key: "a", generation: 1, size: 2, checksum: 3, ttlLeft: 4), DiskFile(key: "b", generation: 5, size: 6, checksum: nil, ttlLeft: nil)
                ])
        ]
        for r in requests {
            XCTAssertEqual(try r.encode().withUnsafeBytes { try MasterRequest.decode(kind: r.kind, $0) }, r)
        }
        let answer = MasterResponse.diskRound(
            offers: [DiskOffer(key: "k", handle: 1, offset: 4096, size: 10, checksum: 9, ttlLeft: 100, reused: true)], forget: [1, 2])
        XCTAssertEqual(try answer.encode().withUnsafeBytes { try MasterResponse.decode(kind: answer.kind, $0) }, answer)
        var long = WireWriter()
        long.u32(1); long.u64(1); long.u64(1); long.u32(1)
        long.count(MasterLimits.maxBatch + 1)
        XCTAssertThrowsError(try long.bytes.withUnsafeBytes { try MasterRequest.decode(kind: MasterRequest.Kind.diskRound.rawValue, $0) })
        var forged = WireWriter()
        forged.count(0); forged.count(DiskDirectory.forgetPerRound + 1)
        XCTAssertThrowsError(try forged.bytes.withUnsafeBytes { try MasterResponse.decode(kind: answer.kind, $0) })
    }
}
