#if canImport(Glibc)
import Glibc
#endif
import CKVCopy
import KVCore
import KVSystem
import Synchronization

/// What may go to the disk tier when DRAM no longer holds an object.
public enum DiskAdmission: Int32, Sendable {
    /// Only keys seen at least twice (written or looked up again after their first write),
    /// counted in a small count-min sketch that halves itself as it fills: one-shot blocks
    /// never cost an SSD write. The default.
    case reuse = 0
    /// Every object that leaves DRAM.
    case all = 1
}

/// The disk tier's settings: a directory this process owns while the tier is open, and
/// the bytes its object files may take.
public struct DiskTierOptions: Sendable, Equatable {
    public var path: String
    public var capacity: Int
    public var admission: DiskAdmission
    public init(path: String, capacity: Int, admission: DiskAdmission = .reuse) {
        self.path = path
        self.capacity = capacity
        self.admission = admission
    }
}

/// One object on disk: its header's facts, kept in memory so a read needs no header I/O.
struct DiskEntry: Sendable {
    var generation: UInt64
    var size: Int
    /// Unix time in nanoseconds after which the object is gone (0: never).
    var expiresAt: Int64
    var crcs: [UInt32]
    var headerBytes: Int
    var fileBytes: Int { headerBytes + DiskRecord.padded(size) }
    /// Slot in the CLOCK ring, and whether it was used since the hand last passed.
    var slot: Int
    var referenced: Bool
}

/// The on-disk form of one object: a file `objects/<generation as 16 hex digits>`, a
/// header of whole 4 KiB blocks, then the bytes padded to 4 KiB (so direct I/O can read
/// every block). Written under `<name>.tmp` and renamed when complete: a file without the
/// suffix was written whole (a crash mid-write leaves only a `.tmp`, removed at open).
///
/// Header, little endian: magic "KVSDISK1", header bytes (u32), key bytes (u32), object
/// size (u64), generation (u64, also the file's name), expiry (i64 Unix ns, 0: none),
/// chunk size log2 (u32), chunk count (u32), the key, one CRC32C per chunk of the object,
/// then the header's own CRC32C over everything before it.
enum DiskRecord {
    static let magic: [UInt8] = Array("KVSDISK1".utf8)
    static let block = 4096
    static let chunkShift = 20
    static let chunk = 1 << chunkShift
    static let fixed = 48

    static func padded(_ n: Int) -> Int { (n + block - 1) / block * block }
    static func chunks(_ size: Int) -> Int { (size + chunk - 1) >> chunkShift }
    static func headerBytes(keyBytes: Int, size: Int) -> Int { padded(fixed + keyBytes + 4 * chunks(size) + 4) }

    static func name(_ generation: UInt64) -> String {
        let hex = String(generation, radix: 16)
        return String(repeating: "0", count: max(0, 16 - hex.count)) + hex
    }

    static func generation(ofName name: String) -> UInt64? {
        guard name.utf8.count == 16, name.utf8.allSatisfy({ (48...57).contains($0) || (97...102).contains($0) }) else { return nil }
        return UInt64(name, radix: 16)
    }

    /// Writes the header of `key` into `into` (headerBytes(...) bytes, zeroed by the caller).
    static func encode(key: ObjectKey, entry e: DiskEntry, into p: UnsafeMutableRawPointer) {
        magic.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: 8) }
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) { p.storeBytes(of: v.littleEndian, toByteOffset: at, as: T.self) }
        put(UInt32(e.headerBytes), 8)
        put(UInt32(key.count), 12)
        put(UInt64(e.size), 16)
        put(e.generation, 24)
        put(e.expiresAt, 32)
        put(UInt32(chunkShift), 40)
        put(UInt32(e.crcs.count), 44)
        key.withUTF8 { (p + fixed).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        var at = fixed + key.count
        for c in e.crcs { put(c, at); at += 4 }
        put(kv_crc32c_copy(nil, p, at, 0, 0), at)
    }

    /// Reads a header back, checking every field against the file (`fileBytes`) and its name
    /// (`generation`); nil for anything that does not add up.
    static func decode(_ p: UnsafeRawBufferPointer, fileBytes: Int, generation: UInt64) -> (ObjectKey, DiskEntry)? {
        guard p.count >= fixed, memcmp(p.baseAddress!, magic, 8) == 0 else { return nil }
        func get<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T { T(littleEndian: p.loadUnaligned(fromByteOffset: at, as: T.self)) }
        let headerBytes = Int(get(8, UInt32.self)), keyBytes = Int(get(12, UInt32.self))
        let size64 = get(16, UInt64.self), gen = get(24, UInt64.self), expires = get(32, Int64.self)
        let shift = Int(get(40, UInt32.self)), count = Int(get(44, UInt32.self))
        guard keyBytes >= 1, keyBytes <= ObjectKey.maxBytes, size64 >= 1, size64 <= UInt64(Int.max / 2),
            shift == chunkShift, gen == generation
        else { return nil }
        let size = Int(size64)
        guard count == chunks(size), headerBytes == Self.headerBytes(keyBytes: keyBytes, size: size),
            headerBytes <= p.count, fileBytes == headerBytes + padded(size)
        else { return nil }
        let end = fixed + keyBytes + 4 * count
        guard get(end, UInt32.self) == kv_crc32c_copy(nil, p.baseAddress!, end, 0, 0) else { return nil }
        guard let key = try? ObjectKey(utf8: UnsafeRawBufferPointer(rebasing: p[fixed..<(fixed + keyBytes)])) else { return nil }
        let crcs = (0..<count).map { get(fixed + keyBytes + 4 * $0, UInt32.self) }
        return (
            key,
            DiskEntry(
                generation: gen, size: size, expiresAt: expires, crcs: crcs, headerBytes: headerBytes,
                slot: -1, referenced: false)
        )
    }
}

