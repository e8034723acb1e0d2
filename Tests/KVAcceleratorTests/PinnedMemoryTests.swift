#if canImport(Glibc)
import Glibc
#endif
import XCTest
import KVAccelerator
import KVCore
import KVTestSupport

final class PinnedMemoryTests: XCTestCase {
    override func tearDown() { FakeAccelerator.reset() }

    private let a = MemoryRegion(address: 0x10000, length: 512 * 1024)
    private let b = MemoryRegion(address: 0x100000, length: 768 * 1024)

    func testNothingToDoWithoutAnAcceleratorOrWhenOff() {
        let pm = PinnedMemory()
        guard case .notNeeded = pm.pin(a, policy: PinningPolicy()) else { return XCTFail() }
        FakeAccelerator.setDevices(1)
        guard case .notNeeded = pm.pin(a, policy: PinningPolicy(enabled: false)) else { return XCTFail() }
        XCTAssertTrue(FakeAccelerator.pinnedRanges.isEmpty)
        XCTAssertEqual(pm.fallbacks.load(ordering: .relaxed), 0)
    }

    func testBudgetCapsPinnedBytesAndFallsBack() {
        FakeAccelerator.setDevices(1)
        let pm = PinnedMemory()
        let policy = PinningPolicy(enabled: true, maxBytes: 1024 * 1024)
        guard case .pinned(let ra) = pm.pin(a, policy: policy) else { return XCTFail("first pin fits") }
        guard case .fellBack(let why) = pm.pin(b, policy: policy) else { return XCTFail("second exceeds") }
        XCTAssertTrue(why.contains("budget"), why)
        XCTAssertEqual(pm.pinnedBytes.load(ordering: .relaxed), a.length)
        XCTAssertEqual(pm.fallbacks.load(ordering: .relaxed), 1)
        XCTAssertEqual(FakeAccelerator.pinnedRanges, [a], "only the range that fit was pinned")
        pm.unpin(ra)
        XCTAssertEqual(pm.pinnedBytes.load(ordering: .relaxed), 0)
        XCTAssertTrue(FakeAccelerator.pinnedRanges.isEmpty)
        guard case .pinned(let rb) = pm.pin(b, policy: policy) else { return XCTFail("fits after the unpin") }
        pm.unpin(rb)
    }

    func testDriverRefusalFallsBackAndReleasesTheReservation() {
        FakeAccelerator.setDevices(1)
        FakeAccelerator.failPins(true)
        let pm = PinnedMemory()
        guard case .fellBack = pm.pin(a, policy: PinningPolicy()) else { return XCTFail() }
        XCTAssertEqual(pm.pinnedBytes.load(ordering: .relaxed), 0)
        XCTAssertEqual(pm.fallbacks.load(ordering: .relaxed), 1)
        XCTAssertFalse(FakeAccelerator.events.contains(.unpin(a.length)), "a refused pin is never unpinned")
    }

    func testConcurrentPinsNeverExceedTheBudget() {
        FakeAccelerator.setDevices(1)
        let pm = PinnedMemory()
        let cap = 10 * 4096
        let policy = PinningPolicy(enabled: true, maxBytes: cap)
        let pinned = Locked<[PinnedRange]>([])
        DispatchQueue.concurrentPerform(iterations: 40) { i in
            if case .pinned(let r) = pm.pin(MemoryRegion(address: UInt(0x1000_0000 + i * 4096), length: 4096), policy: policy) {
                pinned.withLock { $0.append(r) }
            }
        }
        XCTAssertEqual(pinned.withLock { $0.count }, 10)
        XCTAssertEqual(pm.fallbacks.load(ordering: .relaxed), 30)
        for r in pinned.withLock({ $0 }) { pm.unpin(r) }
        XCTAssertEqual(pm.pinnedBytes.load(ordering: .relaxed), 0)
    }

    func testPolicyFromEnvironment() throws {
        let names = ["KVSTORE_PIN_MEMORY", "MC_STORE_PIN_MEMORY", "KVSTORE_PIN_MEMORY_MAX_BYTES", "MC_STORE_PIN_MEMORY_MAX_BYTES"]
        let saved = names.map { n in getenv(n).map { String(cString: $0) } }
        defer { for (n, v) in zip(names, saved) { if let v { setenv(n, v, 1) } else { unsetenv(n) } } }
        for n in names { unsetenv(n) }
        XCTAssertEqual(try PinningPolicy.fromEnvironment(), PinningPolicy(enabled: true, maxBytes: 0))
        setenv("MC_STORE_PIN_MEMORY", "0", 1)
        setenv("MC_STORE_PIN_MEMORY_MAX_BYTES", "4096", 1)
        XCTAssertEqual(try PinningPolicy.fromEnvironment(), PinningPolicy(enabled: false, maxBytes: 4096))
        setenv("KVSTORE_PIN_MEMORY", "1", 1) // the KVSTORE_ name wins over the alias
        setenv("KVSTORE_PIN_MEMORY_MAX_BYTES", "0", 1)
        XCTAssertEqual(try PinningPolicy.fromEnvironment(), PinningPolicy(enabled: true, maxBytes: 0))
        setenv("KVSTORE_PIN_MEMORY_MAX_BYTES", "-5", 1)
        XCTAssertThrowsError(try PinningPolicy.fromEnvironment()) { e in
            XCTAssertTrue((e as! KVError).message.contains("KVSTORE_PIN_MEMORY_MAX_BYTES"))
        }
        setenv("KVSTORE_PIN_MEMORY_MAX_BYTES", "1", 1)
        setenv("KVSTORE_PIN_MEMORY", "maybe", 1)
        XCTAssertThrowsError(try PinningPolicy.fromEnvironment())
    }
}
