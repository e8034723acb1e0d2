#if canImport(Glibc)
import Glibc
#endif
import KVCore
import KVSystem

/// The master's command line, defined once: the `kvstore-master` executable and `kvstore
/// master` / `python -m kvstore master` (through the C ABI's `kv_master_main`) both parse
/// their arguments here. Flags take kvstore's names; Mooncake master's spellings are accepted
/// where they mean the same thing. `--flag value` and `--flag=value` both work.
public enum MasterCommandLine {
    /// What the arguments ask for.
    public enum Parsed {
        case run(MasterServer.Options)
        case help(String)
    }

    struct Flag: Sendable {
        let names: [String]
        let value: String // placeholder shown in the help ("" for none)
        let help: String
        let apply: @Sendable (inout Settings, String) throws(KVError) -> Void
    }

    /// Everything the flags set, turned into options at the end (some depend on others).
    struct Settings {
        var options = MasterServer.Options()
        var token = "", tokenFile = ""
        var tenants: [String] = []
        var clientTTL = 10.0, leaseTTL = 5.0, softPinTTL = 1800.0, writeTimeout = 300.0, readWait = 0.05
        var leaseMilliseconds: Int? = nil
        var highWatermark = 0.9, evictionRatio = 0.05
        var etcd = "", cluster = "kvstore", etcdTTL = 2, advertise = ""
    }

    static func int(_ s: String, _ flag: String) throws(KVError) -> Int {
        guard let v = Int(s) else { throw .invalidArgument("\(flag) needs an integer, not '\(s)'") }
        return v
    }

    static func double(_ s: String, _ flag: String) throws(KVError) -> Double {
        guard let v = Double(s), v.isFinite else { throw .invalidArgument("\(flag) needs a number, not '\(s)'") }
        return v
    }

