import KVSystem

/// Runs `body(i)` for i in 0..<count, each on its own new thread (unlike
/// `DispatchQueue.concurrentPerform`, which uses one thread per core and may run iterations
/// one after another), and waits for all of them.
public func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let threads = (0..<count).map { i in try! BackgroundThread { body(i) } }
    for t in threads { t.join() }
}
