#if canImport(Glibc)
import Glibc
#endif

/// kvstore's diagnostics: one line to standard error, prefixed "kvstore: ", written with one
/// `write` so lines of several threads do not interleave.
public func logLine(_ line: String) {
    _ = "kvstore: \(line)\n".withCString { Glibc.write(2, $0, strlen($0)) }
}
