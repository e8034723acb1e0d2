import KVCore
import KVSystem
import KVTransfer
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Where a store's objects live and how it reaches them: the one job the embedded store and a
/// cluster member do differently, besides their `MasterLink`. `StoreClient` holds one
/// (`EmbeddedDirectory` or `ClusterDirectory`) and asks it, never which mode it is in.
protocol SegmentDirectory: AnyObject, Sendable {
    /// This store's host identity (`localHostIdentity`): reads list replicas on it first, and a
    /// KV layout names it.
    var host: String { get }
    /// The segment to place a write's first replica in: this store's own (nil: it has none).
    var ownSegmentID: SegmentID? { get }
    /// How to reach segment `seg`.
    func access(_ seg: SegmentID) throws(KVError) -> SegmentAccess
    /// Runs at the start of every operation (after the store's gate): reconnects a lost master
    /// link and holds the segment identities steady until `leaveOperation`.
    func enterOperation() throws(KVError)
    func leaveOperation()
    /// Whether process ids the master verified name processes of this PID namespace (the
    /// same-host KV route uses them only then).
    var sharesPIDs: Bool { get }
    /// Serves the host `buffers` of this store's KV layout to peers from now on; returns the
    /// endpoint they reach it at ("": only this process can, the embedded store).
    func serveKV(_ buffers: [MemoryRegion]) throws(KVError) -> String
    /// Stops serving KV buffers (peers' transfers in progress are cut).
    func stopServingKV()
    /// The link to a peer's KV server at `endpoint` (kept for reuse).
    func kvLink(_ endpoint: String) throws(KVError) -> PeerLink
    /// Copies bytes `range` of the disk copy replica `r` names (`DiskDirectory.isDisk`) into
    /// `destinations` (host memory): from this client's own disk tier, or its owner's.
    func readDisk(_ r: Replica, range: Range<Int>, into destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError)
    /// This client's disk tier in a cluster (nil: none; the embedded store's is its master's).
    var clusterDisk: ClusterDisk? { get }
    /// The counters of the master link and the peers (zeros without them).
    var linkStatistics: LinkStatistics { get }
    /// Leaves: closes the master link, stops serving, forgets the peers. Idempotent.
    func close()
}

/// How a client reaches one segment.
enum SegmentAccess: Sendable {
    /// Mapped into this process: its own, or another local client's shared segment.
    case mapped(HostSegment)
    /// Served over TCP by its owner on another host.
    case peer(PeerLink)
}

/// What `SegmentDirectory.linkStatistics` reports (see `StoreClient.statistics`).
struct LinkStatistics {
    var reconnects = 0, commitFailures = 0, resumes = 0, restoredObjects = 0, resumedCommits = 0
    var failovers = 0, term = 0, rdmaDevices = 0, local = false, peers = 0, peersPruned = 0
}

/// The embedded store: one private segment (id 0), nothing to reconnect, no peers.
final class EmbeddedDirectory: SegmentDirectory {
    let segment: HostSegment
    let host = localHostIdentity()

    init(segment: HostSegment) { self.segment = segment }

    var ownSegmentID: SegmentID? { 0 }

    func access(_ seg: SegmentID) throws(KVError) -> SegmentAccess {
        guard seg == 0 else { throw KVError(.internal, "segment \(seg) is not this store's") }
        return .mapped(segment)
    }

    @inline(__always) func enterOperation() throws(KVError) {}
    @inline(__always) func leaveOperation() {}
    var sharesPIDs: Bool { true }
    func serveKV(_ buffers: [MemoryRegion]) throws(KVError) -> String { "" }
    func stopServingKV() {}
    func kvLink(_ endpoint: String) throws(KVError) -> PeerLink { throw KVError(.internal, "an embedded store has no peers") }
    func readDisk(_ r: Replica, range: Range<Int>, into destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) {
        throw KVError(.internal, "an embedded store reads its disk tier through its master")
    }
    var clusterDisk: ClusterDisk? { nil }
    var linkStatistics: LinkStatistics { LinkStatistics() }
    func close() {}
}

/// A cluster member: its master link, its own segment (if any) and how it reaches the others.
final class ClusterDirectory: SegmentDirectory {
    let remote: RemoteMaster
    let state: ClusterState
    let segment: HostSegment?
    let clusterDisk: ClusterDisk?

    init(remote: RemoteMaster, state: ClusterState, segment: HostSegment?, disk: ClusterDisk?) {
        self.remote = remote
        self.state = state
        self.segment = segment
        clusterDisk = disk
    }

    var host: String { state.host }

    var ownSegmentID: SegmentID? {
        segment == nil ? nil : state.segment.load(ordering: .relaxed)
    }

