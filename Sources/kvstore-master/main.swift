import ArgumentParser
import KVCore
import KVMaster

/// `kvstore-master`: the standalone network master (docs/architecture.md §2). Flags take kvstore's
/// names; Mooncake master's spellings are accepted where they mean the same thing.
@main
struct KVStoreMaster: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvstore-master",
        abstract: "Run the kvstore master: object metadata, leases and eviction for a cluster of clients.")

    @Option(name: [.customLong("host"), .customLong("rpc_address")], help: "Address to listen on.")
    var host = "127.0.0.1"

    @Option(name: [.customLong("port"), .customLong("rpc_port")], help: "Port of the control plane.")
    var port = 50051

    @Option(name: [.customLong("metrics-port"), .customLong("metrics_port")], help: "Port of /metrics and /health (0: none).")
    var metricsPort = 9003

    @Option(name: .customLong("metrics-host"), help: "Address of /metrics and /health.")
    var metricsHost = "127.0.0.1"

    @Option(help: "Token clients must prove (visible in ps: prefer --token-file or $KVSTORE_MASTER_TOKEN; default: generated and written to this user's token file).")
    var token: String?

    @Option(name: .customLong("token-file"), help: "Read the token from this file (mode 600).")
    var tokenFile: String?

    @Option(name: .customLong("max-clients"), help: "Most connections at once (0: from the file-descriptor limit).")
    var maxClients = 0

    @Option(name: .customLong("allow-uid"), help: "Also accept this user's processes on the local socket (repeatable).")
    var allowUID: [UInt32] = []

    @Option(name: .customLong("tenant"), help: "NAME:TOKEN_FILE: clients proving that token see only NAME's keys (repeatable).")
    var tenant: [String] = []

    @Option(name: [.customLong("client-ttl"), .customLong("client_ttl")], help: "Seconds without a heartbeat before a client is dead.")
    var clientTTL = 10.0

    @Option(name: .customLong("lease-ttl"), help: "Seconds a read leases an object.")
    var leaseTTL = 5.0

    @Option(name: .customLong("default_kv_lease_ttl"), help: "Mooncake's spelling of --lease-ttl, in milliseconds.")
    var leaseTTLMilliseconds: Int?

    @Option(name: [.customLong("eviction-high-watermark"), .customLong("eviction_high_watermark_ratio")], help: "Evict above this fraction of capacity.")
    var highWatermark = 0.9

    @Option(name: [.customLong("eviction-ratio"), .customLong("eviction_ratio")], help: "Fraction of capacity one eviction round frees.")
    var evictionRatio = 0.05

    @Option(name: .customLong("soft-pin-ttl"), help: "Seconds a soft pin lasts when a put does not say.")
    var softPinTTL = 1800.0

    func run() throws {
        var o = MasterServer.Options()
        o.host = host
        o.port = port
        o.metricsHost = metricsHost
        o.metricsPort = metricsPort == 0 ? nil : metricsPort
        let lease = leaseTTLMilliseconds.map { Double($0) / 1000 } ?? leaseTTL
        do throws(KVError) {
            let cache = try CachePolicy(leaseSeconds: lease, softPinSeconds: softPinTTL, highWatermark: highWatermark,
                                        evictionRatio: evictionRatio)
            o.config = MasterConfig(token: try MasterServer.token(given: token ?? "", file: tokenFile ?? ""),
                                    clientTTL: try Seconds.nanoseconds(clientTTL, name: "client_ttl"), cache: cache)
            o.maxClients = maxClients
            o.allowedUIDs = allowUID
            o.config.tenants = try MasterServer.tenants(tenant)
            let server = try MasterServer(options: o)
            server.stopOnSignals()
            server.run()
        } catch {
            throw ValidationError(error.message)
        }
    }
}
