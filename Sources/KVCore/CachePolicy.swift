/// Nanoseconds on a monotonic clock. The state machine never reads a clock: every operation
/// that depends on time is handed `now`, so tests drive time by hand.
public typealias Nanoseconds = UInt64

/// Durations given in seconds by users, converted and checked in one place.
public enum Seconds {
    /// The longest duration accepted anywhere (leases, pins, TTLs): 365 days. Anything longer
    /// is almost certainly a unit mistake (milliseconds passed as seconds).
    public static let maximum: Double = 365 * 24 * 3600
    public static let maximumNanoseconds = Nanoseconds(maximum * 1e9)

    /// `seconds` as nanoseconds. Throws `invalidArgument` naming `name` for NaN, infinity, a
    /// negative value, zero when `allowZero` is false, or more than `maximum`.
    public static func nanoseconds(_ seconds: Double, name: String, allowZero: Bool = false) throws(KVError) -> Nanoseconds {
        guard seconds.isFinite else { throw .invalidArgument("\(name) must be a finite number of seconds, got \(seconds)") }
        guard seconds >= 0 else { throw .invalidArgument("\(name) must not be negative, got \(seconds) s") }
        guard seconds > 0 || allowZero else { throw .invalidArgument("\(name) must be greater than 0 s") }
        guard seconds <= maximum else {
            throw .invalidArgument("\(name) of \(seconds) s is longer than the maximum of \(Int(maximum)) s (365 days)")
        }
        return Nanoseconds((seconds * 1e9).rounded())
    }
}

/// The cache rules of one store (or, later, one master): how long reads lease objects, when
/// and how much to evict. Checked by `validate()`; the defaults match Mooncake's master.
public struct CachePolicy: Sendable, Equatable {
    /// How long a read (`get`, `get_into`, `exists`, `size`) protects the object from eviction
    /// and removal. 0: reads grant no lease (an object is still protected while it is copied).
    public var leaseTTL: Nanoseconds = 5_000_000_000
    /// How long a soft pin lasts when the put does not say.
    public var softPinTTL: Nanoseconds = 1_800_000_000_000
    /// Eviction starts when a write would take usage above this fraction of capacity.
    public var highWatermark = 0.9
    /// Fraction of capacity one eviction round frees (at least what the write needs).
    public var evictionRatio = 0.05
    /// Whether an upsert of the same size may rewrite an unleased, unread object in place.
    /// The network master turns this off: remote readers copy without a hold, so bytes must
    /// never change under a version they may have been told about.
    public var inPlaceUpserts = true

    public init() {}

    public init(leaseTTL: Nanoseconds, softPinTTL: Nanoseconds, highWatermark: Double, evictionRatio: Double) {
        self.leaseTTL = leaseTTL
        self.softPinTTL = softPinTTL
        self.highWatermark = highWatermark
        self.evictionRatio = evictionRatio
    }

    /// Builds a policy from user values in seconds and fractions; every value is checked.
    public init(leaseSeconds: Double, softPinSeconds: Double, highWatermark: Double, evictionRatio: Double) throws(KVError) {
        leaseTTL = try Seconds.nanoseconds(leaseSeconds, name: "the lease TTL", allowZero: true)
        softPinTTL = try Seconds.nanoseconds(softPinSeconds, name: "the soft-pin TTL")
        self.highWatermark = highWatermark
        self.evictionRatio = evictionRatio
        try validate()
    }

    public func validate() throws(KVError) {
        guard highWatermark.isFinite, highWatermark > 0, highWatermark <= 1 else {
            throw .invalidArgument("the eviction high watermark must be a fraction in (0, 1], got \(highWatermark)")
        }
        guard evictionRatio.isFinite, evictionRatio > 0, evictionRatio <= 1 else {
            throw .invalidArgument("the eviction ratio must be a fraction in (0, 1], got \(evictionRatio)")
        }
        guard leaseTTL <= Seconds.maximumNanoseconds, softPinTTL > 0, softPinTTL <= Seconds.maximumNanoseconds else {
            throw .invalidArgument("lease and soft-pin durations must be at most 365 days (soft pin: more than 0)")
        }
    }
}

/// Per-write cache options.
public struct WriteOptions: Sendable, Equatable {
    /// Never evicted (still removable). Counted in `hardPinnedBytes`.
    public var hardPin = false
    /// Evicted only after every ordinary object, for this long after the write commits
    /// (then ordinary). nil: not soft-pinned.
    public var softPinTTL: Nanoseconds? = nil
    /// The object expires (disappears as if removed) this long after the write commits.
    public var ttl: Nanoseconds? = nil
    /// Copies to place, each in a distinct segment (best effort: fewer when fewer segments
    /// exist). 1...`ObjectTable.maxReplicas`.
    public var replicas = 1
    /// The writer stores a CRC32C of the bytes, computed in the same pass as its copy, and
    /// every whole-object read checks its copy against it. The writer's business: it does not
    /// travel with `putStart` (the CRC travels with the commit).
    public var checksum = false

    public init(
        hardPin: Bool = false, softPinTTL: Nanoseconds? = nil, ttl: Nanoseconds? = nil, replicas: Int = 1,
        checksum: Bool = false
    ) {
        self.hardPin = hardPin
        self.softPinTTL = softPinTTL
        self.ttl = ttl
        self.replicas = replicas
        self.checksum = checksum
    }

    public static let `default` = WriteOptions()

    /// Builds options from user values: `softPinSeconds`/`ttlSeconds` nil when not given;
    /// a soft pin without its own TTL lasts `policy.softPinTTL`.
    public init(
        hardPin: Bool, softPin: Bool, softPinSeconds: Double?, ttlSeconds: Double?, replicas: Int = 1,
        checksum: Bool = false, policy: CachePolicy
    ) throws(KVError) {
        if softPinSeconds != nil && !softPin { throw .invalidArgument("a soft-pin TTL is given for a write that is not soft-pinned") }
        self.hardPin = hardPin
        self.replicas = replicas
        self.checksum = checksum
        if softPin {
            softPinTTL = try softPinSeconds.map { s throws(KVError) in try Seconds.nanoseconds(s, name: "the soft-pin TTL") } ?? policy.softPinTTL
        }
        if let ttlSeconds { ttl = try Seconds.nanoseconds(ttlSeconds, name: "the object TTL") }
        try validate()
    }

    /// Checks options that arrive already in nanoseconds (from the wire): the pins are
    /// exclusive and each duration is more than 0 and at most 365 days.
    public func validate() throws(KVError) {
        if hardPin && softPinTTL != nil { throw .invalidArgument("a write is hard-pinned or soft-pinned, not both: choose one") }
        for (name, v) in [("the soft-pin TTL", softPinTTL), ("the object TTL", ttl)] {
            if let v, v == 0 || v > Seconds.maximumNanoseconds {
                throw .invalidArgument("\(name) must be greater than 0 and at most 365 days")
            }
        }
        guard (1...ObjectTable.maxReplicas).contains(replicas) else {
            throw .invalidArgument("the replica count must be between 1 and \(ObjectTable.maxReplicas), got \(replicas)")
        }
    }
}
