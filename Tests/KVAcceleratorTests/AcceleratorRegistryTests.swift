import XCTest
import KVAccelerator
import KVCore
import KVTestSupport

final class AcceleratorRegistryTests: XCTestCase {
    override func tearDown() { FakeAccelerator.reset() }

    func testDeviceKindsRegisterThemselvesStatically() {
        // No call registered anything: the records are in the linker section.
        let kinds = AcceleratorRegistry.registeredTypes.map { $0.kind }
        XCTAssertEqual(kinds.first, .cpu)
        XCTAssertTrue(kinds.contains(.cuda))
        XCTAssertTrue(kinds.contains(FakeAccelerator.kind))
        XCTAssertEqual(Set(kinds).count, kinds.count)
    }

    func testHostIsAlwaysFirstAndAvailable() {
        let s = AcceleratorRegistry.snapshot
        XCTAssertEqual(s.devices.first?.location, .host)
        XCTAssertNotNil(s.device(at: .host))
        XCTAssertTrue(s.kinds.contains(.cpu))
    }

    func testSnapshotIsImmutableAndRefreshPublishesANewOne() {
        let before = AcceleratorRegistry.snapshot
        XCTAssertFalse(before.devices.contains { $0.kind == FakeAccelerator.kind })
        FakeAccelerator.setDevices(2) // probes again
        let after = AcceleratorRegistry.snapshot
        XCTAssertGreaterThan(after.generation, before.generation)
        XCTAssertFalse(before.devices.contains { $0.kind == FakeAccelerator.kind }, "an old snapshot never changes")
        XCTAssertEqual(after.devices.filter { $0.kind == FakeAccelerator.kind }.map(\.location.index), [0, 1])
        XCTAssertTrue(after.hasAccelerator)
        XCTAssertTrue(AcceleratorRegistry.snapshot === after, "readers see the published snapshot")
    }

