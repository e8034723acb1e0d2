#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore

/// A fake accelerator kind ("fake") for tests. It registers itself exactly as real devices
/// do — a record in the `kvstore_accelerators` section below — and is found by the registry's
/// probe. Its "device memory" is one host arena per device, so copies really move bytes and
/// classification really answers by address. Tests switch it on (`setDevices`), inject
/// failures, and read the log of what the registry and transfers asked of it.
///
/// Global state behind one lock; tests that change it run serially (XCTest's default).
public final class FakeAccelerator: AcceleratorDevice {
    public static let kind = DeviceKind(rawValue: "fake")
    /// Bytes of "device memory" per fake device.
    public static let arenaSize = 1 << 20

    public enum Event: Equatable, Sendable {
        case enter(Int), leave(Int)
        case copy(CopyDirection, device: Int, bytes: Int)
        /// One batched call of `copies` copies.
        case copyBatch(CopyDirection, device: Int, copies: Int)
        case pin(Int), unpin(Int)
    }

    struct State: Sendable {
        var devices = 0
        var failPins = false
        var failCopiesTo: UInt? = nil
        var noBatches = false
        var events: [Event] = []
        var pinned: [MemoryRegion] = []
        var current: Int? = nil
        /// Holds per device (`acquire`/`release`), as a CUDA device counts context retains.
        var holds: [Int: Int] = [:]
        /// The stream of each copy queued, and the streams of each `withCopies` scope.
        var copyStreams: [DeviceStream] = []
        var scopes: [DeviceStream] = []
    }

    static let state = Locked(State())
    /// Arenas, allocated once for the process (addresses stored as integers).
    static let arenas: [UInt] = (0..<4).map { _ in UInt(bitPattern: malloc(arenaSize)) }

    /// Makes `n` (0...4) fake devices appear at the next registry refresh, and refreshes.
    public static func setDevices(_ n: Int) {
        state.withLock {
            $0.devices = n; $0.events = []
        }
        AcceleratorRegistry.refresh()
    }

    public static func reset() {
        state.withLock { $0 = State() }
        AcceleratorRegistry.refresh()
    }

    public static var events: [Event] { state.withLock { $0.events } }
    public static func clearEvents() { state.withLock { $0.events = [] } }
    public static var pinnedRanges: [MemoryRegion] { state.withLock { $0.pinned } }
    public static var currentDevice: Int? { state.withLock { $0.current } }
    public static func holds(_ i: Int) -> Int { state.withLock { $0.holds[i] ?? 0 } }
    public static var copyStreams: [DeviceStream] { state.withLock { $0.copyStreams } }
    public static var copyScopes: [DeviceStream] { state.withLock { $0.scopes } }
    public static func failPins(_ on: Bool) { state.withLock { $0.failPins = on } }
    /// Makes the devices lack a batched copy call (`unsupported`, as older CUDA drivers).
    public static func failBatches(_ on: Bool) { state.withLock { $0.noBatches = on } }
    /// Makes copies whose destination is `address` fail (nil: none fail).
    public static func failCopies(to address: UInt?) { state.withLock { $0.failCopiesTo = address } }

