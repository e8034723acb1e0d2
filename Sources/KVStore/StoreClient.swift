import KVAccelerator
import KVCore
import KVTransfer
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The store client: every object operation of kvstore. This form is the embedded
/// store: an in-process master and one host segment. Bytes are copied exactly once, straight
/// between the caller's memory and the segment (`LocalCopyTransport`); the master's lock is
/// never held during a copy.
///
/// Thread-safe: any number of threads may call any method at once. Memory passed in as
/// `MemoryRegion`s must stay valid for the call.
public final class StoreClient: Sendable {
    /// What the caller knows about where its buffers live.
    public enum MemoryHint: Sendable {
        /// Every buffer is host memory (a Python buffer-protocol object, for example): no lookup.
        case host
        /// Find out: a registered buffer's location by address range, otherwise ask the
        /// accelerator registry (a driver query only when an accelerator is present).
        case locate
    }

    public let segment: HostSegment
    public let registry = MemoryRegistry()
    public let counters = TransferCounters()
    let master: EmbeddedMaster
    let transport: LocalCopyTransport
    let gate = OperationGate()
    let operations = OperationCounters()

    /// Creates an embedded store with one host segment of `segmentSize` bytes; `prefault`
    /// commits the segment's pages now instead of on first use. The segment is pinned when an
    /// accelerator is present and `pinning` (default: from the environment, see
    /// `PinningPolicy`) allows; a refused pin leaves it pageable and is counted in stats.
    /// `cache` sets leases and eviction (checked here); `clock` is for tests.
    public init(segmentSize: Int, prefault: Bool = false, pinning: PinningPolicy? = nil,
                cache: CachePolicy = CachePolicy(), clock: @escaping Clock = monotonicClock) throws(KVError) {
        guard segmentSize >= SegmentAllocator.granule else {
            throw .invalidArgument("segment size must be at least \(SegmentAllocator.granule) bytes, got \(segmentSize)")
        }
        try cache.validate()
        let policy: PinningPolicy
        if let pinning { policy = pinning } else { policy = try PinningPolicy.fromEnvironment() }
        segment = try HostSegment(size: segmentSize, prefault: prefault, pinning: policy)
        master = EmbeddedMaster(capacity: segmentSize, policy: cache, clock: clock)
        transport = LocalCopyTransport(counters: counters)
    }

    /// The store's lease and eviction rules.
    public var cachePolicy: CachePolicy { master.policy }

    // MARK: writes

