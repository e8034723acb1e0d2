#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVSystem
import Synchronization

/// Leader election for the masters of one cluster, on etcd (`--etcd`, `--cluster`).
///
/// The leader holds the key `/kvstore/<cluster>/leader`, whose value is the address clients
/// dial ("host:port"), attached to an etcd lease of `ttl` seconds that it renews every third
/// of the TTL. The revision that created the key is the leader's *term*: it is unique and
/// grows with each election, the master puts it in every welcome, and a client that found the
/// leader in etcd refuses a master whose term differs (a stale address).
///
/// Fencing: etcd ends the lease no sooner than `ttl` after the last renewal it received, which
/// is after this master sent it, so this master acts as leader only until
/// `sent + ttl - margin` of its last acknowledged renewal (`deadline`): `MasterServer.run`
/// stops serving by then whenever renewals fail (etcd unreachable, the process frozen), before
/// any standby can win the key. Two masters never both act as leader.
///
/// Standbys poll the key every `pollNanos` and race to create it (an etcd transaction that
/// succeeds only when the key does not exist) as soon as it is gone.
public final class MasterElection: Sendable {
    public struct Options: Sendable, Equatable {
        /// etcd endpoints: "http://h:p,h:p".
        public var endpoints: String
        public var cluster = "kvstore"
        /// Seconds of the leader's lease (etcd may raise it to its minimum).
        public var ttl = 2
        /// The host clients dial ("": the master's --host, which must then not be 0.0.0.0).
        public var advertise = ""

        public init(endpoints: String, cluster: String = "kvstore", ttl: Int = 2, advertise: String = "") {
            self.endpoints = endpoints
            self.cluster = cluster
            self.ttl = ttl
            self.advertise = advertise
        }

        public func validate() throws(KVError) {
            _ = try EtcdClient.parseEndpoints(Substring(endpoints))
            try MasterElection.validate(cluster: cluster)
            guard (1...300).contains(ttl) else { throw .invalidArgument("the etcd lease TTL must be 1 to 300 seconds, not \(ttl)") }
        }
    }

    public let etcd: EtcdClient
    public let options: Options
    public let key: [UInt8]
    /// How often a standby looks at the leader key.
    public let pollNanos: Nanoseconds = 50_000_000
    private let clock: Clock
    private let log: @Sendable (String) -> Void
    /// Until when this master may act as leader (monotonic; 0: it is not the leader).
    private let until = Atomic<UInt64>(0)
    private let held = Locked<(lease: Int64, term: Int64, ttl: Int)>((0, 0, 0))
    private let keeper = Locked<BackgroundThread?>(nil)
    private let wake: WakePipe
    /// Elections this master won, and leaderships it lost (lease lost or not renewed in time).
    public let won = Atomic<Int>(0)
    public let lost = Atomic<Int>(0)

    public static func validate(cluster: String) throws(KVError) { try MasterElectionKey.validate(cluster: cluster) }

    public init(
        options: Options, clock: @escaping Clock = monotonicClock,
        log: @escaping @Sendable (String) -> Void = MasterServer.logToStandardError
    ) throws(KVError) {
        try options.validate()
        self.options = options
        etcd = try EtcdClient(endpoints: options.endpoints, timeout: max(0.2, min(1, Double(options.ttl) / 3)))
        key = MasterElectionKey.leader(cluster: options.cluster)
        self.clock = clock
        self.log = log
        wake = try WakePipe()
    }

    /// The monotonic time until which this master may act as leader (0: it is not).
    public var deadline: Nanoseconds { until.load(ordering: .acquiring) }

    /// The term this master leads (0: none).
    public var term: Int64 { held.withLock { $0.term } }

    /// The TTL etcd granted the current lease.
    public var grantedTTL: Int { held.withLock { $0.ttl } }

    /// Wakes `campaign` (which then returns nil) and the keepalive thread. Thread-safe.
    public func interrupt() { wake.wake() }

    /// Sleeps up to `nanos`; true when `interrupt()` or `stopFD` woke it.
    private func sleep(_ nanos: Nanoseconds, stopFD: Int32 = -1) -> Bool {
        wake.wait(millis: Int32(max(1, nanos / 1_000_000)), or: stopFD)
    }