    /// The device memory of fake device `i`.
    public static func memory(_ i: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: arenas[i]), count: arenaSize)
    }

    public static func probe() -> [any AcceleratorDevice] {
        let n = state.withLock { $0.devices }
        return (0..<n).map { FakeAccelerator(index: $0) }
    }

    public let location: MemoryLocation
    let index: Int

    init(index: Int) {
        self.index = index
        location = MemoryLocation(kind: Self.kind, index: index)
    }

    static func owner(_ address: UInt) -> Int? {
        let n = state.withLock { $0.devices }
        return (0..<n).first { arenas[$0] <= address && address < arenas[$0] + UInt(arenaSize) }
    }

    public func classify(_ address: UInt) -> MemoryLocation? {
        guard address != 0, let i = Self.owner(address) else { return nil }
        return MemoryLocation(kind: Self.kind, index: i)
    }

    public func acquire() throws(KVError) { Self.state.withLock { $0.holds[index, default: 0] += 1 } }

    public func release() { Self.state.withLock { $0.holds[index, default: 0] -= 1 } }

    public func withCopies<R>(on stream: DeviceStream, _ body: () throws(KVError) -> R) throws(KVError) -> R {
        Self.state.withLock { $0.scopes.append(stream) }
        return try body()
    }

    /// Needs a hold, as a CUDA device needs its retained context.
    public func withCurrent<R>(_ body: () throws(KVError) -> R) throws(KVError) -> R {
        guard Self.holds(index) > 0 else { throw KVError(.internal, "fake:\(index) used without a hold") }
        let previous = Self.state.withLock { s in
            let p = s.current
            s.current = index
            s.events.append(.enter(index))
            return p
        }
        defer {
            Self.state.withLock { s in
                s.current = previous; s.events.append(.leave(index))
            }
        }
        return try body()
    }

    public func copy(
        _ direction: CopyDirection, from source: UInt, to destination: UInt, count: Int,
        stream: DeviceStream = .unknown
    ) throws(KVError) {
        // Checks what a real copy engine would: the device side is this device's memory, the
        // host side is not device memory, and this device is current.
        let srcDev = Self.owner(source), dstDev = Self.owner(destination)
        let ok: Bool =
            switch direction {
            case .hostToDevice: srcDev == nil && dstDev == index
            case .deviceToHost: srcDev == index && dstDev == nil
            case .deviceToDevice: srcDev != nil && dstDev != nil && (srcDev == index || dstDev == index)
            case .hostToHost: false
            }
        guard ok else {
            throw KVError(.transfer, "fake:\(index) refuses \(direction) from 0x\(String(source, radix: 16)) to 0x\(String(destination, radix: 16))")
        }
        let fail: Bool = Self.state.withLock { s in
            s.events.append(.copy(direction, device: index, bytes: count))
            s.copyStreams.append(stream)
            return s.current != index || s.failCopiesTo == destination
        }
        guard !fail else { throw KVError(.transfer, "fake:\(index) copy failed (injected, or device not current)") }
        memcpy(UnsafeMutableRawPointer(bitPattern: destination)!, UnsafeRawPointer(bitPattern: source)!, count)
    }

    /// Checks every copy as `copy` does, then records one event for the whole batch.
    public func copyBatch(
        _ direction: CopyDirection, sources: [UInt], destinations: [UInt], counts: [Int],
        stream: DeviceStream = .unknown
    ) throws(KVError) {
        if Self.state.withLock({ $0.noBatches }) { throw KVError(.unsupported, "fake:\(index) has no batched copy") }
        guard !sources.isEmpty else { return }
        for i in sources.indices {
            try copy(direction, from: sources[i], to: destinations[i], count: counts[i], stream: stream)
        }
        Self.state.withLock { s in
            s.events.removeLast(sources.count)
            s.events.append(.copyBatch(direction, device: index, copies: sources.count))
        }
    }

    public func allocatePinned(bytes: Int) throws(KVError) -> MemoryRegion {
        guard bytes > 0, let p = malloc(bytes) else { throw .noSpace("fake pinned allocation of \(bytes) bytes") }
        return MemoryRegion(p, length: bytes)
    }

    public func freePinned(_ region: MemoryRegion) { free(UnsafeMutableRawPointer(bitPattern: region.address)) }

    public func pin(_ region: MemoryRegion) throws(KVError) {
        let refused: Bool = Self.state.withLock { s in
            if s.failPins { return true }
            s.pinned.append(region)
            s.events.append(.pin(region.length))
            return false
        }
        if refused { throw KVError(.noSpace, "fake:\(index) refuses to pin (injected)") }
    }

    public func unpin(_ region: MemoryRegion) {
        Self.state.withLock { s in
            if let i = s.pinned.firstIndex(of: region) { s.pinned.remove(at: i) }
            s.events.append(.unpin(region.length))
        }
    }
}

@used @section("kvstore_accelerators")
let fakeAcceleratorRegistration: AcceleratorRegistration = { AcceleratorRecord.make(FakeAccelerator.self) }