    /// This client's own segment or another local client's (mapped), or a peer's on another
    /// host (TCP). Asks the master about a segment once per connection.
    func access(_ seg: SegmentID) throws(KVError) -> SegmentAccess {
        if let segment, seg == state.segment.load(ordering: .relaxed) { return .mapped(segment) }
        if let a = state.peers.withLock({ $0.map[seg] }) { return a }
        let (info, epoch) = try remote.segmentInfo(seg)
        let a = try state.reach(info)
        state.peers.withLock { p in if p.epoch == epoch { p.map[seg] = a } }
        return a
    }

    /// Reconnects if the connection was lost, then shares the data lock (a reconnect, which
    /// remounts and renumbers segments, waits for it).
    @inline(__always) func enterOperation() throws(KVError) {
        try remote.reconnectIfNeeded()
        remote.dataLock.lockShared()
    }

    @inline(__always) func leaveOperation() { remote.dataLock.unlock() }

    var sharesPIDs: Bool { state.sharesPIDs.load(ordering: .relaxed) }

    /// On the segment's server, or (a pure client) on a server made for the layout.
    func serveKV(_ buffers: [MemoryRegion]) throws(KVError) -> String {
        var found = state.server.withLock { $0 } ?? state.kvServer.withLock { $0 }
        if found == nil {
            let made = try SegmentServer(region: MemoryRegion(address: 0, length: 0), host: remote.localHost, token: state.token)
            state.kvServer.withLock { $0 = made }
            found = made
        }
        found!.serveKV(buffers)
        return found!.endpoint
    }

    func stopServingKV() {
        state.server.withLock { $0 }?.serveKV([])
        state.kvServer.withLock { $0 }?.serveKV([])
    }

    func kvLink(_ endpoint: String) throws(KVError) -> PeerLink {
        if let l = state.kvLinks.withLock({ $0[endpoint] }) { return l }
        let l = try PeerLink(endpoint: endpoint, token: state.token, counters: state.counters)
        state.kvLinks.withLock { $0[endpoint] = l }
        return l
    }

    /// This client's own disk copies without the network; another's through its owner's
    /// segment server (found once per connection, like a segment).
    func readDisk(_ r: Replica, range: Range<Int>, into destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) {
        let owner = DiskDirectory.ownerSegment(of: r.segment)
        let generation = UInt64(r.offset)
        if let clusterDisk, owner == state.segment.load(ordering: .relaxed) {
            return try clusterDisk.read(generation: generation, range: range, into: destinations)
        }
        var endpoint = state.endpoints.withLock { $0.map[owner] }
        if endpoint == nil {
            let (info, epoch) = try remote.segmentInfo(owner)
            endpoint = info.endpoint
            state.endpoints.withLock { e in if e.epoch == epoch && e.map.count < ClusterState.maxPeers { e.map[owner] = info.endpoint } }
        }
        try kvLink(endpoint!).readDisk(
            segment: r.segment, generation: generation, offset: range.lowerBound, length: range.count, into: destinations)
    }

    var linkStatistics: LinkStatistics {
        LinkStatistics(
            reconnects: remote.reconnects.load(ordering: .relaxed), commitFailures: remote.commitFailures.load(ordering: .relaxed),
            resumes: remote.resumes.load(ordering: .relaxed), restoredObjects: remote.restoredObjects.load(ordering: .relaxed),
            resumedCommits: remote.resumedCommits.load(ordering: .relaxed), failovers: remote.failovers.load(ordering: .relaxed),
            term: Int(clamping: remote.term.load(ordering: .relaxed)),
            rdmaDevices: RDMA.discovery.devices.filter(\.active).count, local: remote.isLocal,
            peers: state.peers.withLock { $0.map.count }, peersPruned: state.pruned.load(ordering: .relaxed))
    }

    func close() {
        clusterDisk?.close() // its thread talks to the master
        remote.close()
        state.close()
    }
}

/// A connected client's view of the cluster: its host identity, its own segment id and
/// server, and the segments of others it has mapped or dialled (forgotten at each reconnect,
/// since a restarted master numbers segments afresh).
final class ClusterState: Sendable {
    let host = localHostIdentity()
    let token: ClusterToken
    /// The client's counters, which its peer links add their network bytes to.
    let counters: TransferCounters
    let segment = Atomic<SegmentID>(0)
    /// This client reaches the master over its local socket and sees its pid as it does: the
    /// owner pids the master verified name processes here too. Without it, same-host peers
    /// are reached over TCP.
    let sharesPIDs = Atomic<Bool>(false)
    let server = Locked<SegmentServer?>(nil)
    /// The server of a pure client's KV layout (a client with a segment serves it on the
    /// segment's server).
    let kvServer = Locked<SegmentServer?>(nil)
    /// Peers' KV servers by endpoint.
    let kvLinks = Locked<[String: PeerLink]>([:])
    let peers = Locked<(epoch: Int, map: [SegmentID: SegmentAccess])>((0, [:]))
    /// Peers' segment servers by segment (their disk copies are read there), per epoch.
    let endpoints = Locked<(epoch: Int, map: [SegmentID: String])>((0, [:]))
    /// Most peers kept mapped or dialled; past it, `prunePeers` drops the excess.
    static let maxPeers = 256

