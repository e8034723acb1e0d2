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
    public mutating func addWrite(_ parts: UnsafeBufferPointer<MemoryRegion>, locations: [MemoryLocation]?,
                                  into destination: MemoryRegion, owner: Int) {
        withUnsafePointer(to: destination) { d in
            add(sources: parts, source: { locations?[$0] ?? .host },
                destinations: UnsafeBufferPointer(start: d, count: 1), destination: { _ in .host }, owner: owner)
        }
    }

    /// Plans reading the host region `source` (a segment) into the `destinations` stream for
    /// `owner`. `locations` is aligned with `destinations`; nil means all are host memory.
    public mutating func addRead(from source: MemoryRegion, into destinations: UnsafeBufferPointer<MemoryRegion>,
                                 locations: [MemoryLocation]?, owner: Int) {
        withUnsafePointer(to: source) { s in
            add(sources: UnsafeBufferPointer(start: s, count: 1), source: { _ in .host },
                destinations: destinations, destination: { locations?[$0] ?? .host }, owner: owner)
        }
    }

    private mutating func add(sources: UnsafeBufferPointer<MemoryRegion>, source: (Int) -> MemoryLocation,
                              destinations: UnsafeBufferPointer<MemoryRegion>, destination: (Int) -> MemoryLocation,
                              owner: Int) {
        TransferPlan.forEachIndexedSlice(sources: sources, destinations: destinations) { op, si, di in
            let s = source(si), d = destination(di)
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
    }

    /// Runs every copy; returns the failure of each owner that failed (empty when all
    /// succeeded). A device missing from `devices` fails its copies with `invalidArgument`.
    /// Each device used is held in `holds` (acquired once per store).
    public func execute(transport: LocalCopyTransport, into destination: LocalCopyTransport.Destination,
                        devices: AcceleratorSnapshot, holds: DeviceHolds) -> [Int: KVError] {
        var failed: [Int: KVError] = [:]
        for c in hostCopies { transport.copyHost(c.op, into: destination) }
        for group in deviceGroups {
            guard let device = devices.device(at: group.device) else {
                let error = devices.missing(group.device)
                for c in group.copies where failed[c.owner] == nil { failed[c.owner] = error }
                continue
            }
            do throws(KVError) {
                try holds.hold(device)
                try device.withCurrent { () throws(KVError) in
                    try device.withCopies(on: group.stream) { () throws(KVError) in
                        for c in group.copies where failed[c.owner] == nil {
                            do throws(KVError) {
                                try device.copy(c.direction, from: c.op.source, to: c.op.destination, count: c.op.length,
                                                stream: group.stream)
                                transport.count(c.op.length)
                            } catch {
                                failed[c.owner] = error
                            }
                        }
                    }
                }
            } catch {
                for c in group.copies where failed[c.owner] == nil { failed[c.owner] = error }
            }
        }
        return failed
    }
}
