#if canImport(Glibc)
import Glibc
#endif
import CKVCopy
import KVAccelerator
import KVCore
import KVSystem

/// How block copies are issued (docs/architecture.md §3, "KV blocks").
public enum KVCopyExecutor: String, Sendable, CaseIterable {
    /// One operation per copy (per coalesced run): the default.
    case perBlock = "per_block"
    /// Many copies per operation: one `process_vm_readv`/`writev` call for up to 1024 runs on
    /// the same host, one request for up to 1024 runs over TCP (the peer streams them back to
    /// back). In one process a host copy is already one `memcpy` per run, so it is the same
    /// as `perBlock` there; device memory is not built into it (`unsupported`).
    case aggregated
}

/// Where the peer's KV memory is, seen from this process.
public enum KVRoute: Sendable {
    /// This process: its addresses are ours.
    case sameProcess
    /// Another process on this host: `process_vm_readv`/`writev` on `pid`; `link` (the
    /// peer's segment server, when it has one) is used if the kernel refuses (ptrace rules).
    case sameHost(pid: Int32, link: PeerLink?)
    /// Another host: the peer's segment server.
    case network(PeerLink)
}

/// Executes block-copy plans (`KVBlockPlan`) between this process's memory and a peer's.
public struct KVBlockMover: Sendable {
    public let counters: TransferCounters

    /// Runs per `process_vm_readv` call or TCP request of the aggregated executor (the
    /// kernel's IOV_MAX, and the segment server's frame limit).
    public static let maxRunsPerOperation = 1024

    public init(counters: TransferCounters) { self.counters = counters }

    /// Moves every copy. `pull`: the copies' sources are the peer's memory and their
    /// destinations ours; otherwise the other way. Both sides must be host memory. Returns
    /// the number of transfer operations issued (memcpy calls, system calls or requests).
    public func run(_ copies: [KVBlockCopy], pull: Bool, route: KVRoute, executor: KVCopyExecutor) throws(KVError) -> Int {
        guard !copies.isEmpty else { return 0 }
        let batch = executor == .aggregated ? Self.maxRunsPerOperation : 1
        switch route {
        case .sameProcess:
            for c in copies {
                memmove(UnsafeMutableRawPointer(bitPattern: c.destination)!, UnsafeRawPointer(bitPattern: c.source)!, c.length)
            }
            count(copies, operations: copies.count)
            return copies.count
        case let .sameHost(pid, link):
            do throws(KVError) {
                return try crossProcess(copies, pull: pull, pid: pid, batch: batch)
            } catch  where error.code == .unsupported && link != nil {
                return try network(copies, pull: pull, link: link!, batch: batch)
            }
        case let .network(link):
            return try network(copies, pull: pull, link: link, batch: batch)
        }
    }

    private func count(_ copies: some Collection<KVBlockCopy>, operations: Int) {
        counters.bytesCopied.add(copies.reduce(0) { $0 + $1.length }, ordering: .relaxed)
        counters.copyOps.add(operations, ordering: .relaxed)
    }

    /// `process_vm_readv`/`writev`, `batch` runs per call. A refusal by the kernel (EPERM:
    /// ptrace rules; ENOSYS) is `unsupported` before any byte moved; a partial copy or a bad
    /// address (the peer withdrew its memory) is `transfer`.
    private func crossProcess(_ copies: [KVBlockCopy], pull: Bool, pid: Int32, batch: Int) throws(KVError) -> Int {
        var local = [UnsafeMutableRawPointer?](), remote = [UnsafeMutableRawPointer?](), lengths = [Int]()
        local.reserveCapacity(batch)
        remote.reserveCapacity(batch)
        lengths.reserveCapacity(batch)
        var calls = 0, start = 0
        while start < copies.count {
            let chunk = copies[start..<min(start + batch, copies.count)]
            local.removeAll(keepingCapacity: true)
            remote.removeAll(keepingCapacity: true)
            lengths.removeAll(keepingCapacity: true)
            var want = 0
            for c in chunk {
                let (mine, theirs) = pull ? (c.destination, c.source) : (c.source, c.destination)
                local.append(UnsafeMutableRawPointer(bitPattern: mine))
                remote.append(UnsafeMutableRawPointer(bitPattern: theirs))
                lengths.append(c.length)
                want += c.length
            }
            let n = kv_process_vm_copy(pid, pull ? 0 : 1, local, remote, lengths, local.count)
            calls += 1
            if n < 0 {
                let e = errno
                if (e == EPERM || e == ENOSYS) && start == 0 {
                    throw KVError(.unsupported, "the kernel refuses cross-process copies with process \(pid) (errno \(e))")
                }
                throw SystemCall.failure(pull ? "process_vm_readv from process \(pid)" : "process_vm_writev to process \(pid)", code: .transfer)
            }
            guard n == want else {
                throw KVError(.transfer, "moved \(n) of \(want) bytes with process \(pid): its KV memory is gone")
            }
            count(chunk, operations: 1)
            start += chunk.count
        }
        return calls
    }

    /// Over the peer's segment server, `batch` runs per request.
    private func network(_ copies: [KVBlockCopy], pull: Bool, link: PeerLink, batch: Int) throws(KVError) -> Int {
        var requests = 0, start = 0
        var remote = [MemoryRegion](), local = [MemoryRegion]()
        while start < copies.count {
            let chunk = copies[start..<min(start + batch, copies.count)]
            remote.removeAll(keepingCapacity: true)
            local.removeAll(keepingCapacity: true)
            for c in chunk {
                let (mine, theirs) = pull ? (c.destination, c.source) : (c.source, c.destination)
                remote.append(MemoryRegion(address: theirs, length: c.length))
                local.append(MemoryRegion(address: mine, length: c.length))
            }
            try link.kvTransfer(write: !pull, remote: remote, local: local)
            requests += 1
            start += chunk.count
        }
        return requests
    }
}
