#if canImport(Glibc)
import Glibc
#endif
import KVCore

/// A first-in first-out queue of work items handed from one thread to a pool of others
/// (pthread mutex and condition variable, so the thread sanitizer sees every hand-off).
///
/// `push` says whether a thread already waiting in `pop` will take the item; when none is,
/// the caller decides whether to start another worker (the pool's size is the caller's).
/// `@unchecked Sendable`: the items and counters are only touched under `mutex`.
public final class WorkQueue<Item>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let ready: UnsafeMutablePointer<pthread_cond_t>
    private var items: [Item] = []
    private var head = 0
    private var waiting = 0
    private var closed = false

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        ready = .allocate(capacity: 1)
        ready.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(ready, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(ready)
        ready.deinitialize(count: 1)
        ready.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deinitialize(count: 1)
        mutex.deallocate()
    }

    /// Items queued and not yet taken.
    public var count: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return items.count - head
    }

    /// Queues `item` (dropped when the queue is closed: false). True when a thread waiting in
    /// `pop` will take it; false when every waiter already has an item to take (or none waits).
    @discardableResult
    public func push(_ item: Item) -> Bool {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        guard !closed else { return false }
        items.append(item)
        pthread_cond_signal(ready)
        return waiting >= items.count - head
    }

    /// The oldest item, waiting up to `timeout` seconds for one; nil on timeout or once the
    /// queue is closed. An item queued before the timeout is taken even if the wait timed out.
    public func pop(timeout: Double) -> Item? {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        var until = timespec()
        clock_gettime(CLOCK_MONOTONIC, &until)
        let nanos = Int(until.tv_nsec) + Int((timeout - timeout.rounded(.down)) * 1e9)
        until.tv_sec += Int(timeout) + nanos / 1_000_000_000
        until.tv_nsec = nanos % 1_000_000_000
        waiting += 1
        while head == items.count && !closed {
            if pthread_cond_timedwait(ready, mutex, &until) == ETIMEDOUT { break }
        }
        waiting -= 1
        guard head < items.count, !closed else { return nil }
        let item = items[head]
        head += 1
        if head == items.count { items.removeAll(keepingCapacity: true); head = 0 }
        return item
    }

    /// Wakes every waiter with nil and refuses new items; returns what was still queued.
    public func close() -> [Item] {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        closed = true
        pthread_cond_broadcast(ready)
        let left = Array(items[head...])
        items.removeAll()
        head = 0
        return left
    }
}
