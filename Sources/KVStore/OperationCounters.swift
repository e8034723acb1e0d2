import Synchronization

/// Operation counters of a store client (relaxed atomics).
final class OperationCounters: Sendable {
    let puts = Atomic<Int>(0)
    /// Lookups that found the object; `hits + misses` is the number of gets.
    let hits = Atomic<Int>(0)
    let misses = Atomic<Int>(0)
    let removes = Atomic<Int>(0)
    /// Reads whose copy ended after the reader's lease deadline: their bytes were thrown
    /// away (the read was retried or failed).
    let readsExpired = Atomic<Int>(0)
    /// Whole-object reads checked against their writer's CRC32C, and copies that differed
    /// from it (each replica tried counts once).
    let checksumsVerified = Atomic<Int>(0)
    let checksumFailures = Atomic<Int>(0)
}
