/// The framing and field codec of kvstore's network protocol (the master's control plane and
/// the peers' data plane). Pure: it turns bytes into values and back and validates every
/// field; sockets live elsewhere.
///
/// A frame is a 16-byte little-endian header followed by `length` payload bytes:
///
/// | offset | field |
/// |---|---|
/// | 0 | u32 magic `0x5453_564B`: the bytes "KVST" |
/// | 4 | u16 protocol version (`WireFrameHeader.version`) |
/// | 6 | u16 message kind (the protocol layer defines them) |
/// | 8 | u32 request id (a response carries its request's id) |
/// | 12 | u32 payload length, at most the receiver's limit |
///
/// Payload fields are little-endian integers, IEEE doubles, and length-prefixed (u32) byte
/// strings, UTF-8 strings, keys and arrays. A reader checks each length against the bytes
/// that remain before allocating anything, so a hostile length cannot make it allocate.
public struct WireFrameHeader: Sendable, Equatable {
    public static let size = 16
    public static let magic: UInt32 = 0x5453_564B
    public static let version: UInt16 = 3
    /// Default payload limit: 64 MiB (a batch of many keys with their metadata).
    public static let defaultMaxPayload = 64 << 20

    public var kind: UInt16
    public var requestID: UInt32
    public var length: Int

    public init(kind: UInt16, requestID: UInt32, length: Int) {
        self.kind = kind
        self.requestID = requestID
        self.length = length
    }

    /// Decodes and validates a header from the first 16 bytes of `bytes`. Throws
    /// `invalidArgument` naming the bad field: short input, wrong magic, another protocol
    /// version, a kind `isKnown` rejects, or a payload longer than `maxPayload`.
    public static func decode(
        _ bytes: UnsafeRawBufferPointer, maxPayload: Int = defaultMaxPayload,
        isKnown: (UInt16) -> Bool = { _ in true }
    ) throws(KVError) -> WireFrameHeader {
        guard bytes.count >= size else { throw .invalidArgument("frame header is \(bytes.count) bytes, needs \(size)") }
        var r = WireReader(bytes)
        let m = try r.u32()
        guard m == magic else { throw .invalidArgument("bad frame magic 0x\(String(m, radix: 16))") }
        let v = try r.u16()
        guard v == version else { throw .invalidArgument("protocol version \(v) is not supported (this side speaks \(version))") }
        let kind = try r.u16()
        guard isKnown(kind) else { throw .invalidArgument("unknown message kind \(kind)") }
        let id = try r.u32()
        let length = Int(try r.u32())
        guard length <= maxPayload else { throw .invalidArgument("payload of \(length) bytes exceeds the limit of \(maxPayload)") }
        return WireFrameHeader(kind: kind, requestID: id, length: length)
    }

    /// The 16 header bytes.
    public func encode(into w: inout WireWriter) {
        w.u32(Self.magic)
        w.u16(Self.version)
        w.u16(kind)
        w.u32(requestID)
        w.u32(UInt32(length))
    }
}

/// Appends fields to a growing byte array.
public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    /// Makes room for `more` bytes at once (a writer about to append many fields).
    public mutating func reserve(_ more: Int) { bytes.reserveCapacity(bytes.count + more) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    /// Appends what another writer wrote (whole frames).
    public mutating func append(_ other: WireWriter) { bytes += other.bytes }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    public mutating func f64(_ v: Double) { u64(v.bitPattern) }

    /// A u32 length then the bytes.
    public mutating func bytes(_ b: UnsafeRawBufferPointer) {
        u32(UInt32(b.count))
        bytes.append(contentsOf: b)
    }

    public mutating func bytes(_ b: [UInt8]) { b.withUnsafeBytes { bytes($0) } }

    public mutating func string(_ s: String) {
        var s = s
        s.withUTF8 { bytes(UnsafeRawBufferPointer($0)) }
    }

    public mutating func key(_ k: ObjectKey) { k.withUTF8 { bytes($0) } }

    /// A u32 element count; the elements follow, written by the caller.
    public mutating func count(_ n: Int) { u32(UInt32(n)) }

    /// A whole frame: header (with the payload's length) then `payload`.
    public static func frame(kind: UInt16, requestID: UInt32, payload: [UInt8]) -> [UInt8] {
        var w = WireWriter(capacity: WireFrameHeader.size + payload.count)
        w.frame(kind: kind, requestID: requestID, payload: payload)
        return w.bytes
    }

    /// Appends a whole frame (several frames can go out in one write).
    public mutating func frame(kind: UInt16, requestID: UInt32, payload: [UInt8]) {
        WireFrameHeader(kind: kind, requestID: requestID, length: payload.count).encode(into: &self)
        bytes.append(contentsOf: payload)
    }
}

