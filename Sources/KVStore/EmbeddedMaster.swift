import KVAccelerator
import KVCore


/// The in-process master: the `ObjectTable` state machine behind one lock. Every method is
/// thread-safe and holds the lock only for bookkeeping, never while bytes are copied.
public final class EmbeddedMaster: Sendable {
    private let table: Locked<ObjectTable>

    public init(capacity: Int) {
        table = Locked(ObjectTable(capacity: capacity))
    }

    public func beginWrite(key: ObjectKey, size: Int, mode: WriteMode) throws(KVError) -> WriteTicket {
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.beginWrite(key: key, size: size, mode: mode) }
    }

    public func commitWrite(_ ticket: WriteTicket) throws(KVError) {
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.commitWrite(ticket) }
    }

    public func abortWrite(_ ticket: WriteTicket) throws(KVError) {
        try table.withLock { (t) throws(KVError) in try t.abortWrite(ticket) }
    }

    public func acquireRead(key: ObjectKey) -> ReadResult {
        table.withLock { $0.acquireRead(key: key) }
    }

    public func releaseRead(_ handle: VersionHandle) throws(KVError) {
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.releaseRead(handle) }
    }

    public func size(key: ObjectKey) -> Int? { table.withLock { $0.size(key: key) } }

    public func remove(key: ObjectKey) throws(KVError) {
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.remove(key: key) }
    }

    public func removeAll() throws(KVError) -> Int {
        try table.withLock { (t: inout ObjectTable) throws(KVError) in try t.removeAll() }
    }

    /// A consistent snapshot of the table's accounting.
    public func snapshot() -> (objects: Int, objectBytes: Int, used: Int, capacity: Int, readers: Int, freeBlocks: Int, largestFree: Int) {
        table.withLock { t in
            (t.objectCount, t.objectBytes, t.usedBytes, t.capacity, t.activeReaders,
             t.allocator.freeBlockCount, t.allocator.largestFreeBlock)
        }
    }
}
