#if canImport(Glibc)
import Glibc
#endif
import CKVCopy
import KVCore
import Synchronization

/// The secret a cluster's master, clients and segment servers share. Never sent: both sides
/// of every connection prove they hold it (`Authentication`).
///
/// Where it comes from, in order: an explicit token (`Store.connect(token=...)`), then
/// `KVSTORE_MASTER_TOKEN`, then, for a master on a loopback address, the token file the master
/// wrote for its port in this user's runtime directory (`TokenFile`). A token read from the
/// file is read again on `reload()` (a restarted master writes a new one).
public final class ClusterToken: Sendable, ExpressibleByStringLiteral {
    private let value: Locked<[UInt8]>
    /// The file this token was read from (nil: given explicitly or by the environment).
    public let file: String?

    public init(_ token: String) {
        value = Locked(Array(token.utf8))
        file = nil
    }

    public convenience init(stringLiteral value: String) { self.init(value) }

    /// The token for a master at host:port, as a client finds it (a tenant's token is never
    /// read from the master's file, which holds the cluster's).
    public init(explicit: String?, host: String, port: Int, tenant: String = "") {
        if let explicit, !explicit.isEmpty {
            value = Locked(Array(explicit.utf8))
            file = nil
        } else if let env = TokenFile.environmentToken() {
            value = Locked(Array(env.utf8))
            file = nil
        } else if tenant.isEmpty, Socket.isLoopback(host), let path = try? TokenFile.path(port: port) {
            value = Locked(Array((TokenFile.read(path) ?? "").utf8))
            file = path
        } else {
            value = Locked([])
            file = nil
        }
    }

    public var bytes: [UInt8] { value.withLock { $0 } }

    /// Replaces the value (the data plane's key, received in each welcome).
    public func set(_ bytes: [UInt8]) { value.withLock { $0 = bytes } }

    /// Reads the token file again (nothing for an explicit token).
    public func reload() {
        guard let file, let t = TokenFile.read(file) else { return }
        value.withLock { $0 = Array(t.utf8) }
    }

    /// What to tell a user whose token was refused.
    public var hint: String {
        if let file { return "the token was read from \(file)" }
        return "check the token (Store.connect(token=...) or KVSTORE_MASTER_TOKEN)"
    }
}

/// A directory only this user may change: created mode 0700 when missing; an existing one
/// must be a real directory (not a link) owned by this user, with none of the `forbidden`
/// mode bits (0o077: nobody else may even read it; 0o022: nobody else may plant files).
public enum PrivateDirectory {
    /// Throws `invalidArgument` naming `what` and the problem.
    public static func ensure(_ dir: String, what: String, forbidden: mode_t) throws(KVError) {
        if mkdir(dir, 0o700) != 0 && errno != EEXIST {
            throw SystemCall.failure("mkdir of the \(what) \(dir)", code: .invalidArgument)
        }
        var st = stat()
        guard lstat(dir, &st) == 0 else { throw SystemCall.failure("lstat of \(dir)", code: .invalidArgument) }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw .invalidArgument("\(what) \(dir) is not a directory") }
        guard st.st_uid == geteuid() else {
            throw .invalidArgument("\(what) \(dir) belongs to uid \(st.st_uid), not to this user (\(geteuid())): refusing it")
        }
        guard st.st_mode & forbidden == 0 else {
            throw .invalidArgument(
                "\(what) \(dir) has mode \(String(st.st_mode & 0o777, radix: 8)); "
                    + (forbidden & 0o044 != 0 ? "it must be 700" : "others must not be able to write to it (chmod go-w)"))
        }
    }
}

/// The token files of masters: `<runtime dir>/master-<port>.token`, mode 0600, in a directory
/// of mode 0700 owned by this user. The runtime directory is `KVSTORE_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/kvstore`, else `/tmp/kvstore-<uid>`. A directory or file that another
/// user owns, or that others may read or write, is refused (like ssh's key checks): nobody
/// else can plant or read a token.
public enum TokenFile {
    /// The token in `KVSTORE_MASTER_TOKEN`, if set and not empty.
    public static func environmentToken() -> String? {
        Environment.string("KVSTORE_MASTER_TOKEN")
    }

    /// The runtime directory (created 0700 when missing). Throws `invalidArgument` when it
    /// exists with the wrong owner, type or mode.
    public static func directory() throws(KVError) -> String {
        let dir: String
        if let v = Environment.string("KVSTORE_RUNTIME_DIR") {
            dir = v
        } else if let v = Environment.string("XDG_RUNTIME_DIR") {
            dir = v + "/kvstore"
        } else {
            dir = "/tmp/kvstore-\(geteuid())"
        }
        try PrivateDirectory.ensure(dir, what: "runtime directory", forbidden: 0o077)
        return dir
    }

    public static func path(port: Int) throws(KVError) -> String {
        "\(try directory())/master-\(port).token"
    }

    /// The token in `path`, or nil when it is missing, not this user's, readable by others,
    /// or empty.
    public static func read(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_uid == geteuid(), st.st_mode & 0o077 == 0, st.st_size <= 4096 else { return nil }
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = Glibc.read(fd, &buf, buf.count)
        guard n > 0 else { return nil }
        let text = String(decoding: buf[0..<n], as: UTF8.self).split(whereSeparator: { $0 == "\n" || $0 == "\r" || $0 == " " }).first
        return text.map(String.init)
    }

    /// Writes `token` to `path` (mode 0600), replacing what was there atomically.
    public static func write(_ token: String, to path: String) throws(KVError) {
        let tmp = path + ".\(getpid()).tmp"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw SystemCall.failure("create \(tmp)", code: .invalidArgument) }
        let line = Array((token + "\n").utf8)
        let n = line.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        guard n == line.count else {
            unlink(tmp)
            throw KVError(.invalidArgument, "could not write the token file \(tmp)")
        }
        guard rename(tmp, path) == 0 else {
            unlink(tmp)
            throw SystemCall.failure("rename \(tmp) to \(path)", code: .invalidArgument)
        }
    }

    /// Removes `path` if it still holds `token` (another master may have replaced it).
    public static func remove(_ path: String, ifHolding token: String) {
        if read(path) == token { unlink(path) }
    }
}