/// Reads fields from a borrowed payload, checking every length against what remains. Every
/// failure is `invalidArgument` naming what was being read.
public struct WireReader {
    private let base: UnsafeRawBufferPointer
    public private(set) var position = 0

    public init(_ bytes: UnsafeRawBufferPointer) { base = bytes }

    /// Reads all of `payload` with `body`, which must consume every byte (`what` names the
    /// message in the error when it does not).
    public static func parse<T>(
        _ payload: [UInt8], _ what: String,
        _ body: (inout WireReader) throws(KVError) -> T
    ) throws(KVError) -> T {
        try rethrowingKVError {
            try payload.withUnsafeBytes { b in
                var r = WireReader(b)
                let v = try body(&r)
                try r.finish(what)
                return v
            }
        }
    }

    public var remaining: Int { base.count - position }

    private mutating func take(_ n: Int, _ what: String) throws(KVError) -> UnsafeRawBufferPointer {
        guard n >= 0, n <= remaining else {
            throw .invalidArgument("truncated message: \(what) needs \(n) bytes, \(remaining) left")
        }
        defer { position += n }
        return UnsafeRawBufferPointer(rebasing: base[position..<position + n])
    }

    private mutating func fixed<T: FixedWidthInteger>(_: T.Type, _ what: String) throws(KVError) -> T {
        let b = try take(MemoryLayout<T>.size, what)
        return T(littleEndian: b.loadUnaligned(as: T.self))
    }

    public mutating func u8() throws(KVError) -> UInt8 { try fixed(UInt8.self, "u8") }
    public mutating func u16() throws(KVError) -> UInt16 { try fixed(UInt16.self, "u16") }
    public mutating func u32() throws(KVError) -> UInt32 { try fixed(UInt32.self, "u32") }
    public mutating func u64() throws(KVError) -> UInt64 { try fixed(UInt64.self, "u64") }
    public mutating func i64() throws(KVError) -> Int64 { Int64(bitPattern: try u64()) }
    public mutating func f64() throws(KVError) -> Double { Double(bitPattern: try u64()) }

    /// A bool written as exactly 0 or 1.
    public mutating func bool() throws(KVError) -> Bool {
        switch try u8() {
        case 0: return false
        case 1: return true
        case let v: throw .invalidArgument("bad bool value \(v)")
        }
    }

    /// A u64 that must fit in `Int` and be at most `max`.
    public mutating func size(max: Int = Int.max, _ what: String = "size") throws(KVError) -> Int {
        let v = try u64()
        guard v <= UInt64(max) else { throw .invalidArgument("\(what) \(v) exceeds \(max)") }
        return Int(v)
    }

    /// Length-prefixed bytes (at most `max`), borrowed from the payload.
    public mutating func bytes(max: Int = Int.max, _ what: String = "bytes") throws(KVError) -> UnsafeRawBufferPointer {
        let n = Int(try u32())
        guard n <= max else { throw .invalidArgument("\(what) of \(n) bytes exceeds \(max)") }
        return try take(n, what)
    }

    /// A length-prefixed string that must be valid UTF-8 (at most `max` bytes).
    public mutating func string(max: Int = 4096, _ what: String = "string") throws(KVError) -> String {
        let b = try bytes(max: max, what)
        guard let s = String(validating: b, as: UTF8.self) else { throw .invalidArgument("\(what) is not valid UTF-8") }
        return s
    }

    /// A key: valid UTF-8, 1 to `ObjectKey.maxBytes` bytes.
    public mutating func key() throws(KVError) -> ObjectKey {
        let b = try bytes(max: ObjectKey.maxBytes, "key")
        guard ObjectKey.isValidUTF8(b) else { throw .invalidArgument("key is not valid UTF-8") }
        return try ObjectKey(utf8: b)
    }

    /// An element count whose elements take at least `minElementSize` bytes each (at most
    /// `max` elements): a count the remaining bytes cannot hold is refused before anything
    /// is allocated for it.
    public mutating func count(max: Int, minElementSize: Int, _ what: String = "count") throws(KVError) -> Int {
        let n = Int(try u32())
        guard n <= max else { throw .invalidArgument("\(what) \(n) exceeds \(max)") }
        guard n * Swift.max(1, minElementSize) <= remaining else {
            throw .invalidArgument("truncated message: \(n) \(what) cannot fit in \(remaining) bytes")
        }
        return n
    }

    /// Throws unless every byte was read (trailing garbage is an error, not ignored).
    public func finish(_ what: String = "message") throws(KVError) {
        guard remaining == 0 else { throw .invalidArgument("\(what) has \(remaining) unexpected trailing bytes") }
    }
}