/// Counters of a disk tier (all since it was opened, except objects and bytes).
public struct DiskTierStatistics: Sendable, Equatable {
    public var objects = 0
    public var bytes = 0
    public var capacity = 0
    public var offloads = 0
    public var offloadedBytes = 0
    public var offloadFailures = 0
    public var hits = 0
    public var readBytes = 0
    public var evictions = 0
    public var corrupt = 0
    public var recovered = 0
}

/// The disk tier of one store: objects that DRAM let go, one file each under `path`, read
/// back with their CRC32C checked chunk by chunk (a mismatch is an error and drops the
/// file, never bytes). Own eviction under `capacity` (CLOCK: a second chance for what was
/// read since the hand last passed). One process at a time: an exclusive `flock` on
/// `path/lock`, held while open.
///
/// Thread-safe. The lock guards the index only; file I/O runs outside it. Files are named by
/// a generation never reused, so a reader that opened a file before it was dropped reads
/// the old bytes whole, and one that comes after finds no file: a miss, never another
/// object's bytes.
public final class DiskTier: @unchecked Sendable {
    public let path: String
    public let capacity: Int
    public let admission: DiskAdmission
    private let objects: String
    private var lockFD: Int32
    /// Whether the file system takes kv_o_direct() (tmpfs does not).
    private let direct: Bool

    struct State {
        var index: [ObjectKey: DiskEntry] = [:]
        var ring: [ObjectKey?] = []
        var freeSlots: [Int] = []
        var hand = 0
        var bytes = 0
        var nextGeneration: UInt64 = 1
        /// Keys being offloaded, and whether a write or removal of the key came since
        /// (then the offload's file is dropped when it completes).
        var inFlight: [ObjectKey: Bool] = [:]
        var stats = DiskTierStatistics()
        /// After ENOSPC: the tier takes no more bytes than it holds now until it frees some.
        var fullAt: Int? = nil
        /// Each file's key, by generation (a cluster peer reads a file by its generation).
        var byGeneration: [UInt64: ObjectKey] = [:]
        /// A cluster member's tier: the generations that left the index since the master last
        /// heard (`takeDropped`), at most `maxDropped`.
        var reportDrops = false
        var dropped: [UInt64] = []
        /// Generations dropped after failing a check (the last `maxCorrupt`): a peer asking
        /// for one again learns why it is gone.
        var corrupt: [UInt64] = []
    }
    static let maxCorrupt = 1024
    static let maxDropped = 1 << 20
    private let state = Locked(State())
    private let sketch = Locked(FrequencySketch())

    /// Opens (creating it, mode 0700) the tier at `options.path`: takes the lock, removes
    /// files of writes that never completed, and indexes every complete object (header
    /// checked; a bad header removes the file). Objects past `capacity` are dropped.
    public init(_ options: DiskTierOptions) throws(KVError) {
        guard !options.path.isEmpty else { throw .invalidArgument("the disk tier's directory must not be empty") }
        guard options.capacity >= DiskRecord.block * 2 else {
            throw .invalidArgument("the disk tier's size must be at least \(DiskRecord.block * 2) bytes, got \(options.capacity)")
        }
        path = options.path
        capacity = options.capacity
        admission = options.admission
        objects = options.path + "/objects"
        // Nobody else may plant a file here: it would be served as a cached object.
        try PrivateDirectory.ensure(path, what: "the disk tier directory", forbidden: 0o022)
        try PrivateDirectory.ensure(objects, what: "disk tier directory", forbidden: 0o022)
        let fd = open(path + "/lock", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw SystemCall.failure("opening \(path)/lock", code: .invalidArgument) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            Glibc.close(fd)
            if e == EWOULDBLOCK {
                throw .invalidArgument(
                    "disk_path \(path) is in use by another store (its lock file \(path)/lock is held); each process needs its own disk tier directory")
            }
            errno = e
            throw SystemCall.failure("locking \(path)/lock", code: .invalidArgument)
        }
        lockFD = fd
        direct = Self.takesDirectIO(objects)
        id = Self.identity(options.path + "/id")
        recover()
    }

