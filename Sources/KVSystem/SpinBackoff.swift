#if canImport(Glibc)
import Glibc
#endif

/// When to spin for an answer and when to block. On an idle machine a short spin pays: a
/// blocked waiter costs a scheduler wake-up (tens of microseconds on a VM) and an answer
/// comes within a few. On a busy one it costs dearly: the spinner holds a core the other side
/// (or the engine) needs, and the scheduler ranks it behind tasks that slept. The sign of a
/// busy machine: more runnable tasks than cores for three samples in a row (`/proc/loadavg`,
/// read at most every millisecond while spinning is allowed). Then waits block at once for a
/// quiet period: 1 ms after an isolated sign, doubling up to `quiet` while signs come right
/// after each period; then spinning is tried again. (A spin losing its core was tried as a
/// second sign: Python threads waiting for the GIL wake often enough to trip it, and 4 threads
/// of one client fell from 78k to 61k gets/s.) Measured (`bench --ops cluster`, 2 cores): with
/// one other process spinning, 4 KiB put/get went from 16k/24k ops/s to 42-45k/56-57k.
///
/// Not thread-safe: one per waiting loop (a connection's reader, the master's poll loop).
public struct SpinBackoff: Sendable {
    /// Longest spin, in nanoseconds (0: never spin).
    public let spinNanos: Int
    /// The longest quiet period.
    public static let quiet = 20_000_000
    private var quietUntil = 0

    public init(spinNanos: Int) {
        self.spinNanos = spinNanos
    }

    private var sampledAt = 0
    private var crowded = 0
    /// How often the runnable-task count is read while spinning is allowed.
    static let samplePeriod = 1_000_000

    /// How long a wait that starts at `now` may spin (0: block at once).
    @inline(__always)
    public mutating func budget(now: Int) -> Int {
        guard spinNanos > 0, now >= quietUntil else { return 0 }
        if now &- sampledAt >= Self.samplePeriod {
            sampledAt = now
            // Three samples in a row with more runnable tasks than cores: not a passing kernel thread.
            crowded = Self.runnableTasks() > Self.cores ? crowded + 1 : 0
            if crowded >= 3 { return noteBusy(now: now) }
        }
        return spinNanos
    }

    /// The current quiet period: short after an isolated sign (a stray task took the core
    /// once), doubling while signs keep coming right after each period, up to `quiet`.
    private(set) var quietLength = SpinBackoff.minQuiet
    static let minQuiet = 1_000_000

    /// A sign of a busy machine at `now`: starts a quiet period; returns 0 (no spin).
    @discardableResult
    mutating func noteBusy(now: Int) -> Int {
        // A sign soon after the last period ended: the machine is busy, back off longer.
        quietLength = now &- quietUntil < 2 &* quietLength ? min(quietLength &* 2, Self.quiet) : Self.minQuiet
        quietUntil = now &+ quietLength
        return 0
    }

    /// Cores online.
    static let cores: Int = max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))

    static let loadavg: Int32 = open("/proc/loadavg", O_RDONLY | O_CLOEXEC)

    /// Tasks runnable right now on the whole machine, this one included (the fourth field of
    /// /proc/loadavg, "running/total"); 0 when it cannot be read.
    static func runnableTasks() -> Int {
        guard loadavg >= 0 else { return 0 }
        var buf = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        return withUnsafeMutableBytes(of: &buf) { b -> Int in
            let n = pread(loadavg, b.baseAddress!, b.count, 0)
            guard n > 0 else { return 0 }
            var fields = 0, value = 0, i = 0
            while i < n {
                let c = b[i]
                if c == 0x20 {
                    fields += 1
                } else if fields == 3 {
                    guard c >= 0x30 && c <= 0x39 else { return value } // the '/'
                    value = value * 10 + Int(c - 0x30)
                }
                i += 1
            }
            return value
        }
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    @inline(__always)
    public static func now() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return ts.tv_sec &* 1_000_000_000 &+ ts.tv_nsec
    }
}
