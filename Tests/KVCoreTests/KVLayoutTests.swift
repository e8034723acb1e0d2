import XCTest
@testable import KVCore

/// KV layouts: every validation rule names the bad descriptor; the block plan checks both
/// layouts and the lists before producing copies, and coalesces runs.
final class KVLayoutTests: XCTestCase {
    /// `layers` x kinds buffers of `blocks` x `bpb` bytes at made-up, disjoint addresses.
    func layout(
        layers: Int = 2, kinds: [KVBufferKind] = [.key, .value], blocks: Int = 8, bpb: Int = 64,
        base: UInt = 1 << 20
    ) -> [KVBufferDescriptor] {
        var out: [KVBufferDescriptor] = []
        for l in 0..<layers {
            for (k, kind) in kinds.enumerated() {
                out.append(
                    KVBufferDescriptor(
                        layer: l, kind: kind, address: base + UInt((l * kinds.count + k) * blocks * bpb),
                        length: blocks * bpb, bytesPerBlock: bpb))
            }
        }
        return out
    }

    func refused(_ ds: [KVBufferDescriptor], _ text: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try KVLayout(ds), file: file, line: line) {
            XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument, file: file, line: line)
            XCTAssertTrue(($0 as? KVError)?.message.contains(text) ?? false, "\($0)", file: file, line: line)
        }
    }

    func testValidLayoutIsSortedByLayerThenKind() throws {
        let ds = layout(layers: 3, kinds: [.key, .value, .index])
        let l = try KVLayout(ds.reversed())
        XCTAssertEqual(l.descriptors, ds)
        XCTAssertEqual(l.layers, 3)
        XCTAssertEqual(l.kinds, [.key, .value, .index])
        XCTAssertEqual(l.descriptor(layer: 2, kind: .value), ds[7])
    }

    func testEveryRuleNamesTheBadDescriptor() {
        let ds = layout()
        var d = ds
        d[3].address = d[2].address + 8 // inside descriptor 2
        refused(d, "descriptor 3 (layer 1, VALUE) overlaps descriptor 2 (layer 1, KEY)")
        d = ds; d[1].length -= 1
        refused(d, "descriptor 1 (layer 0, VALUE): length 511 is not a multiple of bytes per block 64")
        d = ds; d[2].layer = 0; d[2].kind = .key
        refused(d, "both (layer 0, KEY)")
        refused(
            ds
                + layout(layers: 1, base: 1 << 30).map {
                    var x = $0; x.layer = 3; return x
                }, "layer 2 has no buffer")
        refused(Array(ds.dropLast()), "layer 1 has no VALUE buffer")
        d = ds; d[0].bytesPerBlock = 0
        refused(d, "descriptor 0 (layer 0, KEY): bytes per block")
        d = ds; d[0].length = 0
        refused(d, "descriptor 0 (layer 0, KEY): length must be greater than 0")
        d = ds; d[0].address = 0
        refused(d, "not a valid range")
        d = ds; d[0].address = UInt.max - 10
        refused(d, "not a valid range")
        d = ds; d[0].layer = -1
        refused(d, "layer must be")
        refused([], "at least one")
        // The same addresses on two devices do not overlap.
        d = ds; d[3].address = d[2].address; d[3].location = MemoryLocation(kind: .cuda, index: 0)
        XCTAssertNoThrow(try KVLayout(d))
    }

    func testRunsCoalesceOnlyWhenBothSidesAreConsecutive() {
        XCTAssertEqual(
            KVBlockPlan.runs([1, 2, 3, 7, 8, 5], [4, 5, 6, 9, 11, 0]).map { [$0.source, $0.destination, $0.count] },
            [[1, 4, 3], [7, 9, 1], [8, 11, 1], [5, 0, 1]])
        XCTAssertEqual(KVBlockPlan.runs([3, 2, 1], [3, 2, 1]).count, 3)
        XCTAssertTrue(KVBlockPlan.runs([], []).isEmpty)
    }

    func testPlanMakesOneCopyPerRunAndBuffer() throws {
        let src = try KVLayout(layout(layers: 3)), dst = try KVLayout(layout(layers: 3, base: 1 << 30))
        let copies = try KVBlockPlan.copies(from: src, to: dst, sourceBlocks: [0, 1, 2, 6], destinationBlocks: [4, 5, 6, 0], layers: [2, 0])
        XCTAssertEqual(copies.count, 2 * 2 * 2) // 2 runs x 2 layers x 2 kinds
        let first = copies[0]
        XCTAssertEqual(first.source, src.descriptor(layer: 2, kind: .key).address)
        XCTAssertEqual(first.destination, dst.descriptor(layer: 2, kind: .key).address + 4 * 64)
        XCTAssertEqual(first.length, 3 * 64)
        XCTAssertEqual(copies[1].length, 64)
        XCTAssertEqual(try KVBlockPlan.copies(from: src, to: dst, sourceBlocks: [], destinationBlocks: []).count, 0)
    }

    func testPlanChecksEverythingFirst() throws {
        let src = try KVLayout(layout()), dst = try KVLayout(layout(base: 1 << 30))
        func bad(_ s: KVLayout, _ d: KVLayout, _ a: [Int], _ b: [Int], layers: [Int]? = nil, _ text: String, line: UInt = #line) {
            XCTAssertThrowsError(try KVBlockPlan.copies(from: s, to: d, sourceBlocks: a, destinationBlocks: b, layers: layers), line: line) {
                XCTAssertTrue(($0 as? KVError)?.message.contains(text) ?? false, "\($0)", line: line)
            }
        }
        bad(src, try KVLayout(layout(layers: 3, base: 1 << 30)), [0], [0], "same number")
        bad(src, try KVLayout(layout(kinds: [.key, .index], base: 1 << 30)), [0], [0], "same")
        bad(src, try KVLayout(layout(bpb: 128, base: 1 << 30)), [0], [0], "bytes per block")
        bad(src, dst, [0, 1], [0], "equally long")
        bad(src, dst, [0, 1], [3, 3], "destination block 3 is listed twice")
        bad(src, dst, [8], [0], "source block 8 is out of range")
        bad(src, dst, [0], [-1], "destination block -1 is out of range")
        bad(src, dst, [0], [0], layers: [2], "layer 2 is out of range")
        bad(src, dst, [0], [0], layers: [1, 1], "layer 1 is listed twice")
        bad(src, dst, [0], [0], layers: [], "at least one layer")
        // Fewer blocks in one buffer: ids are checked against each chosen buffer.
        var short = layout(base: 1 << 30)
        short[3].length = 4 * 64
        bad(src, try KVLayout(short), [0], [5], "destination block 5 is out of range")
        XCTAssertNoThrow(try KVBlockPlan.copies(from: src, to: try KVLayout(short), sourceBlocks: [0], destinationBlocks: [5], layers: [0]))
    }

    func testCodecRoundTripsAndValidates() throws {
        let p = PublishedLayout(node: "prefill-0", layout: try KVLayout(layout()), host: "h", pid: 42, endpoint: "1.2.3.4:5")
        var w = WireWriter()
        p.encode(into: &w)
        XCTAssertEqual(try WireReader.parse(w.bytes, "layout") { (r) throws(KVError) in try PublishedLayout.decode(&r) }, p)
        // A layout that breaks a rule does not decode (the master never stores one).
        var d = layout()
        d[1].length -= 1
        var bad = WireWriter()
        bad.string("n"); bad.count(d.count)
        for x in d {
            bad.u32(UInt32(x.layer)); bad.u8(x.kind.rawValue); bad.u64(UInt64(x.address)); bad.u64(UInt64(x.length)); bad.u64(UInt64(x.bytesPerBlock));
            bad.string(x.location.name)
        }
        bad.string("h"); bad.u64(1); bad.string("")
        XCTAssertThrowsError(try WireReader.parse(bad.bytes, "layout") { (r) throws(KVError) in try PublishedLayout.decode(&r) })
        // Locations are parsed when decoded: an empty, malformed or too long one is refused.
        for location in ["", "cuda:x", "CPU", String(repeating: "a", count: MemoryLocation.maxTextBytes + 1)] {
            var w = WireWriter()
            w.string("n"); w.count(1)
            w.u32(0); w.u8(KVBufferKind.key.rawValue); w.u64(4096); w.u64(4096); w.u64(4096); w.string(location)
            w.string("h"); w.u64(1); w.string("")
            XCTAssertThrowsError(try WireReader.parse(w.bytes, "layout") { (r) throws(KVError) in try PublishedLayout.decode(&r) }, location)
        }
        XCTAssertEqual(MemoryLocation.host.name, "cpu")
        XCTAssertEqual(MemoryLocation(kind: .cuda, index: 2).name, "cuda:2")
    }

    func testDirectoryOwnership() throws {
        var dir = LayoutDirectory()
        let p = PublishedLayout(node: "n", layout: try KVLayout(layout()), host: "h", pid: 1, endpoint: "")
        try dir.publish(p, owner: 1)
        try dir.publish(p, owner: 1) // replacing one's own
        XCTAssertThrowsError(try dir.publish(p, owner: 2)) { XCTAssertEqual(($0 as? KVError)?.code, .objectExists) }
        XCTAssertThrowsError(try dir.unpublish("n", owner: 2)) { XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound) }
        XCTAssertEqual(try dir.fetch("n"), p)
        dir.depart(1)
        XCTAssertThrowsError(try dir.fetch("n")) { XCTAssertEqual(($0 as? KVError)?.code, .objectNotFound) }
        var empty = p
        empty.node = ""
        XCTAssertThrowsError(try dir.publish(empty, owner: 1))
    }
}