    /// Until when a lease renewed (or granted) by a request sent at `sent` is surely alive: the
    /// TTL etcd answered, never more than the one it granted (a renewal claiming a longer one
    /// is not believed), less a tenth of it (at least 50 ms).
    static func deadline(sent: Nanoseconds, answered: Int, granted: Int) -> Nanoseconds {
        let ttl = Nanoseconds(max(0, min(answered, granted)))
        let margin = max(50_000_000, ttl * 100_000_000)
        let alive = ttl * 1_000_000_000
        return alive > margin ? sent &+ (alive - margin) : sent
    }

    /// Waits as a standby until this master wins the leader key with `address`; returns the
    /// term. Returns nil when interrupted or when `stopFD` turns readable (a signal). etcd
    /// errors are logged and retried, never fatal: a standby outlives an etcd outage.
    public func campaign(address: String, stopFD: Int32 = -1) -> Int64? {
        var announced = false
        var lastError = ""
        while true {
            do throws(KVError) {
                if let current = try etcd.get(key) {
                    if !announced {
                        let who = String(decoding: current.value.prefix(80), as: UTF8.self)
                        log("standby for cluster '\(options.cluster)': the leader is \(who) (term \(current.createRevision))")
                        announced = true
                    }
                } else {
                    let sent = clock()
                    let (lease, ttl) = try etcd.grant(ttl: options.ttl)
                    let (won, current) = try etcd.create(key, value: Array(address.utf8), lease: lease)
                    if let won {
                        held.withLock { $0 = (lease, won, ttl) }
                        until.store(Self.deadline(sent: sent, answered: ttl, granted: ttl), ordering: .releasing)
                        _ = self.won.add(1, ordering: .relaxed)
                        log("leader of cluster '\(options.cluster)' (term \(won), etcd lease TTL \(ttl) s) at \(address)")
                        return won
                    }
                    try? etcd.revoke(lease) // lost the race: the lease is not needed
                    if let current, !announced {
                        log("standby for cluster '\(options.cluster)': the leader is \(String(decoding: current.value.prefix(80), as: UTF8.self))")
                        announced = true
                    }
                }
                lastError = ""
            } catch {
                if error.message != lastError { log("standby: etcd: \(error.message)") }
                lastError = error.message
            }
            if sleep(pollNanos, stopFD: stopFD) { return nil }
        }
    }

    /// Starts renewing the lease every third of its TTL. `onLost` runs (on the keepalive
    /// thread) when etcd says the lease is gone or the deadline passed without a renewal.
    public func keepLeading(onLost: @escaping @Sendable () -> Void) throws(KVError) {
        let (lease, _, ttl) = held.withLock { $0 }
        let period = Nanoseconds(ttl) * 1_000_000_000 / 3
        let t = try BackgroundThread { [self] in
            var next = clock() &+ period
            while true {
                let now = clock()
                if now < next, sleep(next &- now) { return } // resign
                if clock() >= deadline {
                    end("its etcd lease was not renewed in time")
                    onLost()
                    return
                }
                let sent = clock()
                do throws(KVError) {
                    let left = try etcd.keepAlive(lease)
                    guard left > 0 else {
                        end("etcd no longer has its lease")
                        onLost()
                        return
                    }
                    until.store(Self.deadline(sent: sent, answered: left, granted: ttl), ordering: .releasing)
                    next = sent &+ period
                } catch {
                    log("leader: cannot renew the etcd lease: \(error.message)")
                    next = clock() &+ 100_000_000
                }
            }
        }
        keeper.withLock { $0 = t }
    }

    private func end(_ why: String) {
        until.store(0, ordering: .releasing)
        _ = lost.add(1, ordering: .relaxed)
        log("no longer the leader of cluster '\(options.cluster)' (term \(term)): \(why); serving stops")
    }

    /// Stops leading: ends the keepalive thread and revokes the lease (deleting the leader
    /// key at once, so a standby takes over without waiting for the TTL).
    public func resign() {
        interrupt()
        let t = keeper.withLock { t -> BackgroundThread? in
            defer { t = nil }; return t
        }
        t?.join()
        wake.drain()
        until.store(0, ordering: .releasing)
        let (lease, term, _) = held.withLock { h in
            defer { h = (0, 0, 0) }; return h
        }
        guard lease != 0 else { return }
        do throws(KVError) {
            try etcd.revoke(lease)
            log("resigned as leader of cluster '\(options.cluster)' (term \(term))")
        } catch {
            log("could not revoke the etcd lease (it ends by its TTL): \(error.message)")
        }
    }
}
