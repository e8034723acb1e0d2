import CKVStoreABI
import KVAccelerator
import KVCore
import KVStore
import KVTransfer

/// Helpers shared by the `@c` functions: handle conversion, key decoding, status mapping.
enum ABI {
    @inline(__always)
    static func client(_ store: OpaquePointer?) throws(KVError) -> StoreClient {
        guard let store else { throw .invalidArgument("store handle is NULL") }
        return Unmanaged<StoreClient>.fromOpaque(UnsafeRawPointer(store)).takeUnretainedValue()
    }

    @inline(__always)
    static func key(_ ptr: UnsafePointer<CChar>?, _ len: Int) throws(KVError) -> ObjectKey {
        guard ptr != nil || len == 0 else { throw .invalidArgument("key pointer is NULL") }
        return try ObjectKey(utf8: UnsafeRawBufferPointer(start: ptr, count: len))
    }

    /// The client of a batch call of `n` items, once its arrays are checked (NULL only when empty).
    @inline(__always)
    static func batchClient(
        _ store: OpaquePointer?, _ n: Int, _ items: UnsafeRawPointer?,
        _ statuses: UnsafeMutablePointer<Int32>?
    ) throws(KVError) -> StoreClient {
        let c = try client(store)
        guard n >= 0, n == 0 || (items != nil && statuses != nil) else { throw .invalidArgument("batch arrays are NULL") }
        return c
    }

    /// Runs `body`; returns KV_OK or the error's code (recording its message).
    @inline(__always)
    static func status(_ body: () throws(KVError) -> Void) -> Int32 {
        do {
            try body()
            return 0
        } catch {
            return LastError.record(error)
        }
    }

    /// Destination counterpart of `withSources`.
    @inline(__always)
    static func withDestinations<R>(
        _ parts: UnsafePointer<kv_mut_buffer>?, _ count: Int,
        _ body: (UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> R
    ) throws(KVError) -> R {
        try withRegions(count, { i in (UInt(bitPattern: parts![i].ptr), parts![i].len) }, body)
    }

    @inline(__always)
    static func withSources<R>(
        _ parts: UnsafePointer<kv_buffer>?, _ count: Int,
        _ body: (UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> R
    ) throws(KVError) -> R {
        try withRegions(count, { i in (UInt(bitPattern: parts![i].ptr), parts![i].len) }, body)
    }

    /// Calls `body` with `count` regions read by `element` (stack storage).
    @inline(__always)
    static func withRegions<R>(
        _ count: Int, _ element: (Int) -> (UInt, Int),
        _ body: (UnsafeBufferPointer<MemoryRegion>) throws(KVError) -> R
    ) throws(KVError) -> R {
        guard count > 0 else { return try body(UnsafeBufferPointer(start: nil, count: 0)) }
        return try withUnsafeTemporaryAllocation(of: MemoryRegion.self, capacity: count) { (buf) throws(KVError) -> R in
            for i in 0..<count {
                let (a, n) = element(i)
                // MemoryRegion is trivial: elements initialised before a throw need no cleanup.
                guard a != 0 || n == 0 else { throw KVError.invalidArgument("buffer \(i) is NULL") }
                buf.initializeElement(at: i, to: MemoryRegion(address: a, length: n))
            }
            return try body(UnsafeBufferPointer(buf))
        }
    }
}
