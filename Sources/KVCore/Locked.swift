#if canImport(Glibc)
import Glibc
#endif

/// A value behind a pthread mutex: the lock for state shared between threads.
///
/// Why not `Synchronization.Mutex`: on Linux its futex fast path lives inside the
/// uninstrumented standard library, so ThreadSanitizer cannot see it and reports every
/// access it protects as a race; pthread mutexes are intercepted by TSan, so the race detector
/// stays meaningful. Cost is the same (an uncontended futex lock).
///
/// `@unchecked Sendable`: `state` is only touched inside `withLock`, under `mutex`.
public final class Locked<State: Sendable>: @unchecked Sendable {
    @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @usableFromInline let state: UnsafeMutablePointer<State>

    public init(_ initial: State) {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        state = .allocate(capacity: 1)
        state.initialize(to: initial)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deinitialize(count: 1)
        mutex.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    /// Runs `body` with exclusive access to the state. Never call `withLock` of the same
    /// instance from inside `body`.
    @inlinable @inline(__always)
    public func withLock<R, E: Error>(_ body: (inout State) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&state.pointee)
    }
}
