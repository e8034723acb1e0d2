#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore
import KVSystem
import KVTransfer

/// Prefill→decode KV transfer (docs/architecture.md §3, "KV blocks"): this client publishes its KV
/// cache as a layout under a node id; another moves blocks between its own layout and a
/// peer's, straight between the two caches (the master only holds the layouts).
extension StoreClient {
    /// Validates `descriptors` (the layout rules, and that each location names a device of
    /// this machine) and publishes them under `node`, replacing this client's previous
    /// layout. Peers on other hosts reach host buffers through this client's server.
    public func registerKVLayout(node: String, descriptors: [KVBufferDescriptor]) throws(KVError) {
        try enter()
        defer { leave() }
        guard !node.isEmpty, node.utf8.count <= 256, !node.utf8.contains(0) else {
            throw .invalidArgument("a node id must be 1 to 256 bytes without NUL")
        }
        let layout = try KVLayout(descriptors)
        let devices = AcceleratorRegistry.snapshot
        for (i, d) in descriptors.enumerated() {
            do throws(KVError) {
                // The location is checked against the memory, as register_buffer does: a GPU
                // buffer labelled "cpu" would be memmoved, host memory labelled "cuda:0" given
                // to the copy engine.
                let loc = d.location
                _ = try devices.requireDevice(at: loc)
                if devices.hasAccelerator, d.length > 0, let actual = try devices.classify(d.address), actual != loc {
                    throw KVError.invalidArgument("buffer at 0x\(String(d.address, radix: 16)) is \(actual) memory, not \(loc)")
                }
            } catch {
                throw .invalidArgument("descriptor \(i) \(d.name): \(error.message)")
            }
        }
        let old = kvNode.withLock { $0 }
        let hostBuffers = layout.descriptors.filter { $0.location.isHost }.map { MemoryRegion(address: $0.address, length: $0.length) }
        let endpoint = try directory.serveKV(hostBuffers)
        let published = PublishedLayout(
            node: node, layout: layout, host: directory.host,
            pid: Int(getpid()), endpoint: endpoint)
        if let old, old.node != node { try? master.unpublishLayout(node: old.node) }
        try master.publishLayout(published)
        kvNode.withLock { $0 = published }
    }

    /// Withdraws this client's layout (peers can no longer reach it). Not an error when
    /// there is none.
    public func unregisterKVLayout() throws(KVError) {
        try enter()
        defer { leave() }
        guard let old = kvNode.withLock({ $0 }) else { return }
        directory.stopServingKV()
        kvNode.withLock { $0 = nil }
        try master.unpublishLayout(node: old.node)
    }

    /// The layout published under `node` (`objectNotFound` when none).
    public func kvLayout(node: String) throws(KVError) -> PublishedLayout {
        try enter()
        defer { leave() }
        return try master.fetchLayout(node: node)
    }

    /// This client's published layout, if any.
    public var ownKVLayout: PublishedLayout? { kvNode.withLock { $0 } }

    /// Copies blocks between the peer `node`'s layout and this client's: `pull` copies the
    /// peer's `sourceBlocks[i]` into this client's `destinationBlocks[i]`, otherwise this
    /// client's `sourceBlocks[i]` into the peer's `destinationBlocks[i]`, for every kind of
    /// `layers` (nil: all). Everything is validated before any byte moves (`KVBlockPlan`);
    /// runs of consecutive ids are coalesced. Returns the transfer operations issued.
    public func moveKVBlocks(
        peer node: String, pull: Bool, sourceBlocks: [Int], destinationBlocks: [Int],
        layers: [Int]? = nil, executor: KVCopyExecutor = .perBlock
    ) throws(KVError) -> Int {
        try enter()
        defer { leave() }
        guard let mine = kvNode.withLock({ $0 }) else {
            throw .invalidArgument("this store has no KV layout: register one before moving blocks")
        }
        let peer = node == mine.node ? mine : try master.fetchLayout(node: node)
        let (from, to) = pull ? (peer.layout, mine.layout) : (mine.layout, peer.layout)
        let copies = try KVBlockPlan.copies(from: from, to: to, sourceBlocks: sourceBlocks, destinationBlocks: destinationBlocks, layers: layers)
        // Addresses are used directly only for this store's own layout; another layout's pid is
        // the one the master verified (0: unknown, so never a same-host target).
        let sharesPIDs = directory.sharesPIDs
        let sameProcess = peer.node == mine.node || (sharesPIDs && peer.host == mine.host && peer.pid == Int(getpid()))
        // Device memory: copies by the device, in this process only.
        let fromLocations = from.descriptors.map(\.location), toLocations = to.descriptors.map(\.location)
        let mover = KVBlockMover(counters: counters)
        if (fromLocations + toLocations).contains(where: { !$0.isHost }) {
            guard sameProcess else {
                throw KVError(.unsupported, "KV blocks in device memory move only within one process here (no GPU transport between processes is built in)")
            }
            return try deviceCopies(copies, from: fromLocations, to: toLocations, batched: executor == .aggregated)
        }
        if sameProcess { return try mover.run(copies, pull: pull, route: .sameProcess, executor: executor) }
        let link = peer.endpoint.isEmpty ? nil : try directory.kvLink(peer.endpoint)
        if peer.host == mine.host, peer.pid > 0, sharesPIDs {
            return try mover.run(copies, pull: pull, route: .sameHost(pid: Int32(peer.pid), link: link), executor: executor)
        }
        guard let link else { throw KVError(.unsupported, "node '\(peer.node)' is on another host and serves no KV transfers") }
        return try mover.run(copies, pull: pull, route: .network(link), executor: executor)
    }

    /// The KV copies of a layout with device memory, through the one device-copy executor
    /// (`DeviceCopyPlan`): grouped by the device that owns either side, one copy per run, or
    /// (`batched`) one batched driver call per device and direction for up to 1024 runs (a
    /// device without one: `unsupported`, before any byte moves); host runs of a mixed layout
    /// are copied in this process. KV caches carry no stream: each device's copies wait for
    /// all of its queued work and are complete on return. `from`/`to`: each descriptor's
    /// location. Returns the operations issued.
    private func deviceCopies(_ copies: [KVBlockCopy], from: [MemoryLocation], to: [MemoryLocation], batched: Bool) throws(KVError) -> Int {
        let snapshot = AcceleratorRegistry.snapshot
        for loc in from + to { _ = try snapshot.requireDevice(at: loc) } // every device exists before a byte moves
        var plan = DeviceCopyPlan()
        for c in copies {
            plan.add(
                CopyOp(source: c.source, destination: c.destination, length: c.length),
                from: from[c.sourceDescriptor], to: to[c.destinationDescriptor], owner: 0)
        }
        let outcome = plan.execute(transport: transport, into: .callerMemory, devices: snapshot, holds: deviceHolds, batched: batched)
        if let e = outcome.failed[0] { throw e }
        return outcome.operations
    }
}