    static let flags: [Flag] = [
        Flag(names: ["--host", "--rpc_address"], value: "ADDRESS", help: "address to listen on (default 127.0.0.1)") { s, v in
            s.options.host = v
        },
        Flag(names: ["--port", "--rpc_port"], value: "PORT", help: "control-plane port; 0: any free port (default 50051)") { s, v throws(KVError) in
            s.options.port = try int(v, "--port")
        },
        Flag(names: ["--metrics-host"], value: "ADDRESS", help: "address of /metrics and /health (default 127.0.0.1)") { s, v in
            s.options.metricsHost = v
        },
        Flag(
            names: ["--metrics-port", "--metrics_port"], value: "PORT",
            help: "port of /metrics and /health; 0: any free port; -1: none (default 9003)"
        ) { s, v throws(KVError) in
            let p = try int(v, "--metrics-port")
            guard p >= -1 else { throw .invalidArgument("--metrics-port must be -1 (none), 0 (any) or a port, not \(p)") }
            s.options.metricsPort = p < 0 ? nil : p
        },
        Flag(
            names: ["--token"], value: "TOKEN",
            help: "token clients must prove (visible to other users in ps: prefer --token-file or $KVSTORE_MASTER_TOKEN; "
                + "default: generated, and written to this user's token file)"
        ) { s, v in s.token = v },
        Flag(names: ["--token-file"], value: "FILE", help: "read the token from this file (mode 600)") { s, v in s.tokenFile = v },
        Flag(names: ["--max-clients"], value: "N", help: "most connections at once (default 0: from the file-descriptor limit)") {
            s, v throws(KVError) in
            let n = try int(v, "--max-clients")
            guard n >= 0 else { throw .invalidArgument("--max-clients must be 0 (from the descriptor limit) or more, not \(n)") }
            s.options.maxClients = n
        },
        Flag(
            names: ["--allow-uid"], value: "UID",
            help: "also accept this user's processes on the local socket (repeatable; default: the master's own user and root)"
        ) {
            s, v throws(KVError) in
            s.options.allowedUIDs += try MasterServer.uids(v)
        },
        Flag(
            names: ["--tenant"], value: "NAME:TOKEN_FILE",
            help: "a tenant: clients proving the token in TOKEN_FILE connect as kvstore://NAME@host:port and see only NAME's keys "
                + "(repeatable)"
        ) { s, v in s.tenants.append(v) },
        Flag(names: ["--client-ttl", "--client_ttl"], value: "SECONDS", help: "silence after which a client is dead (default 10)") {
            s, v throws(KVError) in
            s.clientTTL = try double(v, "--client-ttl")
        },
        Flag(names: ["--lease-ttl"], value: "SECONDS", help: "how long a read leases an object (default 5)") { s, v throws(KVError) in
            s.leaseTTL = try double(v, "--lease-ttl")
        },
        Flag(names: ["--default_kv_lease_ttl"], value: "MS", help: "Mooncake's --lease-ttl, in milliseconds") { s, v throws(KVError) in
            s.leaseMilliseconds = try int(v, "--default_kv_lease_ttl")
        },
        Flag(
            names: ["--eviction-high-watermark", "--eviction_high_watermark_ratio"], value: "RATIO",
            help: "evict above this fraction of capacity (default 0.9)"
        ) { s, v throws(KVError) in
            s.highWatermark = try double(v, "--eviction-high-watermark")
        },
        Flag(
            names: ["--eviction-ratio", "--eviction_ratio"], value: "RATIO",
            help: "fraction of capacity one eviction round frees (default 0.05)"
        ) { s, v throws(KVError) in
            s.evictionRatio = try double(v, "--eviction-ratio")
        },
        Flag(names: ["--soft-pin-ttl"], value: "SECONDS", help: "how long a soft pin lasts when a put does not say (default 1800)") {
            s, v throws(KVError) in
            s.softPinTTL = try double(v, "--soft-pin-ttl")
        },
        Flag(
            names: ["--write-timeout"], value: "SECONDS",
            help: "a write not committed within this time is aborted and its space reused (default 300)"
        ) { s, v throws(KVError) in
            s.writeTimeout = try double(v, "--write-timeout")
        },
        Flag(
            names: ["--read-wait"], value: "SECONDS",
            help: "how long a read of a key with a write in flight waits for its commit (default 0.05; 0: never)"
        ) { s, v throws(KVError) in
            s.readWait = try double(v, "--read-wait")
        },
        Flag(
            names: ["--etcd", "--etcd-endpoints", "--etcd_endpoints"], value: "URLS",
            help: "run as leader or hot standby, elected on etcd at these endpoints (http://host:port, comma-separated; "
                + "clients connect with kvstore+etcd://host:port/CLUSTER)"
        ) { s, v in s.etcd = v },
        Flag(names: ["--cluster", "--cluster_id"], value: "NAME", help: "the cluster whose leader this master stands for (default kvstore)") {
            s, v throws(KVError) in
            try MasterElection.validate(cluster: v)
            s.cluster = v
        },
        Flag(
            names: ["--etcd-ttl"], value: "SECONDS",
            help: "the leader's etcd lease: a dead leader is replaced after about this long (default 2)"
        ) { s, v throws(KVError) in
            s.etcdTTL = try int(v, "--etcd-ttl")
        },
        Flag(names: ["--advertise"], value: "ADDRESS", help: "the address clients dial, published in etcd (default the --host)") { s, v in
            s.advertise = v
        }
    ]

    /// The help text, for `program`.
    public static func usage(_ program: String) -> String {
        var out = "usage: \(program) [options]\n\nRun the kvstore master: object metadata, leases and eviction for a cluster of clients.\n\noptions:\n"
        out += "  -h, --help\n      show this help and exit\n"
        for f in flags {
            out += "  \(f.names.joined(separator: ", ")) \(f.value)\n      \(f.help)\n"
        }
        return out
    }

