/// What a timer of `ObjectTable` ends.
public enum TimerKind: Int, Sendable, CaseIterable {
    case lease = 0
    case softPin = 1
    case expiry = 2
}

/// Deadlines of the object table: a binary min-heap of (deadline, version slot, kind) with at
/// most one timer per (slot, kind). Its position index makes `schedule` (insert or move) and
/// `cancel` O(log n), so a dropped version never leaves a timer behind.
///
/// Not thread-safe: the owner (the object table) serialises access.
struct TimerQueue: Sendable {
    struct Timer: Sendable {
        var deadline: Nanoseconds
        var slot: Int32
        var kind: UInt8
    }

    private var heap: [Timer] = []
    /// position[slot * kinds + kind]: index in `heap`, or -1.
    private var position: [Int32] = []
    private static let kinds = TimerKind.allCases.count

    var count: Int { heap.count }

    private func index(_ slot: Int32, _ kind: TimerKind) -> Int { Int(slot) * Self.kinds + kind.rawValue }

    /// The deadline of (slot, kind), or nil when none is scheduled.
    func deadline(slot: Int32, kind: TimerKind) -> Nanoseconds? {
        let i = index(slot, kind)
        guard i < position.count, position[i] >= 0 else { return nil }
        return heap[Int(position[i])].deadline
    }

    /// Schedules (slot, kind) at `deadline`, replacing its previous deadline if any.
    mutating func schedule(slot: Int32, kind: TimerKind, at deadline: Nanoseconds) {
        let i = index(slot, kind)
        if i >= position.count { position.append(contentsOf: repeatElement(-1, count: i + 1 - position.count)) }
        if position[i] >= 0 {
            let p = Int(position[i])
            let old = heap[p].deadline
            heap[p].deadline = deadline
            if deadline < old { siftUp(p) } else { siftDown(p) }
            return
        }
        heap.append(Timer(deadline: deadline, slot: slot, kind: UInt8(kind.rawValue)))
        position[i] = Int32(heap.count - 1)
        siftUp(heap.count - 1)
    }

    /// Removes (slot, kind) if scheduled.
    mutating func cancel(slot: Int32, kind: TimerKind) {
        let i = index(slot, kind)
        guard i < position.count, position[i] >= 0 else { return }
        removeAt(Int(position[i]))
    }

    /// Cancels every timer of `slot`.
    mutating func cancelAll(slot: Int32) {
        for k in TimerKind.allCases { cancel(slot: slot, kind: k) }
    }

    /// Removes and returns the earliest timer whose deadline is at or before `now`.
    mutating func popDue(now: Nanoseconds) -> (slot: Int32, kind: TimerKind, deadline: Nanoseconds)? {
        guard let top = heap.first, top.deadline <= now else { return nil }
        removeAt(0)
        return (top.slot, TimerKind(rawValue: Int(top.kind))!, top.deadline)
    }

    // MARK: heap

    private mutating func removeAt(_ p: Int) {
        let gone = heap[p]
        position[index(gone.slot, TimerKind(rawValue: Int(gone.kind))!)] = -1
        let last = heap.removeLast()
        guard p < heap.count else { return }
        heap[p] = last
        position[index(last.slot, TimerKind(rawValue: Int(last.kind))!)] = Int32(p)
        if p > 0 && heap[p].deadline < heap[(p - 1) / 2].deadline { siftUp(p) } else { siftDown(p) }
    }

    private mutating func place(_ t: Timer, at p: Int) {
        heap[p] = t
        position[index(t.slot, TimerKind(rawValue: Int(t.kind))!)] = Int32(p)
    }

    private mutating func siftUp(_ start: Int) {
        var p = start
        let t = heap[p]
        while p > 0 {
            let parent = (p - 1) / 2
            guard t.deadline < heap[parent].deadline else { break }
            place(heap[parent], at: p)
            p = parent
        }
        place(t, at: p)
    }

    private mutating func siftDown(_ start: Int) {
        var p = start
        let t = heap[p]
        let n = heap.count
        while true {
            var child = 2 * p + 1
            guard child < n else { break }
            if child + 1 < n && heap[child + 1].deadline < heap[child].deadline { child += 1 }
            guard heap[child].deadline < t.deadline else { break }
            place(heap[child], at: p)
            p = child
        }
        place(t, at: p)
    }
}
