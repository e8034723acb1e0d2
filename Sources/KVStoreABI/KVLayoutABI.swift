import CKVStoreABI
import KVCore
import KVStore
import KVTransfer

// KV layouts and block moves (kvstore_abi.h, "KV layouts and block transfer").

extension ABI {
    /// A node id: UTF-8 of 1...256 bytes without NUL.
    static func node(_ ptr: UnsafePointer<CChar>?, _ len: Int) throws(KVError) -> String {
        guard let ptr, len > 0, len <= 256 else { throw .invalidArgument("a node id must be 1 to 256 bytes") }
        let bytes = UnsafeRawBufferPointer(start: ptr, count: len)
        guard !bytes.contains(0), let s = String(validating: bytes, as: UTF8.self) else {
            throw .invalidArgument("a node id must be UTF-8 without NUL")
        }
        return s
    }

    /// `count` int64s at `ptr` (NULL only when empty).
    static func ints(_ ptr: UnsafePointer<Int64>?, _ count: Int, _ what: String) throws(KVError) -> [Int] {
        guard count >= 0, count <= 1 << 24 else { throw .invalidArgument("\(what): too many entries (\(count))") }
        guard count == 0 || ptr != nil else { throw .invalidArgument("\(what) pointer is NULL") }
        return (0..<count).map { Int(ptr![$0]) }
    }
}

@c(kv_layout_register)
public func kvLayoutRegister(
    _ store: OpaquePointer?, _ node: UnsafePointer<CChar>?, _ nodeLen: Int,
    _ buffers: UnsafePointer<kv_block_buffer>?, _ count: Int
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let n = try ABI.node(node, nodeLen)
        guard count >= 0, count <= KVLayout.maxDescriptors else {
            throw .invalidArgument("a KV layout has 1 to \(KVLayout.maxDescriptors) buffer descriptors, not \(count)")
        }
        guard count == 0 || buffers != nil else { throw .invalidArgument("buffers pointer is NULL") }
        var ds: [KVBufferDescriptor] = []
        for i in 0..<count {
            var b = buffers![i]
            guard let kind = KVBufferKind(rawValue: UInt8(truncatingIfNeeded: b.kind)), b.kind >= 0, b.kind <= 2 else {
                throw .invalidArgument("descriptor \(i): kind \(b.kind) is not KEY (0), VALUE (1) or INDEX (2)")
            }
            guard b.length <= UInt64(MasterLimits.maxSize), b.bytes_per_block <= UInt64(MasterLimits.maxSize) else {
                throw .invalidArgument("descriptor \(i): length and bytes per block must be below 2^48")
            }
            let location = withUnsafeBytes(of: &b.location) { raw -> String? in
                guard let end = raw.firstIndex(of: 0) else { return nil }
                return String(validating: raw[..<end], as: UTF8.self)
            }
            guard let location else { throw .invalidArgument("descriptor \(i): location must be NUL-terminated UTF-8 within 32 bytes") }
            let parsed: MemoryLocation
            do throws(KVError) { parsed = try MemoryLocation(parsing: location) } catch { throw .invalidArgument("descriptor \(i): \(error.message)") }
            ds.append(
                KVBufferDescriptor(
                    layer: Int(b.layer), kind: kind, address: UInt(b.address), length: Int(b.length),
                    bytesPerBlock: Int(b.bytes_per_block), location: parsed))
        }
        try c.registerKVLayout(node: n, descriptors: ds)
    }
}

@c(kv_layout_unregister)
public func kvLayoutUnregister(_ store: OpaquePointer?) -> Int32 {
    ABI.status { () throws(KVError) in try ABI.client(store).unregisterKVLayout() }
}

@c(kv_layout_fetch)
public func kvLayoutFetch(
    _ store: OpaquePointer?, _ node: UnsafePointer<CChar>?, _ nodeLen: Int,
    _ out: UnsafeMutablePointer<kv_block_buffer>?, _ capacity: Int, _ count: UnsafeMutablePointer<Int>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let n = try ABI.node(node, nodeLen)
        guard let count else { throw .invalidArgument("count pointer is NULL") }
        let ds = try c.kvLayout(node: n).layout.descriptors
        count.pointee = ds.count
        guard capacity >= ds.count, let out else { return }
        for (i, d) in ds.enumerated() {
            var b = kv_block_buffer()
            b.layer = Int64(d.layer)
            b.kind = Int32(d.kind.rawValue)
            b.address = UInt64(d.address)
            b.length = UInt64(d.length)
            b.bytes_per_block = UInt64(d.bytesPerBlock)
            withUnsafeMutableBytes(of: &b.location) { raw in
                let utf8 = Array(d.location.name.utf8.prefix(raw.count - 1))
                raw.copyBytes(from: utf8)
                raw[utf8.count] = 0
            }
            out[i] = b
        }
    }
}

@c(kv_blocks_move)
public func kvBlocksMove(
    _ store: OpaquePointer?, _ peer: UnsafePointer<CChar>?, _ peerLen: Int, _ flags: UInt32,
    _ src: UnsafePointer<Int64>?, _ dst: UnsafePointer<Int64>?, _ count: Int,
    _ layers: UnsafePointer<Int64>?, _ layerCount: Int, _ transfers: UnsafeMutablePointer<UInt64>?
) -> Int32 {
    ABI.status { () throws(KVError) in
        let c = try ABI.client(store)
        let n = try ABI.node(peer, peerLen)
        guard flags & ~UInt32(KV_BLOCKS_PUSH | KV_BLOCKS_AGGREGATED) == 0 else { throw .invalidArgument("unknown flags \(flags)") }
        let s = try ABI.ints(src, count, "source blocks"), d = try ABI.ints(dst, count, "destination blocks")
        let l = layers == nil ? nil : try ABI.ints(layers, layerCount, "layers")
        let issued = try c.moveKVBlocks(
            peer: n, pull: flags & UInt32(KV_BLOCKS_PUSH) == 0, sourceBlocks: s, destinationBlocks: d,
            layers: l, executor: flags & UInt32(KV_BLOCKS_AGGREGATED) != 0 ? .aggregated : .perBlock)
        transfers?.pointee = UInt64(issued)
    }
}
