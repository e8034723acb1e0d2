import KVAccelerator
import KVCore
import KVTransfer

extension StoreClient {
    /// This client's segment takes no new object from now on; what it holds stays readable
    /// until it leaves (a graceful unmount). `unsupported` in an embedded store,
    /// `invalidArgument` for a client without a segment.
    public func drainSegment() throws(KVError) {
        try enter()
        defer { leave() }
        try master.drainSegment()
    }

    /// Adds replicas of `key` in each of `targets` (segments of the cluster that hold none
    /// yet); with `dropping`, moves the replica in that segment instead (it goes once the copy
    /// is in place). The bytes go through this client: read from a current replica (verified
    /// as any read: lease and checksum) straight into a target on this host when there is one
    /// (else into staging memory), then written to the other targets. Readers
    /// see the object all along; when it is removed or replaced meanwhile, nothing changes and
    /// this throws `objectNotFound`. `unsupported` in an embedded store (one segment).
    public func copyReplicas(key: ObjectKey, to targets: [SegmentID], dropping: SegmentID? = nil) throws(KVError) {
        try enter()
        defer { leave() }
        let t = try master.beginCopy(key: key, to: targets, dropping: dropping)
        let c = t.copy
        do throws(KVError) {
            guard let first = c.sources.first else { throw KVError(.internal, "the master named no replica to copy from") }
            let read = ReadTicket(
                handle: 0, segment: first.segment, offset: first.offset, size: c.size, fallbacks: Array(c.sources.dropFirst()),
                leaseEnd: t.leaseEnd, checksum: c.checksum)
            var write = WriteTicket(handle: 0, size: c.size, inPlace: false, replicas: c.targets)
            write.deadline = t.deadline
            write.beginBy = t.beginBy
            // Fills the targets other than `skip` from `parts`.
            func fill(from parts: UnsafeBufferPointer<MemoryRegion>, skip: Replica?) throws(KVError) {
                var plan = DeviceCopyPlan()
                for r in c.targets where r != skip {
                    _ = try self.write(parts, locations: nil, size: c.size, to: r, of: write, plan: &plan, owner: 0)
                }
            }
            // A target mapped on this host is read into directly (it is invisible until the
            // commit, which a failed check never sends), and fills the others: no staging copy.
            var local: (Replica, MemoryRegion)? = nil
            for r in c.targets where local == nil {
                if case .mapped(let s) = try access(r.segment) { local = (r, try Self.region(of: s, r, c.size)) }
            }
            if let (r, region) = local {
                try Self.checkDeadline(write)
                try withUnsafePointer(to: region) { (d) throws(KVError) in
                    let one = UnsafeBufferPointer(start: d, count: 1)
                    _ = try self.heldCopyOut(read, range: 0..<c.size, to: one, memory: .host)
                    try fill(from: one, skip: r)
                }
            } else {
                try withStaging(c.size) { (staging) throws(KVError) in
                    try withUnsafePointer(to: staging) { (s) throws(KVError) in
                        let one = UnsafeBufferPointer(start: s, count: 1)
                        _ = try self.heldCopyOut(read, range: 0..<c.size, to: one, memory: .host)
                        try fill(from: one, skip: nil)
                    }
                }
            }
            try master.endCopy(c.handle, commit: true)
        } catch {
            try? master.endCopy(c.handle, commit: false)
            throw error
        }
    }
}
