/// A kind of device: "cpu" for host memory, "cuda" for NVIDIA GPUs, and whatever other kinds
/// register themselves (tests register "fake"). A name: lower-case letters, digits and '_',
/// starting with a letter.
public struct DeviceKind: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }

    public static let cpu = DeviceKind(rawValue: "cpu")
    public static let cuda = DeviceKind(rawValue: "cuda")

    public var description: String { rawValue }

    static func isValidName(_ s: Substring) -> Bool {
        guard let first = s.utf8.first, (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(first) else { return false }
        return s.utf8.allSatisfy { c in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c)
                || c == UInt8(ascii: "_")
        }
    }
}

/// Where a range of memory lives: host memory or one device. Written "cpu", "cpu:0",
/// "cuda:3" (the form Python users pass as `location=`), at most `maxTextBytes` bytes.
/// Parsing checks the form only; whether the device exists is `AcceleratorRegistry`'s
/// question (KVAccelerator). A value type of KVCore: KV layouts carry it parsed.
public struct MemoryLocation: Sendable, Hashable, CustomStringConvertible {
    public let kind: DeviceKind
    public let index: Int

    public static let host = MemoryLocation(kind: .cpu, index: 0)

    /// The longest written form accepted: the C ABI's `kv_block_buffer.location` holds 32
    /// bytes with its NUL (Python reads the same limit from the ABI).
    public static let maxTextBytes = 31

    public init(kind: DeviceKind, index: Int) {
        self.kind = kind
        self.index = index
    }

    /// Parses "kind" or "kind:N" (N a non-negative decimal). Throws `invalidArgument` for
    /// anything else.
    public init(parsing text: String) throws(KVError) {
        guard text.utf8.count <= Self.maxTextBytes else {
            throw .invalidArgument("memory location '\(text.prefix(40))' is longer than \(Self.maxTextBytes) bytes")
        }
        let parts = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard DeviceKind.isValidName(parts[0]) else {
            throw .invalidArgument("unknown memory location '\(text)'; expected 'cpu' or 'cuda:N'")
        }
        var index = 0
        if parts.count == 2 {
            guard parts[1].utf8.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }),
                let i = Int(parts[1])
            else {
                throw .invalidArgument("bad device index in memory location '\(text)'")
            }
            index = i
        }
        self.kind = DeviceKind(rawValue: String(parts[0]))
        self.index = index
    }

    public var isHost: Bool { kind == .cpu }
    public var description: String { "\(kind.rawValue):\(index)" }
    /// The form KV layouts give back: "cpu" for the host, else "kind:N".
    public var name: String { isHost ? "cpu" : description }
}

/// The direction of a copy, always named explicitly: a device copy engine needs it, and a
/// copy whose direction does not match where its pointers live is refused.
public enum CopyDirection: Sendable, Hashable, CustomStringConvertible {
    case hostToHost, hostToDevice, deviceToHost, deviceToDevice

    public init(from source: MemoryLocation, to destination: MemoryLocation) {
        switch (source.isHost, destination.isHost) {
        case (true, true): self = .hostToHost
        case (true, false): self = .hostToDevice
        case (false, true): self = .deviceToHost
        case (false, false): self = .deviceToDevice
        }
    }

    public var description: String {
        switch self {
        case .hostToHost: "H2H"
        case .hostToDevice: "H2D"
        case .deviceToHost: "D2H"
        case .deviceToDevice: "D2D"
        }
    }
}
