/// The one error type of the Swift core. Every failure that crosses a layer boundary is a
/// `KVError`; its `code` is stable (the C ABI returns it and Python maps it to an exception
/// class in exactly one place, `kvstore/_errors.py`).
public struct KVError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Stable status codes. Never renumber: the C ABI and the Python mapping depend on them.
    public enum Code: Int32, Sendable, CaseIterable {
        case objectNotFound = 1
        case objectExists = 2
        case noSpace = 3
        case leaseHeld = 4
        case invalidArgument = 5
        case transfer = 6
        case storeClosed = 7
        case unsupported = 8
        case `internal` = 9
        /// An argument of the wrong type. Raised by the Python layer only; listed here so the
        /// code space stays in one place.
        case argumentType = 10
        /// A copy's CRC32C differs from the one its writer stored, on every replica: the
        /// object's bytes are corrupt (never returned).
        case checksum = 11
    }

    public let code: Code
    /// A human-readable sentence for the user; names the bad value where there is one.
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "KVError(\(code)): \(message)" }

    public static func invalidArgument(_ message: String) -> KVError { KVError(.invalidArgument, message) }
    public static func notFound(_ message: String) -> KVError { KVError(.objectNotFound, message) }
    public static func exists(_ message: String) -> KVError { KVError(.objectExists, message) }
    public static func noSpace(_ message: String) -> KVError { KVError(.noSpace, message) }
    public static func closed() -> KVError { KVError(.storeClosed, "the store is closed") }
}

/// Runs `body` (a closure through an API that only rethrows untyped errors, such as
/// `Array.withUnsafeBytes`) and gives back its `KVError`.
@inlinable @inline(__always)
public func rethrowingKVError<R>(_ body: () throws -> R) throws(KVError) -> R {
    do { return try body() } catch let e as KVError { throw e } catch { throw KVError(.internal, "\(error)") }
}
