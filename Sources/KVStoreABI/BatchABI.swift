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

@c(kv_batch_put)
public func kvBatchPut(_ store: OpaquePointer?, _ items: UnsafePointer<kv_batch_put_item>?, _ n: Int,
                       _ flags: UInt32, _ statuses: UnsafeMutablePointer<Int32>?) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        guard n >= 0, n == 0 || (items != nil && statuses != nil) else { throw .invalidArgument("batch arrays are NULL") }
        var writes: [StoreClient.BatchWrite?] = []
        var regions: [MemoryRegion] = []
        var early = [KVError?](repeating: nil, count: n)
        writes.reserveCapacity(n)
        for i in 0..<n {
            let it = items![i]
            do throws(KVError) {
                let k = try ABI.key(it.key, it.key_len)
                guard it.nparts == 0 || it.parts != nil else { throw .invalidArgument("parts of item \(i) are NULL") }
                let first = regions.count
                for j in 0..<it.nparts {
                    let p = it.parts![j]
                    guard p.ptr != nil || p.len == 0 else { throw .invalidArgument("buffer \(j) is NULL") }
                    regions.append(MemoryRegion(address: UInt(bitPattern: p.ptr), length: p.len))
                }
                writes.append(StoreClient.BatchWrite(key: k, parts: first..<regions.count))
            } catch {
                early[i] = error
                writes.append(nil)
            }
        }
        let planned = writes.compactMap { $0 }
        let results = try regions.withUnsafeBufferPointer { (r) throws(KVError) in
            try c.putBatch(planned, parts: r, mode: writeMode(flags), memory: memoryHint(flags))
        }
        var next = 0
        var all = early
        for i in 0..<n where writes[i] != nil {
            all[i] = results[next]
            next += 1
        }
        for i in 0..<n { statuses![i] = all[i]?.code.rawValue ?? 0 }
        LastError.setBatch(all)
    }
}

@c(kv_batch_get_into)
public func kvBatchGetInto(_ store: OpaquePointer?, _ items: UnsafePointer<kv_batch_get_item>?, _ n: Int,
                           _ flags: UInt32, _ statuses: UnsafeMutablePointer<Int32>?,
                           _ sizes: UnsafeMutablePointer<UInt64>?) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        guard n >= 0, n == 0 || (items != nil && statuses != nil) else { throw .invalidArgument("batch arrays are NULL") }
        var reads: [StoreClient.BatchRead?] = []
        var regions: [MemoryRegion] = []
        var all = [KVError?](repeating: nil, count: n)
        for i in 0..<n {
            let it = items![i]
            do throws(KVError) {
                let k = try ABI.key(it.key, it.key_len)
                guard it.ndst == 0 || it.dst != nil else { throw .invalidArgument("destinations of item \(i) are NULL") }
                let first = regions.count
                for j in 0..<it.ndst {
                    let d = it.dst![j]
                    guard d.ptr != nil || d.len == 0 else { throw .invalidArgument("buffer \(j) is NULL") }
                    regions.append(MemoryRegion(address: UInt(bitPattern: d.ptr), length: d.len))
                }
                reads.append(StoreClient.BatchRead(key: k, destinations: first..<regions.count))
            } catch {
                all[i] = error
                reads.append(nil)
            }
        }
        let planned = reads.compactMap { $0 }
        let results = try regions.withUnsafeBufferPointer { (r) throws(KVError) in
            try c.getBatch(planned, destinations: r, memory: memoryHint(flags))
        }
        var next = 0
        for i in 0..<n where reads[i] != nil {
            switch results[next] {
            case .success(let size): sizes?[i] = UInt64(size)
            case .failure(let e): all[i] = e
            }
            next += 1
        }
        for i in 0..<n { statuses![i] = all[i]?.code.rawValue ?? 0 }
        LastError.setBatch(all)
    }
}

@c(kv_batch_error)
public func kvBatchError(_ index: Int, _ len: UnsafeMutablePointer<Int>?) -> UnsafePointer<CChar> {
    let b = LastError.box
    guard index >= 0, index < b.batch.count else {
        len?.pointee = 0
        return UnsafePointer(LastError.empty)
    }
    len?.pointee = strlen(b.batch[index])
    return UnsafePointer(b.batch[index])
}
