import KVAccelerator
import KVCore
import KVSystem

#if canImport(Glibc)
import Glibc
#endif

/// What a `StoreClient` asks of its master: the embedded one (a function call) or a master
/// server over the network (`RemoteMaster`). Thread-safe.
public protocol MasterLink: AnyObject, Sendable {
    var policy: CachePolicy { get }
    /// Space for a write, in `options.replicas` segments (`preferred` first when it has room).
    func beginWrite(
        key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions,
        preferred: SegmentID?
    ) throws(KVError) -> WriteTicket
    /// Makes a written object visible. A remote master may only send it (the answer is
    /// read with the next request): the object is visible to this client's next request
    /// at once, to other clients as soon as the master reads it.
    func commitWrite(_ ticket: WriteTicket) throws(KVError)
    func abortWrite(_ ticket: WriteTicket) throws(KVError)
    /// A read of `key` (leased); for a remote master `busy` never happens, the handle is 0
    /// and the ticket lists the other replicas in `fallbacks`.
    func acquireRead(key: ObjectKey, host: String) throws(KVError) -> ReadResult
    func releaseRead(_ handle: VersionHandle) throws(KVError)
    /// Size of `key`, leasing it; nil when absent.
    func lease(key: ObjectKey) throws(KVError) -> Int?
    func remove(key: ObjectKey, force: Bool) throws(KVError)
    /// `lease` of several keys (one result each); a remote master gets them in chunks.
    func leases(keys: [ObjectKey]) throws(KVError) -> [Int?]
    /// `remove` of several keys: one error per key (nil: removed); chunked like `leases`.
    func remove(keys: [ObjectKey], force: Bool) throws(KVError) -> [KVError?]
    func removeAll(force: Bool) throws(KVError) -> Int
    func statistics() throws(KVError) -> CacheStatistics

    /// `beginWrite` of several objects; a refused item does not stop the others. Calls
    /// `started` with consecutive ranges of `items` and one result per item of the range, in
    /// order, covering every item. A remote master gets the items in chunks, the next chunk
    /// sent before `started` runs for this one, so the caller's copies overlap the master's
    /// work. Throws only when the master cannot be asked at all (some chunks may have been
    /// started: their tickets were handed to `started`).
    func beginWrites(
        _ items: [BatchWrite], mode: WriteMode, options: WriteOptions, preferred: SegmentID?,
        started: (Range<Int>, [Result<WriteTicket, KVError>]) -> Void) throws(KVError)
    /// Commits `commit` and aborts `abort` (a remote master gets them in one send); returns
    /// one error per `commit` ticket (nil: committed, or sent to a remote master, which
    /// answers only failures, see `commitWrite`).
    func finishWrites(commit: [WriteTicket], abort: [WriteTicket]) -> [KVError?]
    /// `acquireRead` of several keys, handed to `found` chunk by chunk like `beginWrites`.
    func acquireReads(
        keys: [ObjectKey], host: String,
        found: (Range<Int>, [Result<ReadResult, KVError>]) -> Void) throws(KVError)

    /// KV layouts (prefill→decode transfer): publish this client's under its node id, find
    /// another's, withdraw this client's.
    func publishLayout(_ p: PublishedLayout) throws(KVError)
    func fetchLayout(node: String) throws(KVError) -> PublishedLayout
    func unpublishLayout(node: String) throws(KVError)
    /// One page of the keys of the store (or cluster), in byte order after `after`.
    func keysPage(after: ObjectKey?) throws(KVError) -> ObjectTable.KeysPage

    /// Begins copying `key`'s current version into `targets` (a move with `dropping`; see
    /// `ObjectTable.beginCopy`); the caller copies the bytes and calls `endCopy`.
    func beginCopy(key: ObjectKey, to targets: [SegmentID], dropping: SegmentID?) throws(KVError) -> CopyTicket
    func endCopy(_ handle: UInt64, commit: Bool) throws(KVError)
    /// This client's segment takes no new object from now on (it is about to leave).
    func drainSegment() throws(KVError)
}

/// A replica copy as its copier holds it: what to read and write, and its deadlines on the
/// copier's clock (`leaseEnd` for reading the sources, as `ReadTicket.leaseEnd`; `beginBy`
/// and `deadline` for writing the targets, as `WriteTicket`'s).
public struct CopyTicket: Sendable, Equatable {
    public var copy: ReplicaCopy
    public var leaseEnd: Nanoseconds
    public var beginBy: Nanoseconds
    public var deadline: Nanoseconds
}

extension MasterLink {
    /// An embedded store has one segment: there is nowhere to copy a replica to.
    public func beginCopy(key: ObjectKey, to targets: [SegmentID], dropping: SegmentID?) throws(KVError) -> CopyTicket {
        throw KVError(.unsupported, "replica copies and moves need a cluster: an embedded store has one segment")
    }

    public func endCopy(_ handle: UInt64, commit: Bool) throws(KVError) {
        throw KVError(.unsupported, "replica copies and moves need a cluster: an embedded store has one segment")
    }

    public func drainSegment() throws(KVError) {
        throw KVError(.unsupported, "draining a segment needs a cluster: an embedded store's one segment takes every object")
    }
}

