#if canImport(Glibc)
import Glibc
#endif

/// The process environment, read in one place: every `KVSTORE_*` setting goes through here
/// (the list, with meanings, is in docs/architecture.md, "Environment"). An empty value counts
/// as unset; a value a setting cannot read is treated as unset by the typed readers (callers
/// that must refuse it read the string).
public enum Environment {
    /// The value of `name`, nil when unset or empty.
    public static func string(_ name: String) -> String? {
        guard let v = getenv(name), v.pointee != 0 else { return nil }
        return String(cString: v)
    }

    /// A positive, finite number of `name`.
    public static func positiveDouble(_ name: String) -> Double? {
        string(name).flatMap(Double.init).flatMap { $0 > 0 && $0.isFinite ? $0 : nil }
    }

    /// A non-negative integer of `name` that fits `T`.
    public static func integer<T: FixedWidthInteger>(_ name: String, as: T.Type = T.self) -> T? {
        string(name).flatMap { T($0) }.flatMap { $0 >= 0 ? $0 : nil }
    }
}
