import XCTest
import KVAccelerator
import KVTestSupport
import KVCore
import KVTransfer
@testable import KVStore
#if canImport(Glibc)
import Glibc
#endif

/// KV layouts on an embedded store, with device memory from the fake accelerator: locations
/// are checked against the devices present, device blocks move by per-block device copies
/// with explicit directions, and the aggregated executor has no device path.
final class StoreClientKVTests: XCTestCase {
    override func setUp() { FakeAccelerator.setDevices(2) }
    override func tearDown() { FakeAccelerator.reset() }

    static let bpb = 128, blocks = 16

    func descriptor(_ layer: Int, _ kind: KVBufferKind, device: Int, offset: Int) -> KVBufferDescriptor {
        KVBufferDescriptor(
            layer: layer, kind: kind, address: UInt(bitPattern: FakeAccelerator.memory(device).baseAddress!) + UInt(offset),
            length: Self.blocks * Self.bpb, bytesPerBlock: Self.bpb, location: MemoryLocation(kind: FakeAccelerator.kind, index: device))
    }

    func testDeviceLayoutsMoveBlocksPerBlockWithDeviceCopies() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        defer { s.close() }
        let layer0 = [descriptor(0, .key, device: 0, offset: 0), descriptor(0, .value, device: 1, offset: 0)]
        var bad = layer0
        bad[1].location = MemoryLocation(kind: FakeAccelerator.kind, index: 3)
        XCTAssertThrowsError(try s.registerKVLayout(node: "n", descriptors: bad)) {
            XCTAssertTrue(($0 as? KVError)?.message.contains("descriptor 1 (layer 0, VALUE): no device 'fake:3'") ?? false, "\($0)")
        }
        XCTAssertNil(s.ownKVLayout)
        try s.registerKVLayout(node: "n", descriptors: layer0)
        let key = FakeAccelerator.memory(0), value = FakeAccelerator.memory(1)
        for b in 0..<Self.blocks {
            for i in 0..<Self.bpb { key[b * Self.bpb + i] = UInt8(b); value[b * Self.bpb + i] = UInt8(100 + b) }
        }
        FakeAccelerator.clearEvents()
        XCTAssertEqual(try s.moveKVBlocks(peer: "n", pull: true, sourceBlocks: [0, 1, 5], destinationBlocks: [8, 9, 12]), 4)
        XCTAssertEqual(key[8 * Self.bpb], 0); XCTAssertEqual(key[9 * Self.bpb + 5], 1); XCTAssertEqual(key[12 * Self.bpb], 5)
        XCTAssertEqual(value[12 * Self.bpb + Self.bpb - 1], 105)
        let copies = FakeAccelerator.events.compactMap { e -> CopyDirection? in if case let .copy(d, _, _) = e { d } else { nil } }
        XCTAssertEqual(copies, [.deviceToDevice, .deviceToDevice, .deviceToDevice, .deviceToDevice])
        // Aggregated: one batched call per device and direction (fake:0's KEY and fake:1's VALUE).
        FakeAccelerator.clearEvents()
        XCTAssertEqual(try s.moveKVBlocks(peer: "n", pull: true, sourceBlocks: [2, 4, 6], destinationBlocks: [13, 14, 15], executor: .aggregated), 2)
        XCTAssertEqual(key[13 * Self.bpb], 2); XCTAssertEqual(key[15 * Self.bpb], 6); XCTAssertEqual(value[14 * Self.bpb + 3], 104)
        let batches = FakeAccelerator.events.compactMap { e -> Int? in if case let .copyBatch(.deviceToDevice, _, n) = e { n } else { nil } }
        XCTAssertEqual(batches, [3, 3])
    }

    /// A device without a batched call: the aggregated executor refuses before moving anything.
    func testAggregatedExecutorNeedsABatchedDeviceCall() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        defer { s.close() }
        let host = UnsafeMutableRawPointer.allocate(byteCount: Self.blocks * Self.bpb, alignment: 64)
        defer { host.deallocate() }
        memset(host, 7, Self.blocks * Self.bpb)
        try s.registerKVLayout(
            node: "n",
            descriptors: [
                KVBufferDescriptor(layer: 0, kind: .key, address: UInt(bitPattern: host), length: Self.blocks * Self.bpb, bytesPerBlock: Self.bpb)
            ])
        // Host-only layouts never reach a device: the aggregated executor is the host path.
        XCTAssertEqual(try s.moveKVBlocks(peer: "n", pull: true, sourceBlocks: [0], destinationBlocks: [1], executor: .aggregated), 1)
        FakeAccelerator.failBatches(true)
        defer { FakeAccelerator.failBatches(false) }
        try s.registerKVLayout(node: "n", descriptors: [descriptor(0, .key, device: 0, offset: 0)])
        let key = FakeAccelerator.memory(0)
        memset(key.baseAddress!, 9, Self.blocks * Self.bpb)
        key[5 * Self.bpb] = 1
        XCTAssertThrowsError(try s.moveKVBlocks(peer: "n", pull: true, sourceBlocks: [5], destinationBlocks: [6], executor: .aggregated)) {
            XCTAssertEqual(($0 as? KVError)?.code, .unsupported)
        }
        XCTAssertEqual(key[6 * Self.bpb], 9, "the refused move changed nothing")
    }
}