    init(token: ClusterToken, counters: TransferCounters) {
        self.token = token
        self.counters = counters
    }

    /// After each (re)connect: a new epoch, this client's segment id (0: none), and whether
    /// the link is the master's local socket (`sharesPIDs`).
    func connected(epoch: Int, segment seg: SegmentID, local: Bool) {
        segment.store(seg, ordering: .relaxed)
        sharesPIDs.store(local, ordering: .relaxed)
        server.withLock { $0?.serve(segment: seg) }
        let old = peers.withLock { p in
            defer { p = (epoch, [:]) }
            return p.map
        }
        endpoints.withLock { $0 = (epoch, [:]) }
        _ = old // released outside the lock (unmaps, closes sockets)
    }

    /// Maps a segment of this host, or dials one of another host (or of this host when its
    /// descriptor cannot be had: another PID or network namespace, an owner on TCP). The
    /// descriptor comes only from the process the master verified as the owner.
    func reach(_ info: SegmentInfo) throws(KVError) -> SegmentAccess {
        if info.host == host, info.pid > 0, !info.sharePath.isEmpty, sharesPIDs.load(ordering: .relaxed),
            let fd = try? SegmentShare.receive(name: info.sharePath, pid: info.pid, token: token),
            let s = try? HostSegment(attaching: fd, size: info.size)
        {
            s.populateInBackground()
            return .mapped(s)
        }
        return .peer(try PeerLink(endpoint: info.endpoint, token: token, rdma: RDMA.shared.context, counters: counters))
    }

    /// Forgets the segments the master no longer knows (their owners departed): mappings are
    /// unmapped and descriptors closed, so dead peers' shared memory is freed; keeps at most
    /// `maxPeers`. Runs on the heartbeat thread; drops entries only while no operation is in
    /// flight (an operation may hold addresses in a mapping), else tries again next round.
    ///
    /// One round trip per round when nothing changed: the segments are asked about one by one
    /// only when the master's count of unmounts moved since the last complete prune (or the
    /// cache is over its bound).
    func prunePeers(_ remote: RemoteMaster) {
        let (epoch, known) = peers.withLock { ($0.epoch, Array($0.map.keys)) }
        guard !known.isEmpty, let (unmounts, countEpoch) = try? remote.unmountCount(), countEpoch == epoch else { return }
        let seen = prunedAtUnmounts.withLock { $0 }
        if seen?.epoch == epoch, seen?.unmounts == unmounts, known.count <= Self.maxPeers { return }
        var gone = Set<SegmentID>()
        for seg in known {
            do throws(KVError) {
                _ = try remote.segmentInfo(seg)
            } catch  where error.code == .objectNotFound {
                gone.insert(seg)
            } catch {
                return // the master is unreachable: nothing can be concluded now
            }
        }
        let excess = max(0, known.count - gone.count - Self.maxPeers)
        guard !gone.isEmpty || excess > 0 else {
            prunedAtUnmounts.withLock { $0 = (epoch, unmounts) }
            return
        }
        guard remote.dataLock.tryLockExclusive() else { return } // an operation is in flight: next round
        prunedAtUnmounts.withLock { $0 = (epoch, unmounts) }
        let dropped = peers.withLock { p -> [SegmentAccess] in
            guard p.epoch == epoch else { return [] }
            var out = gone.compactMap { p.map.removeValue(forKey: $0) }
            for seg in Array(p.map.keys.prefix(excess)) { if let a = p.map.removeValue(forKey: seg) { out.append(a) } }
            pruned.add(out.count, ordering: .relaxed) // with the removal: statistics agree
            return out
        }
        remote.dataLock.unlock()
        for case .peer(let l) in dropped { l.closeIdle() }
    } // the mapped segments in `dropped` are unmapped here, as their last reference goes

    /// Peers forgotten by `prunePeers`.
    let pruned = Atomic<Int>(0)
    /// The master's unmount count (and epoch) at the last complete prune: until it moves,
    /// every mapped peer is known to be mounted still.
    let prunedAtUnmounts = Locked<(epoch: Int, unmounts: Int)?>(nil)

    func close() {
        server.withLock { $0 }?.stop()
        kvServer.withLock { $0 }?.stop()
        for l in kvLinks.withLock({ l in
            defer { l = [:] }; return l
        }).values { l.closeIdle() }
        let old = peers.withLock { p in
            defer { p.map = [:] }
            return p.map
        }
        for case .peer(let l) in old.values { l.closeIdle() }
    }
}
