import CKVStoreABI
import KVAccelerator
import KVCore
import KVStore
import KVTransfer

// Object operations of the C ABI. Contracts: include/kvstore_abi.h.

@inline(__always)
func writeMode(_ flags: UInt32) -> WriteMode { flags & UInt32(KV_UPSERT) != 0 ? .upsert : .put }

/// Converts and checks a write's options (NULL: none) against the store's defaults.
func writeOptions(_ p: UnsafePointer<kv_put_options>?, _ c: StoreClient) throws(KVError) -> WriteOptions {
    guard let p else { return WriteOptions(checksum: c.checksumByDefault) }
    let o = p.pointee
    let known = UInt32(KV_PIN_HARD | KV_PIN_SOFT | KV_OPT_TTL | KV_OPT_SOFT_PIN_TTL | KV_OPT_REPLICAS | KV_OPT_CHECKSUM | KV_OPT_NO_CHECKSUM)
    guard o.flags & ~known == 0 else {
        throw .invalidArgument("unknown put option flags 0x\(String(o.flags & ~known, radix: 16))")
    }
    let on = o.flags & UInt32(KV_OPT_CHECKSUM) != 0, off = o.flags & UInt32(KV_OPT_NO_CHECKSUM) != 0
    guard !(on && off) else { throw .invalidArgument("KV_OPT_CHECKSUM and KV_OPT_NO_CHECKSUM are exclusive") }
    return try WriteOptions(
        hardPin: o.flags & UInt32(KV_PIN_HARD) != 0, softPin: o.flags & UInt32(KV_PIN_SOFT) != 0,
        softPinSeconds: o.flags & UInt32(KV_OPT_SOFT_PIN_TTL) != 0 ? o.soft_pin_ttl : nil,
        ttlSeconds: o.flags & UInt32(KV_OPT_TTL) != 0 ? o.ttl : nil,
        replicas: o.flags & UInt32(KV_OPT_REPLICAS) != 0 ? Int(o.replicas) : 1,
        checksum: on || (c.checksumByDefault && !off), policy: c.cachePolicy)
}

@c(kv_put)
public func kvPut(
    _ store: OpaquePointer?, _ key: UnsafePointer<CChar>?, _ keyLen: Int,
    _ parts: UnsafePointer<kv_buffer>?, _ nparts: Int, _ flags: UInt32,
    _ options: UnsafePointer<kv_put_options>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let k = try ABI.key(key, keyLen)
        let o = try writeOptions(options, c)
        try ABI.withSources(parts, nparts) { (regions) throws(KVError) in
            try c.put(key: k, parts: regions, mode: writeMode(flags), options: o, memory: memoryHint(flags))
        }
    }
}

@c(kv_read_begin)
public func kvReadBegin(
    _ store: OpaquePointer?, _ key: UnsafePointer<CChar>?, _ keyLen: Int,
    _ flags: UInt32, _ out: UnsafeMutablePointer<kv_read>?
) -> Int32 {
    var busy = false
    let s = ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let k = try ABI.key(key, keyLen)
        guard let out else { throw .invalidArgument("out pointer is NULL") }
        let t: ReadTicket
        if flags & UInt32(KV_READ_NOWAIT) != 0 {
            switch try c.tryBeginRead(key: k) {
            case .found(let x): t = x
            case .notFound: throw .notFound("object '\(k)' not found")
            case .busy: busy = true; return
            }
        } else {
            t = try c.beginRead(key: k)
        }
        out.pointee = readRecord(t)
    }
    return busy ? Int32(KV_BUSY) : s
}

/// The C record of a read hold (`ticket` reads it back).
@inline(__always)
func readRecord(_ t: ReadTicket) -> kv_read {
    kv_read(
        handle: t.handle, segment: UInt64(t.segment), offset: UInt64(t.offset), size: UInt64(t.size), lease_end: t.leaseEnd,
        checksum: t.checksum ?? 0, has_checksum: t.checksum == nil ? 0 : 1)
}

