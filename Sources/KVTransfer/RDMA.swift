#if canImport(Glibc)
import Glibc
#endif
import CKVVerbs
import KVAccelerator
import KVCore
import KVSystem
import Synchronization

/// RDMA between hosts (docs/architecture.md §3): libibverbs loaded at run time (`CKVVerbs`), device
/// discovery, memory registration, reliable-connected queue pairs and one-sided READ/WRITE.
/// Used by `PeerLink` when both sides have an active device; TCP otherwise.
///
/// Environment: `KVSTORE_RDMA=0` turns RDMA off; `KVSTORE_IBVERBS_LIBRARY` names the library
/// file to load (default `libibverbs.so.1`); `KVSTORE_RDMA_DEVICE` picks a device by name
/// (default: the first with an active InfiniBand or RoCE port); `KVSTORE_RDMA_GID_INDEX` the
/// GID (default: chosen, see `kv_rdma_open`: a routable RoCE v2 GID, GID 0 on InfiniBand).
public enum RDMA {
    /// One device as discovery found it.
    public struct Device: Sendable, Equatable {
        public var name: String
        public var port: Int
        public var active: Bool
        /// "infiniband", "ethernet" (RoCE) or "unknown".
        public var linkLayer: String
        public var mtu: Int
    }

    /// What discovery found: whether the library loaded (and if not, why), and the devices.
    public struct Discovery: Sendable {
        public var loaded: Bool
        /// Why RDMA is not in use, or "" when a device is usable.
        public var reason: String
        public var devices: [Device]
        /// The device `PeerLink`s use: the chosen one, if it has an active port whose link
        /// layer carries reliable-connected RDMA (InfiniBand or RoCE; not, for example, EFA).
        public var usable: Device? {
            let wanted = environment("KVSTORE_RDMA_DEVICE")
            return devices.first { $0.active && $0.linkLayer != "unknown" && (wanted == nil || $0.name == wanted) }
        }
    }

    /// Loads `library` (nil: the default or `KVSTORE_IBVERBS_LIBRARY`) and lists devices.
    public static func discover(library: String? = nil) -> Discovery {
        if let v = environment("KVSTORE_RDMA"), ["0", "off", "false", "no"].contains(v.lowercased()) {
            return Discovery(loaded: false, reason: "RDMA is turned off (KVSTORE_RDMA=\(v))", devices: [])
        }
        let path = library ?? environment("KVSTORE_IBVERBS_LIBRARY")
        do throws(KVError) {
            try call(.unsupported) { err, n in (path.map { p in p.withCString { kv_verbs_load($0, err, n) } } ?? kv_verbs_load(nil, err, n)) == 0 ? () : nil }
        } catch {
            return Discovery(loaded: false, reason: error.message, devices: [])
        }
        var raw = [kv_rdma_device](repeating: kv_rdma_device(), count: 32)
        let n: Int32
        do throws(KVError) {
            n = try call(.unsupported) { err, len in
                let n = kv_rdma_devices(&raw, Int32(raw.count), err, len)
                return n >= 0 ? n : nil
            }
        } catch {
            return Discovery(loaded: true, reason: error.message, devices: [])
        }
        let devices = raw.prefix(Int(min(n, 32))).map { d in
            Device(
                name: withUnsafeBytes(of: d.name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) },
                port: Int(d.port), active: d.active != 0,
                linkLayer: d.link_layer == 1 ? "infiniband" : d.link_layer == 2 ? "ethernet" : "unknown", mtu: Int(d.mtu))
        }
        var found = Discovery(loaded: true, reason: "", devices: devices)
        if found.usable == nil {
            let named = environment("KVSTORE_RDMA_DEVICE").map { " named '\($0)'" } ?? ""
            found.reason =
                devices.isEmpty
                ? "no RDMA devices on this machine"
                : devices.contains(where: { $0.active }) && !devices.contains(where: { $0.active && $0.linkLayer != "unknown" })
                    ? "no RDMA device\(named) with an active InfiniBand or RoCE port (the link layer is unspecified: no reliable-connected RDMA)"
                    : "no RDMA device with an active port" + named
        }
        return found
    }

    /// Discovery as of the first use in this process.
    public static let discovery = discover()

    /// The context every `PeerLink` and `SegmentServer` of this process shares (nil: no usable
    /// device, or it failed to open; `openFailure` says why).
    public static let shared: (context: RDMAContext?, openFailure: String) = {
        guard let d = discovery.usable else { return (nil, discovery.reason) }
        do throws(KVError) {
            let gid = environment("KVSTORE_RDMA_GID_INDEX").flatMap { Int32($0) } ?? -1
            return (try RDMAContext(device: d.name, port: d.port, gidIndex: gid), "")
        } catch {
            return (nil, error.message)
        }
    }()

    /// Runs a shim call that fails by returning nil after writing its reason into the
    /// buffer it is given; throws `code` with that reason.
    static func call<R>(_ code: KVError.Code, _ body: (UnsafeMutablePointer<CChar>, Int) -> R?) throws(KVError) -> R {
        var reason = ""
        let r: R? = withUnsafeTemporaryAllocation(of: CChar.self, capacity: 512) { buffer in
            buffer[0] = 0
            let r = body(buffer.baseAddress!, buffer.count)
            if r == nil { reason = String(decoding: UnsafeRawBufferPointer(buffer).prefix { $0 != 0 }, as: UTF8.self) }
            return r
        }
        guard let r else { throw KVError(code, reason) }
        return r
    }

    static func environment(_ name: String) -> String? { Environment.string(name) }
}

