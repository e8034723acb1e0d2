#if canImport(Glibc)
import Glibc
#endif
/// An object key: a non-empty UTF-8 byte string of at most `maxBytes` bytes.
///
/// Keys are compared and hashed as raw bytes (Swift `String` hashing normalises Unicode and
/// costs several times more). Keys of up to 24 bytes are stored inline, so building one for a
/// lookup allocates nothing; longer keys keep their bytes in an array.
public struct ObjectKey: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByStringInterpolation {
    /// Longest key accepted, in UTF-8 bytes. Keys of LLM connectors (model name, block hash,
    /// rank) are a few hundred bytes at most.
    public static let maxBytes = 1024
    static let inlineCapacity = 24

    @usableFromInline var inline: (UInt64, UInt64, UInt64) = (0, 0, 0)
    @usableFromInline var heap: [UInt8]? = nil
    public let count: Int

    /// Checks a key's length in UTF-8 bytes; throws `invalidArgument` naming the problem.
    public static func validate(byteCount: Int) throws(KVError) {
        if byteCount == 0 { throw .invalidArgument("key must not be empty") }
        if byteCount > maxBytes {
            throw .invalidArgument("key is \(byteCount) bytes; the limit is \(maxBytes) bytes (UTF-8)")
        }
    }

    /// A key from UTF-8 bytes (copied); throws `invalidArgument` when empty or too long.
    public init(utf8 bytes: UnsafeRawBufferPointer) throws(KVError) {
        try Self.validate(byteCount: bytes.count)
        self.init(unchecked: bytes)
    }

    /// A key from a string; throws `invalidArgument` when empty or too long.
    public init(_ string: String) throws(KVError) {
        var s = string
        let bytes = s.withUTF8 { Array($0) }
        try Self.validate(byteCount: bytes.count)
        self = bytes.withUnsafeBytes { ObjectKey(unchecked: $0) }
    }

    /// A key from a literal (tests and fixed keys); the literal must be a valid key.
    /// Whether `bytes` are valid UTF-8. ASCII (what keys nearly always are) is checked eight
    /// bytes at a time; anything else goes through the standard library's validation, whose
    /// generic entry cost a metadata lookup per key on the master (7% of `batch_exists`).
    @inlinable
    public static func isValidUTF8(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let n = bytes.count
        while i + 8 <= n {
            if bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self) & 0x8080_8080_8080_8080 != 0 { break }
            i += 8
        }
        while i < n, bytes[i] < 0x80 { i += 1 }
        if i == n { return true }
        return String(validating: bytes[i...], as: UTF8.self) != nil && (i == 0 || bytes[i] & 0xC0 != 0x80)
    }

    public init(stringLiteral value: String) {
        do { try self.init(value) } catch { preconditionFailure("invalid key literal '\(value)': \(error.message)") }
    }

    public init(stringInterpolation: DefaultStringInterpolation) {
        self.init(stringLiteral: String(stringInterpolation: stringInterpolation))
    }

    init(unchecked bytes: UnsafeRawBufferPointer) {
        count = bytes.count
        if count <= Self.inlineCapacity {
            var words: (UInt64, UInt64, UInt64) = (0, 0, 0)
            withUnsafeMutableBytes(of: &words) { w in
                if let base = bytes.baseAddress, bytes.count > 0 { w.baseAddress!.copyMemory(from: base, byteCount: bytes.count) }
            }
            inline = words
        } else {
            heap = Array(bytes)
        }
    }

    /// The empty placeholder used by unused bookkeeping slots.
    init() { count = 0 }

    /// Calls `body` with the key's UTF-8 bytes.
    public func withUTF8<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        if let heap { return try heap.withUnsafeBytes(body) }
        var words = inline
        return try withUnsafeBytes(of: &words) { try body(UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
    }

    public var description: String { withUTF8 { String(decoding: $0, as: UTF8.self) } }

    /// Byte-wise order of the UTF-8 bytes (a shorter key sorts before its extensions): the
    /// order in which `keys` pages walk the table.
    /// Whether the key's bytes start with `prefix`.
    public func hasPrefix(_ prefix: [UInt8]) -> Bool {
        guard count >= prefix.count else { return false }
        return withUTF8 { b in prefix.withUnsafeBytes { p in p.count == 0 || memcmp(b.baseAddress!, p.baseAddress!, p.count) == 0 } }
    }

    public static func < (a: ObjectKey, b: ObjectKey) -> Bool {
        a.withUTF8 { x in
            b.withUTF8 { y in
                let n = Swift.min(x.count, y.count)
                let c = n == 0 ? 0 : memcmp(x.baseAddress!, y.baseAddress!, n)
                return c != 0 ? c < 0 : x.count < y.count
            }
        }
    }

    public func hash(into hasher: inout Hasher) {
        if let heap {
            heap.withUnsafeBytes { hasher.combine(bytes: $0) }
        } else {
            hasher.combine(inline.0)
            hasher.combine(inline.1)
            hasher.combine(inline.2)
            hasher.combine(count)
        }
    }

    public static func == (a: ObjectKey, b: ObjectKey) -> Bool {
        guard a.count == b.count else { return false }
        if let ha = a.heap, let hb = b.heap { return ha == hb }
        return a.inline == b.inline
    }
}
