import Synchronization

/// Byte and operation counters of the transfer layer, readable at any time from any thread
/// (relaxed atomics; a snapshot taken while copies run is approximate, a quiescent one exact).
public final class TransferCounters: Sendable {
    /// Bytes copied between caller memory and segments (each byte counted once per copy).
    public let bytesCopied = Atomic<Int>(0)
    /// Bytes copied through an intermediate staging buffer (0 unless a transport needs one).
    public let bytesStaged = Atomic<Int>(0)
    /// Copy operations issued (slices).
    public let copyOps = Atomic<Int>(0)
    /// Bytes sent to or received from peers' segments over the network (part of `bytesCopied`).
    public let networkBytes = Atomic<Int>(0)
    /// The part of `networkBytes` moved by RDMA (the rest went over TCP).
    public let rdmaBytes = Atomic<Int>(0)

    public init() {}
}
