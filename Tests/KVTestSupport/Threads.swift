#if canImport(Glibc)
import Glibc
#endif

/// A pthread running one closure (no Foundation): `start()`, then `join()`.
public final class TestThread: @unchecked Sendable { // `t` is touched by start and join only, on the creating thread
    private var t = pthread_t()
    private let body: @Sendable () -> Void

    public init(_ body: @escaping @Sendable () -> Void) { self.body = body }

    public func start() {
        let me = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(
            &t, nil,
            { raw in
                let me = Unmanaged<TestThread>.fromOpaque(raw!).takeRetainedValue()
                me.body()
                return nil
            }, me)
        precondition(rc == 0, "pthread_create failed: \(rc)")
    }

    public func join() { pthread_join(t, nil) }
}

/// Runs `body(i)` for i in 0..<count, each on its own new thread (unlike
/// `DispatchQueue.concurrentPerform`, which uses one thread per core and may run iterations
/// one after another), and waits for all of them.
public func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let threads = (0..<count).map { i in TestThread { body(i) } }
    for t in threads { t.start() }
    for t in threads { t.join() }
}
