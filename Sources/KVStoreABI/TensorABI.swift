import CKVStoreABI
import KVAccelerator
import KVCore
import KVTransfer

// The tensor header codec and the device list of the C ABI. Contracts: include/kvstore_abi.h.

@c(kv_tensor_header_encode)
public func kvTensorHeaderEncode(
    _ dtype: Int32, _ ndim: Int32, _ shape: UnsafePointer<Int64>?,
    _ out: UnsafeMutableRawPointer?, _ outLen: Int
) -> Int32 {
    ABI.status { () throws(KVError) in
        guard let dt = TensorDType(rawValue: dtype) else { throw .invalidArgument("unknown dtype code \(dtype)") }
        guard ndim >= 0, ndim <= Int32(TensorHeader.maxDimensions) else {
            throw .invalidArgument("a tensor has at most \(TensorHeader.maxDimensions) dimensions, got \(ndim)")
        }
        guard ndim == 0 || shape != nil, let out else { throw .invalidArgument("shape or output is NULL") }
        let dims = (0..<Int(ndim)).map { Int(shape![$0]) }
        try TensorHeader(dtype: dt, shape: dims).encode(into: UnsafeMutableRawBufferPointer(start: out, count: outLen))
    }
}

@c(kv_tensor_dtype)
public func kvTensorDType(_ code: Int32, _ name: UnsafeMutablePointer<UnsafePointer<CChar>?>?, _ itemSize: UnsafeMutablePointer<Int32>?) -> Int32 {
    ABI.status { () throws(KVError) in
        guard let dt = TensorDType(rawValue: code) else { throw .invalidArgument("unknown dtype code \(code)") }
        guard let name, let itemSize else { throw .invalidArgument("name or item size is NULL") }
        name.pointee = UnsafeRawPointer(dt.name.utf8Start).assumingMemoryBound(to: CChar.self)
        itemSize.pointee = Int32(dt.itemSize)
    }
}

@c(kv_tensor_header_decode)
public func kvTensorHeaderDecode(_ bytes: UnsafeRawPointer?, _ len: Int, _ out: UnsafeMutablePointer<kv_tensor_info>?) -> Int32 {
    ABI.status { () throws(KVError) in
        guard let bytes, let out else { throw .invalidArgument("header or output is NULL") }
        let h = try TensorHeader(decoding: UnsafeRawBufferPointer(start: bytes, count: len))
        var info = kv_tensor_info()
        info.dtype = h.dtype.rawValue
        info.ndim = Int32(h.shape.count)
        withUnsafeMutableBytes(of: &info.shape) { raw in
            let dims = raw.bindMemory(to: Int64.self)
            for i in 0..<TensorHeader.maxDimensions { dims[i] = i < h.shape.count ? Int64(h.shape[i]) : -1 }
        }
        info.data_offset = UInt64(TensorHeader.size)
        info.data_bytes = UInt64(h.dataBytes)
        out.pointee = info
    }
}

@c(kv_devices)
public func kvDevices(_ refresh: Int32, _ out: UnsafeMutablePointer<CChar>?, _ cap: Int) -> Int {
    let s = refresh != 0 ? AcceleratorRegistry.refresh() : AcceleratorRegistry.snapshot
    let text = s.devices.map(\.location.description).joined(separator: ",")
    let utf8 = Array(text.utf8)
    if let out, cap > 0 {
        let n = min(utf8.count, cap - 1)
        for i in 0..<n { out[i] = CChar(bitPattern: utf8[i]) }
        out[n] = 0
    }
    return utf8.count
}

@c(kv_rdma_info)
public func kvRDMAInfo(_ out: UnsafeMutablePointer<CChar>?, _ cap: Int) -> Int {
    let d = RDMA.discovery
    var lines = ["\(d.loaded ? 1 : 0)\t\(RDMA.shared.context != nil ? 1 : 0)\t\(d.reason.isEmpty ? RDMA.shared.openFailure : d.reason)"]
    for dev in d.devices { lines.append("\(dev.name)\t\(dev.port)\t\(dev.active ? 1 : 0)\t\(dev.linkLayer)\t\(dev.mtu)") }
    let utf8 = Array(lines.joined(separator: "\n").utf8)
    if let out, cap > 0 {
        let n = min(utf8.count, cap - 1)
        for i in 0..<n { out[i] = CChar(bitPattern: utf8[i]) }
        out[n] = 0
    }
    return utf8.count
}
