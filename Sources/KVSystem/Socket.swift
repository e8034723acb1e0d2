#if canImport(Glibc)
import Glibc
#endif
import CKVCopy
import KVCore

/// A TCP socket (IPv4) or a local (abstract Unix-domain) stream socket, owning its descriptor: closed by `close()` or deinit. Calls that can
/// fail throw `KVError` through `SystemCall` (code `transfer` for I/O on a connection).
///
/// `@unchecked Sendable`: the descriptor is an integer; whoever shares a socket between
/// threads serialises reads and writes themselves (the master's loop owns its sockets).
public final class Socket: @unchecked Sendable {
    public private(set) var fd: Int32

    public init(adopting fd: Int32) { self.fd = fd }

    deinit { close() }

    public func close() {
        if fd >= 0 { Glibc.close(fd); fd = -1 }
    }

    /// Resolves "a.b.c.d" or "localhost" (IPv4) into a socket address.
    public static func address(host: String, port: Int) throws(KVError) -> sockaddr_in {
        guard (0...65535).contains(port) else { throw .invalidArgument("port \(port) is out of range") }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        let h = host == "localhost" ? "127.0.0.1" : host
        guard inet_pton(AF_INET, h, &a.sin_addr) == 1 else {
            throw .invalidArgument("'\(host)' is not an IPv4 address (a.b.c.d or localhost)")
        }
        return a
    }

    /// Splits "a.b.c.d:port" (the port may be left out when `defaultPort` is given) and checks
    /// both: an IPv4 address or localhost, a port in 1...65535.
    public static func endpoint(_ text: Substring, defaultPort: Int? = nil) throws(KVError) -> (host: String, port: Int) {
        var host = text, port = defaultPort
        if let colon = text.lastIndex(of: ":") {
            host = text[..<colon]
            port = Int(text[text.index(after: colon)...])
        }
        guard let port, (1...65535).contains(port) else {
            throw .invalidArgument("'\(text)' is not host:port with a port from 1 to 65535")
        }
        _ = try address(host: String(host), port: port)
        return (String(host), port)
    }

