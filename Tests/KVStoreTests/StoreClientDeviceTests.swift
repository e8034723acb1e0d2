import XCTest
import CKVAccelerator
import KVAccelerator
import KVTestSupport
#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVTransfer
@testable import KVStore

/// Transfers to and from device memory, using the fake accelerator of KVTestSupport (two
/// devices whose memory is a host arena each).
final class StoreClientDeviceTests: XCTestCase {
    override func setUp() { FakeAccelerator.setDevices(2) }
    override func tearDown() { FakeAccelerator.reset() }

    let fake0 = MemoryLocation(kind: FakeAccelerator.kind, index: 0)
    let fake1 = MemoryLocation(kind: FakeAccelerator.kind, index: 1)

    func stat(_ s: StoreClient, _ name: String) -> Int {
        s.statistics().first { $0.name.description == name }!.value
    }

    func region(_ device: Int, offset: Int, length: Int) -> MemoryRegion {
        MemoryRegion(FakeAccelerator.memory(device).baseAddress! + offset, length: length)
    }

    func fill(_ r: MemoryRegion, seed: UInt8) {
        let p = UnsafeMutableRawPointer(bitPattern: r.address)!
        for i in 0..<r.length { p.storeBytes(of: UInt8(truncatingIfNeeded: Int(seed) &* 13 &+ i), toByteOffset: i, as: UInt8.self) }
    }