    /// Writes the concatenation of `parts` as the object `key`: each part copied once, in
    /// order, straight into its place in the segment. The object becomes visible only when
    /// completely written.
    /// Parts on a device are copied by that device (device→host); see `MemoryHint`.
    /// `options` pin the object or give it a TTL. Evicts when the store is full.
    public func put(key: ObjectKey, parts: UnsafeBufferPointer<MemoryRegion>, mode: WriteMode,
                    options: WriteOptions = .default, memory: MemoryHint = .locate) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        let total = TransferPlan.totalLength(parts)
        guard total > 0 else { throw .invalidArgument("value must not be empty") }
        let locations = locate(parts, memory)
        let ticket = try master.beginWrite(key: key, size: total, mode: mode, options: options)
        let destination = segment.region(offset: ticket.offset, length: total)
        if let locations {
            var plan = DeviceCopyPlan()
            plan.addWrite(parts, locations: locations, into: destination, owner: 0)
            if let e = plan.execute(transport: transport, into: .segment, devices: AcceleratorRegistry.snapshot)[0] {
                try? master.abortWrite(ticket)
                throw e
            }
        } else {
            copyHost(parts, into: destination)
        }
        try master.commitWrite(ticket)
        operations.puts.add(1, ordering: .relaxed)
    }

    /// One object of a batch: its key and the range of its regions in the batch's region list
    /// (its parts for `putBatch`, its destinations for `getBatch`).
    public struct BatchItem: Sendable {
        public let key: ObjectKey
        public let regions: Range<Int>
        public init(key: ObjectKey, regions: Range<Int>) {
            self.key = key
            self.regions = regions
        }
    }

    /// Writes several objects; returns one result per object (nil: written). Space for every
    /// object is taken first, then all copies run grouped per device (each device made current
    /// once), then each object commits — or is revoked if its copy failed.
    public func putBatch(_ items: [BatchItem], parts: UnsafeBufferPointer<MemoryRegion>, mode: WriteMode,
                         options: WriteOptions = .default, memory: MemoryHint = .locate) throws(KVError) -> [KVError?] {
        try gate.enter()
        defer { gate.leave() }
        var results = [KVError?](repeating: nil, count: items.count)
        var tickets = [WriteTicket?](repeating: nil, count: items.count)
        var plan = DeviceCopyPlan()
        for (i, item) in items.enumerated() {
            do throws(KVError) {
                let mine = try Self.slice(parts, item.regions, "parts")
                let total = TransferPlan.totalLength(mine)
                guard total > 0 else { throw .invalidArgument("value must not be empty") }
                let t = try master.beginWrite(key: item.key, size: total, mode: mode, options: options)
                tickets[i] = t
                let destination = segment.region(offset: t.offset, length: total)
                if let locations = locate(mine, memory) {
                    plan.addWrite(mine, locations: locations, into: destination, owner: i)
                } else {
                    copyHost(mine, into: destination)   // host memory: nothing to group
                }
            } catch {
                results[i] = error
            }
        }
        let failed = plan.execute(transport: transport, into: .segment, devices: AcceleratorRegistry.snapshot)
        for (i, t) in tickets.enumerated() {
            guard let t else { continue }
            if let e = failed[i] {
                try? master.abortWrite(t)
                results[i] = e
                continue
            }
            do throws(KVError) {
                try master.commitWrite(t)
                operations.puts.add(1, ordering: .relaxed)
            } catch {
                results[i] = error
            }
        }
        return results
    }

    /// Regions `range` of `all` (one batch item's); throws `invalidArgument` when out of range.
    static func slice(_ all: UnsafeBufferPointer<MemoryRegion>, _ range: Range<Int>,
                      _ what: String) throws(KVError) -> UnsafeBufferPointer<MemoryRegion> {
        guard range.lowerBound >= 0, range.upperBound <= all.count else {
            throw .invalidArgument("\(what) \(range) out of range of \(all.count) \(what)")
        }
        return UnsafeBufferPointer(rebasing: all[range])
    }

    /// Where each of `regions` lives; nil when all are host memory (the fast path).
    func locate(_ regions: UnsafeBufferPointer<MemoryRegion>, _ hint: MemoryHint) -> [MemoryLocation]? {
        guard hint == .locate else { return nil }
        let snapshot = AcceleratorRegistry.snapshot
        var out: [MemoryLocation]? = nil
        for (i, r) in regions.enumerated() {
            let loc = location(of: r, snapshot: snapshot)
            if loc.isHost && out == nil { continue }
            if out == nil { out = [MemoryLocation](repeating: .host, count: regions.count) }
            out![i] = loc
        }
        return out
    }

    /// The location of `region`: its registration's, else the registry's classification.
    public func location(of region: MemoryRegion, snapshot: AcceleratorSnapshot = AcceleratorRegistry.snapshot) -> MemoryLocation {
        if let e = registry.lookup(region) { return e.location }
        return snapshot.classify(region.address) ?? .host
    }

    // MARK: reads
    //
    // The public read calls each pass the operation gate once; the `held…` helpers below
    // assume the caller is inside it, so `get` pays for one gate entry, not three.

    /// Takes a read hold on `key`, waiting while an in-place upsert rewrites it.
    public func beginRead(key: ObjectKey) throws(KVError) -> ReadTicket {
        try gate.enter()
        defer { gate.leave() }
        return try heldBeginRead(key: key)
    }

    /// Takes a read hold without waiting; `.busy` while an in-place upsert rewrites the object.
    public func tryBeginRead(key: ObjectKey) throws(KVError) -> ReadResult {
        try gate.enter()
        defer { gate.leave() }
        return heldTryBeginRead(key: key)
    }

    /// Copies a held object into `destinations` (filled in order); returns bytes copied.
    /// Throws `invalidArgument` when they hold fewer than `ticket.size` bytes (nothing copied).
    public func copyOut(_ ticket: ReadTicket, to destinations: UnsafeBufferPointer<MemoryRegion>,
                        memory: MemoryHint = .locate) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        return try heldCopyOut(ticket, range: 0..<ticket.size, to: destinations, memory: memory)
    }

    /// Copies bytes `range` of a held object into `destinations` (which must hold at least
    /// `range.count` bytes); returns bytes copied.
    public func copyOut(_ ticket: ReadTicket, range: Range<Int>, to destinations: UnsafeBufferPointer<MemoryRegion>,
                        memory: MemoryHint = .locate) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        guard range.lowerBound >= 0, range.upperBound <= ticket.size else {
            throw .invalidArgument("range \(range.lowerBound)..<\(range.upperBound) is outside an object of \(ticket.size) bytes")
        }
        return try heldCopyOut(ticket, range: range, to: destinations, memory: memory)
    }

    /// Ends a read hold. After `close` it throws `storeClosed` (the segment is gone).
    public func endRead(_ ticket: ReadTicket) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        try master.releaseRead(ticket.handle)
    }

    /// Copies object `key` into `destinations`; returns its size. The store is unchanged when
    /// it fails.
    public func get(key: ObjectKey, into destinations: UnsafeBufferPointer<MemoryRegion>,
                    memory: MemoryHint = .locate) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        let t = try heldBeginRead(key: key)
        defer { try? master.releaseRead(t.handle) }
        return try heldCopyOut(t, range: 0..<t.size, to: destinations, memory: memory)
    }

    /// Reads several objects, object `i` into `destinations[items[i].regions]`; returns one
    /// result per object (its size, or the error). Every object is held first, then all copies
    /// run grouped per device, then the holds are released.
    public func getBatch(_ items: [BatchItem], destinations: UnsafeBufferPointer<MemoryRegion>,
                         memory: MemoryHint = .locate) throws(KVError) -> [Result<Int, KVError>] {
        try gate.enter()
        defer { gate.leave() }
        var results = [Result<Int, KVError>](repeating: .success(0), count: items.count)
        var held: [ReadTicket] = []
        defer { for t in held { try? master.releaseRead(t.handle) } }
        var plan = DeviceCopyPlan()
        for (i, item) in items.enumerated() {
            do throws(KVError) {
                let mine = try Self.slice(destinations, item.regions, "destinations")
                let t = try heldBeginRead(key: item.key)
                held.append(t)
                try Self.checkRoom(mine, for: t.size, of: t)
                let source = segment.region(offset: t.offset, length: t.size)
                if let locations = locate(mine, memory) {
                    plan.addRead(from: source, into: mine, locations: locations, owner: i)
                } else {
                    copyHost(source, into: mine)
                }
                results[i] = .success(t.size)
            } catch {
                results[i] = .failure(error)
            }
        }
        for (i, e) in plan.execute(transport: transport, into: .callerMemory, devices: AcceleratorRegistry.snapshot) {
            results[i] = .failure(e)
        }
        return results
    }

    private func heldBeginRead(key: ObjectKey) throws(KVError) -> ReadTicket {
        while true {
            switch heldTryBeginRead(key: key) {
            case .found(let t): return t
            case .notFound: throw .notFound("object '\(key)' not found")
            case .busy: sched_yield()
            }
        }
    }

    private func heldTryBeginRead(key: ObjectKey) -> ReadResult {
        let r = master.acquireRead(key: key)
        switch r {
        case .found: operations.hits.add(1, ordering: .relaxed)
        case .notFound: operations.misses.add(1, ordering: .relaxed)
        case .busy: break
        }
        return r
    }

    /// Throws `invalidArgument` when `destinations` hold fewer than `count` bytes of `ticket`'s object.
    private static func checkRoom(_ destinations: UnsafeBufferPointer<MemoryRegion>, for count: Int,
                                  of ticket: ReadTicket) throws(KVError) {
        let room = TransferPlan.totalLength(destinations)
        guard room < count else { return }
        let what = count == ticket.size ? "an object of \(ticket.size) bytes" : "\(count) bytes"
        throw .invalidArgument("buffer of \(room) bytes is too small for \(what)")
    }

    private func heldCopyOut(_ ticket: ReadTicket, range: Range<Int>, to destinations: UnsafeBufferPointer<MemoryRegion>,
                             memory: MemoryHint) throws(KVError) -> Int {
        try Self.checkRoom(destinations, for: range.count, of: ticket)
        let source = segment.region(offset: ticket.offset + range.lowerBound, length: range.count)
        if let locations = locate(destinations, memory) {
            var plan = DeviceCopyPlan()
            plan.addRead(from: source, into: destinations, locations: locations, owner: 0)
            if let e = plan.execute(transport: transport, into: .callerMemory, devices: AcceleratorRegistry.snapshot)[0] { throw e }
            return range.count
        }
        return copyHost(source, into: destinations)
    }

    /// Host parts into a segment region: one copy per slice, no lookup, no plan.
    private func copyHost(_ parts: UnsafeBufferPointer<MemoryRegion>, into destination: MemoryRegion) {
        withUnsafePointer(to: destination) { d in
            _ = transport.copy(from: parts, to: UnsafeBufferPointer(start: d, count: 1), into: .segment)
        }
    }

    /// A segment region into host destinations; returns bytes copied.
    @discardableResult
    private func copyHost(_ source: MemoryRegion, into destinations: UnsafeBufferPointer<MemoryRegion>) -> Int {
        withUnsafePointer(to: source) { s in
            transport.copy(from: UnsafeBufferPointer(start: s, count: 1), to: destinations, into: .callerMemory)
        }
    }

    // MARK: queries and removal

    /// Whether `key` exists; an existing object is leased (so a `get` that follows finds it).
    public func exists(key: ObjectKey) throws(KVError) -> Bool {
        try gate.enter()
        defer { gate.leave() }
        return master.lease(key: key) != nil
    }

    /// The size of `key` in bytes; leases the object.
    public func size(key: ObjectKey) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        guard let n = master.lease(key: key) else { throw .notFound("object '\(key)' not found") }
        return n
    }

    /// Removes `key`. A leased object is refused with `leaseHeld` unless `force`. Readers
    /// already copying finish with the bytes they hold; the space is freed when the last of
    /// them is done.
    public func remove(key: ObjectKey, force: Bool = false) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        try master.remove(key: key, force: force)
        operations.removes.add(1, ordering: .relaxed)
    }

    /// Removes every object that is not leased (every object when `force`); returns how many.
    public func removeAll(force: Bool = false) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        let n = master.removeAll(force: force)
        operations.removes.add(n, ordering: .relaxed)
        return n
    }

    // MARK: buffers

    /// Records `region` as user memory at `location` ("cpu", "cuda:N"): later transfers find
    /// its device by address range, with no driver query. Throws `invalidArgument` when no
    /// such device exists, or when the registry can tell the memory lives elsewhere.
    public func registerBuffer(_ region: MemoryRegion, location: String) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        let loc = try MemoryLocation(parsing: location)
        let snapshot = AcceleratorRegistry.snapshot
        _ = try snapshot.requireDevice(at: loc)
        if snapshot.hasAccelerator, let actual = snapshot.classify(region.address), actual != loc {
            throw .invalidArgument("buffer at 0x\(String(region.address, radix: 16)) is \(actual) memory, not \(loc)")
        }
        try registry.register(region, location: loc)
    }

    public func unregisterBuffer(address: UInt) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        try registry.unregister(address: address)
    }

    // MARK: lifecycle

    public var isClosed: Bool { gate.isClosed }

    /// Refuses new operations, waits for those in flight, then releases the segment.
    /// Idempotent.
    public func close() {
        if gate.close() {
            registry.removeAll()
            segment.unmap()
        }
    }
}
