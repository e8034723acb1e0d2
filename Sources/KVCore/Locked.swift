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
    /// instance from inside `body`. Waiting for a lock another thread holds is a wait
    /// (`WaitHooks`); taking a free one is not.
    @inlinable @inline(__always)
    /// `body` under the lock when it is free now; nil (and nothing run) when another thread holds it.
    public func withLockIfFree<R>(_ body: (inout State) -> R) -> R? {
        guard pthread_mutex_trylock(mutex) == 0 else { return nil }
        defer { pthread_mutex_unlock(mutex) }
        return body(&state.pointee)
    }

    public func withLock<R, E: Error>(_ body: (inout State) throws(E) -> R) throws(E) -> R {
        if pthread_mutex_trylock(mutex) != 0 { lockContended() }
        defer { pthread_mutex_unlock(mutex) }
        return try body(&state.pointee)
    }

    /// Taken by another thread: retry a few thousand times (tens of microseconds: most
    /// holders finish within one round trip to the master), then wait (`WaitHooks`).
    @usableFromInline func lockContended() {
        for _ in 0..<2_000 where pthread_mutex_trylock(mutex) == 0 { return }
        _ = WaitHooks.waiting { pthread_mutex_lock(mutex) }
    }
}

/// What a thread does around a wait that may be long: blocking on the network or on a lock
/// another thread holds. The Python extension sets them once, at import, to release the GIL
/// for a wait of a call that kept it (a short call keeps the GIL: releasing it costs more than
/// the call); on any other thread they do nothing.
public enum WaitHooks {
    public typealias Hook = @convention(c) () -> Void
    /// Set once, before any store exists (so never written while read).
    nonisolated(unsafe) public static var before: Hook? = nil
    nonisolated(unsafe) public static var after: Hook? = nil

    /// Runs `body`, a wait, between the hooks.
    @inlinable @inline(__always)
    public static func waiting<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        guard let before, let after else { return try body() }
        before()
        defer { after() }
        return try body()
    }
}
