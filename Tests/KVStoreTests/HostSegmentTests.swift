import XCTest
import KVCore
import KVAccelerator
@testable import KVStore
#if canImport(Glibc)
import Glibc
#endif

/// Shared segments: a second mapping through the path other processes use sees the same bytes.
final class HostSegmentTests: XCTestCase {
    func bytes(_ r: MemoryRegion) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: r.address), count: r.length)
    }

    func testSharedSegmentIsVisibleThroughItsSharePath() throws {
        let owner = try HostSegment(size: 1 << 20, prefault: true, shared: true)
        defer { owner.unmap() }
        XCTAssertTrue(owner.isShared)
        let path = try XCTUnwrap(owner.sharePath)
        XCTAssertTrue(path.hasPrefix("/proc/\(getpid())/fd/"))
        let peer = try HostSegment(attaching: path, size: 1 << 20)
        defer { peer.unmap() }
        let a = bytes(owner.region(offset: 4096, length: 100)), b = bytes(peer.region(offset: 4096, length: 100))
        for i in 0..<100 { a[i] = UInt8(i) }
        XCTAssertEqual(Array(b), (0..<100).map(UInt8.init))
        b[0] = 200
        XCTAssertEqual(a[0], 200, "writes go both ways: one memory")
        XCTAssertNotEqual(a.baseAddress, b.baseAddress, "two mappings")
    }

    func testPrivateSegmentsHaveNoSharePath() throws {
        let s = try HostSegment(size: 1 << 16)
        XCTAssertFalse(s.isShared)
        XCTAssertNil(s.sharePath)
    }

    func testAttachingRefusesMissingOrShortFiles() throws {
        XCTAssertThrowsError(try HostSegment(attaching: "/proc/self/fd/987654", size: 4096)) {
            XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
        }
        let owner = try HostSegment(size: 1 << 16, shared: true)
        defer { owner.unmap() }
        XCTAssertThrowsError(try HostSegment(attaching: owner.sharePath!, size: 1 << 20)) {
            XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
            XCTAssertTrue(($0 as? KVError)?.message.contains("smaller") ?? false)
        }
    }

    func testUnmapClosesTheFileAndLeavesNothingInDevShm() throws {
        let before = try FileManagerless.entries("/dev/shm").filter { $0.hasPrefix("kvstore-") }
        let s = try HostSegment(size: 1 << 16, shared: true)
        XCTAssertEqual(try FileManagerless.entries("/dev/shm").filter { $0.hasPrefix("kvstore-") }, before, "unlinked at once")
        let fd = s.fd
        s.unmap()
        XCTAssertEqual(s.fd, -1)
        XCTAssertEqual(fcntl(fd, F_GETFD), -1, "the descriptor is closed")
    }
}

/// Directory listing without Foundation.
enum FileManagerless {
    static func entries(_ path: String) throws -> [String] {
        guard let d = opendir(path) else { throw KVError(.internal, "opendir \(path)") }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { out.append(name) }
        }
        return out.sorted()
    }
}
