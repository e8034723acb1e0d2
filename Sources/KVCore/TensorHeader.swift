/// The 304-byte little-endian header stored in front of a tensor's raw C-contiguous bytes,
/// byte-compatible with Mooncake Store's tensor format:
///
/// | offset | field |
/// |---|---|
/// | 0 | u32 magic 0x4D4F4F4E |
/// | 4 | u16 version = 1 |
/// | 6 | u16 header size = 304 |
/// | 8 | i32 dtype code (`TensorDType`) |
/// | 12 | i32 ndim (0…8) |
/// | 16 | u32 layout kind (0 full, 1 shard) |
/// | 20 | u32 flags = 0 |
/// | 24 | u64 data offset = 304 |
/// | 32 | u64 data bytes |
/// | 40 | i64[8] global shape (unused dims −1) |
/// | 104 | i64[8] local shape (unused dims −1) |
/// | 168 | u32 axis count (0…4) |
/// | 172 | u32 reserved |
/// | 176 | 4 × 32-byte axis records |
///
/// A plain value; encoding and decoding validate every field.
public struct TensorHeader: Sendable, Equatable {
    public static let size = 304
    public static let magic: UInt32 = 0x4D4F_4F4E
    public static let version: UInt16 = 1
    public static let maxDimensions = 8
    public static let maxAxes = 4

    /// One sharding axis record (kept as stored; kvstore writes none).
    public struct Axis: Sendable, Equatable {
        public var kind: Int32, axisIndex: Int32, shardRank: Int32, shardCount: Int32, splitDim: Int32
        public init(kind: Int32, axisIndex: Int32, shardRank: Int32, shardCount: Int32, splitDim: Int32) {
            self.kind = kind; self.axisIndex = axisIndex; self.shardRank = shardRank
            self.shardCount = shardCount; self.splitDim = splitDim
        }
    }

    public var dtype: TensorDType
    /// The shape of the stored bytes (the local shape).
    public var shape: [Int]
    /// The global shape (equal to `shape` for a full tensor).
    public var globalShape: [Int]
    /// 0: full tensor, 1: shard.
    public var layoutKind: UInt32
    public var axes: [Axis]

    /// A full (unsharded) tensor header. Throws `invalidArgument` for more than 8 dimensions,
    /// a negative dimension, or a byte size that overflows.
    public init(dtype: TensorDType, shape: [Int]) throws(KVError) {
        self.dtype = dtype
        self.shape = shape
        self.globalShape = shape
        self.layoutKind = 0
        self.axes = []
        _ = try validatedDataBytes()
    }

    /// Bytes of tensor data the header describes: product(shape) × element size.
    public var dataBytes: Int { (try? validatedDataBytes()) ?? 0 }

    func validatedDataBytes() throws(KVError) -> Int {
        guard shape.count <= Self.maxDimensions else {
            throw .invalidArgument("a tensor has at most \(Self.maxDimensions) dimensions, got \(shape.count)")
        }
        var n = dtype.itemSize
        for d in shape {
            guard d >= 0 else { throw .invalidArgument("tensor dimension \(d) is negative") }
            let (m, o) = n.multipliedReportingOverflow(by: d)
            guard !o else { throw .invalidArgument("tensor of shape \(shape) is too large") }
            n = m
        }
        return n
    }

