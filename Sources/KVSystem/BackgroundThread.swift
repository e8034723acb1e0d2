#if canImport(Glibc)
import Glibc
#endif
import KVCore

/// A POSIX thread running one closure; `join()` waits for it to return. Used for the
/// long-lived service threads of a client (heartbeat, segment server and its connections).
public final class BackgroundThread: @unchecked Sendable {
    private var thread = pthread_t()
    private var joined = false

    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    /// Starts `body` on a new thread. Throws `internal` when the system refuses a thread.
    public init(_ body: @escaping @Sendable () -> Void) throws(KVError) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(
            &thread, nil,
            { arg in
                let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
                b.body()
                return nil
            }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw KVError(.internal, "pthread_create failed: error \(rc)")
        }
    }

    /// Waits for the thread to finish. Call once, from another thread.
    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(thread, nil)
    }

    deinit {
        if !joined { pthread_detach(thread) }
    }
}