@inline(__always)
func ticket(_ hold: UnsafePointer<kv_read>) -> ReadTicket {
    ReadTicket(
        handle: hold.pointee.handle, segment: SegmentID(truncatingIfNeeded: hold.pointee.segment),
        offset: Int(hold.pointee.offset), size: Int(hold.pointee.size), leaseEnd: hold.pointee.lease_end,
        checksum: hold.pointee.has_checksum != 0 ? hold.pointee.checksum : nil)
}

@c(kv_read_copy)
public func kvReadCopy(
    _ store: OpaquePointer?, _ hold: UnsafePointer<kv_read>?,
    _ dst: UnsafePointer<kv_mut_buffer>?, _ ndst: Int, _ flags: UInt32,
    _ copied: UnsafeMutablePointer<UInt64>?
) -> Int32 {
    var stale = false
    let s = ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        guard let hold else { throw .invalidArgument("read hold is NULL") }
        let t = ticket(hold)
        let n = try ABI.withDestinations(dst, ndst) { (d) throws(KVError) in
            try c.copyOutIfLeased(t, range: 0..<t.size, to: d, memory: memoryHint(flags))
        }
        stale = n == nil
        copied?.pointee = UInt64(n ?? 0)
    }
    return stale ? staleRead(hold!) : s
}

/// KV_STALE, with the reason as the last error.
private func staleRead(_ hold: UnsafePointer<kv_read>) -> Int32 {
    LastError.set(StoreClient.leaseExpired(ticket(hold), tries: 1).message)
    return Int32(KV_STALE)
}

@c(kv_read_copy_range)
public func kvReadCopyRange(
    _ store: OpaquePointer?, _ hold: UnsafePointer<kv_read>?, _ offset: UInt64, _ length: UInt64,
    _ dst: UnsafePointer<kv_mut_buffer>?, _ ndst: Int, _ flags: UInt32,
    _ copied: UnsafeMutablePointer<UInt64>?
) -> Int32 {
    var stale = false
    let s = ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        guard let hold else { throw .invalidArgument("read hold is NULL") }
        guard offset <= UInt64(Int.max), length <= UInt64(Int.max) - offset else {
            throw .invalidArgument("range offset \(offset) length \(length) overflows")
        }
        let range = Int(offset)..<Int(offset + length)
        let n = try ABI.withDestinations(dst, ndst) { (d) throws(KVError) in
            try c.copyOutIfLeased(ticket(hold), range: range, to: d, memory: memoryHint(flags))
        }
        stale = n == nil
        copied?.pointee = UInt64(n ?? 0)
    }
    return stale ? staleRead(hold!) : s
}

@c(kv_read_end)
public func kvReadEnd(_ store: OpaquePointer?, _ hold: UnsafePointer<kv_read>?) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        guard let hold else { throw .invalidArgument("read hold is NULL") }
        try c.endRead(ticket(hold))
    }
}

@c(kv_get_into)
public func kvGetInto(
    _ store: OpaquePointer?, _ key: UnsafePointer<CChar>?, _ keyLen: Int,
    _ dst: UnsafePointer<kv_mut_buffer>?, _ ndst: Int, _ flags: UInt32,
    _ copied: UnsafeMutablePointer<UInt64>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let k = try ABI.key(key, keyLen)
        let n = try ABI.withDestinations(dst, ndst) { (d) throws(KVError) in try c.get(key: k, into: d, memory: memoryHint(flags)) }
        copied?.pointee = UInt64(n)
    }
}

@c(kv_exists)
public func kvExists(
    _ store: OpaquePointer?, _ key: UnsafePointer<CChar>?, _ keyLen: Int,
    _ out: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let k = try ABI.key(key, keyLen)
        out?.pointee = try c.exists(key: k) ? 1 : 0
    }
}

@c(kv_size)
public func kvSize(
    _ store: OpaquePointer?, _ key: UnsafePointer<CChar>?, _ keyLen: Int,
    _ out: UnsafeMutablePointer<UInt64>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let k = try ABI.key(key, keyLen)
        out?.pointee = UInt64(try c.size(key: k))
    }
}

