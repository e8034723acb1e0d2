import XCTest
@testable import KVCore
@testable import KVStore

/// A client's index of its own segment, from the master's notices (issue 17 item 6). The
/// master may lie: a notice that does not fit the segment is dropped, so the index stays
/// bounded and a restore never reports a range outside the segment.
final class SegmentIndexTests: XCTestCase {
    /// Notices are numbered per segment, as the master numbers them.
    var number: UInt64 = 0
    func next() -> UInt64 { number += 1; return number }

    func stored(_ seg: SegmentID, _ offset: Int, _ size: Int, seq: UInt64, key: ObjectKey = "k") -> ObjectTable.SegmentNotice {
        ObjectTable.SegmentNotice(
            segment: seg, offset: offset, seq: seq,
            object: ObjectTable.Restored(key: key, offset: offset, size: size, seq: seq, options: .default, checksum: nil),
            number: seg == 7 ? next() : 1)
    }

    func gone(_ offset: Int, seq: UInt64) -> ObjectTable.SegmentNotice {
        ObjectTable.SegmentNotice(segment: 7, offset: offset, seq: seq, object: nil, number: next())
    }

    func mounted() -> RemoteMaster.Link {
        var l = RemoteMaster.Link()
        l.segment = 7
        l.mount = RemoteMaster.Mount(size: 1 << 20, host: "h", sharePath: "", endpoint: "")
        return l
    }

    /// A lost notice (a gap in the numbers) may hide that an indexed object went and its space
    /// was reused: the index is dropped rather than reported to a restarted master. Notices
    /// heard twice change nothing; what was applied is what the client confirms.
    func testAGapInTheNoticesDropsTheIndex() {
        var l = mounted()
        RemoteMaster.apply([stored(7, 0, 100, seq: 1), stored(7, 4096, 64, seq: 2)], &l)
        XCTAssertEqual(l.index.count, 2)
        XCTAssertEqual(l.noticed, 2)
        let again = [ObjectTable.SegmentNotice(segment: 7, offset: 0, seq: 1, object: nil, number: 1)]
        RemoteMaster.apply(again, &l)
        XCTAssertEqual(l.index.count, 2, "a notice heard already is not applied twice")
        _ = next() // number 3 never arrives
        RemoteMaster.apply([stored(7, 8192, 64, seq: 4)], &l)
        XCTAssertEqual(l.index.keys.sorted(), [8192], "only what came after the gap is trusted")
        XCTAssertEqual(l.noticed, 4)
    }

    func testNoticesBuildTheIndexAndForgedOnesAreDropped() {
        var l = mounted()
        RemoteMaster.apply([stored(7, 0, 100, seq: 1), stored(7, 4096, 64, seq: 2)], &l)
        XCTAssertEqual(l.index.keys.sorted(), [0, 4096])
        // Forged: another segment, past the end, overrunning the end, unaligned, negative,
        // an object whose offset differs from the notice's, an empty object.
        RemoteMaster.apply(
            [
                stored(8, 8192, 64, seq: 3), stored(7, 1 << 20, 64, seq: 3), stored(7, (1 << 20) - 64, 128, seq: 3),
                stored(7, 100, 64, seq: 3), stored(7, -64, 64, seq: 3), stored(7, 0, 0, seq: 3),
                ObjectTable.SegmentNotice(
                    segment: 7, offset: 8192, seq: 3,
                    object: ObjectTable.Restored(key: "k", offset: 0, size: 64, seq: 3, options: .default, checksum: nil),
                    number: next())
            ],
            &l)
        XCTAssertEqual(l.index.keys.sorted(), [0, 4096], "nothing forged entered the index")
        XCTAssertEqual(l.index[0]?.size, 100)
        // A removal names the commit it removes: a stale one leaves a newer object alone.
        RemoteMaster.apply([gone(0, seq: 99)], &l)
        XCTAssertNotNil(l.index[0])
        RemoteMaster.apply([gone(0, seq: 1)], &l)
        XCTAssertNil(l.index[0])
        XCTAssertEqual(l.index.keys.sorted(), [4096], "forged notices still count in the numbering: no gap")
        var none = RemoteMaster.Link()
        RemoteMaster.apply([stored(0, 0, 64, seq: 1)], &none)
        XCTAssertTrue(none.index.isEmpty, "a client without a segment keeps no index")
    }
}