/// The in-process master: the `ObjectTable` state machine behind one lock, fed by `clock`.
/// Every method is thread-safe and holds the lock only for bookkeeping, never while bytes
/// are copied.
public final class EmbeddedMaster: MasterLink {
    private let table: Locked<ObjectTable>
    /// The one client of an embedded master is owner 0.
    private let layouts = Locked(LayoutDirectory())
    public let clock: Clock
    public let policy: CachePolicy

    public init(capacity: Int, policy: CachePolicy = CachePolicy(), clock: @escaping Clock = monotonicClock) {
        table = Locked(ObjectTable(capacity: capacity, policy: policy))
        self.clock = clock
        self.policy = policy
    }

    public func beginWrite(
        key: ObjectKey, size: Int, mode: WriteMode, options: WriteOptions,
        preferred: SegmentID? = nil
    ) throws(KVError) -> WriteTicket {
        let now = clock()
        return try table.withLock { (t: inout ObjectTable) throws(KVError) in
            try t.beginWrite(key: key, size: size, mode: mode, options: options, replicas: options.replicas, now: now)
        }
    }

    public func commitWrite(_ ticket: WriteTicket) throws(KVError) {
        let now = clock()
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.commitWrite(ticket, now: now) }
    }

    public func abortWrite(_ ticket: WriteTicket) throws(KVError) {
        let now = clock()
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.abortWrite(ticket, now: now) }
    }

    public func acquireRead(key: ObjectKey, host: String = "") -> ReadResult {
        let now = clock()
        return table.withLock { $0.acquireRead(key: key, now: now) }
    }

    public func releaseRead(_ handle: VersionHandle) throws(KVError) {
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.releaseRead(handle) }
    }

    /// Size of `key`, leasing it; nil when absent.
    public func lease(key: ObjectKey) -> Int? {
        let now = clock()
        return table.withLock { $0.lease(key: key, now: now) }
    }

    public func remove(key: ObjectKey, force: Bool) throws(KVError) {
        let now = clock()
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.remove(key: key, force: force, now: now) }
    }

    public func leases(keys: [ObjectKey]) -> [Int?] {
        let now = clock()
        return table.withLock { t in keys.map { t.lease(key: $0, now: now) } }
    }

    public func remove(keys: [ObjectKey], force: Bool) -> [KVError?] {
        let now = clock()
        return table.withLock { t in
            keys.map { k in
                do throws(KVError) { try t.remove(key: k, force: force, now: now); return nil } catch { return error }
            }
        }
    }

    public func removeAll(force: Bool) -> Int {
        let now = clock()
        return table.withLock { $0.removeAll(force: force, now: now) }
    }

    public func beginWrites(
        _ items: [BatchWrite], mode: WriteMode, options: WriteOptions, preferred: SegmentID?,
        started: (Range<Int>, [Result<WriteTicket, KVError>]) -> Void
    ) {
        let now = clock()
        let results = table.withLock { t in
            items.map { i in
                Result { () throws(KVError) in
                    try t.beginWrite(key: i.key, size: i.size, mode: mode, options: options, replicas: options.replicas, now: now)
                }
            }
        }
        started(0..<items.count, results)
    }

    public func finishWrites(commit: [WriteTicket], abort: [WriteTicket]) -> [KVError?] {
        let now = clock()
        return table.withLock { t in
            for a in abort { try? t.abortWrite(a, now: now) }
            return commit.map { c in
                do throws(KVError) { try t.commitWrite(c, now: now); return nil } catch { return error }
            }
        }
    }

    public func acquireReads(keys: [ObjectKey], host: String, found: (Range<Int>, [Result<ReadResult, KVError>]) -> Void) {
        let now = clock()
        let results: [Result<ReadResult, KVError>] = table.withLock { t in keys.map { .success(t.acquireRead(key: $0, now: now)) } }
        found(0..<keys.count, results)
    }

    public func keysPage(after: ObjectKey?) -> ObjectTable.KeysPage {
        let now = clock()
        return table.withLock { $0.keysPage(after: after, now: now) }
    }

    public func publishLayout(_ p: PublishedLayout) throws(KVError) {
        try layouts.withLock { (d: inout LayoutDirectory) throws(KVError) in try d.publish(p, owner: 0) }
    }

    public func fetchLayout(node: String) throws(KVError) -> PublishedLayout {
        try layouts.withLock { (d: inout LayoutDirectory) throws(KVError) in try d.fetch(node) }
    }

    public func unpublishLayout(node: String) throws(KVError) {
        try layouts.withLock { (d: inout LayoutDirectory) throws(KVError) in try d.unpublish(node, owner: 0) }
    }

    // MARK: for a lower tier (`TieredMaster`)

    /// Runs `body` on the table under its lock with the time now: a lower tier composes
    /// its steps with the table's there (a commit and the drop of the key's disk copy, say),
    /// so no other call sees one without the other. `body` must not do I/O.
    func withTable<R, E: Error>(_ body: (inout ObjectTable, Nanoseconds) throws(E) -> R) throws(E) -> R {
        let now = clock()
        return try table.withLock { (t: inout ObjectTable) throws(E) in try body(&t, now) }
    }

    /// The table's counters, after running the timers due now.
    public func statistics() -> CacheStatistics {
        let now = clock()
        return table.withLock { t in
            t.advance(now: now)
            return t.statistics
        }
    }
}
