import KVCore

/// Where a range of memory lives: host memory or one accelerator. Written as "cpu", "cpu:0",
/// "cuda:3" (the form Python users pass as `location=`).
public struct MemoryLocation: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable { case cpu, cuda }
    public let kind: Kind
    public let index: Int

    public static let host = MemoryLocation(kind: .cpu, index: 0)

    public init(kind: Kind, index: Int) {
        self.kind = kind
        self.index = index
    }

    /// Parses "cpu", "cpu:N", "cuda", "cuda:N". Throws `invalidArgument` for anything else.
    public init(parsing text: String) throws(KVError) {
        let parts = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard let kind = Kind(rawValue: String(parts[0])) else {
            throw .invalidArgument("unknown memory location '\(text)'; expected 'cpu' or 'cuda:N'")
        }
        var index = 0
        if parts.count == 2 {
            guard let i = Int(parts[1]), i >= 0 else {
                throw .invalidArgument("bad device index in memory location '\(text)'")
            }
            index = i
        }
        self.kind = kind
        self.index = index
    }

    public var description: String { "\(kind.rawValue):\(index)" }
}
