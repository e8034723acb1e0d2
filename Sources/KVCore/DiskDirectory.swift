/// The network master's index of object copies on its clients' disk tiers
/// (docs/architecture.md, "Disk tier (cluster)"). Pure logic, no I/O: `MasterLogic` keeps
/// it beside the object table and calls it at every commit and removal.
///
/// Rules:
/// - A client with a disk tier copies objects of its own segment that are next in line for
///   eviction (`offer`, under a read hold) and reports each copy (`report`); only a copy of
///   the version that was offered, reported before any commit or removal of its key, is
///   indexed. A later commit or removal drops the entry (`drop`) and queues the file for its
///   owner to delete (`takeForget`): no older version comes back.
/// - A key is served from DRAM while the table has it; only when DRAM lost it (eviction) is
///   the disk entry the answer: a replica in the owner's *disk segment* (`diskSegment`),
///   whose offset is the owner's file generation. The owner checks every byte (CRC32C) and
///   the file's key and generation before sending any.
/// - Entries belong to a disk (the id its directory keeps), not to a connection: a client
///   that departs leaves its disk's entries indexed but offline (not served; still dropped by
///   commits and removals), so when a process opens that directory again and registers its
///   files (`restore`), only the files still indexed are taken and every other is deleted:
///   a key written or removed while the disk was away never comes back. A disk the master
///   does not know (it restarted, or forgot the disk: `maxOfflineDisks`) has its files taken
///   for keys the table and the index do not hold, except a forgotten disk's, which are all
///   refused.
public struct DiskDirectory: Sendable {
    /// The bit that makes a segment id a disk segment: `Replica(segment: owner | bit,
    /// offset: generation)`. Segment ids are below 2^31 (`MasterLogic.nextSegment`).
    public static let segmentBit: SegmentID = 1 << 31
    public static func isDisk(_ s: SegmentID) -> Bool { s & segmentBit != 0 }
    public static func diskSegment(of s: SegmentID) -> SegmentID { s | segmentBit }
    public static func ownerSegment(of s: SegmentID) -> SegmentID { s & ~segmentBit }

    /// Most entries one disk may hold (each is a file of at least 8 KiB there).
    public static let maxEntriesPerDisk = 1 << 22
    /// Most files one round tells a client to delete (the rest wait for the next round).
    public static let forgetPerRound = 1 << 16
    /// Most offers one client may have unreported.
    public static let maxOffersPerClient = 1024
    /// Disks kept indexed while away; past it the longest away is forgotten.
    public static let maxOfflineDisks = 64
    /// Forgotten disks remembered (their files are refused when they come back).
    public static let maxForgottenDisks = 4096

    public struct Entry: Sendable, Equatable {
        public var disk: UInt64
        public var generation: UInt64
        public var size: Int
        public var checksum: UInt32?
        /// The master's clock; 0: no TTL.
        public var expiresAt: Nanoseconds
    }

    struct Offer {
        var client: UInt64
        var key: ObjectKey
        var size: Int
        var checksum: UInt32?
        var expiresAt: Nanoseconds
    }

    struct Ref: Hashable {
        var disk: UInt64
        var generation: UInt64
    }

    /// A disk with its process connected: the client and the segment it serves with.
    public struct Online: Sendable, Equatable {
        public var client: UInt64
        public var segment: SegmentID
        public var capacity: Int
    }

    private(set) var entries: [ObjectKey: Entry] = [:]
    private var byRef: [Ref: ObjectKey] = [:]
    private var perDisk: [UInt64: Int] = [:]
    /// Offers not yet reported: version → offer; a commit or removal of the key removes it,
    /// so its report is refused.
    private var offered: [VersionHandle: Offer] = [:]
    private var offeredKeys: [ObjectKey: VersionHandle] = [:]
    private var offersOf: [UInt64: Int] = [:]
    /// Generations each disk is to delete, handed over with its client's next round.
    private var forget: [UInt64: [UInt64]] = [:]
    /// Disks by id: connected ones, and those away since (master clock).
    public private(set) var online: [UInt64: Online] = [:]
    private var diskOf: [UInt64: UInt64] = [:] // client → disk
    private var away: [UInt64: Nanoseconds] = [:]
    private var forgotten: Set<UInt64> = []
    private var forgottenOrder: [UInt64] = []
    /// Per client: whether its `restore` takes only indexed files (its disk was known).
    private var strictRestore: [UInt64: Bool] = [:]

    public private(set) var bytes = 0
    public private(set) var hits = 0
    public private(set) var copies = 0
    public private(set) var refusedReports = 0
    public private(set) var restored = 0
    public private(set) var refusedRestores = 0

    public init() {}

    public var count: Int { entries.count }
    /// Whether any client has declared a disk tier (eviction then looks ahead for copies).
    public var anyTier: Bool { !online.isEmpty || !away.isEmpty }
    public var capacity: Int { online.values.reduce(0) { $0 + $1.capacity } }