/// An open device port with its protection domain. Thread-safe (verbs calls are).
public final class RDMAContext: @unchecked Sendable {
    let raw: OpaquePointer
    public let device: String

    /// What the event watcher shares with the context (not the context itself).
    final class Events: Sendable {
        let up = Atomic<Bool>(true)
        let stop = Atomic<Bool>(false)
    }
    private let events = Events()
    private var watcher: BackgroundThread?

    /// `gidIndex` -1 lets the device choose (see `kv_rdma_open`). A thread reads the device's
    /// asynchronous events (`kv_rdma_next_event`): each is logged, and a port error or a fatal
    /// device error marks the context down (`isUp`) until the port is active again.
    public init(device: String, port: Int, gidIndex: Int32 = -1, log: @escaping @Sendable (String) -> Void = logLine) throws(KVError) {
        raw = try RDMA.call(.unsupported) { err, n in kv_rdma_open(device, Int32(port), gidIndex, err, n) }
        self.device = device
        let context = UInt(bitPattern: raw), events = self.events
        watcher = try? BackgroundThread {
            var type: Int32 = 0, eventPort: Int32 = 0
            var text = [CChar](repeating: 0, count: 256)
            while !events.stop.load(ordering: .acquiring) {
                let r = kv_rdma_next_event(OpaquePointer(bitPattern: context), 200, &type, &eventPort, &text, text.count)
                if r < 0 { return } // this library reports no events
                guard r == 1, eventPort == 0 || Int(eventPort) == port else { continue }
                let name = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                switch type {
                case Int32(KV_RDMA_EVENT_PORT_ERR), Int32(KV_RDMA_EVENT_DEVICE_FATAL):
                    events.up.store(false, ordering: .releasing)
                    log("RDMA device \(device) port \(port): \(name); RDMA is not used until the port is active again (TCP meanwhile)")
                case Int32(KV_RDMA_EVENT_PORT_ACTIVE):
                    events.up.store(true, ordering: .releasing)
                    log("RDMA device \(device) port \(port): \(name); RDMA is used again")
                default:
                    log("RDMA device \(device): \(name)")
                }
            }
        }
    }

    /// Whether the port is usable as far as the device's events tell.
    public var isUp: Bool { events.up.load(ordering: .acquiring) }

    deinit {
        events.stop.store(true, ordering: .releasing)
        watcher?.join()
        kv_rdma_close(raw)
    }

    /// Registers `region` (memory someone else owns) for local access and, with `remote`,
    /// for peers' READ and WRITE.
    public func register(_ region: MemoryRegion, remote: Bool = true) throws(KVError) -> RDMAMemory {
        try RDMAMemory(self, region, remote: remote, owned: false)
    }

    /// Maps `size` bytes (whole pages of their own, so no other data shares a registered
    /// page: fork-safe) and registers them for local access only (a staging buffer); unmapped
    /// with the registration.
    public func allocate(_ size: Int) throws(KVError) -> RDMAMemory {
        let bytes = (max(size, 1) + 4095) & ~4095
        let p = try SystemCall.mmap(length: bytes, protection: PROT_READ | PROT_WRITE, flags: MAP_PRIVATE | MAP_ANONYMOUS)
        do throws(KVError) {
            return try RDMAMemory(self, MemoryRegion(address: UInt(bitPattern: p), length: bytes), remote: false, owned: true)
        } catch {
            munmap(p, bytes)
            throw error
        }
    }
}

/// A registered memory region and its keys: deregistered on deinit, then freed when it was
/// allocated by `RDMAContext.allocate`.
public final class RDMAMemory: @unchecked Sendable {
    public let region: MemoryRegion
    public let lkey: UInt32
    public let rkey: UInt32
    private let mr: UnsafeMutableRawPointer
    private let context: RDMAContext
    private let owned: Bool

    init(_ context: RDMAContext, _ region: MemoryRegion, remote: Bool, owned: Bool) throws(KVError) {
        var l: UInt32 = 0, r: UInt32 = 0
        mr = try RDMA.call(.transfer) { err, n in
            kv_rdma_register(
                context.raw, UnsafeMutableRawPointer(bitPattern: region.address), region.length, remote ? 1 : 0,
                &l, &r, err, n)
        }
        self.context = context
        self.region = region
        self.owned = owned
        lkey = l
        rkey = r
    }

