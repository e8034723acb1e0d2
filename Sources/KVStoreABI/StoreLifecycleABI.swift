import CKVStoreABI
import KVAccelerator
import KVCore
import KVStore

// Lifecycle, errors and statistics of the C ABI. Contracts: include/kvstore_abi.h.

@c(kv_last_error)
public func kvLastError(_ len: UnsafeMutablePointer<Int>?) -> UnsafePointer<CChar> {
    let b = LastError.box
    len?.pointee = b.count
    return UnsafePointer(b.bytes)
}

@c(kv_max_key_bytes)
public func kvMaxKeyBytes() -> Int { ObjectKey.maxBytes }

extension CachePolicy {
    /// The policy a `kv_store_config` describes, every value checked.
    init(_ c: kv_store_config) throws(KVError) {
        try self.init(
            leaseSeconds: c.lease_ttl, softPinSeconds: c.soft_pin_ttl,
            highWatermark: c.eviction_high_watermark, evictionRatio: c.eviction_ratio)
    }
}

@c(kv_store_config_init)
public func kvStoreConfigInit(_ config: UnsafeMutablePointer<kv_store_config>?) {
    let d = CachePolicy()
    config?.pointee = kv_store_config(
        lease_ttl: Double(d.leaseTTL) / 1e9, soft_pin_ttl: Double(d.softPinTTL) / 1e9,
        eviction_high_watermark: d.highWatermark, eviction_ratio: d.evictionRatio,
        disk_path: nil, disk_size: 0, disk_admission: 0)
}

/// The disk tier a `kv_store_config` asks for (nil: none), every value checked.
private func diskTier(_ c: kv_store_config) throws(KVError) -> DiskTierOptions? {
    guard let p = c.disk_path else { return nil }
    let path = String(cString: p)
    guard c.disk_size <= UInt64(Int.max) else { throw .invalidArgument("a disk tier of \(c.disk_size) bytes is too large") }
    guard let admission = DiskAdmission(rawValue: Int32(bitPattern: c.disk_admission)) else {
        throw .invalidArgument("the disk admission policy must be 0 (reuse) or 1 (all), got \(c.disk_admission)")
    }
    return DiskTierOptions(path: path, capacity: Int(c.disk_size), admission: admission)
}

/// A segment size from the ABI, checked to fit an Int.
private func segmentBytes(_ n: UInt64) throws(KVError) -> Int {
    guard n <= UInt64(Int.max) else { throw .invalidArgument("segment size \(n) is too large") }
    return Int(n)
}

/// The environment's pinning policy, off with KV_CREATE_NO_PIN.
private func pinning(_ flags: UInt32) throws(KVError) -> PinningPolicy {
    var p = try PinningPolicy.fromEnvironment()
    if flags & UInt32(KV_CREATE_NO_PIN) != 0 { p.enabled = false }
    return p
}

@c(kv_set_wait_hooks)
public func kvSetWaitHooks(_ before: (@convention(c) () -> Void)?, _ after: (@convention(c) () -> Void)?) {
    WaitHooks.before = after == nil ? nil : before
    WaitHooks.after = before == nil ? nil : after
}

@c(kv_store_create)
public func kvStoreCreate(
    _ segmentSize: UInt64, _ flags: UInt32, _ config: UnsafePointer<kv_store_config>?,
    _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        guard let out else { throw .invalidArgument("out pointer is NULL") }
        let size = try segmentBytes(segmentSize)
        let cache = try config.map { (c) throws(KVError) in try CachePolicy(c.pointee) } ?? CachePolicy()
        let disk = try config.flatMap { (c) throws(KVError) in try diskTier(c.pointee) }
        let client = try StoreClient(
            segmentSize: size, prefault: flags & UInt32(KV_CREATE_PREFAULT) != 0,
            pinning: try pinning(flags), cache: cache, disk: disk)
        client.checksumDefault.store(flags & UInt32(KV_CREATE_CHECKSUM) != 0, ordering: .relaxed)
        out.pointee = OpaquePointer(Unmanaged.passRetained(client).toOpaque())
    }
}

