import KVAccelerator
import KVCore
import KVTransfer

extension StoreClient {
    /// Names of the statistics, in the order `statistics()` returns them. Static strings, so
    /// the C ABI can hand out their addresses.
    public static let statisticNames: [StaticString] = [
        "objects", "object_bytes", "bytes_used", "capacity", "bytes_free",
        "hard_pinned_bytes", "soft_pinned_bytes",
        "bytes_copied", "bytes_staged", "copy_ops",
        "puts", "gets", "hits", "misses", "removes",
        "evicted_objects", "evicted_bytes", "expired_objects",
        "leases_active", "active_readers", "free_blocks", "largest_free_block",
        "registered_buffers", "registered_bytes", "page_locked_bytes", "page_lock_fallbacks", "accelerators", "closed",
        "segment_size", "master_reconnects", "commit_failures", "network_bytes", "rdma_bytes", "rdma_devices",
        "master_local", "peers", "peers_pruned",
    ]

    /// Current values, aligned with `statisticNames`. All counts are exact when no operation
    /// is in flight.
    public func statistics() -> [Int] {
        // A connected client shows the cluster's table (zeros while the master is unreachable).
        let s = (try? master.statistics()) ?? CacheStatistics([])
        let hits = operations.hits.load(ordering: .relaxed), misses = operations.misses.load(ordering: .relaxed)
        return [
            s.objects, s.objectBytes, s.usedBytes, s.capacity, s.capacity - s.usedBytes,
            s.hardPinnedBytes, s.softPinnedBytes,
            counters.bytesCopied.load(ordering: .relaxed), counters.bytesStaged.load(ordering: .relaxed),
            counters.copyOps.load(ordering: .relaxed),
            operations.puts.load(ordering: .relaxed), hits + misses, hits, misses,
            operations.removes.load(ordering: .relaxed),
            s.evictedObjects, s.evictedBytes, s.expiredObjects,
            s.activeLeases, s.activeReaders, s.freeBlocks, s.largestFreeBlock,
            registry.count, registry.registeredBytes,
            isClosed ? 0 : segment?.pinnedLength ?? 0, segment?.pinFellBack ?? false ? 1 : 0,
            AcceleratorRegistry.snapshot.accelerators.count, isClosed ? 1 : 0,
            segment?.size ?? 0, remote?.reconnects.load(ordering: .relaxed) ?? 0,
            remote?.commitFailures.load(ordering: .relaxed) ?? 0, counters.networkBytes.load(ordering: .relaxed),
            counters.rdmaBytes.load(ordering: .relaxed), remote == nil ? 0 : RDMA.discovery.devices.filter(\.active).count,
            remote?.isLocal ?? false ? 1 : 0,
            cluster?.peers.withLock { $0.map.count } ?? 0, cluster?.pruned.load(ordering: .relaxed) ?? 0,
        ]
    }
}
