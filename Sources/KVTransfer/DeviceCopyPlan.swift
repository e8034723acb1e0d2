import KVAccelerator
import KVCore

/// Copies whose sides may live on devices, grouped by the device that performs them.
///
/// Each source and destination region comes with its location. A slice between two host
/// regions is a host copy; any other slice is performed by a device — the source's for a
/// device→host or device→device copy, the destination's for host→device — with its direction
/// named, on the stream the caller declared for the device-side memory (`CallDevices`;
/// unknown otherwise). `execute` runs the host copies, then each (device, stream) group's
/// copies inside one `withCurrent` and one `withCopies` scope, so a batch mixing several
/// devices switches device once per device, not once per buffer, and each group is ordered
/// after its stream's earlier work and complete before `execute` returns. Each copy carries an
/// owner (an object of a batch): a failure fails its owner only, and the owner's remaining
/// copies are skipped.
public struct DeviceCopyPlan {
    public struct Copy: Sendable, Hashable {
        public let op: CopyOp
        public let direction: CopyDirection
        public let owner: Int
    }

    /// Host→host slices.
    public private(set) var hostCopies: [Copy] = []
    /// Device slices per performing device and stream, in order of first use.
    public private(set) var deviceGroups: [(device: MemoryLocation, stream: DeviceStream, copies: [Copy])] = []

    public init() {}

    /// Plans writing the `parts` stream into the host region `destination` (a segment) for
    /// `owner`. `locations` is aligned with `parts`; nil means every part is host memory.
    public mutating func addWrite(
        _ parts: UnsafeBufferPointer<MemoryRegion>, locations: [MemoryLocation]?,
        into destination: MemoryRegion, owner: Int
    ) {
        withUnsafePointer(to: destination) { d in
            add(
                sources: parts, source: { locations?[$0] ?? .host },
                destinations: UnsafeBufferPointer(start: d, count: 1), destination: { _ in .host }, owner: owner)
        }
    }

    /// Plans reading the host region `source` (a segment) into the `destinations` stream for
    /// `owner`. `locations` is aligned with `destinations`; nil means all are host memory.
    public mutating func addRead(
        from source: MemoryRegion, into destinations: UnsafeBufferPointer<MemoryRegion>,
        locations: [MemoryLocation]?, owner: Int
    ) {
        withUnsafePointer(to: source) { s in
            add(
                sources: UnsafeBufferPointer(start: s, count: 1), source: { _ in .host },
                destinations: destinations, destination: { locations?[$0] ?? .host }, owner: owner)
        }
    }

    private mutating func add(
        sources: UnsafeBufferPointer<MemoryRegion>, source: (Int) -> MemoryLocation,
        destinations: UnsafeBufferPointer<MemoryRegion>, destination: (Int) -> MemoryLocation,
        owner: Int
    ) {
        TransferPlan.forEachIndexedSlice(sources: sources, destinations: destinations) { op, si, di in
            add(op, from: source(si), to: destination(di), owner: owner)
        }
    }

    /// Plans one copy of `op` whose source lives at `from` and destination at `to` (a KV block
    /// run, say) for `owner`.
    public mutating func add(_ op: CopyOp, from s: MemoryLocation, to d: MemoryLocation, owner: Int) {
        let direction = CopyDirection(from: s, to: d)
        let copy = Copy(op: op, direction: direction, owner: owner)
        if direction == .hostToHost {
            hostCopies.append(copy)
            return
        }
        let performer = s.isHost ? d : s
        let stream = CallDevices.stream(at: s.isHost ? op.destination : op.source)
        if let g = deviceGroups.firstIndex(where: { $0.device == performer && $0.stream == stream }) {
            deviceGroups[g].copies.append(copy)
        } else {
            deviceGroups.append((performer, stream, [copy]))
        }
    }

    /// Device calls of one batched call at most (a KV pull's aggregated executor).
    public static let maxCopiesPerBatch = 1024

