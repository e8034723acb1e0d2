import KVAccelerator
import KVCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Counts operations in flight and refuses new ones once closed, so `close` can wait for
/// running copies before it unmaps memory. One atomic add on enter and one on leave.
public final class OperationGate: Sendable {
    private static let closedBit = 1 << 62
    private let state = Atomic<Int>(0)

    public init() {}

    /// Admits an operation; throws `storeClosed` after `close`.
    @inline(__always)
    public func enter() throws(KVError) {
        let v = state.add(1, ordering: .acquiring).newValue
        if v & Self.closedBit != 0 {
            state.subtract(1, ordering: .releasing)
            throw .closed()
        }
    }

    @inline(__always)
    public func leave() {
        state.subtract(1, ordering: .releasing)
    }

    public var isClosed: Bool { state.load(ordering: .acquiring) & Self.closedBit != 0 }

    /// Refuses new operations and waits until those in flight have left. Returns false when
    /// the gate was already closed.
    @discardableResult
    public func close() -> Bool {
        let old = state.bitwiseOr(Self.closedBit, ordering: .acquiringAndReleasing).oldValue
        while state.load(ordering: .acquiring) & ~Self.closedBit != 0 { sched_yield() }
        return old & Self.closedBit == 0
    }
}
