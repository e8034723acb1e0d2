#if canImport(Glibc)
import Glibc
#endif
import KVCore

/// Reads frames from a blocking socket through a buffer: one `recv` usually brings a whole
/// answer (or several pipelined ones), and waiting starts with a short spin of non-blocking
/// reads (at most `spinNanos`, see `SpinBackoff`) before blocking, so an answer that comes
/// within the spin costs no scheduler wake-up.
public struct FrameReader: Sendable {
    private var buffer = [UInt8](repeating: 0, count: 1 << 16)
    private var start = 0
    private var end = 0
    public let maxPayload: Int
    public var spin: SpinBackoff
    public var spinNanos: Int { spin.spinNanos }

    public init(maxPayload: Int, spinNanos: Int) {
        self.maxPayload = maxPayload
        self.spin = SpinBackoff(spinNanos: spinNanos)
    }

    /// The next frame. Throws `transfer` for I/O failures, `invalidArgument` for a bad frame.
    public mutating func next(_ s: Socket, isKnown: (UInt16) -> Bool) throws(KVError) -> (WireFrameHeader, [UInt8]) {
        try fill(s, WireFrameHeader.size)
        let h = try rethrowingKVError {
            try buffer.withUnsafeBytes { b in
                try WireFrameHeader.decode(
                    UnsafeRawBufferPointer(rebasing: b[start..<start + WireFrameHeader.size]),
                    maxPayload: maxPayload, isKnown: isKnown)
            }
        }
        try fill(s, WireFrameHeader.size + h.length)
        let payload = Array(buffer[start + WireFrameHeader.size..<start + WireFrameHeader.size + h.length])
        start += WireFrameHeader.size + h.length
        if start == end { start = 0; end = 0 }
        return (h, payload)
    }

    /// The next frame when one is buffered or arrives without waiting (non-blocking reads);
    /// nil otherwise. Throws `transfer` once the peer closed, `invalidArgument` for a bad frame.
    public mutating func nextIfReady(_ s: Socket, isKnown: (UInt16) -> Bool) throws(KVError) -> (WireFrameHeader, [UInt8])? {
        while true {
            if end - start >= WireFrameHeader.size {
                let h = try rethrowingKVError {
                    try buffer.withUnsafeBytes { b in
                        try WireFrameHeader.decode(
                            UnsafeRawBufferPointer(rebasing: b[start..<start + WireFrameHeader.size]),
                            maxPayload: maxPayload, isKnown: isKnown)
                    }
                }
                if end - start >= WireFrameHeader.size + h.length { return try next(s, isKnown: isKnown) }
                if buffer.count < WireFrameHeader.size + h.length || start > 0 {
                    buffer.withUnsafeMutableBytes { b in b.baseAddress!.copyMemory(from: b.baseAddress! + start, byteCount: end - start) }
                    end -= start
                    start = 0
                    let want = WireFrameHeader.size + h.length
                    if buffer.count < want { buffer += [UInt8](repeating: 0, count: want - buffer.count) }
                }
            } else if start > 0 {
                buffer.withUnsafeMutableBytes { b in b.baseAddress!.copyMemory(from: b.baseAddress! + start, byteCount: end - start) }
                end -= start
                start = 0
            }
            let fd = s.fd, free = buffer.count - end
            let n = buffer.withUnsafeMutableBytes { b in recv(fd, b.baseAddress! + end, free, Int32(MSG_DONTWAIT)) }
            if n == 0 { throw KVError(.transfer, "the peer closed the connection") }
            if n < 0 { return nil }
            end += n
        }
    }

    /// Ensures `count` buffered bytes from `start`.
    private mutating func fill(_ s: Socket, _ count: Int) throws(KVError) {
        guard end - start < count else { return }
        if start > 0 { // move what is left to the front
            buffer.withUnsafeMutableBytes { b in
                b.baseAddress!.copyMemory(from: b.baseAddress! + start, byteCount: end - start)
            }
            end -= start
            start = 0
        }
        if buffer.count < count { buffer += [UInt8](repeating: 0, count: count - buffer.count) }
        let started = SpinBackoff.now()
        let deadline = started &+ spin.budget(now: started)
        while end < count {
            let fd = s.fd
            let free = buffer.count - end
            var spinning = deadline > started
            var blocked = false
            let n = buffer.withUnsafeMutableBytes { b -> Int in
                while true {
                    if !spinning && !blocked {
                        // A blocking wait: up to a millisecond as it is (an answer usually comes
                        // well within), then tell the hooks (the GIL goes) and wait on.
                        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                        if poll(&p, 1, 1) == 0 {
                            blocked = true
                            WaitHooks.before?()
                        }
                    }
                    let r = recv(fd, b.baseAddress! + end, free, spinning ? Int32(MSG_DONTWAIT) : 0)
                    if r >= 0 { return r }
                    if errno == EINTR { continue }
                    guard spinning, errno == EAGAIN || errno == EWOULDBLOCK else { return -1 }
                    if SpinBackoff.now() > deadline { spinning = false }
                }
            }
            let failure = errno
            if blocked, WaitHooks.before != nil { WaitHooks.after?() }
            errno = failure
            if n == 0 { throw KVError(.transfer, "the peer closed the connection") }
            if n < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK { throw KVError(.transfer, "recv timed out: the peer stopped answering") }
                throw SystemCall.failure("recv", code: .transfer)
            }
            end += n
        }
    }
}