    /// Parses `arguments` (without the program name). Throws `invalidArgument` naming the bad flag.
    public static func parse(_ arguments: [String], program: String = "kvstore-master") throws(KVError) -> Parsed {
        var s = Settings()
        var i = 0
        while i < arguments.count {
            let arg = arguments[i]
            if arg == "-h" || arg == "--help" { return .help(usage(program)) }
            var name = arg, value: String? = nil
            if let eq = arg.firstIndex(of: "="), arg.hasPrefix("--") {
                name = String(arg[..<eq])
                value = String(arg[arg.index(after: eq)...])
            }
            guard let flag = flags.first(where: { $0.names.contains(name) }) else {
                throw .invalidArgument("unknown argument '\(arg)' (\(program) --help lists the flags)")
            }
            if value == nil {
                guard i + 1 < arguments.count else { throw .invalidArgument("\(name) needs a value (\(flag.value))") }
                i += 1
                value = arguments[i]
            }
            try flag.apply(&s, value!)
            i += 1
        }
        let lease = s.leaseMilliseconds.map { Double($0) / 1000 } ?? s.leaseTTL
        let cache = try CachePolicy(
            leaseSeconds: lease, softPinSeconds: s.softPinTTL, highWatermark: s.highWatermark,
            evictionRatio: s.evictionRatio)
        var options = s.options
        let tenants = options.config.tenants
        options.config = MasterConfig(
            token: try MasterServer.token(given: s.token, file: s.tokenFile),
            clientTTL: try Seconds.nanoseconds(s.clientTTL, name: "client_ttl"), cache: cache)
        options.config.tenants = tenants.merging(try MasterServer.tenants(s.tenants)) { _, new in new }
        options.config.quotas.writeTimeout = try Seconds.nanoseconds(s.writeTimeout, name: "write_timeout")
        guard s.readWait >= 0, s.readWait <= 60 else { throw .invalidArgument("--read-wait must be between 0 and 60 seconds") }
        options.config.readWait = Nanoseconds(s.readWait * 1e9)
        if !s.etcd.isEmpty {
            options.election = MasterElection.Options(endpoints: s.etcd, cluster: s.cluster, ttl: s.etcdTTL, advertise: s.advertise)
        } else if s.cluster != "kvstore" || s.etcdTTL != 2 || !s.advertise.isEmpty {
            throw .invalidArgument("--cluster, --etcd-ttl and --advertise need --etcd")
        }
        try options.validate()
        return .run(options)
    }

    /// Parses, then serves until SIGINT or SIGTERM; returns the process exit status (0, or 2
    /// for bad arguments or a master that cannot start, with the reason on standard error).
    public static func main(_ arguments: [String], program: String) -> Int32 {
        func fail(_ message: String) -> Int32 {
            let text = "\(program): \(message)\n"
            _ = text.withCString { write(2, $0, strlen($0)) }
            return 2
        }
        do throws(KVError) {
            switch try parse(arguments, program: program) {
            case .help(let text):
                _ = text.withCString { write(1, $0, strlen($0)) }
                return 0
            case .run(let options) where options.election != nil:
                return try runElected(options)
            case .run(let options):
                let server = try MasterServer(options: options)
                let previous = server.stopOnSignals()
                defer { MasterServer.restoreSignals(previous) }
                server.run()
                return 0
            }
        } catch {
            return fail(error.message)
        }
    }

    /// A master elected on etcd: a standby until it wins the leader key, then a `MasterServer`
    /// (a fresh table each term: clients re-register their objects, as after a restart) that
    /// serves while the lease is renewed in time. A leader that loses its lease stops serving
    /// and stands by again; SIGINT or SIGTERM resigns (the lease is revoked, so a standby takes
    /// over at once) and returns 0.
    static func runElected(_ base: MasterServer.Options) throws(KVError) -> Int32 {
        let e = base.election!
        let election = try MasterElection(options: e)
        let stop = try WakePipe() // written by SIGINT and SIGTERM
        let address = "\(e.advertise.isEmpty ? base.host : e.advertise):\(base.port)"
        while true {
            let saved = MasterServer.stopOnSignals(writingTo: stop.writeFD)
            let won = election.campaign(address: address, stopFD: stop.readFD)
            MasterServer.restoreSignals(saved)
            guard let term = won else { return 0 }
            var options = base
            options.config.term = UInt64(term)
            let server: MasterServer
            do throws(KVError) {
                server = try MasterServer(options: options)
            } catch {
                MasterServer.logToStandardError("cannot serve as leader: \(error.message); resigning")
                election.resign()
                if stop.wait(millis: 1000) { return 0 }
                continue
            }
            server.fence = { election.deadline }
            let lostBefore = election.lost.load(ordering: .relaxed)
            try election.keepLeading(onLost: { server.stop() })
            let previous = server.stopOnSignals()
            let ended = server.run()
            MasterServer.restoreSignals(previous)
            election.resign()
            // Stopped by a signal (not by a lost lease): done. Otherwise stand by again.
            if ended == .stopped, election.lost.load(ordering: .relaxed) == lostBefore { return 0 }
        }
    }
}
