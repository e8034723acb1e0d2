#if canImport(Glibc)
import Glibc
#endif

/// Runs `body(i)` for i in 0..<count, each on its own new thread (unlike
/// `DispatchQueue.concurrentPerform`, which uses one thread per core and may run iterations
/// one after another), and waits for all of them.
public func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    final class Job: @unchecked Sendable {  // handed to exactly one thread
        let index: Int
        let body: @Sendable (Int) -> Void
        init(_ index: Int, _ body: @escaping @Sendable (Int) -> Void) { self.index = index; self.body = body }
    }
    var threads: [pthread_t] = []
    for i in 0..<count {
        var t = pthread_t()
        let job = Unmanaged.passRetained(Job(i, body)).toOpaque()
        let rc = pthread_create(&t, nil, { raw in
            let job = Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue()
            job.body(job.index)
            return nil
        }, job)
        precondition(rc == 0, "pthread_create failed: \(rc)")
        threads.append(t)
    }
    for t in threads { pthread_join(t, nil) }
}
