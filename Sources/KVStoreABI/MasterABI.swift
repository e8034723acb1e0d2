#if canImport(Glibc)
import Glibc
#endif
import CKVStoreABI
import KVCore
import KVMaster

// The network master in the C ABI. Contract: include/kvstore_abi.h.

@c(kv_master_run)
public func kvMasterRun(_ options: UnsafePointer<kv_master_options>?) -> Int32 {
    ABI.status { () throws(KVError) in
        guard let o = options?.pointee else { throw .invalidArgument("options are NULL") }
        var opts = MasterServer.Options()
        opts.host = o.host.map { String(cString: $0) } ?? "127.0.0.1"
        opts.port = Int(o.port)
        opts.metricsHost = o.metrics_host.map { String(cString: $0) } ?? "127.0.0.1"
        opts.metricsPort = o.metrics_port < 0 ? nil : Int(o.metrics_port)
        let token = o.token.map { String(cString: $0) } ?? ""
        let tokenFile = o.token_file.map { String(cString: $0) } ?? ""
        let cache = try CachePolicy(o.cache)
        opts.config = MasterConfig(token: try MasterServer.token(given: token, file: tokenFile),
                                   clientTTL: try Seconds.nanoseconds(o.client_ttl, name: "client_ttl"), cache: cache)
        guard o.max_clients >= 0 else { throw .invalidArgument("max_clients must be 0 (from the descriptor limit) or more") }
        opts.maxClients = Int(o.max_clients)
        opts.allowedUIDs = try MasterServer.uids(o.allow_uids.map { String(cString: $0) } ?? "")
        opts.config.tenants = try MasterServer.tenants(o.tenants.map { String(cString: $0) }.map { [$0] } ?? [])
        let server = try MasterServer(options: opts)
        let previous = server.stopOnSignals()
        defer { MasterServer.restoreSignals(previous) }
        server.run()
    }
}
