import XCTest
import KVAccelerator
import KVCore
@testable import KVTransfer

final class MemoryRegistryTests: XCTestCase {
    func testRegisterLookupUnregister() throws {
        let reg = MemoryRegistry()
        try reg.register(MemoryRegion(address: 1000, length: 100), location: .host)
        try reg.register(MemoryRegion(address: 2000, length: 100), location: MemoryLocation(kind: .cuda, index: 1))
        XCTAssertEqual(reg.lookup(MemoryRegion(address: 1050, length: 50))?.location, .host)
        XCTAssertEqual(reg.lookup(MemoryRegion(address: 2000, length: 1))?.location.description, "cuda:1")
        XCTAssertNil(reg.lookup(MemoryRegion(address: 1050, length: 51)), "a range running past the end is not registered")
        XCTAssertNil(reg.lookup(MemoryRegion(address: 1500, length: 1)))
        XCTAssertEqual(reg.count, 2)
        XCTAssertEqual(reg.registeredBytes, 200)
        try reg.unregister(address: 1000)
        XCTAssertNil(reg.lookup(MemoryRegion(address: 1000, length: 1)))
        XCTAssertThrowsError(try reg.unregister(address: 1000))
        XCTAssertThrowsError(try reg.unregister(address: 2001), "only the start address unregisters")
    }

    func testOverlapsAndEmptyRangesAreRefused() throws {
        let reg = MemoryRegistry()
        try reg.register(MemoryRegion(address: 1000, length: 100), location: .host)
        for (a, n) in [(950, 51), (1099, 10), (1000, 100), (900, 300), (1010, 5)] {
            XCTAssertThrowsError(try reg.register(MemoryRegion(address: UInt(a), length: n), location: .host)) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
            }
        }
        XCTAssertNoThrow(try reg.register(MemoryRegion(address: 1100, length: 10), location: .host))
        XCTAssertNoThrow(try reg.register(MemoryRegion(address: 990, length: 10), location: .host))
        XCTAssertThrowsError(try reg.register(MemoryRegion(address: 5000, length: 0), location: .host))
        XCTAssertEqual(reg.count, 3)
    }

    func testLocationParsing() throws {
        XCTAssertEqual(try MemoryLocation(parsing: "cpu"), .host)
        XCTAssertEqual(try MemoryLocation(parsing: "cpu:0"), .host)
        XCTAssertEqual(try MemoryLocation(parsing: "cuda:3"), MemoryLocation(kind: .cuda, index: 3))
        for bad in ["", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "CPU", "1cuda", "cu-da:0"] {
            XCTAssertThrowsError(try MemoryLocation(parsing: bad), bad)
        }
    }
}