    deinit {
        kv_rdma_deregister(mr)
        if owned { munmap(UnsafeMutableRawPointer(bitPattern: region.address), region.length) }
    }
}

/// A reliable-connected queue pair; one operation at a time.
public final class RDMAQueuePair: @unchecked Sendable {
    private let raw: OpaquePointer
    let context: RDMAContext
    /// What the peer needs to connect to this queue pair.
    public let address: RDMAAddress

    /// `remote`: whether the peer may READ and WRITE through this queue pair (the serving
    /// side's; the initiating side's allows nothing remote).
    public init(_ context: RDMAContext, remote: Bool) throws(KVError) {
        var a = kv_rdma_address()
        raw = try RDMA.call(.transfer) { err, n in kv_rdma_qp_create(context.raw, remote ? 1 : 0, &a, err, n) }
        self.context = context
        address = RDMAAddress(a)
    }

    deinit { kv_rdma_qp_destroy(raw) }

    public func connect(to remote: RDMAAddress) throws(KVError) {
        var r = remote.raw
        try RDMA.call(.transfer) { err, n in kv_rdma_qp_connect(raw, &r, err, n) == 0 ? () : nil }
    }

    /// One-sided READ (remote → `local`) or WRITE (`local` → remote) of `local.length` bytes;
    /// `local` must lie in memory registered with `lkey`.
    public func transfer(
        write: Bool, local: MemoryRegion, lkey: UInt32, remote: UInt64, rkey: UInt32,
        timeoutMilliseconds: Int32 = 30_000
    ) throws(KVError) {
        try RDMA.call(.transfer) { err, n in
            kv_rdma_transfer(
                raw, write ? 1 : 0, UnsafeMutableRawPointer(bitPattern: local.address), lkey, remote, rkey,
                local.length, timeoutMilliseconds, err, n) == 0 ? () : nil
        }
    }
}

/// A queue pair's address as exchanged over TCP (`encode`/`decode` are the wire form).
public struct RDMAAddress: Sendable, Equatable {
    public var qpn: UInt32
    public var psn: UInt32
    public var lid: UInt16
    public var gid: [UInt8]
    public var mtu: Int32
    /// 0 InfiniBand, 1 RoCE v1, 2 RoCE v2.
    public var gidType: UInt8
    /// 1 InfiniBand, 2 Ethernet (RoCE).
    public var linkLayer: UInt8

    init(_ a: kv_rdma_address) {
        qpn = a.qpn
        psn = a.psn
        lid = a.lid
        gid = withUnsafeBytes(of: a.gid) { Array($0) }
        mtu = a.mtu
        gidType = a.gid_type
        linkLayer = a.link_layer
    }

    public init(qpn: UInt32, psn: UInt32, lid: UInt16, gid: [UInt8], mtu: Int32, gidType: UInt8 = 0, linkLayer: UInt8 = 1) {
        self.qpn = qpn
        self.psn = psn
        self.lid = lid
        self.gid = gid
        self.mtu = mtu
        self.gidType = gidType
        self.linkLayer = linkLayer
    }

    var raw: kv_rdma_address {
        var a = kv_rdma_address()
        a.qpn = qpn
        a.psn = psn
        a.lid = lid
        withUnsafeMutableBytes(of: &a.gid) { b in for (i, v) in gid.prefix(16).enumerated() { b[i] = v } }
        a.mtu = mtu
        a.gid_type = gidType
        a.link_layer = linkLayer
        return a
    }

    public func encode(into w: inout WireWriter) {
        w.u32(qpn); w.u32(psn); w.u16(lid)
        for i in 0..<16 { w.u8(i < gid.count ? gid[i] : 0) }
        w.u32(UInt32(bitPattern: mtu))
        w.u8(gidType); w.u8(linkLayer)
    }

    public static func decode(_ r: inout WireReader) throws(KVError) -> RDMAAddress {
        let qpn = try r.u32(), psn = try r.u32(), lid = try r.u16()
        var gid: [UInt8] = []
        for _ in 0..<16 { gid.append(try r.u8()) }
        let mtu = Int32(bitPattern: try r.u32())
        guard (1...5).contains(mtu) else { throw .invalidArgument("bad RDMA MTU \(mtu)") }
        let gidType = try r.u8(), linkLayer = try r.u8()
        guard gidType <= 2, (1...2).contains(linkLayer) else { throw .invalidArgument("bad RDMA GID type \(gidType) or link layer \(linkLayer)") }
        return RDMAAddress(qpn: qpn, psn: psn, lid: lid, gid: gid, mtu: mtu, gidType: gidType, linkLayer: linkLayer)
    }
}
