#if canImport(Glibc)
import Glibc
#endif
import CKVStoreABI
import KVAccelerator
import KVCore
import KVStore

// Batch calls of the C ABI: every object's copies are planned first and run grouped per
// device. Contracts: include/kvstore_abi.h.

@inline(__always)
func memoryHint(_ flags: UInt32) -> StoreClient.MemoryHint { flags & UInt32(KV_HOST_MEMORY) != 0 ? .host : .locate }

/// The items of a batch call, converted: for each item whose key and buffer array are valid,
/// its position and its `BatchItem` (key and range of its buffers in `regions`); for the
/// others, their error.
struct BatchInput {
    var positions: [Int] = []
    var items: [StoreClient.BatchItem] = []
    var regions: [MemoryRegion] = []
    var errors: [KVError?]

    /// `item(i)` gives item i's key and buffer array; kv_buffer and kv_mut_buffer share one
    /// layout, so both arrays are read as kv_buffer.
    init(count n: Int, item: (Int) -> (key: UnsafePointer<CChar>?, keyLen: Int, buffers: UnsafePointer<kv_buffer>?, count: Int)) {
        errors = [KVError?](repeating: nil, count: n)
        positions.reserveCapacity(n)
        items.reserveCapacity(n)
        regions.reserveCapacity(n)
        for i in 0..<n {
            let it = item(i)
            do throws(KVError) {
                let k = try ABI.key(it.key, it.keyLen)
                guard it.count == 0 || it.buffers != nil else { throw .invalidArgument("buffers of item \(i) are NULL") }
                for j in 0..<it.count {
                    guard it.buffers![j].ptr != nil || it.buffers![j].len == 0 else { throw .invalidArgument("buffer \(j) is NULL") }
                }
                let first = regions.count
                for j in 0..<it.count {
                    regions.append(MemoryRegion(address: UInt(bitPattern: it.buffers![j].ptr), length: it.buffers![j].len))
                }
                positions.append(i)
                items.append(StoreClient.BatchItem(key: k, regions: first..<regions.count))
            } catch {
                errors[i] = error
            }
        }
    }

    /// Records the outcome of converted object `j` (nil: success), then writes every item's
    /// status (statuses is NULL only for an empty batch) and keeps the messages for
    /// kv_batch_error.
    mutating func finish(_ outcome: [KVError?], statuses: UnsafeMutablePointer<Int32>?) {
        for (j, e) in outcome.enumerated() { errors[positions[j]] = e }
        for (i, e) in errors.enumerated() { statuses?[i] = e?.code.rawValue ?? 0 }
        LastError.setBatch(errors)
    }
}

@c(kv_batch_put)
public func kvBatchPut(
    _ store: OpaquePointer?, _ items: UnsafePointer<kv_batch_put_item>?, _ n: Int,
    _ flags: UInt32, _ options: UnsafePointer<kv_put_options>?,
    _ statuses: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, items, statuses)
        let o = try writeOptions(options, c)
        var input = BatchInput(count: n) { i in (items![i].key, items![i].key_len, items![i].parts, items![i].nparts) }
        let results = try input.regions.withUnsafeBufferPointer { (r) throws(KVError) in
            try c.putBatch(input.items, parts: r, mode: writeMode(flags), options: o, memory: memoryHint(flags))
        }
        input.finish(results, statuses: statuses)
    }
}

@c(kv_batch_get_into)
public func kvBatchGetInto(
    _ store: OpaquePointer?, _ items: UnsafePointer<kv_batch_get_item>?, _ n: Int,
    _ flags: UInt32, _ statuses: UnsafeMutablePointer<Int32>?,
    _ sizes: UnsafeMutablePointer<UInt64>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, items, statuses)
        var input = BatchInput(count: n) { i in
            (items![i].key, items![i].key_len, UnsafeRawPointer(items![i].dst)?.assumingMemoryBound(to: kv_buffer.self), items![i].ndst)
        }
        let results = try input.regions.withUnsafeBufferPointer { (r) throws(KVError) in
            try c.getBatch(input.items, destinations: r, memory: memoryHint(flags))
        }
        var outcome = [KVError?](repeating: nil, count: results.count)
        for (j, r) in results.enumerated() {
            switch r {
            case .success(let size): sizes?[input.positions[j]] = UInt64(size)
            case .failure(let e): outcome[j] = e
            }
        }
        input.finish(outcome, statuses: statuses)
    }
}

/// The keys of a key batch, converted: the valid ones, their positions, and every item's error.
struct KeyBatch {
    var keys: [ObjectKey] = []
    var positions: [Int] = []
    var errors: [KVError?]

    init(_ raw: UnsafePointer<kv_key>?, _ n: Int) {
        errors = [KVError?](repeating: nil, count: n)
        keys.reserveCapacity(n)
        positions.reserveCapacity(n)
        for i in 0..<n {
            do throws(KVError) {
                keys.append(try ABI.key(raw![i].ptr, raw![i].len))
                positions.append(i)
            } catch {
                errors[i] = error
            }
        }
    }

    /// Records converted key `j`'s outcome.
    mutating func set(_ j: Int, _ e: KVError?) { errors[positions[j]] = e }