@c(kv_store_connect)
public func kvStoreConnect(
    _ url: UnsafePointer<CChar>?, _ segmentSize: UInt64, _ flags: UInt32,
    _ token: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    ABI.status { () throws(KVError) in try connect(url, segmentFile: nil, segmentSize, flags, token, out) }
}

@c(kv_store_connect_file)
public func kvStoreConnectFile(
    _ url: UnsafePointer<CChar>?, _ path: UnsafePointer<CChar>?, _ segmentSize: UInt64, _ flags: UInt32,
    _ token: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        guard let path else { throw .invalidArgument("segment file path is NULL") }
        try connect(url, segmentFile: String(cString: path), segmentSize, flags, token, out)
    }
}

@c(kv_store_connect_config)
public func kvStoreConnectConfig(
    _ url: UnsafePointer<CChar>?, _ path: UnsafePointer<CChar>?, _ segmentSize: UInt64, _ flags: UInt32,
    _ token: UnsafePointer<CChar>?, _ config: UnsafePointer<kv_store_config>?, _ out: UnsafeMutablePointer<OpaquePointer?>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let disk = try config.flatMap { (c) throws(KVError) in try diskTier(c.pointee) }
        try connect(url, segmentFile: path.map { String(cString: $0) }, segmentSize, flags, token, out, disk: disk)
    }
}

/// Every connect: a client of the master at `url`, its segment new memory or `segmentFile`
/// (which is never prefaulted or pinned), with the disk tier `disk` below it (nil: none).
private func connect(
    _ url: UnsafePointer<CChar>?, segmentFile: String?, _ segmentSize: UInt64, _ flags: UInt32,
    _ token: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?, disk: DiskTierOptions? = nil
) throws(KVError) {
    guard let out else { throw .invalidArgument("out pointer is NULL") }
    guard let url else { throw .invalidArgument("master url is NULL") }
    let size = try segmentBytes(segmentSize)
    let t = token.map { String(cString: $0) }
    let client = try StoreClient(
        connecting: String(cString: url), segmentSize: size, token: t?.isEmpty == false ? t : nil,
        prefault: segmentFile == nil && flags & UInt32(KV_CREATE_PREFAULT) != 0, pinning: try pinning(flags),
        segmentFile: segmentFile, disk: disk)
    client.checksumDefault.store(flags & UInt32(KV_CREATE_CHECKSUM) != 0, ordering: .relaxed)
    out.pointee = OpaquePointer(Unmanaged.passRetained(client).toOpaque())
}

@c(kv_store_destroy)
public func kvStoreDestroy(_ store: OpaquePointer?) {
    guard let store else { return }
    let u = Unmanaged<StoreClient>.fromOpaque(UnsafeRawPointer(store))
    u.takeUnretainedValue().close()
    u.release()
}

@c(kv_store_close)
public func kvStoreClose(_ store: OpaquePointer?) -> Int32 {
    ABI.status { () throws(KVError) in try ABI.client(store).close() }
}

@c(kv_store_is_closed)
public func kvStoreIsClosed(_ store: OpaquePointer?) -> Int32 {
    guard let c = try? ABI.client(store) else { return 1 }
    return c.isClosed ? 1 : 0
}

@c(kv_stats)
public func kvStats(_ store: OpaquePointer?, _ out: UnsafeMutablePointer<kv_stat>?, _ cap: Int) -> Int {
    guard let c = try? ABI.client(store) else { return 0 }
    let stats = c.statistics()
    guard let out, cap > 0 else { return stats.count }
    for (i, s) in stats.prefix(cap).enumerated() {
        out[i] = kv_stat(name: UnsafeRawPointer(s.name.utf8Start).assumingMemoryBound(to: CChar.self), value: Int64(s.value))
    }
    return stats.count
}
