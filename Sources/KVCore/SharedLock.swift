#if canImport(Glibc)
import Glibc
#endif

/// A readers-writer lock (pthread_rwlock, writers preferred): many holders share it, one
/// holder excludes all. A client's operations share it while they use segment memory; a
/// reconnect to the master takes it exclusively, so no copy runs while segments are remounted.
public final class SharedLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(lock, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    @inline(__always) public func lockShared() { pthread_rwlock_rdlock(lock) }
    /// Shares the lock unless it is held or awaited exclusively; false then (never waits).
    @inline(__always) public func tryLockShared() -> Bool { pthread_rwlock_tryrdlock(lock) == 0 }
    @inline(__always) public func lockExclusive() { pthread_rwlock_wrlock(lock) }
    @inline(__always) public func tryLockExclusive() -> Bool { pthread_rwlock_trywrlock(lock) == 0 }
    @inline(__always) public func unlock() { pthread_rwlock_unlock(lock) }
}