    /// Writes every item's status and keeps the messages for kv_batch_error.
    func finish(_ statuses: UnsafeMutablePointer<Int32>?) {
        for (i, e) in errors.enumerated() { statuses?[i] = e?.code.rawValue ?? 0 }
        LastError.setBatch(errors)
    }
}

/// A missing key of `kv_batch_size` (one shared value: 10,000 missing keys build no message each;
/// the index in the batch names the key).
private let missingObject = KVError.notFound("object not found")

@c(kv_batch_size)
public func kvBatchSize(
    _ store: OpaquePointer?, _ keys: UnsafePointer<kv_key>?, _ n: Int,
    _ statuses: UnsafeMutablePointer<Int32>?, _ sizes: UnsafeMutablePointer<UInt64>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, keys, statuses)
        guard n == 0 || sizes != nil else { throw .invalidArgument("batch arrays are NULL") }
        var batch = KeyBatch(keys, n)
        for (j, r) in try c.sizes(keys: batch.keys).enumerated() {
            if let size = r { sizes![batch.positions[j]] = UInt64(size) } else { batch.set(j, missingObject) }
        }
        batch.finish(statuses)
    }
}

@c(kv_batch_remove)
public func kvBatchRemove(
    _ store: OpaquePointer?, _ keys: UnsafePointer<kv_key>?, _ n: Int, _ flags: UInt32,
    _ statuses: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, keys, statuses)
        var batch = KeyBatch(keys, n)
        for (j, e) in try c.remove(keys: batch.keys, force: flags & UInt32(KV_REMOVE_FORCE) != 0).enumerated() { batch.set(j, e) }
        batch.finish(statuses)
    }
}

@c(kv_batch_read_begin)
public func kvBatchReadBegin(
    _ store: OpaquePointer?, _ keys: UnsafePointer<kv_key>?, _ n: Int,
    _ holds: UnsafeMutablePointer<kv_read>?, _ statuses: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, keys, statuses)
        guard n == 0 || holds != nil else { throw .invalidArgument("batch arrays are NULL") }
        var batch = KeyBatch(keys, n)
        for (j, r) in try c.beginReads(keys: batch.keys).enumerated() {
            switch r {
            case .success(let t):
                holds![batch.positions[j]] = readRecord(t)
            case .failure(let e): batch.set(j, e)
            }
        }
        batch.finish(statuses)
    }
}

@c(kv_batch_error)
public func kvBatchError(_ index: Int, _ len: UnsafeMutablePointer<Int>?) -> UnsafePointer<CChar> {
    let b = LastError.box
    guard index >= 0, index < b.batch.count, let message = b.batch[index] else {
        len?.pointee = 0
        return UnsafePointer(LastError.empty)
    }
    len?.pointee = strlen(message)
    return UnsafePointer(message)
}

/// The items of a ranged call (reads or writes), converted: each item's pieces in `copies`
/// (its range in `pieces`), its position, and one error slot per range, every item's ranges in
/// order. An item whose key (or id) or ranges are malformed fails with all its ranges.
struct RangeBatch {
    var pieces: [Range<Int>] = []
    var copies: [StoreClient.Piece] = []
    var positions: [Int] = []
    var errors: [KVError?] = []
    private var first: [Int] = []

    /// Adds item `i` of `count` ranges; `accept` converts the rest of the item (its key) and
    /// runs once its ranges are valid. Throws only when the range list is NULL.
    mutating func add(
        _ i: Int, _ ranges: UnsafePointer<kv_range>?, _ count: Int,
        _ accept: () throws(KVError) -> Void
    ) throws(KVError) {
        guard count == 0 || ranges != nil else { throw .invalidArgument("ranges of item \(i) are NULL") }
        first.append(errors.count)
        errors.append(contentsOf: repeatElement(nil, count: count))
        let start = copies.count
        do throws(KVError) {
            for j in 0..<count {
                let r = ranges![j]
                guard r.offset <= UInt64(Int.max), r.length <= UInt64(Int.max) - r.offset else {
                    throw .invalidArgument("range \(j) of item \(i): offset \(r.offset) length \(r.length) overflows")
                }
                guard r.mem != nil || r.length == 0 else { throw .invalidArgument("range \(j) of item \(i) has NULL memory") }
                copies.append(
                    StoreClient.Piece(
                        offset: Int(r.offset), length: Int(r.length),
                        memory: MemoryRegion(address: UInt(bitPattern: r.mem), length: Int(r.length))))
            }
            try accept()
            pieces.append(start..<copies.count)
            positions.append(i)
        } catch {
            copies.removeSubrange(start...)
            for j in 0..<count { errors[first[i] + j] = error }
        }
    }

    /// Records the outcome per piece of the converted items, then writes every range's status
    /// and keeps the messages for kv_batch_error.
    mutating func finish(_ outcome: [KVError?], statuses: UnsafeMutablePointer<Int32>?) {
        for (j, p) in pieces.enumerated() {
            let base = first[positions[j]]
            for (k, c) in p.enumerated() { errors[base + k] = outcome[c] }
        }
        for (i, e) in errors.enumerated() { statuses![i] = e?.code.rawValue ?? 0 }
        LastError.setBatch(errors)
    }
}