    /// Writes the 304 header bytes to `out` (at least 304 bytes).
    public func encode(into out: UnsafeMutableRawBufferPointer) throws(KVError) {
        guard out.count >= Self.size else { throw .invalidArgument("tensor header needs \(Self.size) bytes, got \(out.count)") }
        let bytes = try validatedDataBytes()
        guard globalShape.count == shape.count, axes.count <= Self.maxAxes else {
            throw .invalidArgument("inconsistent tensor header (global shape rank or axis count)")
        }
        for i in 0..<Self.size { out[i] = 0 }
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) { out.storeBytes(of: v.littleEndian, toByteOffset: at, as: T.self) }
        put(Self.magic, 0)
        put(Self.version, 4)
        put(UInt16(Self.size), 6)
        put(dtype.rawValue, 8)
        put(Int32(shape.count), 12)
        put(layoutKind, 16)
        put(UInt32(0), 20)
        put(UInt64(Self.size), 24)
        put(UInt64(bytes), 32)
        for i in 0..<Self.maxDimensions {
            put(Int64(i < globalShape.count ? globalShape[i] : -1), 40 + 8 * i)
            put(Int64(i < shape.count ? shape[i] : -1), 104 + 8 * i)
        }
        put(UInt32(axes.count), 168)
        for (i, a) in axes.enumerated() {
            let o = 176 + 32 * i
            put(a.kind, o); put(a.axisIndex, o + 4); put(a.shardRank, o + 8); put(a.shardCount, o + 12); put(a.splitDim, o + 16)
        }
    }

    /// Encodes into a new array of 304 bytes.
    public func encoded() throws(KVError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.size)
        var failure: KVError?
        out.withUnsafeMutableBytes { b in
            do throws(KVError) { try encode(into: b) } catch { failure = error }
        }
        if let failure { throw failure }
        return out
    }

    /// Decodes and validates a header. Throws `invalidArgument` naming the first bad field
    /// ("not a tensor" when the magic is wrong).
    public init(decoding b: UnsafeRawBufferPointer) throws(KVError) {
        guard b.count >= Self.size else {
            throw .invalidArgument("not a tensor: \(b.count) bytes is shorter than the \(Self.size)-byte tensor header")
        }
        func get<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T { T(littleEndian: b.loadUnaligned(fromByteOffset: at, as: T.self)) }
        guard get(0, UInt32.self) == Self.magic else { throw .invalidArgument("not a tensor: bad magic in the tensor header") }
        guard get(4, UInt16.self) == Self.version else {
            throw .invalidArgument("corrupt tensor header: unsupported version \(get(4, UInt16.self))")
        }
        guard get(6, UInt16.self) == UInt16(Self.size), get(24, UInt64.self) == UInt64(Self.size) else {
            throw .invalidArgument("corrupt tensor header: header size or data offset is not \(Self.size)")
        }
        guard let dt = TensorDType(rawValue: get(8, Int32.self)) else {
            throw .invalidArgument("corrupt tensor header: unknown dtype code \(get(8, Int32.self))")
        }
        let ndim = Int(get(12, Int32.self))
        guard (0...Self.maxDimensions).contains(ndim) else {
            throw .invalidArgument("corrupt tensor header: ndim \(ndim) outside 0...\(Self.maxDimensions)")
        }
        let layout = get(16, UInt32.self)
        guard layout <= 1 else { throw .invalidArgument("corrupt tensor header: layout kind \(layout)") }
        let axisCount = Int(get(168, UInt32.self))
        guard axisCount <= Self.maxAxes else { throw .invalidArgument("corrupt tensor header: \(axisCount) axes") }
        var shape: [Int] = [], global: [Int] = []
        for i in 0..<Self.maxDimensions {
            let g = get(40 + 8 * i, Int64.self), l = get(104 + 8 * i, Int64.self)
            if i < ndim {
                guard g >= 0, l >= 0, l <= Int64(Int32.max) * 1024 else {
                    throw .invalidArgument("corrupt tensor header: dimension \(i) is \(l)")
                }
                shape.append(Int(l)); global.append(Int(g))
            } else {
                guard g == -1, l == -1 else { throw .invalidArgument("corrupt tensor header: unused dimension \(i) is not -1") }
            }
        }
        self.dtype = dt
        self.shape = shape
        self.globalShape = global
        self.layoutKind = layout
        self.axes = (0..<axisCount).map { i in
            let o = 176 + 32 * i
            return Axis(
                kind: get(o, Int32.self), axisIndex: get(o + 4, Int32.self), shardRank: get(o + 8, Int32.self),
                shardCount: get(o + 12, Int32.self), splitDim: get(o + 16, Int32.self))
        }
        let expected: Int
        do { expected = try validatedDataBytes() } catch { throw .invalidArgument("corrupt tensor header: \(error.message)") }
        guard get(32, UInt64.self) == UInt64(expected) else {
            throw .invalidArgument("corrupt tensor header: data bytes \(get(32, UInt64.self)) do not match shape \(shape) of \(dt)")
        }
    }
}

/// Element types of stored tensors and their codes (the header's dtype field).
public enum TensorDType: Int32, Sendable, CaseIterable {
    case float32 = 0, float64, int8, uint8, int16, uint16, int32, uint32, int64, uint64, bool
    case float16, bfloat16, float8E4M3, float8E5M2

    /// The name numpy and torch give it (torch without "torch.").
    public var name: StaticString {
        switch self {
        case .float32: "float32"
        case .float64: "float64"
        case .int8: "int8"
        case .uint8: "uint8"
        case .int16: "int16"
        case .uint16: "uint16"
        case .int32: "int32"
        case .uint32: "uint32"
        case .int64: "int64"
        case .uint64: "uint64"
        case .bool: "bool"
        case .float16: "float16"
        case .bfloat16: "bfloat16"
        case .float8E4M3: "float8_e4m3fn"
        case .float8E5M2: "float8_e5m2"
        }
    }

    /// Bytes per element.
    public var itemSize: Int {
        switch self {
        case .int8, .uint8, .bool, .float8E4M3, .float8E5M2: 1
        case .int16, .uint16, .float16, .bfloat16: 2
        case .float32, .int32, .uint32: 4
        case .float64, .int64, .uint64: 8
        }
    }
}
