/// Rules for object keys. Keys are non-empty UTF-8 strings of at most `maxBytes` bytes.
public enum ObjectKey {
    /// Longest key accepted, in UTF-8 bytes. Keys of LLM connectors (model name, block hash,
    /// rank) are a few hundred bytes at most.
    public static let maxBytes = 1024

    /// Checks a key given as UTF-8 bytes; throws `invalidArgument` naming the problem.
    public static func validate(byteCount: Int) throws(KVError) {
        if byteCount == 0 { throw .invalidArgument("key must not be empty") }
        if byteCount > maxBytes {
            throw .invalidArgument("key is \(byteCount) bytes; the limit is \(maxBytes) bytes (UTF-8)")
        }
    }

    /// Builds the key string from UTF-8 bytes after validating its length.
    public static func make(_ utf8: UnsafeRawBufferPointer) throws(KVError) -> String {
        try validate(byteCount: utf8.count)
        return String(decoding: utf8, as: UTF8.self)
    }
}
