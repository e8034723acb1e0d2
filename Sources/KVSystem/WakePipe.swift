#if canImport(Glibc)
import Glibc
#endif
import KVCore

/// A pipe one thread (or a signal handler) writes to wake another out of `poll`: poll
/// `readFD` for `POLLIN`. Both ends are close-on-exec and non-blocking, so `wake()` never
/// blocks (a full pipe already holds a wake-up). Closed at deinit.
public final class WakePipe: Sendable {
    public let readFD: Int32
    public let writeFD: Int32

    public init() throws(KVError) {
        var fds: [Int32] = [0, 0]
        try SystemCall.check("pipe", pipe(&fds))
        for fd in fds {
            SystemCall.bestEffort("fcntl FD_CLOEXEC", fcntl(fd, F_SETFD, FD_CLOEXEC))
            SystemCall.bestEffort("fcntl O_NONBLOCK", fcntl(fd, F_SETFL, O_NONBLOCK))
        }
        (readFD, writeFD) = (fds[0], fds[1])
    }

    deinit {
        close(readFD)
        close(writeFD)
    }

    /// Wakes the poller (async-signal-safe: one `write`).
    public func wake() {
        var b: UInt8 = 1
        _ = write(writeFD, &b, 1)
    }

    /// Takes every pending wake-up, so the next `poll` waits again.
    public func drain() {
        var sink = [UInt8](repeating: 0, count: 64)
        while read(readFD, &sink, sink.count) > 0 {}
    }

    /// Waits up to `millis` (-1: for ever) for a wake-up or for `other` (-1: none) to be
    /// readable; true when either came.
    public func wait(millis: Int32, or other: Int32 = -1) -> Bool {
        var fds = [pollfd(fd: readFD, events: Int16(POLLIN), revents: 0), pollfd(fd: other, events: Int16(POLLIN), revents: 0)]
        return poll(&fds, 2, millis) > 0
    }
}