    /// Runs every copy; returns the failure of each owner that failed (empty when all
    /// succeeded). A device missing from `devices` fails its copies with `invalidArgument`.
    /// Each device used is held in `holds` (acquired once per store).
    public func execute(
        transport: LocalCopyTransport, into destination: LocalCopyTransport.Destination,
        devices: AcceleratorSnapshot, holds: DeviceHolds
    ) -> [Int: KVError] {
        execute(transport: transport, into: destination, devices: devices, holds: holds, batched: false).failed
    }

    /// `execute`, and how many operations it issued (a host copy, a device copy or a batched
    /// device call each count one). `batched`: each group's copies of one direction go in
    /// batched calls of up to `maxCopiesPerBatch` (`copyBatch`); a device without one fails
    /// every owner with `unsupported` before any byte moves.
    public func execute(
        transport: LocalCopyTransport, into destination: LocalCopyTransport.Destination,
        devices: AcceleratorSnapshot, holds: DeviceHolds, batched: Bool
    ) -> (failed: [Int: KVError], operations: Int) {
        var failed: [Int: KVError] = [:]
        var operations = 0
        func fail(_ copies: [Copy], _ error: KVError) {
            for c in copies where failed[c.owner] == nil { failed[c.owner] = error }
        }
        if batched { // refuse before moving anything when a device has no batched call
            for group in deviceGroups {
                guard let device = devices.device(at: group.device) else { continue }
                do throws(KVError) {
                    try holds.hold(device)
                    try device.withCurrent { () throws(KVError) in
                        try device.copyBatch(group.copies[0].direction, sources: [], destinations: [], counts: [], stream: group.stream)
                    }
                } catch {
                    fail(hostCopies + deviceGroups.flatMap(\.copies), error)
                    return (failed, 0)
                }
            }
        }
        for c in hostCopies where failed[c.owner] == nil {
            transport.copyHost(c.op, into: destination)
            operations += 1
        }
        for group in deviceGroups {
            guard let device = devices.device(at: group.device) else {
                fail(group.copies, devices.missing(group.device))
                continue
            }
            do throws(KVError) {
                try holds.hold(device)
                try device.withCurrent { () throws(KVError) in
                    try device.withCopies(on: group.stream) { () throws(KVError) in
                        if batched {
                            operations += runBatches(group.copies, on: device, stream: group.stream, transport: transport, fail: fail)
                            return
                        }
                        for c in group.copies where failed[c.owner] == nil {
                            do throws(KVError) {
                                try device.copy(
                                    c.direction, from: c.op.source, to: c.op.destination, count: c.op.length,
                                    stream: group.stream)
                                transport.count(c.op.length)
                                operations += 1
                            } catch {
                                failed[c.owner] = error
                            }
                        }
                    }
                }
            } catch {
                fail(group.copies, error)
            }
        }
        return (failed, operations)
    }

    /// One group's copies in batched calls, per direction in order of first use; returns the
    /// calls made. A failed call fails the owners of its copies.
    private func runBatches(
        _ copies: [Copy], on device: any AcceleratorDevice, stream: DeviceStream, transport: LocalCopyTransport,
        fail: ([Copy], KVError) -> Void
    ) -> Int {
        var directions: [CopyDirection] = []
        for c in copies where !directions.contains(c.direction) { directions.append(c.direction) }
        var calls = 0
        for d in directions {
            let mine = copies.filter { $0.direction == d }
            for start in stride(from: 0, to: mine.count, by: Self.maxCopiesPerBatch) {
                let chunk = Array(mine[start..<min(start + Self.maxCopiesPerBatch, mine.count)])
                do throws(KVError) {
                    try device.copyBatch(
                        d, sources: chunk.map(\.op.source), destinations: chunk.map(\.op.destination),
                        counts: chunk.map(\.op.length), stream: stream)
                    for c in chunk { transport.count(c.op.length) }
                } catch {
                    fail(chunk, error)
                }
                calls += 1
            }
        }
        return calls
    }
}