    public func offers(of client: UInt64) -> Int { offersOf[client, default: 0] }
    public func isOffered(_ key: ObjectKey) -> Bool { offeredKeys[key] != nil }
    public func disk(of client: UInt64) -> UInt64? { diskOf[client] }

    /// `client` serves disk `disk` (of `capacity` bytes) through segment `segment`. A disk
    /// another client declared is taken over when that client's connection is gone
    /// (`holderConnected` false: a restarted process whose old session still waits out its
    /// TTL); refused while it is connected (two processes cannot hold one directory, its
    /// lock: a copied directory, or a lie).
    public mutating func declare(
        client: UInt64, disk d: UInt64, segment: SegmentID, capacity: Int, holderConnected: Bool
    ) throws(KVError) {
        if let o = online[d], o.client != client {
            guard !holderConnected else {
                throw .invalidArgument(
                    "disk \(String(d, radix: 16)) is served by another connected client (a copied disk_path directory?)")
            }
            diskOf[o.client] = nil
            online[d] = nil
            strictRestore[client] = true
        }
        if let old = diskOf[client], old != d { throw .invalidArgument("this client already declared another disk") }
        if online[d] == nil, strictRestore[client] == nil {
            strictRestore[client] = perDisk[d] != nil || away[d] != nil || forgotten.contains(d)
        }
        online[d] = Online(client: client, segment: segment, capacity: capacity)
        away[d] = nil
        diskOf[client] = d
    }

    /// The entry of `key` (nil: none, or it expired, which drops it).
    public mutating func lookup(_ key: ObjectKey, now: Nanoseconds) -> Entry? {
        guard let e = entries[key] else { return nil }
        if e.expiresAt != 0 && e.expiresAt <= now {
            drop(key)
            return nil
        }
        return e
    }

    /// `lookup` of a copy whose disk is connected (what reads, `exists` and listings see).
    public mutating func served(_ key: ObjectKey, now: Nanoseconds) -> Entry? {
        guard let e = lookup(key, now: now), online[e.disk] != nil else { return nil }
        return e
    }

    /// Where to read `key`'s disk copy now: the disk segment of the client serving it (nil:
    /// none, or its disk is away). Counted as a disk hit.
    public mutating func hit(_ key: ObjectKey, now: Nanoseconds) -> (Entry, Replica)? {
        guard let e = lookup(key, now: now), let o = online[e.disk] else { return nil }
        hits += 1
        return (e, Replica(segment: Self.diskSegment(of: o.segment), offset: Int(e.generation)))
    }

    /// A commit or removal of `key`: its disk copy and any offer of it are gone.
    @discardableResult
    public mutating func drop(_ key: ObjectKey) -> Bool {
        if let h = offeredKeys.removeValue(forKey: key), let o = offered.removeValue(forKey: h) { unoffer(o.client) }
        guard let e = entries.removeValue(forKey: key) else { return false }
        unindex(e)
        if online[e.disk] != nil { forget[e.disk, default: []].append(e.generation) } // an away disk's files are refused when it comes back
        return true
    }

    /// Drops every entry whose key starts with `prefix` (nil: all); returns how many of them
    /// had no DRAM copy (`inTable` false).
    public mutating func dropAll(prefix: [UInt8]?, inTable: (ObjectKey) -> Bool) -> Int {
        var keys: [ObjectKey] = []
        for k in entries.keys where prefix.map({ p in k.withUTF8 { $0.starts(with: p) } }) ?? true { keys.append(k) }
        for k in offeredKeys.keys where prefix.map({ p in k.withUTF8 { $0.starts(with: p) } }) ?? true { keys.append(k) }
        var diskOnly = 0
        for k in keys {
            if entries[k] != nil && !inTable(k) { diskOnly += 1 }
            drop(k)
        }
        return diskOnly
    }

    /// `client` is to copy version `handle` of `key` to its disk.
    public mutating func offer(
        _ handle: VersionHandle, key: ObjectKey, client: UInt64, size: Int, checksum: UInt32?, expiresAt: Nanoseconds
    ) {
        if let old = offeredKeys[key], let o = offered.removeValue(forKey: old) { unoffer(o.client) }
        offered[handle] = Offer(client: client, key: key, size: size, checksum: checksum, expiresAt: expiresAt)
        offeredKeys[key] = handle
        offersOf[client, default: 0] += 1
    }

    /// `client`'s report on offer `handle`: stored as file `generation` (`stored`), or not.
    /// Returns the key when the copy was indexed; a stored copy that is refused (its key was
    /// written or removed since, or the disk is over its quota) is queued for deletion.
    public mutating func report(_ handle: VersionHandle, generation: UInt64, stored: Bool, client: UInt64) -> ObjectKey? {
        guard let d = diskOf[client] else { return nil }
        guard let o = offered[handle], o.client == client else {
            if stored {
                refusedReports += 1
                forget[d, default: []].append(generation)
            }
            return nil
        }
        offered[handle] = nil
        offeredKeys[o.key] = nil
        unoffer(client)
        guard stored else { return nil }
        guard perDisk[d, default: 0] < Self.maxEntriesPerDisk, byRef[Ref(disk: d, generation: generation)] == nil else {
            refusedReports += 1
            forget[d, default: []].append(generation)
            return nil
        }
        if entries[o.key] != nil { drop(o.key) }
        index(o.key, Entry(disk: d, generation: generation, size: o.size, checksum: o.checksum, expiresAt: o.expiresAt))
        copies += 1
        return o.key
    }

