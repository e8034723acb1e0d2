#if canImport(Glibc)
import Glibc
#endif

/// When to spin for an answer and when to block. On an idle machine a short spin pays: a
/// blocked waiter costs a scheduler wake-up (tens of microseconds on a VM) and an answer
/// comes within a few. On a busy one it costs dearly: the spinner holds a core the other side
/// (or the engine) needs, and the scheduler ranks it behind tasks that slept.
///
/// The sign of a busy machine is the spinner's own run delay: the time the kernel kept this
/// thread runnable but off every core (`/proc/thread-self/schedstat`, second field), read at
/// most every millisecond while spinning is allowed. A delay of more than a quarter of the
/// time since the last sample means another task took this core: waits block at once for a
/// quiet period, 1 ms after an isolated sign, doubling up to `quiet` while signs come soon
/// after each period (within twice its length and a scheduler slice); then spinning is tried
/// again. Where schedstat cannot be read, the sign
/// is the older one: more runnable tasks than cores in three samples of `/proc/loadavg`.
///
/// Why run delay and not the runnable count: the count cannot tell another process spinning
/// on a core from this client's own Python threads taking turns at the GIL, and it stopped the
/// spinning of both the master and the client whenever a client had 4 threads: 4 threads' 4 KiB
/// gets fell to half of one thread's. The run delay of the spinning thread itself stays under
/// 10% with 4 client threads and passes 40% with one process spinning on a core (measured,
/// 2 cores: `bench --ops cluster`, rows "get 4 threads" and "core busy").
///
/// Not thread-safe: one per waiting loop (a connection's reader, the master's poll loop).
public struct SpinBackoff: Sendable {
    /// Longest spin, in nanoseconds (0: never spin).
    public let spinNanos: Int
    /// The longest quiet period. Each return to spinning costs up to a scheduler slice of
    /// fighting for the core before the sign shows: 20 ms quiet periods kept 4 KiB put/get at
    /// 39%/52% of the idle figures with one process spinning on a core, 100 ms at 46%/69%
    /// (medians of 6, 2 cores); 400 ms gained nothing more.
    public static let quiet = 100_000_000
    private var quietUntil = 0

    public init(spinNanos: Int) {
        self.spinNanos = spinNanos
    }

    private var sampledAt = 0
    /// The run delay read at `sampledAt`, and the thread it was read on (a reader's loop runs
    /// on whichever thread holds its connection: a delta only counts on one thread).
    private var delayAt = 0
    private var sampledOn: pthread_t = 0
    private var crowded = 0
    /// How often the run delay (or the runnable-task count) is read while spinning is allowed.
    static let samplePeriod = 1_000_000
    /// The longest time between two samples whose run delay is judged (longer: this thread
    /// was not spinning meanwhile).
    static let longestInterval = 16_000_000

    /// How long a wait that starts at `now` may spin (0: block at once).
    @inline(__always)
    public mutating func budget(now: Int) -> Int {
        guard spinNanos > 0, now >= quietUntil else { return 0 }
        if now &- sampledAt >= Self.samplePeriod { return sample(now: now) }
        return spinNanos
    }

    private mutating func sample(now: Int) -> Int {
        let interval = now &- sampledAt
        sampledAt = now
        if let delay = Self.runDelay() {
            let me = pthread_self()
            // Preempted while spinning: the interval that holds the lost slice shows it.
            let busy = me == sampledOn && interval <= Self.longestInterval && (delay &- delayAt) &* 4 > interval
            (delayAt, sampledOn) = (delay, me)
            if busy { return noteBusy(now: now) }
        } else {
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
    /// About a scheduler slice.
    static let slice = 4_000_000

    /// A sign of a busy machine at `now`: starts a quiet period; returns 0 (no spin).
    @discardableResult
    mutating func noteBusy(now: Int) -> Int {
        // A sign soon after the last period ended: the machine is busy, back off longer.
        // (A spinner notices only once it lost its core: a scheduler slice, a few ms, after it
        // began spinning again.)
        quietLength = now &- quietUntil < 2 &* quietLength &+ Self.slice ? min(quietLength &* 2, Self.quiet) : Self.minQuiet
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
        return decimalField(3, of: loadavg) ?? 0
    }

    /// This thread's run delay so far, in nanoseconds (the second field of
    /// /proc/thread-self/schedstat); nil when the kernel does not keep it. (Opened per sample,
    /// at most once a millisecond: the file names the thread that opens it.)
    static func runDelay() -> Int? {
        guard schedstatReadable else { return nil }
        let fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        return decimalField(1, of: fd)
    }

    /// The number that starts space-separated field `index` of the first 64 bytes of `fd`
    /// (read from its start; the number ends at the first non-digit); nil when there is none.
    static func decimalField(_ index: Int, of fd: Int32) -> Int? {
        var buf = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        return withUnsafeMutableBytes(of: &buf) { b -> Int? in
            let n = pread(fd, b.baseAddress!, b.count, 0)
            guard n > 0 else { return nil }
            var field = 0, value = 0, digits = 0, i = 0
            while i < n, field <= index {
                let c = b[i]
                if c == 0x20 {
                    field += 1
                } else if field == index {
                    guard c >= 0x30 && c <= 0x39 else { break }
                    value = value &* 10 &+ Int(c - 0x30)
                    digits += 1
                }
                i += 1
            }
            return digits > 0 ? value : nil
        }
    }

    /// Whether this kernel keeps per-thread schedstat (checked once).
    static let schedstatReadable: Bool = access("/proc/thread-self/schedstat", R_OK) == 0

    /// CLOCK_MONOTONIC in nanoseconds.
    @inline(__always)
    public static func now() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return ts.tv_sec &* 1_000_000_000 &+ ts.tv_nsec
    }
}