    /// Whether `host` is a loopback address.
    public static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host.hasPrefix("127.")
    }

    /// A listening socket on host:port (port 0: the kernel picks; see `localPort`).
    public static func listen(host: String, port: Int, backlog: Int32 = 128) throws(KVError) -> Socket {
        var addr = try address(host: host, port: port)
        let s = Socket(adopting: try SystemCall.check("socket", Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)))
        var one: Int32 = 1
        SystemCall.bestEffort("setsockopt SO_REUSEADDR", setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size)))
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s.fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        try SystemCall.check("bind to \(host):\(port)", rc, code: .invalidArgument)
        try SystemCall.check("listen on \(host):\(port)", Glibc.listen(s.fd, backlog))
        return s
    }

    /// A connected socket to host:port (blocking, TCP_NODELAY), giving up after `timeout`
    /// seconds. Throws `transfer` when the peer cannot be reached.
    public static func connect(host: String, port: Int, timeout: Double = 5) throws(KVError) -> Socket {
        var addr = try address(host: host, port: port)
        let s = Socket(adopting: try SystemCall.check("socket", Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)))
        s.setNonBlocking()
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s.fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if rc != 0 {
            guard errno == EINPROGRESS else { throw SystemCall.failure("connect to \(host):\(port)", code: .transfer) }
            var p = pollfd(fd: s.fd, events: Int16(POLLOUT), revents: 0)
            let n: Int32 = WaitHooks.waiting {
                var r: Int32
                repeat { r = poll(&p, 1, Int32(timeout * 1000)) } while r < 0 && errno == EINTR
                return r
            }
            guard n > 0 else { throw KVError(.transfer, "connect to \(host):\(port) timed out after \(timeout) s") }
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len)
            if err != 0 {
                errno = err
                throw SystemCall.failure("connect to \(host):\(port)", code: .transfer)
            }
        }
        SystemCall.bestEffort("fcntl clearing O_NONBLOCK", fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) & ~O_NONBLOCK))
        s.setNoDelay()
        return s
    }

    /// An abstract Unix-domain address (`name` without the leading NUL; Linux only). Abstract
    /// names belong to the network namespace and vanish with the socket: no file to clean up.
    private static func localAddress(_ name: String) throws(KVError) -> (sockaddr_un, socklen_t) {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(name.utf8)
        let room = MemoryLayout.size(ofValue: a.sun_path) - 1
        guard !bytes.isEmpty, bytes.count <= room, !bytes.contains(0) else {
            throw .invalidArgument("local socket name '\(name)' must be 1 to \(room) bytes without NUL")
        }
        withUnsafeMutableBytes(of: &a.sun_path) { p in
            p[0] = 0
            for (i, b) in bytes.enumerated() { p[i + 1] = b }
        }
        return (a, socklen_t(MemoryLayout<sa_family_t>.size + 1 + bytes.count))
    }

    /// A listening socket on the abstract Unix-domain name `name` (same host and network
    /// namespace only). Throws `invalidArgument` when the name is taken.
    public static func listenLocal(name: String, backlog: Int32 = 128) throws(KVError) -> Socket {
        let (addr, len) = try localAddress(name)
        let s = Socket(adopting: try SystemCall.check("socket", Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)))
        let rc = withUnsafePointer(to: addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s.fd, $0, len) } }
        try SystemCall.check("bind to local socket \(name)", rc, code: .invalidArgument)
        try SystemCall.check("listen on local socket \(name)", Glibc.listen(s.fd, backlog))
        return s
    }

    /// A connected (blocking) socket to the abstract Unix-domain name `name`. Throws
    /// `transfer` when nothing listens there (another host or network namespace).
    public static func connectLocal(name: String) throws(KVError) -> Socket {
        let (addr, len) = try localAddress(name)
        let s = Socket(adopting: try SystemCall.check("socket", Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)))
        let rc = withUnsafePointer(to: addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s.fd, $0, len) } }
        try SystemCall.check("connect to local socket \(name)", rc, code: .transfer)
        return s
    }

    /// Makes blocking reads and writes fail with `transfer` after `seconds` without progress.
    public func setTimeout(_ seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        SystemCall.bestEffort("setsockopt SO_RCVTIMEO", setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)))
        SystemCall.bestEffort("setsockopt SO_SNDTIMEO", setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)))
    }

    /// Turns TCP keepalive on: after `idle` seconds without traffic, a probe every `interval`
    /// seconds; `count` unanswered probes end the connection (reads fail then). Best effort:
    /// a refused option leaves the socket as it was.
    public func setKeepAlive(idle: Int32, interval: Int32, count: Int32) {
        var on: Int32 = 1, i = idle, v = interval, c = count
        let size = socklen_t(MemoryLayout<Int32>.size)
        guard setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, size) == 0 else { return }
        SystemCall.bestEffort("setsockopt TCP_KEEPIDLE", setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPIDLE, &i, size))
        SystemCall.bestEffort("setsockopt TCP_KEEPINTVL", setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPINTVL, &v, size))
        SystemCall.bestEffort("setsockopt TCP_KEEPCNT", setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPCNT, &c, size))
    }

    /// The local IPv4 address this socket is bound or connected from ("a.b.c.d").
    public var localHost: String {
        var a = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        inet_ntop(AF_INET, &a.sin_addr, &text, socklen_t(text.count))
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The IPv4 address at the other end of a TCP connection ("a.b.c.d"); nil for a
    /// Unix-domain socket or on failure.
    public var peerHost: String? {
        var a = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } }
        guard rc == 0, Int32(a.sin_family) == AF_INET else { return nil }
        var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        guard inet_ntop(AF_INET, &a.sin_addr, &text, socklen_t(text.count)) != nil else { return nil }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The process at the other end of a Unix-domain socket, as the kernel saw it when it
    /// connected (SO_PEERCRED): nil for TCP or on failure.
    public var peerCredentials: (pid: Int32, uid: UInt32, gid: UInt32)? {
        // struct ucred { pid_t pid; uid_t uid; gid_t gid; } (Glibc's module hides the type).
        var cred: (Int32, UInt32, UInt32) = (0, 0, 0)
        var len = socklen_t(12)
        guard getsockopt(fd, SOL_SOCKET, 17 /* SO_PEERCRED */, &cred, &len) == 0, len == 12 else { return nil }
        return (cred.0, cred.1, cred.2)
    }

    /// Whether this is a Unix-domain socket (descriptors can travel over it).
    public var isUnixDomain: Bool {
        var a = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return rc == 0 && Int32(a.ss_family) == AF_UNIX
    }

    /// Ends both directions now: a thread blocked reading this socket wakes up.
    public func shutdown() {
        if fd >= 0 { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// The port this socket is bound to.
    public var localPort: Int {
        var a = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: a.sin_port))
    }

    /// Accepts one connection (non-blocking; TCP_NODELAY over TCP); nil when none is pending.
    public func accept() throws(KVError) -> Socket? {
        let c = Glibc.accept(fd, nil, nil)
        if c < 0 {
            if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED { return nil }
            throw SystemCall.failure("accept")
        }
        let s = Socket(adopting: c)
        SystemCall.bestEffort("fcntl FD_CLOEXEC", fcntl(c, F_SETFD, FD_CLOEXEC))
        s.setNonBlocking()
        if !s.isUnixDomain { s.setNoDelay() } // a Unix-domain socket has no Nagle to turn off
        return s
    }

    public func setNonBlocking() { SystemCall.bestEffort("fcntl O_NONBLOCK", fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)) }

    public func setNoDelay() {
        var one: Int32 = 1
        SystemCall.bestEffort("setsockopt TCP_NODELAY", setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size)))
    }

    /// Writes all of `bytes` (blocking socket), retrying short writes. Throws `transfer`.
    /// `deadline` (`monotonicClock`; 0: none): a write still unfinished then fails, however
    /// steadily the peer takes bytes (each `send` is also bounded by `setTimeout`).
    public func writeAll(_ bytes: UnsafeRawBufferPointer, deadline: Nanoseconds = 0) throws(KVError) {
        var done = 0
        while done < bytes.count {
            let base = bytes.baseAddress! + done, left = bytes.count - done
            switch try SystemCall.io("send", { send(fd, base, left, Int32(MSG_NOSIGNAL)) }) {
            case .bytes(let n): done += n
            case .wouldBlock: throw KVError(.transfer, "send timed out: the peer stopped reading")
            }
            if deadline != 0, done < bytes.count, monotonicClock() >= deadline { throw Self.pastDeadline }
        }
    }

    /// Reads exactly `into.count` bytes (blocking socket). Throws `transfer` when the peer
    /// closes first, or when `deadline` (`monotonicClock`; 0: none) passes before the last byte.
    public func readExactly(into: UnsafeMutableRawBufferPointer, deadline: Nanoseconds = 0) throws(KVError) {
        var done = 0
        while done < into.count {
            let base = into.baseAddress! + done, left = into.count - done
            switch try SystemCall.io("recv", { recv(fd, base, left, 0) }) {
            case .bytes(0): throw KVError(.transfer, "the peer closed the connection")
            case .bytes(let n): done += n
            case .wouldBlock: throw KVError(.transfer, "recv timed out: the peer stopped answering")
            }
            if deadline != 0, done < into.count, monotonicClock() >= deadline { throw Self.pastDeadline }
        }
    }

    static let pastDeadline = KVError(.transfer, "the transfer's deadline passed: the peer is too slow")

    /// `readExactly` that stores only bytes that arrived before `deadline` (`monotonicClock`):
    /// it waits for data without taking it (a one-byte `MSG_PEEK`), reads the clock, then
    /// takes what has arrived. Past the deadline it throws `transfer` and stores nothing more:
    /// a writer frozen mid-copy cannot finish its copy into space given to another object.
    public func readExactly(into: UnsafeMutableRawBufferPointer, arrivingBy deadline: Nanoseconds) throws(KVError) {
        var done = 0
        var probe: UInt8 = 0
        while done < into.count {
            let peeked = try withUnsafeMutablePointer(to: &probe) { (p) throws(KVError) in
                try SystemCall.io("recv", { recv(fd, p, 1, Int32(MSG_PEEK)) })
            }
            switch peeked {
            case .bytes(0): throw KVError(.transfer, "the peer closed the connection")
            case .bytes: break
            case .wouldBlock: throw KVError(.transfer, "recv timed out: the peer stopped answering")
            }
            guard monotonicClock() < deadline else {
                throw KVError(.transfer, "the write's deadline passed while its bytes were arriving: the rest is refused")
            }
            let base = into.baseAddress! + done, left = into.count - done
            switch try SystemCall.io("recv", { recv(fd, base, left, Int32(MSG_DONTWAIT)) }) {
            case .bytes(0): throw KVError(.transfer, "the peer closed the connection")
            case .bytes(let n): done += n
            case .wouldBlock: continue
            }
        }
    }

    /// One non-blocking read into `buffer`: bytes read, 0 at end of stream, nil when nothing
    /// is available.
    public func readAvailable(into buffer: UnsafeMutableRawBufferPointer) throws(KVError) -> Int? {
        switch try SystemCall.io("recv", { recv(fd, buffer.baseAddress, buffer.count, 0) }) {
        case .bytes(let n): return n
        case .wouldBlock: return nil
        }
    }

    /// `readAvailable` that also takes a descriptor the peer attached (SCM_RIGHTS; Unix-domain
    /// sockets): `descriptor` is set to it (the caller owns it), else -1.
    public func readAvailable(into buffer: UnsafeMutableRawBufferPointer, descriptor: inout Int32) throws(KVError) -> Int? {
        var fd: Int32 = -1
        let n = kv_recv_fd(self.fd, &fd, buffer.baseAddress, buffer.count)
        descriptor = fd
        if n >= 0 { return n }
        if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { return nil }
        throw SystemCall.failure("recvmsg", code: .transfer)
    }

    /// Writes all of `bytes` with the descriptor `fd` attached to the first of them
    /// (SCM_RIGHTS; Unix-domain sockets), the rest as `writeAll`. Throws `transfer`.
    public func writeAll(_ bytes: UnsafeRawBufferPointer, attaching fd: Int32) throws(KVError) {
        let n = kv_send_fd(self.fd, fd, bytes.baseAddress, bytes.count)
        guard n > 0 else { throw SystemCall.failure("sendmsg with a descriptor", code: .transfer) }
        if n < bytes.count { try writeAll(UnsafeRawBufferPointer(rebasing: bytes[n...])) }
    }

    /// One non-blocking write of `bytes`: bytes written (possibly fewer), 0 when the socket
    /// cannot take any now.
    public func writeAvailable(_ bytes: UnsafeRawBufferPointer) throws(KVError) -> Int {
        switch try SystemCall.io("send", { send(fd, bytes.baseAddress!, bytes.count, Int32(MSG_NOSIGNAL)) }) {
        case .bytes(let n): return n
        case .wouldBlock: return 0
        }
    }
}