    func testConcurrentReadersDuringRefresh() {
        FakeAccelerator.setDevices(1)
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            for _ in 0..<200 {
                if i == 0 {
                    AcceleratorRegistry.refresh()
                } else {
                    let s = AcceleratorRegistry.snapshot
                    XCTAssertEqual(s.devices.first?.location, .host)
                    XCTAssertNotNil(s.device(at: MemoryLocation(kind: FakeAccelerator.kind, index: 0)))
                }
            }
        }
    }

    func testPointerLookup() throws {
        FakeAccelerator.setDevices(2)
        let s = AcceleratorRegistry.snapshot
        XCTAssertNil(try s.classify(0), "null pointers are skipped")
        var local = 0
        try withUnsafePointer(to: &local) { p in
            XCTAssertEqual(try s.classify(UInt(bitPattern: p)), .host)
        }
        let dev1 = UInt(bitPattern: FakeAccelerator.memory(1).baseAddress!) + 100
        XCTAssertEqual(try s.classify(dev1), MemoryLocation(kind: FakeAccelerator.kind, index: 1))
        // Memory of a device that is not present now is host memory as far as anyone knows.
        let dev3 = UInt(bitPattern: FakeAccelerator.memory(3).baseAddress!)
        XCTAssertEqual(try s.classify(dev3), .host)
    }

    func testRequireDeviceNamesWhatExists() {
        let s = AcceleratorRegistry.snapshot
        XCTAssertThrowsError(try s.requireDevice(at: MemoryLocation(kind: .cuda, index: 7))) { e in
            let k = e as! KVError
            XCTAssertEqual(k.code, .invalidArgument)
            XCTAssertTrue(k.message.contains("cuda:7") && k.message.contains("cpu:0"), k.message)
        }
        XCTAssertThrowsError(try s.requireDevice(at: MemoryLocation(kind: .cpu, index: 1)))
    }

    func testWithCurrentRestoresThePreviousDevice() throws {
        FakeAccelerator.setDevices(2)
        let s = AcceleratorRegistry.snapshot
        let d0 = try s.requireDevice(at: MemoryLocation(kind: FakeAccelerator.kind, index: 0))
        let d1 = try s.requireDevice(at: MemoryLocation(kind: FakeAccelerator.kind, index: 1))
        let holds = DeviceHolds()
        defer { holds.releaseAll() }
        try holds.hold(d0)
        try holds.hold(d1)
        try d1.withCurrent { () throws(KVError) in
            XCTAssertEqual(FakeAccelerator.currentDevice, 1)
            try d0.withCurrent { () throws(KVError) in XCTAssertEqual(FakeAccelerator.currentDevice, 0) }
            XCTAssertEqual(FakeAccelerator.currentDevice, 1)
            XCTAssertThrowsError(try d0.withCurrent { () throws(KVError) in throw KVError(.transfer, "boom") })
            XCTAssertEqual(FakeAccelerator.currentDevice, 1, "restored after a throw too")
        }
        XCTAssertNil(FakeAccelerator.currentDevice)
    }

    /// A device is used only under a hold; a store's holds take one per device whatever how
    /// often it is asked, and give all back at once.
    func testDeviceHoldsAcquireOncePerDeviceAndReleaseAll() throws {
        FakeAccelerator.setDevices(2)
        let s = AcceleratorRegistry.snapshot
        let d0 = try s.requireDevice(at: MemoryLocation(kind: FakeAccelerator.kind, index: 0))
        let d1 = try s.requireDevice(at: MemoryLocation(kind: FakeAccelerator.kind, index: 1))
        XCTAssertThrowsError(try d0.withCurrent { () throws(KVError) in }) { e in
            XCTAssertEqual((e as! KVError).code, .internal)
        }
        let a = DeviceHolds(), b = DeviceHolds()
        for _ in 0..<3 { try a.hold(d0) }
        try b.hold(d0)
        try b.hold(d1)
        XCTAssertEqual([FakeAccelerator.holds(0), FakeAccelerator.holds(1)], [2, 1])
        XCTAssertEqual(b.locations, [d0.location, d1.location])
        a.releaseAll()
        XCTAssertEqual([FakeAccelerator.holds(0), FakeAccelerator.holds(1)], [1, 1])
        b.releaseAll()
        b.releaseAll() // idempotent
        XCTAssertEqual([FakeAccelerator.holds(0), FakeAccelerator.holds(1)], [0, 0])
    }

    func testCopyDispatchByDirection() throws {
        FakeAccelerator.setDevices(2)
        let s = AcceleratorRegistry.snapshot
        let d0 = try s.requireDevice(at: MemoryLocation(kind: FakeAccelerator.kind, index: 0))
        let holds = DeviceHolds()
        defer { holds.releaseAll() }
        try holds.hold(d0)
        try holds.hold(try s.requireDevice(at: MemoryLocation(kind: FakeAccelerator.kind, index: 1)))
        let m0 = FakeAccelerator.memory(0), m1 = FakeAccelerator.memory(1)
        let a0 = UInt(bitPattern: m0.baseAddress!), a1 = UInt(bitPattern: m1.baseAddress!)
        var host = [UInt8](repeating: 0, count: 64)
        let source = (0..<64).map { UInt8($0) }
        try source.withUnsafeBytes { src in
            let hs = UInt(bitPattern: src.baseAddress!)
            try d0.withCurrent { () throws(KVError) in
                try d0.copy(.hostToDevice, from: hs, to: a0, count: 64, stream: .unknown)
                try d0.copy(.deviceToDevice, from: a0, to: a1, count: 64, stream: .unknown)
            }
        }
        try host.withUnsafeMutableBytes { h in
            let hd = UInt(bitPattern: h.baseAddress!)
            try d0.withCurrent { () throws(KVError) in
                // Wrong direction for the pointers: refused, nothing copied.
                XCTAssertThrowsError(try d0.copy(.hostToDevice, from: a1, to: hd, count: 64, stream: .unknown))
            }
            XCTAssertEqual(Array(h), [UInt8](repeating: 0, count: 64))
            let d1 = try s.requireDevice(at: MemoryLocation(kind: FakeAccelerator.kind, index: 1))
            try d1.withCurrent { () throws(KVError) in try d1.copy(.deviceToHost, from: a1, to: hd, count: 64, stream: .unknown) }
        }
        XCTAssertEqual(host, source)
        // The host device copies host→host only.
        XCTAssertThrowsError(try s.host.copy(.hostToDevice, from: 1, to: a0, count: 1, stream: .unknown)) { e in
            XCTAssertEqual((e as! KVError).code, .unsupported)
        }
    }

    func testCUDAReportsUnavailableWithoutADriverOrGPU() throws {
        let devices = CUDADevice.probe()
        if devices.isEmpty {
            XCTAssertFalse(CUDADevice.unavailableReason.isEmpty)
            XCTAssertFalse(AcceleratorRegistry.snapshot.devices.contains { $0.kind == .cuda })
        } else {
            XCTAssertTrue(devices.allSatisfy { $0.kind == .cuda })
        }
    }

    func testLocationParsingAcceptsAnyKindName() throws {
        XCTAssertEqual(try MemoryLocation(parsing: "fake:2"), MemoryLocation(kind: FakeAccelerator.kind, index: 2))
        XCTAssertEqual(try MemoryLocation(parsing: "cuda"), MemoryLocation(kind: .cuda, index: 0))
        XCTAssertEqual(CopyDirection(from: .host, to: MemoryLocation(kind: .cuda, index: 0)), .hostToDevice)
        XCTAssertEqual(CopyDirection(from: MemoryLocation(kind: .cuda, index: 1), to: .host), .deviceToHost)
    }
}