@c(kv_remove)
public func kvRemove(_ store: OpaquePointer?, _ key: UnsafePointer<CChar>?, _ keyLen: Int, _ flags: UInt32) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let k = try ABI.key(key, keyLen)
        try c.remove(key: k, force: flags & UInt32(KV_REMOVE_FORCE) != 0)
    }
}

@c(kv_copy_replicas)
public func kvCopyReplicas(
    _ store: OpaquePointer?, _ key: UnsafePointer<CChar>?, _ keyLen: Int,
    _ targets: UnsafePointer<UInt32>?, _ ntargets: Int, _ drop: UInt32, _ flags: UInt32
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let k = try ABI.key(key, keyLen)
        guard ntargets >= 0, ntargets <= ObjectTable.maxReplicas, ntargets == 0 || targets != nil else {
            throw .invalidArgument("between 1 and \(ObjectTable.maxReplicas) target segments, not \(ntargets)")
        }
        let list = ntargets == 0 ? [] : Array(UnsafeBufferPointer(start: targets, count: ntargets))
        let moving = flags & UInt32(KV_COPY_MOVE) != 0
        try c.copyReplicas(key: k, to: list, dropping: moving ? drop : nil)
    }
}

@c(kv_drain_segment)
public func kvDrainSegment(_ store: OpaquePointer?) -> Int32 {
    ABI.status { () throws(KVError) in try ABI.client(store).drainSegment() }
}

@c(kv_remove_all)
public func kvRemoveAll(_ store: OpaquePointer?, _ flags: UInt32, _ removed: UnsafeMutablePointer<UInt64>?) -> Int32 {
    ABI.status { () throws(KVError) in
        let n = try ABI.client(store).removeAll(force: flags & UInt32(KV_REMOVE_FORCE) != 0)
        removed?.pointee = UInt64(n)
    }
}

@c(kv_register_buffer)
public func kvRegisterBuffer(
    _ store: OpaquePointer?, _ ptr: UnsafeRawPointer?, _ len: Int,
    _ location: UnsafePointer<CChar>?, _ locationLen: Int
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        guard let ptr else { throw .invalidArgument("buffer pointer is NULL") }
        let loc = location.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: locationLen), as: UTF8.self) } ?? "cpu"
        try c.registerBuffer(MemoryRegion(ptr, length: len), location: loc)
    }
}

@c(kv_unregister_buffer)
public func kvUnregisterBuffer(_ store: OpaquePointer?, _ ptr: UnsafeRawPointer?) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        try c.unregisterBuffer(address: UInt(bitPattern: ptr))
    }
}

@c(kv_keys_page)
public func kvKeysPage(
    _ store: OpaquePointer?, _ after: UnsafePointer<CChar>?, _ afterLength: Int,
    _ out: UnsafeMutableRawPointer?, _ cap: Int,
    _ count: UnsafeMutablePointer<Int>?, _ more: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        guard let out, let count, let more else { throw .invalidArgument("out, count and more must not be NULL") }
        guard cap >= ObjectTable.keysPageBytes else {
            throw .invalidArgument("the key buffer holds \(cap) bytes; a page needs \(ObjectTable.keysPageBytes)")
        }
        let start = try after.map { (p) throws(KVError) in try ObjectKey(utf8: UnsafeRawBufferPointer(start: p, count: afterLength)) }
        let page = try c.keysPage(after: start)
        count.pointee = page.keys.count
        more.pointee = page.more ? 1 : 0
        var at = 0
        for k in page.keys {
            k.withUTF8 { b in
                out.storeBytes(of: UInt32(b.count).littleEndian, toByteOffset: at, as: UInt32.self)
                if b.count > 0 { (out + at + 4).copyMemory(from: b.baseAddress!, byteCount: b.count) }
                at += 4 + b.count
            }
        }
    }
}
