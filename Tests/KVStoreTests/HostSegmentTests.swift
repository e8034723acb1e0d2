import XCTest
import KVCore
import KVAccelerator
@testable import KVStore
#if canImport(Glibc)
import Glibc
#endif

/// Shared segments: a second mapping from the descriptor other processes receive sees the same
/// bytes; descriptors of anything but a read-write shared-memory file are refused.
final class HostSegmentTests: XCTestCase {
    func bytes(_ r: MemoryRegion) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: r.address), count: r.length)
    }

    /// The background thread maps the whole segment, and `unmap()` stops and waits for it
    /// when it is still running (it must never touch the range after the munmap).
    func testBackgroundPopulationFinishesAndUnmapStopsIt() throws {
        let s = try HostSegment(size: 8 << 20, shared: true)
        s.populateInBackground()
        var waited = 0
        while s.populatedBytes < s.size && waited < 5000 { usleep(1000); waited += 1 }
        XCTAssertEqual(s.populatedBytes, s.size)
        s.unmap()
        for _ in 0..<4 {
            let big = try HostSegment(size: 256 << 20, shared: true)
            big.populateInBackground()
            big.unmap()
            XCTAssertLessThanOrEqual(big.populatedBytes, big.size)
        }
    }

    func testSharedSegmentIsVisibleThroughItsDescriptor() throws {
        let owner = try HostSegment(size: 1 << 20, prefault: true, shared: true)
        defer { owner.unmap() }
        XCTAssertTrue(owner.isShared)
        let peer = try HostSegment(attaching: dup(owner.fd), size: 1 << 20)
        defer { peer.unmap() }
        let a = bytes(owner.region(offset: 4096, length: 100)), b = bytes(peer.region(offset: 4096, length: 100))
        for i in 0..<100 { a[i] = UInt8(i) }
        XCTAssertEqual(Array(b), (0..<100).map(UInt8.init))
        b[0] = 200
        XCTAssertEqual(a[0], 200, "writes go both ways: one memory")
        XCTAssertNotEqual(a.baseAddress, b.baseAddress, "two mappings")
    }

    func testPrivateSegmentsAreNotShared() throws {
        let s = try HostSegment(size: 1 << 16)
        XCTAssertFalse(s.isShared)
        XCTAssertEqual(s.fd, -1)
    }

    func testAttachingRefusesBadShortOrForeignFiles() throws {
        func refused(_ fd: Int32, _ size: Int, _ words: String) {
            XCTAssertThrowsError(try HostSegment(attaching: fd, size: size)) {
                XCTAssertEqual(($0 as? KVError)?.code, .invalidArgument)
                XCTAssertTrue(($0 as? KVError)?.message.contains(words) ?? false, "\($0)")
            }
            XCTAssertEqual(fcntl(fd, F_GETFD), -1, "the descriptor is closed either way")
        }
        refused(987_654, 4096, "not a regular file")
        let owner = try HostSegment(size: 1 << 16, shared: true)
        defer { owner.unmap() }
        refused(dup(owner.fd), 1 << 20, "fewer than")
        // A file a peer could open only for reading: never mapped for writing.
        let readOnly = open("/proc/self/fd/\(owner.fd)", O_RDONLY | O_CLOEXEC)
        refused(readOnly, 1 << 16, "reading and writing")
        // A regular file on disk (say, the victim's own data): refused, whatever its size.
        let path = "/var/tmp/kvstore-hostsegment-test-\(getpid())"
        let disk = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        unlink(path)
        XCTAssertEqual(ftruncate(disk, 1 << 16), 0)
        refused(disk, 1 << 16, "not a shared-memory file")
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
