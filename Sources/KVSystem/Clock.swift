#if canImport(Glibc)
import Glibc
#endif
import KVCore

/// A source of monotonic time in nanoseconds. The store reads it outside its lock and hands
/// the value to the state machine; tests pass a clock they move by hand.
public typealias Clock = @Sendable () -> Nanoseconds

/// `CLOCK_MONOTONIC` in nanoseconds (a vDSO call, no system call).
public let monotonicClock: Clock = {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Nanoseconds(ts.tv_sec) &* 1_000_000_000 &+ Nanoseconds(ts.tv_nsec)
}