    /// `client`'s disk dropped file `generation` by itself (its eviction, a failed check).
    public mutating func dropped(client: UInt64, generation: UInt64) {
        guard let d = diskOf[client], let k = byRef[Ref(disk: d, generation: generation)], let e = entries.removeValue(forKey: k) else { return }
        unindex(e)
    }

    /// `client` registers file `generation` of its disk holding `key` (after its restart or
    /// the master's). A known disk: taken only when the index still has that very file. An
    /// unknown one: taken only when neither DRAM (`inTable`) nor the index has the key. A
    /// forgotten one: refused.
    public mutating func restore(
        _ key: ObjectKey, generation: UInt64, size: Int, checksum: UInt32?, expiresAt: Nanoseconds,
        client: UInt64, inTable: Bool
    ) -> Bool {
        guard let d = diskOf[client] else { return false }
        let taken: Bool
        if byRef[Ref(disk: d, generation: generation)] == key && entries[key]?.size == size {
            taken = true // still indexed (a reconnect, a restarted process)
        } else if strictRestore[client] ?? true {
            taken = false
        } else if !inTable, entries[key] == nil, offeredKeys[key] == nil, perDisk[d, default: 0] < Self.maxEntriesPerDisk,
            byRef[Ref(disk: d, generation: generation)] == nil
        {
            index(key, Entry(disk: d, generation: generation, size: size, checksum: checksum, expiresAt: expiresAt))
            taken = true
        } else {
            taken = false
        }
        if taken { restored += 1 } else { refusedRestores += 1 }
        return taken
    }

    /// The generations `client`'s disk is to delete now (at most `forgetPerRound`).
    public mutating func takeForget(_ client: UInt64) -> [UInt64] {
        guard let d = diskOf[client], var all = forget.removeValue(forKey: d) else { return [] }
        if all.count > Self.forgetPerRound {
            forget[d] = Array(all[Self.forgetPerRound...])
            all.removeSubrange(Self.forgetPerRound...)
        }
        return all
    }

    /// `client` left: its disk's entries stay, offline, until it comes back (or is
    /// forgotten: past `maxOfflineDisks` away, the one away longest).
    public mutating func depart(_ client: UInt64, now: Nanoseconds) {
        for (h, o) in offered where o.client == client {
            offered[h] = nil
            offeredKeys[o.key] = nil
        }
        offersOf[client] = nil
        strictRestore[client] = nil
        guard let d = diskOf.removeValue(forKey: client), online[d]?.client == client else { return }
        online[d] = nil
        forget[d] = nil
        away[d] = now
        while away.count > Self.maxOfflineDisks, let oldest = away.min(by: { $0.value < $1.value })?.key {
            forgetDisk(oldest)
        }
    }

    /// Drops every entry of disk `d` and remembers it as forgotten.
    private mutating func forgetDisk(_ d: UInt64) {
        away[d] = nil
        if perDisk[d] != nil {
            for (r, k) in byRef where r.disk == d {
                if let e = entries.removeValue(forKey: k) { unindex(e) }
            }
        }
        if forgotten.insert(d).inserted { forgottenOrder.append(d) }
        if forgottenOrder.count > Self.maxForgottenDisks { forgotten.remove(forgottenOrder.removeFirst()) }
    }

    /// Keys with a copy on a connected disk after `after` (sorted), at most `limit`, inside
    /// `prefix`.
    public func keys(after: ObjectKey?, prefix: [UInt8]?, limit: Int) -> [ObjectKey] {
        var out: [ObjectKey] = []
        for (k, e) in entries
        where online[e.disk] != nil && (after.map { $0 < k } ?? true) && (prefix.map { p in k.withUTF8 { $0.starts(with: p) } } ?? true) {
            out.append(k)
        }
        out.sort()
        return Array(out.prefix(limit))
    }

    private mutating func index(_ key: ObjectKey, _ e: Entry) {
        entries[key] = e
        byRef[Ref(disk: e.disk, generation: e.generation)] = key
        perDisk[e.disk, default: 0] += 1
        bytes += e.size
    }

    private mutating func unindex(_ e: Entry) {
        byRef[Ref(disk: e.disk, generation: e.generation)] = nil
        if perDisk[e.disk, default: 0] <= 1 { perDisk[e.disk] = nil } else { perDisk[e.disk]! -= 1 }
        bytes -= e.size
    }

    private mutating func unoffer(_ client: UInt64) {
        if offersOf[client, default: 0] <= 1 { offersOf[client] = nil } else { offersOf[client]! -= 1 }
    }
}