    /// This directory's id (a random number kept in `<path>/id`): what a cluster's master
    /// knows the disk's files by across restarts of the process.
    public let id: UInt64

    /// The id in file `name`, made (random) when it is missing or unreadable.
    private static func identity(_ name: String) -> UInt64 {
        var buf = [UInt8](repeating: 0, count: 17)
        let fd = open(name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        if fd >= 0 {
            let n = Glibc.read(fd, &buf, 17)
            Glibc.close(fd)
            if n == 16, let v = UInt64(String(decoding: buf[0..<16], as: UTF8.self), radix: 16), v != 0 { return v }
        }
        let v = UInt64.random(in: 1...UInt64.max)
        let text = Array(DiskRecord.name(v).utf8)
        let tmp = name + ".tmp"
        unlink(tmp)
        let w = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        if w >= 0 {
            let ok = Glibc.write(w, text, text.count) == text.count && fsync(w) == 0
            Glibc.close(w)
            if ok { rename(tmp, name) } else { unlink(tmp) }
        }
        return v
    }

    deinit {
        close()
        for p in spares.withLock({ $0 }) { UnsafeMutableRawPointer(bitPattern: p)!.deallocate() }
    }

    /// Releases the lock; the files stay for the next open.
    public func close() {
        state.withLock { _ in
            if lockFD >= 0 { Glibc.close(lockFD); lockFD = -1 }
        }
    }

    // MARK: buffers

    /// The size of the aligned buffers reads and copies go through (a multiple of the chunk).
    public static let bufferBytes = 4 << 20
    /// Spare buffers kept for reuse: a fresh 4 MiB buffer costs a page fault per 4 KiB
    /// (serving a 16 MiB object from new ones took longer than reading it).
    private let spares = Locked<[UInt]>([])
    static let maxSpares = 8

    /// An aligned buffer of `bufferBytes` (a spare one when there is one); hand it back with
    /// `giveBuffer`.
    public func takeBuffer() -> UnsafeMutableRawPointer {
        if let p = spares.withLock({ $0.popLast() }) { return UnsafeMutableRawPointer(bitPattern: p)! }
        return UnsafeMutableRawPointer.allocate(byteCount: Self.bufferBytes, alignment: DiskRecord.block)
    }

    public func giveBuffer(_ p: UnsafeMutableRawPointer) {
        let kept = spares.withLock { b in
            guard b.count < Self.maxSpares else { return false }
            b.append(UInt(bitPattern: p))
            return true
        }
        if !kept { p.deallocate() }
    }

    private static func takesDirectIO(_ dir: String) -> Bool {
        let probe = dir + "/.direct-probe"
        let fd = open(probe, O_RDWR | O_CREAT | kv_o_direct() | O_CLOEXEC, 0o600)
        if fd >= 0 { Glibc.close(fd) }
        unlink(probe)
        return fd >= 0
    }

    private func file(_ generation: UInt64) -> String { objects + "/" + DiskRecord.name(generation) }

    // MARK: recovery

    private func recover() {
        guard let dir = opendir(objects) else { return }
        var found: [(ObjectKey, DiskEntry)] = []
        var maxGeneration: UInt64 = 0
        let headerLimit = 4 << 20
        let header = UnsafeMutableRawPointer.allocate(byteCount: headerLimit, alignment: DiskRecord.block)
        defer { header.deallocate() }
        while let d = readdir(dir) {
            let name = withUnsafeBytes(of: d.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name == "." || name == ".." { continue }
            let full = objects + "/" + name
            if name.hasSuffix(".tmp") { unlink(full); continue }
            guard let gen = DiskRecord.generation(ofName: name) else { continue }
            maxGeneration = max(maxGeneration, gen)
            let fd = open(full, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
            guard fd >= 0 else {
                if errno == ELOOP { unlink(full) } // a symbolic link: never one of ours
                continue
            }
            var st = stat()
            var n = fstat(fd, &st) == 0 && st.st_mode & S_IFMT == S_IFREG ? pread(fd, header, DiskRecord.block, 0) : -1
            if n == DiskRecord.block {
                // A header longer than one block (a long key, a large object): read it whole.
                let want = Int(UInt32(littleEndian: header.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
                if want > DiskRecord.block && want <= headerLimit { n = pread(fd, header, want, 0) }
            }
            Glibc.close(fd)
            guard n > 0,
                let (key, entry) = DiskRecord.decode(
                    UnsafeRawBufferPointer(start: header, count: n),
                    fileBytes: Int(st.st_size), generation: gen)
            else {
                unlink(full)
                continue
            }
            found.append((key, entry))
        }
        closedir(dir)
        // Newest generation wins a key written twice (a crash between writing a new copy and
        // removing the old one); older first, so the clock ring starts with them.
        found.sort { $0.1.generation < $1.1.generation }
        var drop: [UInt64] = []
        state.withLock { s in
            s.nextGeneration = maxGeneration + 1
            let now = Self.wallNow()
            for (key, entry) in found {
                // Expired, or larger than the whole tier (a header that claims too much).
                if (entry.expiresAt != 0 && entry.expiresAt <= now) || entry.fileBytes > capacity { drop.append(entry.generation); continue }
                if let old = s.index[key] { drop.append(old.generation); remove(&s, key) }
                insert(&s, key, entry)
                s.stats.recovered += 1
            }
            drop += evictLocked(&s, toFit: 0)
        }
        for g in drop { unlink(file(g)) }
    }

    // MARK: index

    private func insert(_ s: inout State, _ key: ObjectKey, _ e: DiskEntry) {
        var e = e
        if let slot = s.freeSlots.popLast() { e.slot = slot; s.ring[slot] = key } else { e.slot = s.ring.count; s.ring.append(key) }
        s.index[key] = e
        s.byGeneration[e.generation] = key
        s.bytes += e.fileBytes
        s.stats.objects = s.index.count
        s.stats.bytes = s.bytes
    }

    @discardableResult
    private func remove(_ s: inout State, _ key: ObjectKey) -> DiskEntry? {
        guard let e = s.index.removeValue(forKey: key) else { return nil }
        s.byGeneration[e.generation] = nil
        if s.reportDrops && s.dropped.count < Self.maxDropped { s.dropped.append(e.generation) }
        s.ring[e.slot] = nil
        s.freeSlots.append(e.slot)
        s.bytes -= e.fileBytes
        s.stats.objects = s.index.count
        s.stats.bytes = s.bytes
        return e
    }

    /// Evicts (CLOCK) until `extra` more bytes fit; returns the generations whose files to remove.
    private func evictLocked(_ s: inout State, toFit extra: Int) -> [UInt64] {
        var gone: [UInt64] = []
        let limit = min(capacity, s.fullAt ?? capacity)
        var steps = 0
        while s.bytes + extra > limit && !s.index.isEmpty && steps < 2 * s.ring.count + 2 {
            steps += 1
            if s.hand >= s.ring.count { s.hand = 0 }
            let h = s.hand
            s.hand += 1
            guard let key = s.ring[h], let e = s.index[key] else { continue }
            if e.referenced { s.index[key]!.referenced = false; continue }
            remove(&s, key)
            s.stats.evictions += 1
            gone.append(e.generation)
        }
        return gone
    }

    /// Those of `objects` without a disk copy (one lock for all).
    func withoutCopies(_ objects: [ObjectTable.ColdObject]) -> [ObjectTable.ColdObject] {
        state.withLock { s in objects.filter { s.index[$0.key] == nil } }
    }

    /// Whether `key` has a disk copy.
    public func contains(_ key: ObjectKey) -> Bool { state.withLock { $0.index[key] != nil } }

    /// Size of `key` on disk; nil when absent (or expired).
    public func size(_ key: ObjectKey) -> Int? {
        let now = Self.wallNow()
        return state.withLock { s in
            guard let e = s.index[key], e.expiresAt == 0 || e.expiresAt > now else { return nil }
            return e.size
        }
    }

    /// Drops the disk copy of `key` (a new version was written, or it was removed) and marks
    /// a transfer of it in flight as stale. Returns whether there was a copy.
    @discardableResult
    public func forget(_ key: ObjectKey) -> Bool {
        guard let g = forgetLater(key) else { return false }
        removeFiles([g])
        return true
    }

    /// `forget` without the file removal (for callers holding another lock): returns the
    /// generation to hand to `removeFiles` afterwards, nil when there was no copy.
    public func forgetLater(_ key: ObjectKey) -> UInt64? {
        state.withLock { s in
            if s.inFlight[key] != nil { s.inFlight[key] = true }
            return remove(&s, key)?.generation
        }
    }

    /// Removes the files of `generations` (from `forgetLater`).
    public func removeFiles(_ generations: [UInt64]) {
        for g in generations { Glibc.unlink(file(g)) }
    }

    /// Drops every disk copy; returns how many there were.
    public func forgetAll() -> Int {
        let gone = forgetAllLater()
        removeFiles(gone.map(\.generation))
        return gone.count
    }

    /// `forgetAll` without the file removals (for callers holding another lock): the keys
    /// and generations dropped.
    public func forgetAllLater() -> [(key: ObjectKey, generation: UInt64)] {
        state.withLock { s in
            for k in s.inFlight.keys { s.inFlight[k] = true }
            let g = s.index.map { (key: $0.key, generation: $0.value.generation) }
            s.index.removeAll()
            s.byGeneration.removeAll()
            s.ring.removeAll()
            s.freeSlots.removeAll()
            s.hand = 0
            s.bytes = 0
            s.fullAt = nil
            s.stats.objects = 0
            s.stats.bytes = 0
            return g
        }
    }

    /// The keys on disk, in byte order, after `after` (nil: from the first), at most `limit`.
    public func keys(after: ObjectKey?, limit: Int) -> [ObjectKey] {
        let now = Self.wallNow()
        let all = state.withLock { s in s.index.compactMap { (k, e) in (e.expiresAt == 0 || e.expiresAt > now) ? k : nil } }
        return Array(all.filter { after == nil || after! < $0 }.sorted().prefix(limit))
    }

    public var statistics: DiskTierStatistics {
        state.withLock { s in
            var st = s.stats
            st.capacity = capacity
            return st
        }
    }

    // MARK: a cluster member's tier

    /// Reports every generation that leaves the index from now on (`takeDropped`).
    func reportDrops() { state.withLock { $0.reportDrops = true } }

    /// The generations that left the index since the last call.
    func takeDropped() -> [UInt64] {
        state.withLock { s in
            defer { s.dropped.removeAll() }
            return s.dropped
        }
    }

    /// Drops file `generation` if it is still indexed (the master says its key moved on).
    func forget(generation g: UInt64) {
        let gone: Bool = state.withLock { s in
            guard let k = s.byGeneration[g], s.index[k]?.generation == g else { return false }
            remove(&s, k)
            return true
        }
        if gone { unlink(file(g)) }
    }

    /// Every indexed file (to register with a master), without expired ones.
    func files() -> [DiskFile] {
        let now = Self.wallNow()
        return state.withLock { s in
            s.index.compactMap { (k, e) in
                guard e.expiresAt == 0 || e.expiresAt > now else { return nil }
                return DiskFile(
                    key: k, generation: e.generation, size: e.size, checksum: nil,
                    ttlLeft: e.expiresAt == 0 ? nil : Nanoseconds(e.expiresAt - now))
            }
        }
    }

    /// Reads bytes `offset ..< offset + length` of file `generation` and hands them to `send`
    /// in order, in pieces of at most `bufferBytes`: each piece
    /// read whole chunks at a time (direct I/O where the file system takes it) into one
    /// aligned buffer, checked (CRC32C of every chunk it touches) while copied into another,
    /// then sent. Nothing reaches `send` from a chunk that failed its check. Throws
    /// `objectNotFound` when the file is not (or no longer) indexed, `checksum` for corrupt or
    /// truncated bytes (the file is dropped), `transfer` for an I/O error; an error from
    /// `send` is passed on.
    func serve(
        generation g: UInt64, offset: Int, length: Int,
        send: (UnsafeRawBufferPointer) throws(KVError) -> Void
    ) throws(KVError) {
        let bounceBytes = Self.bufferBytes
        let copy = try self.copy(generation: g)
        guard offset >= 0, length >= 0, offset <= copy.size, length <= copy.size - offset else {
            throw .invalidArgument("range \(offset)+\(length) is outside an object of \(copy.size) bytes")
        }
        let e = copy.entry
        let name = file(g)
        let fd = open(name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | (direct ? kv_o_direct() : 0))
        guard fd >= 0 else {
            if errno == ENOENT { forgetIfSame(copy); throw .notFound("object '\(copy.key)' left the disk tier") }
            throw SystemCall.failure("opening \(name)", code: .transfer)
        }
        defer { Glibc.close(fd) }
        let first = (offset >> DiskRecord.chunkShift) << DiskRecord.chunkShift
        // Whole chunks (each checked as a whole), at most a bounce buffer's worth at a time.
        let span = min(bounceBytes, DiskRecord.chunks(offset + length - first) * DiskRecord.chunk)
        let end = offset + length
        let starts = Array(stride(from: first, to: max(end, first + 1), by: max(span, 1)))
        // Two buffer pairs when there are several pieces: the next piece is read and checked
        // on a helper thread while this one is sent (disk and network overlap).
        let pairs = starts.count > 1 ? 2 : 1
        let raw = (0..<pairs).map { _ in UInt(bitPattern: takeBuffer()) }
        let checked = (0..<pairs).map { _ in UInt(bitPattern: takeBuffer()) }
        defer { for p in raw + checked { giveBuffer(UnsafeMutableRawPointer(bitPattern: p)!) } }
        let size = e.size
        // Reads and checks piece `i` into its pair (the piece's bytes at `checked[i % pairs]`).
        let load: @Sendable (Int) throws(KVError) -> Void = { [self] (i: Int) throws(KVError) in
            let at = starts[i]
            try readPiece(
                fd, copy, name, at, min(span, size - at), UnsafeMutableRawPointer(bitPattern: raw[i % pairs])!,
                UnsafeMutableRawPointer(bitPattern: checked[i % pairs])! - at)
        }
        if e.size > 0 { try load(0) }
        for i in starts.indices where starts[i] < e.size {
            let failure = Locked<KVError?>(nil)
            let ahead: BackgroundThread? =
                i + 1 < starts.count && starts[i + 1] < e.size
                ? try? BackgroundThread {
                    do throws(KVError) { try load(i + 1) } catch { failure.withLock { $0 = error } }
                } : nil
            do throws(KVError) {
                let at = starts[i], n = min(span, e.size - at)
                let lo = max(offset, at), hi = min(end, at + n)
                let piece = UnsafeRawPointer(bitPattern: checked[i % pairs])!
                if hi > lo { try send(UnsafeRawBufferPointer(start: piece + (lo - at), count: hi - lo)) }
            } catch {
                ahead?.join() // its buffers are freed on the way out
                throw error
            }
            ahead?.join()
            if let f = failure.withLock({ $0 }) { throw f }
            if ahead == nil, i + 1 < starts.count, starts[i + 1] < e.size { try load(i + 1) } // no thread to be had
        }
        state.withLock { s in
            s.stats.hits += 1
            s.stats.readBytes += length
        }
    }

    /// The indexed copy stored as file `g` (marked used), else `objectNotFound`, or
    /// `checksum` when it was dropped for failing a check.
    func copy(generation g: UInt64) throws(KVError) -> Copy {
        let now = Self.wallNow()
        let found: Copy? = state.withLock { s in
            guard let k = s.byGeneration[g], let e = s.index[k], e.generation == g else { return nil }
            guard e.expiresAt == 0 || e.expiresAt > now else { return nil }
            s.index[k]!.referenced = true
            return Copy(key: k, size: e.size, entry: e, ttlLeft: nil)
        }
        if let found { return found }
        if state.withLock({ $0.corrupt.contains(g) }) {
            throw KVError(.checksum, "disk copy (file \(g)) failed its CRC32C check and was dropped; nothing returned")
        }
        throw .notFound("the object left the disk tier (file \(g))")
    }

    // MARK: admission

    /// Counts one sighting of `key` (a write or a lookup).
    public func note(_ key: ObjectKey) {
        guard admission == .reuse else { return }
        let h = FrequencySketch.hash(key)
        sketch.withLock { $0.add(h) }
    }

    /// Whether `key` may take disk space now.
    public func admits(_ key: ObjectKey) -> Bool {
        guard admission == .reuse else { return true }
        let h = FrequencySketch.hash(key)
        return sketch.withLock { $0.estimate(h) } >= 2
    }

    // MARK: writing

    /// Starts a copy of `key` between the tiers (an offload or a promotion): from now on a
    /// write or removal of the key marks it stale. False when one is already in flight.
    /// Always ended with `endTransfer`.
    public func beginTransfer(_ key: ObjectKey) -> Bool {
        state.withLock { s in
            guard s.inFlight[key] == nil else { return false }
            s.inFlight[key] = false
            return true
        }
    }

    public func endTransfer(_ key: ObjectKey) { state.withLock { _ = $0.inFlight.removeValue(forKey: key) } }

    /// Whether a write or removal of `key` came since its transfer began.
    public func transferIsStale(_ key: ObjectKey) -> Bool { state.withLock { $0.inFlight[key] ?? true } }

    /// Writes `size` bytes at `source` as the disk copy of `key` (a transfer begun with
    /// `beginTransfer`), through `bounce` (an aligned buffer of `bounceBytes`, a multiple of
    /// the chunk size). `expiresAt`: Unix ns, 0 for none. Throws on an I/O error (ENOSPC,
    /// EROFS, EIO): nothing of the copy remains then. A copy made stale while it was written
    /// is dropped (not an error).
    /// `sourceRead` runs once, as soon as the last byte of `source` has been read (before the
    /// last write to disk) or the offload has failed: the caller may let go of the source then.
    /// Returns the copy's generation (its file's name), nil when it was stale.
    @discardableResult
    public func offload(
        _ key: ObjectKey, from source: UnsafeRawPointer, size: Int, expiresAt: Int64,
        bounce: UnsafeMutableRawPointer, bounceBytes: Int,
        sourceRead: () -> Void = {}
    ) throws(KVError) -> UInt64? {
        var sourceHeld = true
        defer { if sourceHeld { sourceRead() } }
        let headerBytes = DiskRecord.headerBytes(keyBytes: key.count, size: size)
        let fileBytes = headerBytes + DiskRecord.padded(size)
        guard headerBytes <= bounceBytes else {
            throw .invalidArgument("object of \(size) bytes is too large for the disk tier")
        }
        // Reserve the room first (evicting), so the tier never holds more than its capacity.
        let (reserved, gone): (UInt64?, [UInt64]) = state.withLock { s in
            if let full = s.fullAt, s.bytes < full / 2 { s.fullAt = nil } // freed enough: try the disk again
            let limit = min(capacity, s.fullAt ?? capacity)
            guard fileBytes <= limit else { return (nil, []) }
            let gone = evictLocked(&s, toFit: fileBytes)
            guard s.bytes + fileBytes <= limit else { return (nil, gone) }
            let g = s.nextGeneration
            s.nextGeneration += 1
            s.bytes += fileBytes
            return (g, gone)
        }
        for g in gone { unlink(file(g)) }
        guard let gen = reserved else {
            state.withLock { s in s.stats.offloadFailures += 1 }
            throw .noSpace("the disk tier has no room for \(fileBytes) bytes")
        }
        let tmp = file(gen) + ".tmp"
        var crcs: [UInt32] = []
        do throws(KVError) {
            let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (direct ? kv_o_direct() : 0), 0o600)
            guard fd >= 0 else { throw SystemCall.failure("creating \(tmp)", code: .transfer) }
            defer { Glibc.close(fd) }
            var done = 0
            while done < size {
                let n = min(bounceBytes, size - done)
                var at = 0
                while at < n {
                    let c = min(DiskRecord.chunk, n - at)
                    crcs.append(kv_crc32c_copy(bounce + at, source + done + at, c, 0, 0))
                    at += c
                }
                let padded = DiskRecord.padded(n)
                if padded > n { memset(bounce + n, 0, padded - n) }
                if done + n == size {
                    sourceHeld = false
                    sourceRead()
                }
                try Self.writeAll(fd, bounce, padded, at: headerBytes + done, path: tmp)
                done += n
            }
            memset(bounce, 0, headerBytes)
            let entry = DiskEntry(generation: gen, size: size, expiresAt: expiresAt, crcs: crcs, headerBytes: headerBytes, slot: -1, referenced: false)
            DiskRecord.encode(key: key, entry: entry, into: bounce)
            try Self.writeAll(fd, bounce, headerBytes, at: 0, path: tmp)
            try SystemCall.check("renaming \(tmp)", rename(tmp, file(gen)), code: .transfer)
        } catch {
            unlink(tmp)
            state.withLock { s in
                s.bytes -= fileBytes
                s.stats.offloadFailures += 1
                if error.code == .noSpace { s.fullAt = s.bytes } // ENOSPC (`writeAll`)
            }
            throw error
        }
        let (stale, replaced): (Bool, UInt64?) = state.withLock { s in
            s.bytes -= fileBytes
            let stale = s.inFlight[key] ?? true
            guard !stale else { return (true, nil) }
            let old = remove(&s, key)
            insert(
                &s, key,
                DiskEntry(
                    generation: gen, size: size, expiresAt: expiresAt, crcs: crcs, headerBytes: headerBytes,
                    slot: -1, referenced: false))
            s.stats.offloads += 1
            s.stats.offloadedBytes += size
            return (false, old?.generation)
        }
        if stale { unlink(file(gen)) }
        if let replaced { unlink(file(replaced)) }
        return stale ? nil : gen
    }

    private static func writeAll(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int, at offset: Int, path: String) throws(KVError) {
        var done = 0
        while done < n {
            let r = pwrite(fd, p + done, n - done, off_t(offset + done))
            if r < 0 {
                if errno == EINTR { continue }
                throw SystemCall.failure("writing \(path)", code: errno == ENOSPC ? .noSpace : .transfer)
            }
            if r == 0 { throw KVError(.transfer, "writing \(path) made no progress") }
            done += r
        }
    }

    // MARK: reading

    /// A disk copy found by `lookup`: what a read needs, taken under the lock.
    public struct Copy: Sendable {
        public let key: ObjectKey
        public let size: Int
        let entry: DiskEntry
        /// Seconds of TTL left (nil: none); already expired copies are not found.
        public let ttlLeft: Nanoseconds?
    }

    /// The disk copy of `key` (marked used for eviction), or nil.
    public func lookup(_ key: ObjectKey) -> Copy? {
        let now = Self.wallNow()
        var expired: UInt64? = nil
        let found: Copy? = state.withLock { s in
            guard let e = s.index[key] else { return nil }
            if e.expiresAt != 0 && e.expiresAt <= now {
                remove(&s, key)
                expired = e.generation
                return nil
            }
            s.index[key]!.referenced = true
            return Copy(key: key, size: e.size, entry: e, ttlLeft: e.expiresAt == 0 ? nil : Nanoseconds(e.expiresAt - now))
        }
        if let expired { unlink(file(expired)) }
        return found
    }

    /// Reads the whole of `copy` into `destination` (`copy.size` bytes), checking every
    /// chunk's CRC32C. Direct I/O into the aligned buffers `bounces` (`bounceBytes` each, a
    /// multiple of the chunk size), copied on with the check in the same pass; an object of
    /// several buffers' worth is read as that many pieces at once (one thread each), so the
    /// disk sees a deeper queue and the copies overlap the reads. Throws `objectNotFound` when
    /// the file is gone (dropped meanwhile), `checksum` for corrupt or truncated bytes (the
    /// copy is dropped; nothing is returned), `transfer` for an I/O error.
    public func read(
        _ copy: Copy, into destination: UnsafeMutableRawPointer,
        bounces: [UnsafeMutableRawPointer], bounceBytes: Int
    ) throws(KVError) {
        let e = copy.entry
        let name = file(e.generation)
        let fd = open(name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | (direct ? kv_o_direct() : 0))
        guard fd >= 0 else {
            if errno == ENOENT { forgetIfSame(copy); throw .notFound("object '\(copy.key)' left the disk tier") }
            throw SystemCall.failure("opening \(name)", code: .transfer)
        }
        defer { Glibc.close(fd) }
        let pieces = (e.size + bounceBytes - 1) / bounceBytes
        let threads = min(pieces, bounces.count)
        if threads <= 1 {
            for p in 0..<pieces { try readPiece(fd, copy, name, p * bounceBytes, min(bounceBytes, e.size - p * bounceBytes), bounces[0], destination) }
        } else {
            let next = Atomic<Int>(0)
            let failure = Locked<KVError?>(nil)
            let dst = UInt(bitPattern: destination)
            let work: @Sendable (UInt) -> Void = { [self] b in
                while failure.withLock({ $0 == nil }) {
                    let p = next.add(1, ordering: .relaxed).oldValue
                    guard p < pieces else { return }
                    do throws(KVError) {
                        try readPiece(
                            fd, copy, name, p * bounceBytes, min(bounceBytes, e.size - p * bounceBytes),
                            UnsafeMutableRawPointer(bitPattern: b)!, UnsafeMutableRawPointer(bitPattern: dst)!)
                    } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                    }
                }
            }
            let helpers = bounces[1..<threads].compactMap { b in
                let a = UInt(bitPattern: b)
                return try? BackgroundThread { work(a) }
            }
            work(UInt(bitPattern: bounces[0]))
            for h in helpers { h.join() }
            if let f = failure.withLock({ $0 }) { throw f }
        }
        state.withLock { s in
            s.stats.hits += 1
            s.stats.readBytes += e.size
        }
    }

    /// Reads bytes `at ..< at + n` of `copy` (`at` a multiple of the chunk size) through
    /// `bounce` into `destination + at`, checking each chunk.
    private func readPiece(
        _ fd: Int32, _ copy: Copy, _ name: String, _ at: Int, _ n: Int,
        _ bounce: UnsafeMutableRawPointer, _ destination: UnsafeMutableRawPointer
    ) throws(KVError) {
        let e = copy.entry
        let want = DiskRecord.padded(n)
        var got = 0
        while got < want {
            let r = pread(fd, bounce + got, want - got, off_t(e.headerBytes + at + got))
            if r < 0 {
                if errno == EINTR { continue }
                throw SystemCall.failure("reading \(name)", code: .transfer)
            }
            if r == 0 { break }
            got += r
        }
        guard got >= n else {
            forgetIfSame(copy)
            noteCorrupt(e.generation)
            throw KVError(.checksum, "disk copy of '\(copy.key)' is truncated (\(name)); dropped, nothing returned")
        }
        var c0 = 0
        while c0 < n {
            let c = min(DiskRecord.chunk, n - c0)
            let crc = kv_crc32c_copy(destination + at + c0, bounce + c0, c, 0, 0)
            if crc != e.crcs[(at + c0) >> DiskRecord.chunkShift] {
                forgetIfSame(copy)
                noteCorrupt(e.generation)
                throw KVError(.checksum, "disk copy of '\(copy.key)' failed its CRC32C check at byte \(at + c0) (\(name)); dropped, nothing returned")
            }
            c0 += c
        }
    }

    private func noteCorrupt(_ g: UInt64) {
        state.withLock { s in
            s.stats.corrupt += 1
            s.corrupt.append(g)
            if s.corrupt.count > Self.maxCorrupt { s.corrupt.removeFirst() }
        }
    }

    /// Drops the copy read from `copy` if it is still the indexed one.
    private func forgetIfSame(_ copy: Copy) {
        let gone: Bool = state.withLock { s in
            guard s.index[copy.key]?.generation == copy.entry.generation else { return false }
            remove(&s, copy.key)
            return true
        }
        if gone { unlink(file(copy.entry.generation)) }
    }

    /// Unix time now, in nanoseconds.
    static func wallNow() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}