    func bytes(_ r: MemoryRegion) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: r.address), count: r.length))
    }

    func testPutFromDeviceAndGetIntoDeviceUseTheDeviceWithExplicitDirections() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        defer { s.close() }
        let src = region(0, offset: 0, length: 10_000), dst = region(1, offset: 0, length: 10_000)
        fill(src, seed: 3)
        // A host header and a device body in one object (the tensor shape of a put).
        let header = [UInt8](repeating: 0xAB, count: 304)
        try header.withUnsafeBytes { h in
            let parts = [MemoryRegion(h.baseAddress!, length: 304), src]
            try parts.withUnsafeBufferPointer { try s.put(key: "t", parts: $0, mode: .put) }
        }
        XCTAssertTrue(FakeAccelerator.events.contains(.copy(.deviceToHost, device: 0, bytes: 10_000)))
        FakeAccelerator.clearEvents()
        let t = try s.beginRead(key: "t")
        let n = try [dst].withUnsafeBufferPointer { try s.copyOut(t, range: 304..<10_304, to: $0) }
        try s.endRead(t)
        XCTAssertEqual(n, 10_000)
        XCTAssertEqual(bytes(dst), bytes(src))
        XCTAssertEqual(FakeAccelerator.events, [.enter(1), .copy(.hostToDevice, device: 1, bytes: 10_000), .leave(1)])
        XCTAssertEqual(stat(s, "bytes_staged"), 0)
    }

    /// A store takes a hold on a device at its first copy with it (a CUDA device retains its
    /// context then), never on a device it does not use, and gives it back at close.
    func testAStoreHoldsOnlyTheDevicesItCopiedWithUntilClose() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        XCTAssertEqual([FakeAccelerator.holds(0), FakeAccelerator.holds(1)], [0, 0])
        let src = region(1, offset: 0, length: 4096)
        try [src].withUnsafeBufferPointer { try s.put(key: "a", parts: $0, mode: .put) }
        try [src].withUnsafeBufferPointer { try s.put(key: "b", parts: $0, mode: .put) }
        XCTAssertEqual([FakeAccelerator.holds(0), FakeAccelerator.holds(1)], [0, 1])
        s.close()
        XCTAssertEqual([FakeAccelerator.holds(0), FakeAccelerator.holds(1)], [0, 0])
    }

    /// Memory the caller declared (kv_call_devices) is copied on the declared stream, one
    /// ordered scope per stream; undeclared device memory on an unknown stream; a declared
    /// location is used as is, without asking the devices.
    func testDeclaredStreamsGroupTheCopiesAndDeclaredLocationsAreNotClassifiedAgain() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        defer { s.close() }
        let a = region(0, offset: 0, length: 4096), b = region(0, offset: 8192, length: 4096), c = region(0, offset: 16384, length: 4096)
        let d = region(1, offset: 0, length: 4096)
        for (i, r) in [a, b, c, d].enumerated() { fill(r, seed: UInt8(i + 1)) }
        for r in [a, b, c] { try s.registerBuffer(r, location: "fake:0") }
        var declared = [
            kv_device_part(
                address: UInt64(a.address), length: 4096, stream: 0x10, kind: Int32(KV_DEVICE_CUDA), device: 0,
                flags: UInt32(KV_DEVICE_STREAM_KNOWN), reserved: 0),
            kv_device_part(
                address: UInt64(b.address), length: 4096, stream: 0x20, kind: Int32(KV_DEVICE_CUDA), device: 0,
                flags: UInt32(KV_DEVICE_STREAM_KNOWN), reserved: 0),
            // fake:1 memory declared host: used as host memory, no device copy.
            kv_device_part(
                address: UInt64(d.address), length: 4096, stream: 0, kind: Int32(KV_DEVICE_HOST), device: 0,
                flags: 0, reserved: 0)
        ]
        FakeAccelerator.clearEvents()
        let regions = [a, b, c, d]
        let items = (0..<4).map { StoreClient.BatchItem(key: "k\($0)", regions: $0..<($0 + 1)) }
        let results: [KVError?] = try declared.withUnsafeMutableBufferPointer { p in
            kv_call_devices(p.baseAddress, p.count)
            defer { kv_call_devices(nil, 0) }
            return try regions.withUnsafeBufferPointer { try s.putBatch(items, parts: $0, mode: .put) }
        }
        XCTAssertEqual(results.map { $0 == nil }, [true, true, true, true])
        XCTAssertEqual(FakeAccelerator.copyScopes, [DeviceStream(handle: 0x10), DeviceStream(handle: 0x20), .unknown])
        XCTAssertEqual(FakeAccelerator.copyStreams, [DeviceStream(handle: 0x10), DeviceStream(handle: 0x20), .unknown])
        XCTAssertFalse(FakeAccelerator.events.contains { if case .copy(_, device: 1, _) = $0 { true } else { false } })
        for (i, r) in regions.enumerated() {
            let t = try s.beginRead(key: "k\(i)")
            defer { try? s.endRead(t) }
            var back = [UInt8](repeating: 0, count: 4096)
            _ = try back.withUnsafeMutableBytes { m in
                try [MemoryRegion(m.baseAddress!, length: 4096)].withUnsafeBufferPointer { try s.copyOut(t, range: 0..<4096, to: $0) }
            }
            XCTAssertEqual(back, bytes(r), "object \(i)")
        }
    }

    func testBatchMixingDevicesIsGroupedPerDevice() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        defer { s.close() }
        let host = UnsafeMutableRawPointer.allocate(byteCount: 4 * 4096, alignment: 64)
        defer { host.deallocate() }
        // Objects alternate fake:0, host, fake:1, fake:0, host, fake:1 …
        var parts: [MemoryRegion] = []
        for i in 0..<12 {
            let r: MemoryRegion =
                switch i % 3 {
                case 0: region(0, offset: i * 4096, length: 4096)
                case 1: MemoryRegion(host + (i / 3) * 4096, length: 4096)
                default: region(1, offset: i * 4096, length: 4096)
                }
            fill(r, seed: UInt8(i))
            parts.append(r)
        }
        let items = (0..<12).map { StoreClient.BatchItem(key: "k\($0)", regions: $0..<($0 + 1)) }
        FakeAccelerator.clearEvents()
        let results = try parts.withUnsafeBufferPointer { try s.putBatch(items, parts: $0, mode: .put) }
        XCTAssertTrue(results.allSatisfy { $0 == nil })
        let entered = FakeAccelerator.events.filter { if case .enter = $0 { true } else { false } }
        XCTAssertEqual(entered, [.enter(0), .enter(1)], "each device made current once for the whole batch")
        // Read everything back into the other device's memory, also as one grouped batch.
        var dsts: [MemoryRegion] = []
        for i in 0..<12 { dsts.append(region(i % 2 == 0 ? 1 : 0, offset: 512 * 1024 + i * 4096, length: 4096)) }
        FakeAccelerator.clearEvents()
        let reads = (0..<12).map { StoreClient.BatchItem(key: "k\($0)", regions: $0..<($0 + 1)) }
        let got = try dsts.withUnsafeBufferPointer { try s.getBatch(reads, destinations: $0) }
        XCTAssertTrue(got.allSatisfy { (try? $0.get()) == 4096 })
        XCTAssertEqual(FakeAccelerator.events.filter { if case .enter = $0 { true } else { false } }.count, 2)
        for i in 0..<12 { XCTAssertEqual(bytes(dsts[i]), bytes(parts[i]), "object \(i)") }
    }

    func testFailedDeviceCopyRevokesOnlyThatObject() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        defer { s.close() }
        let parts = [region(0, offset: 0, length: 1000), region(0, offset: 4096, length: 1000)]
        // Device→host copies land in the segment; fail the first object's by its destination.
        let segBase = s.segment!.region(offset: 0, length: 1).address
        FakeAccelerator.failCopies(to: segBase)
        let items = [StoreClient.BatchItem(key: "a", regions: 0..<1), StoreClient.BatchItem(key: "b", regions: 1..<2)]
        let r = try parts.withUnsafeBufferPointer { try s.putBatch(items, parts: $0, mode: .put) }
        FakeAccelerator.failCopies(to: nil)
        XCTAssertEqual(r[0]?.code, .transfer)
        XCTAssertNil(r[1])
        XCTAssertFalse(try s.exists(key: "a"), "a failed write is never visible")
        XCTAssertTrue(try s.exists(key: "b"))
        XCTAssertEqual(stat(s, "objects"), 1)
        XCTAssertEqual(stat(s, "bytes_used"), 1024)
    }

    func testRegisteredBufferKeepsItsDeviceAndBadLocationsAreRefused() throws {
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: false))
        defer { s.close() }
        let r = region(1, offset: 0, length: 8192)
        try s.registerBuffer(r, location: "fake:1")
        XCTAssertEqual(try s.location(of: region(1, offset: 100, length: 10)), fake1)
        XCTAssertThrowsError(try s.registerBuffer(region(0, offset: 0, length: 10), location: "fake:1")) { e in
            XCTAssertEqual((e as! KVError).code, .invalidArgument, "fake:0 memory claimed as fake:1")
        }
        XCTAssertThrowsError(try s.registerBuffer(region(0, offset: 0, length: 10), location: "fake:7"))
        XCTAssertThrowsError(try s.registerBuffer(region(0, offset: 0, length: 10), location: "cuda:0"))
        XCTAssertEqual(stat(s, "registered_buffers"), 1)
    }

    /// A segment is pinned chunk by chunk as device copies first touch it (never at creation,
    /// never for host copies), within the budget, and only what was pinned is unpinned.
    func testSegmentIsPinnedOnFirstDeviceCopyWithinTheBudgetAndUnpinnedOnClose() throws {
        let before = PinnedMemory.shared.pinnedBytes.load(ordering: .relaxed)
        let s = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: true, maxBytes: 0))
        XCTAssertEqual(stat(s, "page_locked_bytes"), 0, "nothing pinned at creation")
        try [UInt8](repeating: 1, count: 100).withUnsafeBytes { b in
            try [MemoryRegion(b.baseAddress!, length: 100)].withUnsafeBufferPointer { try s.put(key: "h", parts: $0, mode: .put) }
        }
        XCTAssertEqual(stat(s, "page_locked_bytes"), 0, "host copies pin nothing")
        let src = region(0, offset: 0, length: 4096)
        fill(src, seed: 9)
        try [src].withUnsafeBufferPointer { try s.put(key: "d", parts: $0, mode: .put) }
        XCTAssertEqual(stat(s, "page_locked_bytes"), 1 << 20)
        XCTAssertEqual(stat(s, "page_lock_fallbacks"), 0)
        XCTAssertEqual(FakeAccelerator.pinnedRanges.count, 1)
        // A second store does not fit a 1.5 MiB budget: its chunk stays pageable and says so,
        // and the copy still runs.
        let t = try StoreClient(segmentSize: 1 << 20, pinning: PinningPolicy(enabled: true, maxBytes: before + 3 << 19))
        try [src].withUnsafeBufferPointer { try t.put(key: "d", parts: $0, mode: .put) }
        try [src].withUnsafeBufferPointer { try t.put(key: "e", parts: $0, mode: .put) }
        XCTAssertEqual(stat(t, "page_locked_bytes"), 0)
        XCTAssertEqual(stat(t, "page_lock_fallbacks"), 1, "a refused chunk is not asked again")
        var back = [UInt8](repeating: 0, count: 4096)
        _ = try back.withUnsafeMutableBytes { m in
            try [MemoryRegion(m.baseAddress!, length: 4096)].withUnsafeBufferPointer { try t.get(key: "e", into: $0) }
        }
        XCTAssertEqual(back, bytes(src))
        s.close()
        t.close()
        XCTAssertTrue(FakeAccelerator.pinnedRanges.isEmpty, "the pinned chunk was unpinned on close")
        XCTAssertEqual(
            FakeAccelerator.events.filter { if case .unpin = $0 { true } else { false } }.count, 1,
            "only the range that was pinned is unpinned")
        XCTAssertEqual(PinnedMemory.shared.pinnedBytes.load(ordering: .relaxed), before)
    }

    /// Chunks of a larger segment: each pinned once, the last one short.
    func testSegmentChunksArePinnedOnceEach() throws {
        let chunk = HostSegment.pinChunk
        let seg = try HostSegment(size: 3 * chunk + 100, pinning: PinningPolicy(enabled: true))
        seg.pinForDeviceCopy(seg.region(offset: chunk + 10, length: chunk)) // chunks 1 and 2
        XCTAssertEqual(seg.pinnedBytes, 2 * chunk)
        seg.pinForDeviceCopy(seg.region(offset: chunk, length: 2 * chunk)) // nothing new
        XCTAssertEqual(FakeAccelerator.pinnedRanges.count, 2)
        seg.pinForDeviceCopy(seg.region(offset: 3 * chunk + 50, length: 50)) // the short last chunk
        XCTAssertEqual(seg.pinnedBytes, 2 * chunk + 100)
        XCTAssertFalse(seg.contains(UInt(bitPattern: FakeAccelerator.memory(0).baseAddress!)))
        seg.unmap()
        XCTAssertTrue(FakeAccelerator.pinnedRanges.isEmpty)
        XCTAssertEqual(seg.pinnedBytes, 0)
    }
}
