#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import KVCore

/// The one wrapper for libc calls that can fail: reads `errno` at once and throws `KVError`.
public enum SystemCall {
    /// Throws when `result` is -1, with `what` and the errno text in the message.
    @discardableResult
    public static func check<T: BinaryInteger>(
        _ what: @autoclosure () -> String, _ result: T,
        code: KVError.Code = .internal
    ) throws(KVError) -> T {
        if result == -1 { throw failure(what(), code: code) }
        return result
    }

    /// mmap that throws on MAP_FAILED.
    public static func mmap(
        length: Int, protection: Int32, flags: Int32, fd: Int32 = -1,
        offset: Int = 0
    ) throws(KVError) -> UnsafeMutableRawPointer {
        guard let p = Glibc.mmap(nil, length, protection, flags, fd, off_t(offset)), p != MAP_FAILED else {
            throw failure("mmap of \(length) bytes", code: .noSpace)
        }
        return p
    }

    /// What a call that moves bytes (send, recv, read, write) came to.
    public enum IO: Equatable {
        /// Bytes moved; 0 from a read: the end of the stream.
        case bytes(Int)
        /// Nothing now: EAGAIN on a non-blocking descriptor, or a blocking one's timeout.
        case wouldBlock
    }

    /// Runs `call` (a send, recv, read or write returning -1 on failure) with the one retry
    /// policy for byte-moving calls: EINTR is retried, EAGAIN/EWOULDBLOCK is `.wouldBlock`,
    /// anything else throws `code` naming `what` and the errno.
    public static func io(
        _ what: @autoclosure () -> String, code: KVError.Code = .transfer,
        _ call: () -> Int
    ) throws(KVError) -> IO {
        while true {
            let n = call()
            if n >= 0 { return .bytes(n) }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return .wouldBlock }
            throw failure(what(), code: code)
        }
    }

    /// A call whose failure the caller can live with (a hint such as `MADV_HUGEPAGE`, an option
    /// such as keepalive, a flag on a descriptor it just made): a failure is logged (rate
    /// limited, `Logger`), never silently dropped. Returns whether the call succeeded.
    @discardableResult
    public static func bestEffort<T: BinaryInteger>(_ what: @autoclosure () -> String, _ result: T) -> Bool {
        guard result == -1 else { return true }
        Logger.shared.warning(failure(what()).message)
        return false
    }

    /// A `KVError` for the current errno.
    public static func failure(_ what: String, code: KVError.Code = .internal) -> KVError {
        let e = errno
        let text = strerror(e).map { String(cString: $0) } ?? "errno \(e)"
        return KVError(code, "\(what) failed: \(text) (errno \(e))")
    }
}
