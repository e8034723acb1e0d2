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
    public let segment: HostSegment
    public let registry = MemoryRegistry()
    public let counters = TransferCounters()
    let master: EmbeddedMaster
    let transport: LocalCopyTransport
    let gate = OperationGate()
    let operations = OperationCounters()

    /// Creates an embedded store with one host segment of `segmentSize` bytes; `prefault`
    /// commits the segment's pages now instead of on first use.
    public init(segmentSize: Int, prefault: Bool = false) throws(KVError) {
        guard segmentSize >= SegmentAllocator.granule else {
            throw .invalidArgument("segment size must be at least \(SegmentAllocator.granule) bytes, got \(segmentSize)")
        }
        segment = try HostSegment(size: segmentSize, prefault: prefault)
        master = EmbeddedMaster(capacity: segmentSize)
        transport = LocalCopyTransport(counters: counters)
    }

    // MARK: writes

    /// Writes the concatenation of `parts` as the object `key`: each part copied once, in
    /// order, straight into its place in the segment. The object becomes visible only when
    /// completely written.
    public func put(key: ObjectKey, parts: UnsafeBufferPointer<MemoryRegion>, mode: WriteMode) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        let total = TransferPlan.totalLength(parts)
        guard total > 0 else { throw .invalidArgument("value must not be empty") }
        let ticket = try master.beginWrite(key: key, size: total, mode: mode)
        let destination = segment.region(offset: ticket.offset, length: total)
        withUnsafePointer(to: destination) { d in
            _ = transport.copy(from: parts, to: UnsafeBufferPointer(start: d, count: 1), into: .segment)
        }
        try master.commitWrite(ticket)
        operations.puts.add(1, ordering: .relaxed)
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
    public func copyOut(_ ticket: ReadTicket, to destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        return try heldCopyOut(ticket, to: destinations)
    }

    /// Ends a read hold. After `close` it throws `storeClosed` (the segment is gone).
    public func endRead(_ ticket: ReadTicket) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        try master.releaseRead(ticket.handle)
    }

    /// Copies object `key` into `destinations`; returns its size. The store is unchanged when
    /// it fails.
    public func get(key: ObjectKey, into destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        let t = try heldBeginRead(key: key)
        defer { try? master.releaseRead(t.handle) }
        return try heldCopyOut(t, to: destinations)
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

    private func heldCopyOut(_ ticket: ReadTicket, to destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> Int {
        let room = TransferPlan.totalLength(destinations)
        guard room >= ticket.size else {
            throw .invalidArgument("buffer of \(room) bytes is too small for an object of \(ticket.size) bytes")
        }
        let source = segment.region(offset: ticket.offset, length: ticket.size)
        return withUnsafePointer(to: source) { s in
            transport.copy(from: UnsafeBufferPointer(start: s, count: 1), to: destinations, into: .callerMemory)
        }
    }

    // MARK: queries and removal

    public func exists(key: ObjectKey) throws(KVError) -> Bool {
        try gate.enter()
        defer { gate.leave() }
        return master.size(key: key) != nil
    }

    public func size(key: ObjectKey) throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        guard let n = master.size(key: key) else { throw .notFound("object '\(key)' not found") }
        return n
    }

    /// Removes `key`. Readers already copying finish with the bytes they hold; the space is
    /// freed when the last of them is done. (`force` is accepted for the lease rules to come;
    /// with no leases every removal is allowed.)
    public func remove(key: ObjectKey, force: Bool = false) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        try master.remove(key: key)
        operations.removes.add(1, ordering: .relaxed)
    }

    /// Removes every object; returns how many.
    public func removeAll() throws(KVError) -> Int {
        try gate.enter()
        defer { gate.leave() }
        let n = try master.removeAll()
        operations.removes.add(n, ordering: .relaxed)
        return n
    }

    // MARK: buffers

    /// Records `region` as user memory at `location` ("cpu" is the only device in this build).
    public func registerBuffer(_ region: MemoryRegion, location: String) throws(KVError) {
        try gate.enter()
        defer { gate.leave() }
        let loc = try MemoryLocation(parsing: location)
        guard loc == .host else {
            throw .invalidArgument("no device '\(location)' on this machine (available: cpu)")
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
