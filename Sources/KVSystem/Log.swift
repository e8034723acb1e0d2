#if canImport(Glibc)
import Glibc
#endif
import KVCore

/// How much a `Logger` says: `error` < `warning` < `info` < `debug`.
public enum LogLevel: Int, Sendable, Comparable {
    case error, warning, info, debug

    public static func < (a: LogLevel, b: LogLevel) -> Bool { a.rawValue < b.rawValue }

    /// "error", "warning", "info", "debug" (case-insensitive); nil for anything else.
    public init?(name: String) {
        switch name.lowercased() {
        case "error": self = .error
        case "warning", "warn": self = .warning
        case "info": self = .info
        case "debug": self = .debug
        default: return nil
        }
    }
}

/// kvstore's diagnostics: one line per message, "<prefix>: <line>", written to standard error
/// with one `write` (lines of several threads never interleave). Messages below the level are
/// dropped; the rest pass a rate limit — a burst of `burst` lines, then `perSecond` lines a
/// second — so a failure that repeats in a tight loop (a full descriptor table, a peer that
/// reconnects without end) cannot flood the log; the next line that passes says how many were
/// suppressed meanwhile. Thread-safe.
public final class Logger: Sendable {
    public let prefix: String
    public let level: LogLevel
    private let burst: Double
    private let perSecond: Double
    private let clock: Clock
    private let sink: @Sendable (String) -> Void
    /// Tokens left, when they were counted, and lines dropped since the last one written.
    private let bucket: Locked<(tokens: Double, at: Nanoseconds, dropped: Int)>

    public init(
        prefix: String, level: LogLevel = Logger.levelFromEnvironment, burst: Int = 100, perSecond: Int = 20,
        clock: @escaping Clock = monotonicClock,
        sink: @escaping @Sendable (String) -> Void = { text in _ = text.withCString { Glibc.write(2, $0, strlen($0)) } }
    ) {
        self.prefix = prefix
        self.level = level
        self.burst = Double(burst)
        self.perSecond = Double(perSecond)
        self.clock = clock
        self.sink = sink
        bucket = Locked((Double(burst), clock(), 0))
    }

    /// The client library's logger ("kvstore: ...").
    public static let shared = Logger(prefix: "kvstore")

    /// `KVSTORE_LOG_LEVEL` ("error", "warning", "info", "debug"); `info` when unset or unknown.
    public static var levelFromEnvironment: LogLevel {
        Environment.string("KVSTORE_LOG_LEVEL").flatMap { LogLevel(name: $0) } ?? .info
    }

    public func log(_ level: LogLevel, _ line: String) {
        guard level <= self.level else { return }
        let dropped: Int? = bucket.withLock { b in
            let now = clock()
            b.tokens = min(burst, b.tokens + Double(now &- b.at) / 1e9 * perSecond)
            b.at = now
            guard b.tokens >= 1 else {
                b.dropped += 1
                return nil
            }
            b.tokens -= 1
            defer { b.dropped = 0 }
            return b.dropped
        }
        guard let dropped else { return }
        let note = dropped > 0 ? " (\(dropped) earlier line\(dropped == 1 ? "" : "s") suppressed: too many)" : ""
        sink("\(prefix): \(line)\(note)\n")
    }

    public func error(_ line: String) { log(.error, line) }
    public func warning(_ line: String) { log(.warning, line) }
    public func info(_ line: String) { log(.info, line) }
    public func debug(_ line: String) { log(.debug, line) }
}

/// A warning through the shared logger: what the library's components take as their `log`.
public func logLine(_ line: String) {
    Logger.shared.warning(line)
}
