import KVCore
import Synchronization

/// A clock tests move by hand: `now` starts at `start` and changes only through `advance`,
/// plus `step` nanoseconds after every reading when `step` > 0 (time that passes with work,
/// deterministically). Thread-safe.
public final class ManualClock: Sendable {
    private let value: Atomic<UInt64>
    private let step: UInt64

    public init(start: Nanoseconds = 1_000_000_000, step: Nanoseconds = 0) {
        value = Atomic(start)
        self.step = step
    }

    public var now: Nanoseconds { value.load(ordering: .relaxed) }

    public func advance(by ns: Nanoseconds) { value.add(ns, ordering: .relaxed) }

    public func advance(seconds: Double) { advance(by: Nanoseconds(seconds * 1e9)) }

    /// The clock function to hand to a store.
    public var clock: @Sendable () -> Nanoseconds {
        { [self] in step == 0 ? value.load(ordering: .relaxed) : value.add(step, ordering: .relaxed).oldValue }
    }
}
