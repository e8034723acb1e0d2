import KVAccelerator
import KVCore
import KVTransfer

extension StoreClient {
    /// One statistic: a static name (the C ABI hands out its address) and its value.
    public struct NamedStatistic: Sendable {
        public let name: StaticString
        public let value: Int
        init(_ name: StaticString, _ value: Int) {
            self.name = name
            self.value = value
        }
    }

    /// Every statistic, named where its value is computed (one list, nothing to keep aligned).
    /// All counts are exact when no operation is in flight.
    public func statistics() -> [NamedStatistic] {
        // A connected client shows the cluster's table (zeros while the master is unreachable).
        let s = (try? master.statistics()) ?? CacheStatistics([])
        let hits = operations.hits.load(ordering: .relaxed), misses = operations.misses.load(ordering: .relaxed)
        let tier = master as? TieredMaster
        let disk = tier?.disk ?? directory.clusterDisk?.disk
        let d = disk?.statistics ?? DiskTierStatistics()
        let link = directory.linkStatistics
        return [
            .init("objects", s.objects), .init("object_bytes", s.objectBytes), .init("bytes_used", s.usedBytes),
            .init("capacity", s.capacity), .init("bytes_free", s.capacity - s.usedBytes),
            .init("hard_pinned_bytes", s.hardPinnedBytes), .init("soft_pinned_bytes", s.softPinnedBytes),
            .init("bytes_copied", counters.bytesCopied.load(ordering: .relaxed)),
            .init("bytes_staged", counters.bytesStaged.load(ordering: .relaxed)),
            .init("copy_ops", counters.copyOps.load(ordering: .relaxed)),
            .init("puts", operations.puts.load(ordering: .relaxed)), .init("gets", hits + misses), .init("hits", hits),
            .init("misses", misses), .init("removes", operations.removes.load(ordering: .relaxed)),
            .init("reads_expired", operations.readsExpired.load(ordering: .relaxed)),
            .init("checksums_verified", operations.checksumsVerified.load(ordering: .relaxed)),
            .init("checksum_failures", operations.checksumFailures.load(ordering: .relaxed)),
            .init("evicted_objects", s.evictedObjects), .init("evicted_bytes", s.evictedBytes),
            .init("expired_objects", s.expiredObjects),
            .init("leases_active", s.activeLeases), .init("active_readers", s.activeReaders),
            .init("free_blocks", s.freeBlocks), .init("largest_free_block", s.largestFreeBlock),
            .init("registered_buffers", registry.count), .init("registered_bytes", registry.registeredBytes),
            .init("page_locked_bytes", isClosed ? 0 : segment?.pinnedBytes ?? 0),
            .init("page_lock_fallbacks", segment?.pinRefusals ?? 0),
            .init("accelerators", AcceleratorRegistry.snapshot.accelerators.count), .init("closed", isClosed ? 1 : 0),
            .init("segment_size", segment?.size ?? 0),
            .init("segment_id", Int(ownSegmentID ?? 0)),
            .init("segment_populated_bytes", segment?.populatedBytes ?? 0),
            .init("master_reconnects", link.reconnects), .init("commit_failures", link.commitFailures),
            .init("sessions_resumed", link.resumes), .init("objects_reregistered", link.restoredObjects),
            .init("commits_resent", link.resumedCommits), .init("master_failovers", link.failovers),
            .init("master_term", link.term),
            .init("network_bytes", counters.networkBytes.load(ordering: .relaxed)),
            .init("rdma_bytes", counters.rdmaBytes.load(ordering: .relaxed)),
            .init("rdma_devices", link.rdmaDevices), .init("master_local", link.local ? 1 : 0),
            .init("peers", link.peers), .init("peers_pruned", link.peersPruned),
            .init("disk_objects", d.objects), .init("disk_bytes", d.bytes), .init("disk_capacity", d.capacity),
            .init("disk_offloads", d.offloads), .init("disk_offloaded_bytes", d.offloadedBytes),
            .init("disk_offload_failures", d.offloadFailures), .init("disk_hits", d.hits), .init("disk_misses", disk == nil ? 0 : misses),
            .init("disk_read_bytes", d.readBytes), .init("disk_evictions", d.evictions),
            .init("disk_corrupt", d.corrupt), .init("disk_recovered", d.recovered),
            .init("disk_promotions", tier?.promotions.load(ordering: .relaxed) ?? 0),
            .init("disk_dropped", tier?.inner.withTable { t, _ in t.evictedUndecided } ?? 0)
        ]
    }
}