@c(kv_batch_read_ranges)
public func kvBatchReadRanges(
    _ store: OpaquePointer?, _ items: UnsafePointer<kv_range_item>?, _ n: Int, _ flags: UInt32,
    _ statuses: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, items, statuses)
        var batch = RangeBatch()
        var keys: [ObjectKey] = []
        for i in 0..<n {
            try batch.add(i, items![i].ranges, items![i].nranges) { () throws(KVError) in
                keys.append(try ABI.key(items![i].key, items![i].key_len))
            }
        }
        let outcome = try batch.copies.withUnsafeBufferPointer { (cp) throws(KVError) in
            try c.readRanges(keys: keys, pieces: batch.pieces, copies: cp, memory: memoryHint(flags))
        }
        batch.finish(outcome, statuses: statuses)
    }
}

@c(kv_batch_replicas)
public func kvBatchReplicas(
    _ store: OpaquePointer?, _ keys: UnsafePointer<kv_key>?, _ n: Int,
    _ statuses: UnsafeMutablePointer<Int32>?, _ counts: UnsafeMutablePointer<UInt32>?,
    _ out: UnsafeMutablePointer<kv_replica>?, _ cap: Int
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, keys, statuses)
        guard n == 0 || counts != nil, cap >= 0, cap == 0 || out != nil else { throw .invalidArgument("batch arrays are NULL") }
        var batch = KeyBatch(keys, n)
        let found = try c.placements(keys: batch.keys)
        let total = found.reduce(0) { sum, r in sum + ((try? r.get())?.replicas.count ?? 0) }
        guard total <= cap else { throw .invalidArgument("\(total) replicas do not fit in \(cap)") }
        for i in 0..<n { counts![i] = 0 }
        var next = 0
        for (j, r) in found.enumerated() {
            switch r {
            case .success(let p):
                counts![batch.positions[j]] = UInt32(p.replicas.count)
                for replica in p.replicas {
                    out![next] = kv_replica(segment: UInt64(replica.segment), offset: UInt64(replica.offset), size: UInt64(p.size))
                    next += 1
                }
            case .failure(let e): batch.set(j, e)
            }
        }
        batch.finish(statuses)
    }
}

@c(kv_batch_write_begin)
public func kvBatchWriteBegin(
    _ store: OpaquePointer?, _ items: UnsafePointer<kv_write_item>?, _ n: Int, _ flags: UInt32,
    _ options: UnsafePointer<kv_put_options>?, _ ids: UnsafeMutablePointer<UInt64>?,
    _ statuses: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, items, statuses)
        guard n == 0 || ids != nil else { throw .invalidArgument("batch arrays are NULL") }
        let o = try writeOptions(options, c)
        var errors = [KVError?](repeating: nil, count: n)
        var keys: [ObjectKey] = [], sizes: [Int] = [], positions: [Int] = []
        for i in 0..<n {
            do throws(KVError) {
                let k = try ABI.key(items![i].key, items![i].key_len)
                guard items![i].size <= UInt64(Int.max) else { throw .invalidArgument("size \(items![i].size) is too large") }
                keys.append(k)
                sizes.append(Int(items![i].size))
                positions.append(i)
            } catch {
                errors[i] = error
            }
            ids![i] = 0
        }
        for (j, r) in try c.beginWrites(keys: keys, sizes: sizes, mode: writeMode(flags), options: o).enumerated() {
            switch r {
            case .success(let id): ids![positions[j]] = id
            case .failure(let e): errors[positions[j]] = e
            }
        }
        for (i, e) in errors.enumerated() { statuses![i] = e?.code.rawValue ?? 0 }
        LastError.setBatch(errors)
    }
}

@c(kv_batch_write_ranges)
public func kvBatchWriteRanges(
    _ store: OpaquePointer?, _ items: UnsafePointer<kv_write_ranges_item>?, _ n: Int,
    _ flags: UInt32, _ statuses: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, items, statuses)
        var batch = RangeBatch()
        var ids: [UInt64] = []
        for i in 0..<n {
            try batch.add(i, items![i].ranges, items![i].nranges) { ids.append(items![i].id) }
        }
        let outcome = try batch.copies.withUnsafeBufferPointer { (cp) throws(KVError) in
            try c.writeRanges(ids: ids, pieces: batch.pieces, copies: cp, memory: memoryHint(flags))
        }
        batch.finish(outcome, statuses: statuses)
    }
}

@c(kv_batch_write_end)
public func kvBatchWriteEnd(
    _ store: OpaquePointer?, _ ids: UnsafePointer<UInt64>?, _ n: Int, _ flags: UInt32,
    _ statuses: UnsafeMutablePointer<Int32>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.batchClient(store, n, ids, statuses)
        let errors = try c.endWrites(ids: (0..<n).map { ids![$0] }, abort: flags & UInt32(KV_WRITE_ABORT) != 0)
        for (i, e) in errors.enumerated() { statuses![i] = e?.code.rawValue ?? 0 }
        LastError.setBatch(errors)
    }
}
