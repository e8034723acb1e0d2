#if canImport(Glibc)
import Glibc
#endif
import CKVCopy
import KVAccelerator
import KVCore
import KVSystem
import Synchronization

// The data plane between hosts (docs/architecture.md §3): each client serves reads and writes of its own
// segment over TCP, and peers call it directly; the master never sees object bytes. Frames
// are `WireFrameHeader`s (kinds 200...211); the bytes of a read or write follow their frame
// raw, sent from and received into segment or caller memory directly (no intermediate buffer).
//
//   200 hello(client nonce)               -> 213 challenge(server nonce, server proof) | 211 error
//   206 prove(client proof)               -> 210 ok | 211 error, then close (see `Authentication`)
//   201 read(segment, offset, length)     -> 210 ok + `length` raw bytes | 211 error
//   202 write(segment, offset, length, remaining) + `length` raw bytes -> 210 ok | 211 error,
//                                            then close (`remaining`: nanoseconds until the
//                                            write's deadline, 0 for none; bytes arriving after
//                                            it are refused, see `Socket.readExactly(arrivingBy:)`)
//   203 rdmaConnect(queue-pair address)   -> 212 rdmaAccepted(address, base, rkey, size, segment)
//                                            | 211 error (`unsupported`: no RDMA here; TCP goes on)
//   204 kvRead(n, n x (address, length))  -> 210 ok + the ranges' raw bytes in order | 211 error
//   205 kvWrite(n, n x (address, length)) + raw bytes -> 210 ok | 211 error, then close
//   207 segmentFD                         -> 210 ok(u64 size) with the segment's descriptor
//                                            attached (SCM_RIGHTS; local socket only) | 211 error
//   208 diskRead(disk segment, generation, offset, length)
//                                         -> 210 ok + the bytes | 211 error (nothing sent yet);
//                                            a failure after ok closes the connection
//
// A server with a shared segment also listens on an abstract Unix-domain socket (`localName`)
// for members on its host: they check the kernel's peer credentials against the owner's pid
// the master verified, authenticate as over TCP, and receive the segment as an open file.
//
// kvRead/kvWrite move KV-cache blocks (prefill→decode): every range must lie inside one
// buffer of the KV layout this process published (`serveKV`), at most `maxKVRanges` per frame.
//
// After rdmaAccepted the peer reads and writes the segment with one-sided RDMA through the
// queue pair, which lives as long as this TCP connection. A remount registers the segment
// again, so the keys handed out before it stop working (those transfers fail, not corrupt).

enum DataFrame {
    /// Every data-plane frame kind, numbered once (the wire format: they never move).
    enum Kind: UInt16, CaseIterable {
        case hello = 200, read, write, rdmaConnect, kvRead, kvWrite, prove, segmentFD, diskRead
        case ok = 210, error, rdmaAccepted, challenge
    }
    static let hello = Kind.hello.rawValue, read = Kind.read.rawValue, write = Kind.write.rawValue
    static let rdmaConnect = Kind.rdmaConnect.rawValue, kvRead = Kind.kvRead.rawValue, kvWrite = Kind.kvWrite.rawValue
    static let prove = Kind.prove.rawValue, segmentFD = Kind.segmentFD.rawValue, diskRead = Kind.diskRead.rawValue
    static let ok = Kind.ok.rawValue, error = Kind.error.rawValue, rdmaAccepted = Kind.rdmaAccepted.rawValue
    static let challenge = Kind.challenge.rawValue
    static let maxPayload = 16 * maxKVRanges + 64
    /// Most block ranges one kvRead or kvWrite frame may name.
    static let maxKVRanges = 1024

    static func isKnown(_ k: UInt16) -> Bool { Kind(rawValue: k) != nil }
    /// Largest frame read before the peer has authenticated (hello and prove are tiny).
    static let maxPreAuthPayload = 256
    /// Seconds a new connection has to authenticate.
    static let authTimeout = 5.0
}

extension Socket {
    /// Sends one frame.
    public func writeFrame(kind: UInt16, requestID: UInt32 = 0, payload: [UInt8]) throws(KVError) {
        let f = WireWriter.frame(kind: kind, requestID: requestID, payload: payload)
        try rethrowingKVError { try f.withUnsafeBytes { try writeAll($0) } }
    }

    /// Reads one whole frame (blocking). Throws `transfer` for I/O failures and
    /// `invalidArgument` for a frame that does not decode.
    public func readFrame(maxPayload: Int, isKnown: (UInt16) -> Bool, deadline: Nanoseconds = 0) throws(KVError) -> (WireFrameHeader, [UInt8]) {
        var head = [UInt8](repeating: 0, count: WireFrameHeader.size)
        try rethrowingKVError { try head.withUnsafeMutableBytes { try readExactly(into: $0, deadline: deadline) } }
        let h = try rethrowingKVError { try head.withUnsafeBytes { try WireFrameHeader.decode($0, maxPayload: maxPayload, isKnown: isKnown) } }
        var payload = [UInt8](repeating: 0, count: h.length)
        if h.length > 0 { try rethrowingKVError { try payload.withUnsafeMutableBytes { try readExactly(into: $0, deadline: deadline) } } }
        return (h, payload)
    }

    /// Sends one small frame without waiting: all of it, or `transfer` (a peer that does not
    /// read its handshake answers is not waited for).
    func writeFrameNow(kind: UInt16, requestID: UInt32 = 0, payload: [UInt8]) throws(KVError) {
        let f = WireWriter.frame(kind: kind, requestID: requestID, payload: payload)
        let n = f.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
        guard n == f.count else { throw KVError(.transfer, "the peer does not take its answer") }
    }

    /// Reads exactly `count` bytes into `regions`, filling them in order (`deadline`: see
    /// `readExactly(into:deadline:)`).
    func readExactly(_ count: Int, into regions: UnsafeBufferPointer<MemoryRegion>, deadline: Nanoseconds = 0) throws(KVError) {
        var left = count
        for r in regions where left > 0 {
            let n = min(left, r.length)
            try readExactly(into: UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: r.address), count: n), deadline: deadline)
            left -= n
        }
        if left > 0 { throw .invalidArgument("destinations hold \(count - left) of \(count) bytes") }
    }

    /// Writes the first `count` bytes of the concatenation of `regions`.
    func writeAll(_ count: Int, from regions: UnsafeBufferPointer<MemoryRegion>, deadline: Nanoseconds = 0) throws(KVError) {
        try PeerLink.pieces(of: regions, skipping: 0, count: count) { (p, _) throws(KVError) in
            try writeAll(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: p.address), count: p.length), deadline: deadline)
        }
    }
}

/// Serves reads and writes of one segment (`region`) to peers on other hosts. Every request is
/// checked: a peer must say hello with the cluster's token first, name the segment id this
/// server currently serves (`segmentID`), and stay inside it.
///
/// Threads: one poller owns every connection while it waits. It accepts, runs the handshake
/// itself with non-blocking reads of tiny frames (a stranger never gets a thread), closes
/// connections past their deadline (authentication, then idleness), and hands a welcomed
/// connection with bytes to read to a pool of at most `maxWorkers` worker threads, which
/// serve its requests with blocking I/O straight between the socket and the segment and give
/// it back once it falls quiet (`linger`). Idle connections hold no thread; a worker idle for
/// `workerIdle` seconds ends. Every request has a deadline (`requestDeadline`): a peer that
/// stalls or trickles is cut off, and no lock is held across a network wait past it.
public final class SegmentServer: @unchecked Sendable {
    /// Longest time a write frame may say is left before its deadline (a peer's claim: a day).
    static let maxRemaining: UInt64 = 86_400 * 1_000_000_000

    public let region: MemoryRegion
    public let host: String
    public let port: Int
    private let token: ClusterToken
    private let listener: Socket
    /// The abstract Unix-domain listener handing out `shareFD` (nil: no shared segment).
    private let localListener: Socket?
    /// Its name ("" when none): what the owner mounts as its segment's share path.
    public let localName: String
    /// The shared segment's file (-1: none); owned by the segment, not by this server.
    private let shareFD: Int32
    /// An authenticated connection silent this long is closed (one that carries a queue pair
    /// excepted); also the longest a single `recv`/`send` may wait for progress.
    private let idleTimeout: Double
    private let wake: WakePipe
    private let state = Locked(State())
    private var pollThread: BackgroundThread?
    /// Welcomed connections with a request waiting, for the workers.
    private let ready = WorkQueue<Connection>()
    /// The id the master gave this segment (0: not mounted; requests are refused); set by
    /// `serve(segment:)`.
    private let segmentID = Locked<SegmentID>(0)
    private let log: @Sendable (String) -> Void
    /// Held shared while a request checks the segment id and copies (the owner's reconnect
    /// takes it exclusively to remount, so no copy straddles a change of identity).
    private let dataLock: SharedLock?
    /// RDMA: the device context and the segment's current registration (nil: TCP only).
    private let rdma: RDMAContext?
    private let registration = Locked<RDMAMemory?>(nil)
    /// Counts `serve(segment:)` calls that changed the registration: a background
    /// registration publishes only while its generation is still current.
    private let registrationGeneration = Locked<Int>(0)
    /// The thread registering the segment now, if any.
    private let registrar = Locked<BackgroundThread?>(nil)
    /// The host buffers of this process's published KV layout, sorted by address; written
    /// under `kvLock` held exclusively, read (and copied from or into) with it shared, so a
    /// layout is never withdrawn while a peer's transfer touches it.
    nonisolated(unsafe) private var kvBuffers: [MemoryRegion] = []
    private let kvLock = SharedLock()
    /// Connections inside a KV transfer now, by serial (cut when the layout changes).
    private let kvActive = Locked<[Int: Socket]>([:])
    /// Reads a range of one of this process's disk tier files (nil: no disk tier).
    private let diskReader = Locked<DiskReader?>(nil)

    /// Reads bytes `offset ..< offset + length` of disk tier file `generation`, handing them
    /// to `send` in order (checked before each piece is handed over).
    public typealias DiskReader =
        @Sendable (
            _ generation: UInt64, _ offset: Int, _ length: Int, _ send: (UnsafeRawBufferPointer) throws(KVError) -> Void
        ) throws(KVError) -> Void

    /// Serves `diskRead` of this segment's disk segment (`DiskDirectory.diskSegment`) with
    /// `reader` from now on (nil: refused).
    public func serveDisk(_ reader: DiskReader?) { diskReader.withLock { $0 = reader } }

    private struct State: @unchecked Sendable {
        /// By serial number (descriptor numbers are reused as soon as a socket closes).
        var connections: [Int: Connection] = [:]
        var nextSerial = 0
        var stopped = false
        /// Worker threads by number; a worker that ends by itself removes its entry.
        var workers: [Int: BackgroundThread] = [:]
        var nextWorker = 0
    }

    /// Most connections kept at once; more are closed at accept.
    public static let maxConnections = 256
    /// Most worker threads (connections with requests beyond that wait for one).
    public static let maxWorkers = 64
    /// Seconds an idle worker waits for work before it ends.
    static let workerIdle = 10.0
    /// Milliseconds a worker keeps a quiet connection before giving it back to the poller
    /// (a client's next request usually follows within; no thread wake-up then).
    static let linger: Int32 = 20
    /// The slowest a peer may move a transfer's bytes (bytes per second) before it is cut off:
    /// a request may take `idleTimeout` plus its bytes at this rate.
    static let minimumRate = 16.0 * 1024 * 1024

    /// Listens on host:port (0: any free port) and starts serving.
    /// With `rdma`, the segment is registered with that device and peers may connect queue
    /// pairs to it (a registration failure is logged and leaves TCP only).
    public init(
        region: MemoryRegion, host: String, port: Int = 0, token: ClusterToken, dataLock: SharedLock? = nil,
        rdma: RDMAContext? = nil, shareFD: Int32 = -1, idleTimeout: Double = SegmentServer.defaultIdleTimeout,
        log: @escaping @Sendable (String) -> Void = { _ in }
    ) throws(KVError) {
        self.region = region
        self.dataLock = dataLock
        self.rdma = rdma
        self.host = host
        self.token = token
        self.log = log
        listener = try Socket.listen(host: host, port: port)
        listener.setNonBlocking()
        self.port = listener.localPort
        self.shareFD = shareFD
        self.idleTimeout = idleTimeout
        if shareFD >= 0 {
            let name = "kvstore-segment.\(getpid()).\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
            let l = try Socket.listenLocal(name: name)
            l.setNonBlocking()
            localListener = l
            localName = name
        } else {
            localListener = nil
            localName = ""
        }
        wake = try WakePipe()
        pollThread = try BackgroundThread { [unowned self] in self.pollLoop() }
    }

    public var endpoint: String { "\(host):\(port)" }

    /// Seconds a TCP-only connection may stay silent before the server closes it:
    /// `KVSTORE_SEGMENT_IDLE_TIMEOUT` (a positive number), else 30. A connection that carries a
    /// queue pair is not timed out (RDMA traffic sends no TCP message); TCP keepalive finds a
    /// dead peer there instead.
    public static let defaultIdleTimeout: Double = {
        Environment.positiveDouble("KVSTORE_SEGMENT_IDLE_TIMEOUT") ?? 30
    }()

    /// Queue pairs one connection may hold (a peer connects one per connection).
    static let maxQueuePairsPerConnection = 1

    /// Serves the segment under id `seg` from now on (0: refuse requests). With RDMA and a
    /// new id, the old registration is dropped at once (keys handed out under the old id stop
    /// working before anything is served under the new one) and the segment is registered
    /// again on a background thread: pinning a large segment takes long, and the caller holds
    /// its master link. Until it is done, queue pairs are refused (peers use TCP and ask again
    /// later). The same id again (a resumed session) keeps the registration and its keys.
    public func serve(segment seg: SegmentID) {
        let previous = segmentID.withLock { id in
            defer { id = seg }; return id
        }
        guard let rdma, seg != previous || registration.withLock({ $0 }) == nil else { return }
        let generation = registrationGeneration.withLock { g in
            g += 1; return g
        }
        registration.withLock { $0 = nil } // deregistered: the old keys stop working
        guard seg != 0 else { return }
        let thread = try? BackgroundThread { [self] in
            do throws(KVError) {
                let m = try rdma.register(region)
                // Published only if no later serve(segment:) (or stop) came meanwhile.
                registrationGeneration.withLock { g in if g == generation { registration.withLock { $0 = m } } }
            } catch {
                log("segment server: RDMA registration failed (\(error.message)); serving over TCP only")
            }
        }
        registrar.withLock { old in
            old?.join()
            old = thread
        }
    }

    /// Waits for the registration in progress, if any (tests; `stop`).
    public func waitForRegistration() {
        registrar.withLock { t in
            t?.join(); t = nil
        }
    }

    /// Serves kvRead/kvWrite of these host buffers from now on (empty: none). Waits for the
    /// transfers in progress on the old ones.
    ///
    /// A peer in the middle of a transfer holds the buffers shared while it waits on the
    /// network; one that stalls (a kvWrite sent in part) must not block the owner: its
    /// connection is cut (`shutdown`), so the change waits for memory copies only.
    public func serveKV(_ buffers: [MemoryRegion]) {
        while !kvLock.tryLockExclusive() {
            for s in kvActive.withLock({ Array($0.values) }) { s.shutdown() }
            usleep(200)
        }
        kvBuffers = buffers.sorted { $0.address < $1.address }
        kvLock.unlock()
    }

    /// Checks that every range lies inside one served KV buffer (call with `kvLock` held).
    private func checkKV(_ ranges: [MemoryRegion]) throws(KVError) {
        for r in ranges {
            // The last buffer starting at or before r.address.
            var lo = 0, hi = kvBuffers.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if kvBuffers[mid].address <= r.address { lo = mid + 1 } else { hi = mid }
            }
            guard lo > 0, r.length >= 0, r.address - kvBuffers[lo - 1].address <= UInt(kvBuffers[lo - 1].length),
                UInt(r.length) <= UInt(kvBuffers[lo - 1].length) - (r.address - kvBuffers[lo - 1].address)
            else {
                throw .invalidArgument("range \(r.address)+\(r.length) is not inside a KV buffer this peer published")
            }
        }
    }

    /// Whether peers can reach this segment over RDMA now.
    public var servesRDMA: Bool { registration.withLock { $0 != nil } }

    /// Stops accepting, ends every connection and waits for every thread. Idempotent.
    public func stop() {
        let first = state.withLock { s -> Bool in
            defer { s.stopped = true }
            return !s.stopped
        }
        guard first else { return }
        wake.wake()
        pollThread?.join()
        _ = ready.close()
        // Workers blocked on a socket wake up as it is shut down; then every thread is joined.
        let (connections, workers) = state.withLock { s in (Array(s.connections.values), Array(s.workers.values)) }
        for c in connections { c.socket.shutdown() }
        for w in workers { w.join() }
        state.withLock { s in s.connections.removeAll() }
        for c in connections { c.queuePairs.removeAll() }
        listener.close()
        localListener?.close()
        registrationGeneration.withLock { $0 += 1 }
        waitForRegistration()
        registration.withLock { $0 = nil } // the segment is not reachable by RDMA once stopped
    }

    /// One served connection: its socket and what it has established so far. The poller owns
    /// it while `busy` is false, one worker while it is true (`busy` changes under `state`).
    private final class Connection: @unchecked Sendable {
        let socket: Socket
        let serial: Int
        var welcomed = false
        var handshake: ServerHandshake?
        var queuePairs: [RDMAQueuePair] = [] // live as long as this connection
        /// Handshake bytes read so far (the poller reads without waiting).
        var inbound: [UInt8] = []
        /// When the poller closes it (`monotonicClock`; 0: never): the authentication deadline,
        /// then the idle deadline.
        var expires: Nanoseconds
        var busy = false

        init(_ s: Socket, _ serial: Int, expires: Nanoseconds) {
            socket = s
            self.serial = serial
            self.expires = expires
        }
    }

    /// The poller: accepts, authenticates, expires, and hands connections with requests to
    /// workers. Returns once `stop` was called.
    private func pollLoop() {
        var fds: [pollfd] = []
        var polled: [Connection] = []
        var restUntil: Nanoseconds = 0 // accept failed (out of descriptors): listeners rest
        while true {
            let now = monotonicClock()
            var next: Nanoseconds = restUntil > now ? restUntil : .max
            var expired: [Connection] = []
            fds.removeAll(keepingCapacity: true)
            polled.removeAll(keepingCapacity: true)
            let resting = restUntil > now
            fds.append(pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0))
            fds.append(pollfd(fd: resting ? -1 : listener.fd, events: Int16(POLLIN), revents: 0))
            fds.append(pollfd(fd: resting ? -1 : localListener?.fd ?? -1, events: Int16(POLLIN), revents: 0))
            let stopped = state.withLock { st -> Bool in
                for c in st.connections.values where !c.busy {
                    if c.expires != 0 {
                        if c.expires <= now { expired.append(c); continue }
                        next = min(next, c.expires)
                    }
                    fds.append(pollfd(fd: c.socket.fd, events: Int16(POLLIN), revents: 0))
                    polled.append(c)
                }
                for c in expired { st.connections[c.serial] = nil }
                return st.stopped
            }
            if stopped { return }
            for c in expired { drop(c) } // too slow to authenticate, or idle too long
            let wait = next == .max ? Int32(-1) : Int32(min(1000, (next - now) / 1_000_000 + 1))
            let n = poll(&fds, nfds_t(fds.count), wait)
            if n < 0 {
                if errno != EINTR { usleep(1000) }
                continue
            }
            if fds[0].revents != 0 { wake.drain() }
            for (i, l) in [(1, listener), (2, localListener)] where fds[i].revents != 0 {
                if let l, !accept(from: l) { restUntil = monotonicClock() &+ 100_000_000 }
            }
            for (i, c) in polled.enumerated() where fds[i + 3].revents != 0 {
                if c.welcomed { dispatch(c) } else { handshake(c) }
            }
        }
    }

    /// Accepts what is pending on `l` (at most 64 at a time); false when accept failed.
    private func accept(from l: Socket) -> Bool {
        for _ in 0..<64 {
            let accepted: Socket?
            do throws(KVError) { accepted = try l.accept() } catch { return false }
            guard let s = accepted else { return true }
            // Workers block; the poller reads with MSG_DONTWAIT.
            SystemCall.bestEffort("fcntl clearing O_NONBLOCK", fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) & ~O_NONBLOCK))
            let deadline = monotonicClock() &+ Nanoseconds(DataFrame.authTimeout * 1e9)
            let kept = state.withLock { st -> Bool in
                // A peer cannot make this process keep connections without bound.
                guard !st.stopped, st.connections.count < Self.maxConnections else { return false }
                st.nextSerial += 1
                st.connections[st.nextSerial] = Connection(s, st.nextSerial, expires: deadline)
                return true
            }
            if !kept { s.close() }
        }
        return true
    }

    /// Forgets a connection and closes it (its thread, if any, has finished with it).
    private func drop(_ c: Connection) {
        state.withLock { st in _ = st.connections.removeValue(forKey: c.serial) }
        c.queuePairs.removeAll()
        c.socket.shutdown()
    }

    /// Reads what has arrived of the handshake (hello, then prove) without waiting, and answers
    /// each whole frame; any failure ends the connection.
    private func handshake(_ c: Connection) {
        do throws(KVError) {
            let limit = WireFrameHeader.size + DataFrame.maxPreAuthPayload
            var chunk = [UInt8](repeating: 0, count: limit - c.inbound.count)
            let fd = c.socket.fd, room = chunk.count
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, room, Int32(MSG_DONTWAIT)) }
            if n == 0 { throw KVError(.transfer, "the peer closed the connection") }
            if n < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { return }
                throw SystemCall.failure("recv", code: .transfer)
            }
            c.inbound += chunk[..<n]
            while !c.welcomed && c.inbound.count >= WireFrameHeader.size {
                let h = try rethrowingKVError {
                    try c.inbound.withUnsafeBytes { b in
                        try WireFrameHeader.decode(
                            UnsafeRawBufferPointer(rebasing: b[..<WireFrameHeader.size]), maxPayload: DataFrame.maxPreAuthPayload,
                            isKnown: { $0 == DataFrame.hello || $0 == DataFrame.prove })
                    }
                }
                guard c.inbound.count >= WireFrameHeader.size + h.length else { return }
                let payload = Array(c.inbound[WireFrameHeader.size..<WireFrameHeader.size + h.length])
                c.inbound.removeFirst(WireFrameHeader.size + h.length)
                do throws(KVError) {
                    if h.kind == DataFrame.hello { try hello(c, h, payload) } else { try prove(c, h, payload) }
                } catch {
                    // The payload of the master's `error` answer (same codec); best effort.
                    try? c.socket.writeFrameNow(kind: DataFrame.error, requestID: h.requestID, payload: MasterResponse.error(error).encode())
                    throw error
                }
            }
            if c.welcomed {
                // A request before the handshake's answer is a protocol error.
                guard c.inbound.isEmpty else { throw .invalidArgument("a request came before the handshake's answer") }
                c.socket.setTimeout(idleTimeout)
                state.withLock { _ in c.expires = monotonicClock() &+ Nanoseconds(idleTimeout * 1e9) }
            }
        } catch {
            if error.code != .transfer { log("segment server: closing a connection: \(error.message)") }
            drop(c)
        }
    }

    /// Hands a welcomed connection with bytes to read to a worker (starting one if none is free
    /// and the pool is not full; otherwise it waits in `ready`).
    private func dispatch(_ c: Connection) {
        state.withLock { st in
            c.busy = true
            guard !ready.push(c), !st.stopped, st.workers.count < Self.maxWorkers else { return }
            st.nextWorker += 1
            let id = st.nextWorker
            if let t = try? BackgroundThread({ [self] in work(id) }) { st.workers[id] = t }
        }
    }

    /// A worker: serves connections from `ready` until none comes for `workerIdle` seconds.
    private func work(_ id: Int) {
        while let c = ready.pop(timeout: Self.workerIdle) {
            if serveRequests(c) {
                state.withLock { _ in
                    c.busy = false
                    c.expires = c.queuePairs.isEmpty ? monotonicClock() &+ Nanoseconds(idleTimeout * 1e9) : 0
                }
                wake.wake()
            } else {
                drop(c)
            }
        }
        state.withLock { st in
            // A worker that ends by itself detaches (stop joins the ones it finds).
            if !st.stopped { st.workers[id] = nil }
        }
    }

    /// Serves requests on `c` while they keep coming (within `linger`). A failure is answered
    /// with an error frame, and ends the connection when the stream's state is unknown.
    /// Returns whether the connection goes on.
    private func serveRequests(_ c: Connection) -> Bool {
        let s = c.socket
        while true {
            let header: WireFrameHeader, payload: [UInt8]
            do throws(KVError) {
                (header, payload) = try s.readFrame(
                    maxPayload: DataFrame.maxPayload, isKnown: DataFrame.isKnown,
                    deadline: requestDeadline(0))
            } catch {
                if error.code != .transfer { log("segment server: closing a connection: \(error.message)") }
                return false
            }
            let kind = DataFrame.Kind(rawValue: header.kind)
            do throws(KVError) {
                switch kind {
                case .read, .write: try transfer(c, header, payload, write: kind == .write)
                case .kvRead, .kvWrite: try kvTransfer(c, header, payload, write: kind == .kvWrite)
                case .segmentFD: try segmentDescriptor(c, header)
                case .diskRead: try diskRead(c, header, payload)
                case .rdmaConnect: try rdmaConnect(c, header, payload)
                case .hello, .prove: throw .invalidArgument("this connection has already authenticated")
                case .ok, .error, .rdmaAccepted, .challenge, nil:
                    throw .invalidArgument("unexpected frame kind \(header.kind)")
                }
            } catch {
                // The payload of the master's `error` answer (same codec); best effort.
                try? s.writeFrame(kind: DataFrame.error, requestID: header.requestID, payload: MasterResponse.error(error).encode())
                // A refused write leaves its raw bytes unread, a transfer failure leaves the
                // stream in an unknown state: either way the connection ends.
                if error.code == .transfer || kind == .write || kind == .kvWrite { return false }
            }
            // Keep the connection while its next request follows soon and nobody waits.
            if ready.count > 0 { return true }
            var p = pollfd(fd: s.fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, Self.linger) <= 0 { return true }
        }
    }

    /// Runs `body` with the segment id served now, holding the owner's data lock shared so
    /// that no remount changes it meanwhile. Never waits: the owner's reconnect may itself
    /// wait for an operation that waits for this peer, so a remount in progress refuses the
    /// request with `transfer` instead.
    ///
    /// `patience`: seconds to keep trying (a queue pair asked for during a remount: the peer
    /// would otherwise go without RDMA on that connection). Polling holds nothing, so it cannot
    /// take part in that wait.
    private func whileServing(patience: Double = 0, _ body: (SegmentID) throws(KVError) -> Void) throws(KVError) {
        if let dataLock, !dataLock.tryLockShared() {
            let until = monotonicClock() + Nanoseconds(patience * 1e9)
            while true {
                guard monotonicClock() < until else { throw KVError(.transfer, "the segment is being remounted by its owner") }
                usleep(1000)
                if dataLock.tryLockShared() { break }
            }
        }
        defer { dataLock?.unlock() }
        try body(segmentID.withLock { $0 })
    }

    /// The deadline of a request moving `bytes` bytes: `idleTimeout` plus the bytes at
    /// `minimumRate`, from now.
    private func requestDeadline(_ bytes: Int) -> Nanoseconds {
        monotonicClock() &+ Nanoseconds((idleTimeout + Double(bytes) / Self.minimumRate) * 1e9)
    }

    private func requireWelcome(_ c: Connection) throws(KVError) {
        guard c.welcomed else { throw .invalidArgument("the first request must be hello") }
    }

    /// hello(client nonce) → challenge(server nonce, server proof).
    private func hello(_ c: Connection, _ header: WireFrameHeader, _ payload: [UInt8]) throws(KVError) {
        guard !c.welcomed, c.handshake == nil else { throw .invalidArgument("hello was already sent on this connection") }
        let cn = try WireReader.parse(payload, "hello") { (r) throws(KVError) in Array(try r.bytes(max: 64, "nonce")) }
        let h = try ServerHandshake(clientNonce: cn)
        c.handshake = h
        var w = WireWriter()
        w.bytes(h.serverNonce)
        w.bytes(h.serverProof(token: token.bytes))
        try c.socket.writeFrameNow(kind: DataFrame.challenge, requestID: header.requestID, payload: w.bytes)
    }

    /// prove(client proof) → ok: the connection is welcomed.
    private func prove(_ c: Connection, _ header: WireFrameHeader, _ payload: [UInt8]) throws(KVError) {
        guard !c.welcomed, let h = c.handshake else { throw .invalidArgument("prove must follow hello") }
        let proof = try WireReader.parse(payload, "prove") { (r) throws(KVError) in Array(try r.bytes(max: 64, "proof")) }
        guard h.accepts(clientProof: proof, token: token.bytes) else { throw .invalidArgument("the segment server refused the token") }
        try c.socket.writeFrameNow(kind: DataFrame.ok, requestID: header.requestID, payload: [])
        c.welcomed = true
    }

    /// read(segment, offset, length) → ok + the bytes; write(segment, offset, length, ns left)
    /// + the bytes → ok, storing only bytes that arrive before the writer's deadline.
    private func transfer(_ c: Connection, _ header: WireFrameHeader, _ payload: [UInt8], write isWrite: Bool) throws(KVError) {
        try requireWelcome(c)
        let s = c.socket
        let (seg, offset, length, remaining) = try WireReader.parse(payload, "transfer request") { (r) throws(KVError) in
            let seg = try r.u32()
            let offset = try r.size(max: MasterLimits.maxSize, "offset"), length = try r.size(max: MasterLimits.maxSize, "length")
            let remaining: UInt64 = isWrite ? try r.u64() : 0
            return (seg, offset, length, min(remaining, Self.maxRemaining))
        }
        // The writer's deadline on this host's clock: when the frame arrived plus what
        // was left of it when it was sent (later than the writer's by the frame's
        // transit; the writer's own deadline is the write timeout less a margin).
        let deadline = remaining > 0 ? monotonicClock() &+ Nanoseconds(remaining) : 0
        // This server's own: nobody holds a worker (and the data lock) for longer.
        let own = requestDeadline(length)
        try whileServing { (current) throws(KVError) in
            guard current != 0, seg == current else { throw .notFound("segment \(seg) is not served here (this server serves \(current))") }
            guard offset <= region.length, length <= region.length - offset else {
                throw .invalidArgument("range \(offset)+\(length) is outside the \(region.length)-byte segment")
            }
            let bytes = UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: region.address + UInt(offset)), count: length)
            if !isWrite {
                try s.writeFrame(kind: DataFrame.ok, requestID: header.requestID, payload: [])
                try s.writeAll(UnsafeRawBufferPointer(bytes), deadline: own)
            } else {
                if deadline != 0 {
                    try s.readExactly(into: bytes, arrivingBy: min(deadline, own))
                } else {
                    try s.readExactly(into: bytes, deadline: own)
                }
                try s.writeFrame(kind: DataFrame.ok, requestID: header.requestID, payload: [])
            }
        }
    }

    /// diskRead(disk segment, generation, offset, length) → ok + the bytes, read and checked
    /// by the disk tier. A failure before the first byte is answered with an error frame; one
    /// after it closes the connection (`transfer`), so the peer never takes a short or
    /// unchecked answer for the object's bytes.
    private func diskRead(_ c: Connection, _ header: WireFrameHeader, _ payload: [UInt8]) throws(KVError) {
        try requireWelcome(c)
        let s = c.socket
        let (seg, generation, offset, length) = try WireReader.parse(payload, "disk read request") { (r) throws(KVError) in
            (try r.u32(), try r.u64(), try r.size(max: MasterLimits.maxSize, "offset"), try r.size(max: MasterLimits.maxSize, "length"))
        }
        guard let reader = diskReader.withLock({ $0 }) else { throw .notFound("this peer has no disk tier") }
        let own = requestDeadline(length)
        var started = false
        do throws(KVError) {
            try whileServing { (current) throws(KVError) in
                guard current != 0, seg == DiskDirectory.diskSegment(of: current) else {
                    throw .notFound("disk segment \(seg) is not served here")
                }
                try reader(generation, offset, length) { (piece) throws(KVError) in
                    if !started {
                        try s.writeFrame(kind: DataFrame.ok, requestID: header.requestID, payload: [])
                        started = true
                    }
                    try s.writeAll(piece, deadline: own)
                }
                if !started { try s.writeFrame(kind: DataFrame.ok, requestID: header.requestID, payload: []) }
            }
        } catch {
            guard started else { throw error }
            s.shutdown() // the peer sees the stream end, never an error frame taken for bytes
            throw KVError(.transfer, "disk read failed after its first byte: \(error.message)")
        }
    }

    /// kvRead(ranges) → ok + the bytes; kvWrite(ranges) + the bytes → ok; every range inside
    /// a KV buffer this process published.
    private func kvTransfer(_ c: Connection, _ header: WireFrameHeader, _ payload: [UInt8], write: Bool) throws(KVError) {
        try requireWelcome(c)
        let s = c.socket
        let ranges = try WireReader.parse(payload, "KV transfer request") { (r) throws(KVError) in try KVRanges.decode(&r) }
        kvActive.withLock { $0[c.serial] = s }
        defer { kvActive.withLock { _ = $0.removeValue(forKey: c.serial) } }
        kvLock.lockShared()
        defer { kvLock.unlock() }
        try checkKV(ranges)
        let total = ranges.reduce(0) { $0 + $1.length }
        let deadline = requestDeadline(total)
        try ranges.withUnsafeBufferPointer { (rs) throws(KVError) in
            if !write {
                try s.writeFrame(kind: DataFrame.ok, requestID: header.requestID, payload: [])
                try s.writeAll(total, from: rs, deadline: deadline)
            } else {
                try s.readExactly(total, into: rs, deadline: deadline)
                try s.writeFrame(kind: DataFrame.ok, requestID: header.requestID, payload: [])
            }
        }
    }

    /// segmentFD → ok(size) with the segment's descriptor attached (local socket only).
    private func segmentDescriptor(_ c: Connection, _ header: WireFrameHeader) throws(KVError) {
        try requireWelcome(c)
        let s = c.socket
        guard shareFD >= 0, s.isUnixDomain else {
            throw KVError(.unsupported, "this server hands out no segment descriptor on this connection")
        }
        try whileServing { (current) throws(KVError) in
            guard current != 0 else { throw .notFound("the segment is not mounted") }
            var w = WireWriter()
            w.u64(UInt64(region.length))
            let f = WireWriter.frame(kind: DataFrame.ok, requestID: header.requestID, payload: w.bytes)
            try rethrowingKVError { try f.withUnsafeBytes { try s.writeAll($0, attaching: shareFD) } }
        }
    }

    /// rdmaConnect(peer's queue-pair address) → rdmaAccepted(ours, segment base, rkey, size,
    /// id), or `unsupported` (the peer goes on over TCP).
    private func rdmaConnect(_ c: Connection, _ header: WireFrameHeader, _ payload: [UInt8]) throws(KVError) {
        try requireWelcome(c)
        let s = c.socket
        let theirs = try WireReader.parse(payload, "rdmaConnect") { (r) throws(KVError) in try RDMAAddress.decode(&r) }
        guard c.queuePairs.count < Self.maxQueuePairsPerConnection else {
            throw .invalidArgument("a connection holds at most \(Self.maxQueuePairsPerConnection) queue pair")
        }
        try whileServing(patience: 0.5) { (current) throws(KVError) in
            guard let rdma else {
                throw KVError(.unsupported, "this peer has no RDMA device (\(RDMA.shared.openFailure)); use TCP")
            }
            guard let memory = registration.withLock({ $0 }) else {
                throw KVError(.unsupported, "this peer's segment is not registered for RDMA (yet, or past its locked-memory limit); use TCP")
            }
            let qp: RDMAQueuePair
            do throws(KVError) {
                qp = try RDMAQueuePair(rdma, remote: true)
                try qp.connect(to: theirs)
            } catch {
                // Our side of RDMA failed: the peer goes on over TCP.
                throw KVError(.unsupported, "RDMA queue pair: \(error.message)")
            }
            c.queuePairs.append(qp)
            // RDMA traffic sends nothing over this socket: the poller does not time it out
            // (see `work`), keepalive probes notice a peer that is gone.
            s.setKeepAlive(idle: 30, interval: 5, count: 4)
            var w = WireWriter()
            qp.address.encode(into: &w)
            w.u64(UInt64(memory.region.address)); w.u32(memory.rkey); w.u64(UInt64(memory.region.length)); w.u32(current)
            try s.writeFrame(kind: DataFrame.rdmaAccepted, requestID: header.requestID, payload: w.bytes)
        }
    }
}

/// The client side of a peer's `SegmentServer`: a small pool of connections (each used by
/// one operation at a time), opened on demand with the cluster's token. A failed connection
/// is dropped, never reused; the operation fails with `transfer`.
///
/// With an RDMA context, each new connection also connects a queue pair to the peer's and
/// tests the data path with a small RDMA READ; reads and writes then move by one-sided RDMA
/// READ/WRITE, staged through a registered buffer of the connection (docs/architecture.md §3:
/// caller memory is not registered). A peer that answers that it has no RDMA (or not yet), or
/// a data path that fails its test (a GID that does not route, an MTU, a firewall), is
/// remembered: TCP carries everything for the next 30 s, then a new connection asks again.
/// An RDMA transfer that fails later (the queue pair in error, a staging buffer past the
/// locked-memory limit) moves that connection to TCP and the operation is done again over TCP
/// on the same connection. A port the device reports down stops RDMA at once.
///
/// Every byte moved is counted in `counters` (`networkBytes`; `rdmaBytes` and `bytesStaged`
/// for RDMA).
public final class PeerLink: Sendable {
    public let host: String
    public let port: Int
    private let token: ClusterToken
    private let idle = Locked<[PeerConnection]>([])
    private static let maxIdle = 8
    private let timeout: Double
    private let rdma: RDMAContext?
    private let counters: TransferCounters
    private let log: @Sendable (String) -> Void
    /// Until when (`monotonicClock`) new connections go without RDMA: the peer said it has
    /// none or is not ready (its registration in progress), or the data path failed its test.
    /// `UInt64.max` without an RDMA context here.
    private let rdmaRefusedUntil = Atomic<UInt64>(0)
    /// How long a refusal lasts before a new connection asks again.
    static let rdmaRetryAfter: Nanoseconds = 30_000_000_000

    /// Whether new connections go without RDMA now.
    public var rdmaRefused: Bool { monotonicClock() < rdmaRefusedUntil.load(ordering: .relaxed) }

    private func refuseRDMA() { rdmaRefusedUntil.store(monotonicClock() &+ Self.rdmaRetryAfter, ordering: .relaxed) }

    /// Largest registered staging buffer of a connection; bigger transfers go in pieces.
    static let stagingLimit = 16 << 20

    /// `endpoint` is "a.b.c.d:port".
    public init(
        endpoint: String, token: ClusterToken, timeout: Double = 30, rdma: RDMAContext? = nil,
        counters: TransferCounters = TransferCounters(), log: @escaping @Sendable (String) -> Void = logLine
    ) throws(KVError) {
        (host, port) = try Socket.endpoint(Substring(endpoint))
        self.token = token
        self.timeout = timeout
        self.rdma = rdma
        self.counters = counters
        self.log = log
        if rdma == nil { rdmaRefusedUntil.store(.max, ordering: .relaxed) }
    }

    /// Copies `length` bytes at `offset` of the peer's segment `segment` into `destinations`
    /// (which must hold at least `length` bytes: `invalidArgument` otherwise, nothing sent).
    public func read(segment: SegmentID, offset: Int, length: Int, into destinations: UnsafeBufferPointer<MemoryRegion>) throws(KVError) {
        try Self.checkLength(destinations, length, "destinations")
        try exchange(length) { (c) throws(KVError) in
            if viaRDMA(c, write: false, segment, offset, length, { piece, at in Self.scatter(piece, skipping: at, into: destinations) }) {
                return
            }
            try c.socket.writeFrame(kind: DataFrame.read, payload: Self.request(segment, offset, length))
            try Self.expectOK(c.socket)
            try c.socket.readExactly(length, into: destinations)
        }
    }

    /// Copies bytes `offset ..< offset + length` of disk tier file `generation` of the peer's
    /// disk segment `segment` (`DiskDirectory.diskSegment`) into `destinations` (which must
    /// hold at least `length` bytes). The peer checks the bytes before sending them.
    public func readDisk(
        segment: SegmentID, generation: UInt64, offset: Int, length: Int, into destinations: UnsafeBufferPointer<MemoryRegion>
    ) throws(KVError) {
        try Self.checkLength(destinations, length, "destinations")
        try exchange(length) { (c) throws(KVError) in
            var w = WireWriter()
            w.u32(segment); w.u64(generation); w.u64(UInt64(offset)); w.u64(UInt64(length))
            try c.socket.writeFrame(kind: DataFrame.diskRead, payload: w.bytes)
            try Self.expectOK(c.socket)
            try c.socket.readExactly(length, into: destinations)
        }
    }

    /// Writes the first `length` bytes of the concatenation of `parts` at `offset` of the
    /// peer's segment (`parts` must hold at least `length` bytes: `invalidArgument`
    /// otherwise, nothing sent). `deadline` (this host's `monotonicClock`; 0: none) is the
    /// write's: the peer stores no byte that reaches it later (over TCP; an RDMA write is
    /// one-sided and is not checked).
    public func write(
        segment: SegmentID, offset: Int, length: Int, from parts: UnsafeBufferPointer<MemoryRegion>,
        deadline: Nanoseconds = 0
    ) throws(KVError) {
        try Self.checkLength(parts, length, "parts")
        try exchange(length) { (c) throws(KVError) in
            // After a failed RDMA write some pieces may have landed: the TCP write below writes
            // the same bytes into the same space, not yet visible to anyone.
            if viaRDMA(c, write: true, segment, offset, length, { piece, at in Self.gather(parts, skipping: at, into: piece) }) {
                return
            }
            var remaining: UInt64 = 0
            if deadline != 0 {
                let now = monotonicClock()
                guard now < deadline else { throw KVError(.transfer, "the write's deadline passed before its copy began") }
                remaining = UInt64(deadline - now)
            }
            var w = WireWriter()
            w.u32(segment); w.u64(UInt64(offset)); w.u64(UInt64(length)); w.u64(remaining)
            try c.socket.writeFrame(kind: DataFrame.write, payload: w.bytes)
            if Self.testWriteStall > 0 && length >= 2 {
                // Test hook: a writer frozen mid-copy (half sent, then a pause).
                let half = length / 2
                try c.socket.writeAll(half, from: parts)
                usleep(Self.testWriteStall)
                try PeerLink.pieces(of: parts, skipping: half, count: length - half) { (p, _) throws(KVError) in
                    try c.socket.writeAll(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: p.address), count: p.length))
                }
            } else {
                try c.socket.writeAll(length, from: parts)
            }
            try Self.expectOK(c.socket)
        }
    }

    /// Test hook: `KVSTORE_TEST_WRITE_STALL_US` pauses every TCP write this long after sending
    /// half of its bytes (a writer descheduled mid-copy).
    static let testWriteStall: UInt32 = Environment.integer("KVSTORE_TEST_WRITE_STALL_US") ?? 0

    /// Moves bytes between the peer's published KV buffers (`remote`) and this process's
    /// memory (`local`, same lengths pairwise) in one request: `write` sends local → remote.
    /// At most `maxKVRanges` pairs; every remote range must lie inside one of the peer's KV
    /// buffers (`invalidArgument` from the peer otherwise, nothing moved).
    public func kvTransfer(write: Bool, remote: [MemoryRegion], local: [MemoryRegion]) throws(KVError) {
        guard remote.count == local.count, remote.count <= DataFrame.maxKVRanges,
            zip(remote, local).allSatisfy({ $0.length == $1.length && $0.length >= 0 })
        else {
            throw .invalidArgument("a KV transfer needs at most \(DataFrame.maxKVRanges) remote and local ranges of equal lengths")
        }
        var w = WireWriter(capacity: 8 + 16 * remote.count)
        KVRanges.encode(remote, into: &w)
        let total = remote.reduce(0) { $0 + $1.length }
        try exchange(total) { (c) throws(KVError) in
            try c.socket.writeFrame(kind: write ? DataFrame.kvWrite : DataFrame.kvRead, payload: w.bytes)
            try local.withUnsafeBufferPointer { (l) throws(KVError) in
                if write {
                    try c.socket.writeAll(total, from: l)
                    try Self.expectOK(c.socket)
                } else {
                    try Self.expectOK(c.socket)
                    try c.socket.readExactly(total, into: l)
                }
            }
        }
    }

    /// Drops every idle connection.
    public func closeIdle() {
        let all = idle.withLock { i in
            defer { i.removeAll() }; return i
        }
        for c in all { c.socket.close() }
    }

    private static func checkLength(_ regions: UnsafeBufferPointer<MemoryRegion>, _ length: Int, _ what: String) throws(KVError) {
        let total = TransferPlan.totalLength(regions)
        guard length >= 0, total >= length else { throw .invalidArgument("\(what) hold \(total) bytes, fewer than the \(length) to transfer") }
    }

    private static func request(_ segment: SegmentID, _ offset: Int, _ length: Int) -> [UInt8] {
        var w = WireWriter()
        w.u32(segment); w.u64(UInt64(offset)); w.u64(UInt64(length))
        return w.bytes
    }

    /// Copies `source` into the byte stream `destinations` starting `skip` bytes in.
    static func scatter(_ source: MemoryRegion, skipping skip: Int, into destinations: UnsafeBufferPointer<MemoryRegion>) {
        pieces(of: destinations, skipping: skip, count: source.length) { piece, at in
            memcpy(UnsafeMutableRawPointer(bitPattern: piece.address)!, UnsafeRawPointer(bitPattern: source.address + UInt(at))!, piece.length)
        }
    }

    /// Fills `destination` from the byte stream `parts` starting `skip` bytes in.
    static func gather(_ parts: UnsafeBufferPointer<MemoryRegion>, skipping skip: Int, into destination: MemoryRegion) {
        pieces(of: parts, skipping: skip, count: destination.length) { piece, at in
            memcpy(UnsafeMutableRawPointer(bitPattern: destination.address + UInt(at))!, UnsafeRawPointer(bitPattern: piece.address)!, piece.length)
        }
    }

    /// Calls `body` with the pieces of bytes `skip..<skip+count` of the stream `regions`, each
    /// with its position from `skip`.
    public static func pieces<E: Error>(
        of regions: UnsafeBufferPointer<MemoryRegion>, skipping skip: Int, count: Int,
        _ body: (MemoryRegion, Int) throws(E) -> Void
    ) throws(E) {
        var skip = skip, at = 0
        for r in regions where at < count {
            if skip >= r.length { skip -= r.length; continue }
            let n = min(r.length - skip, count - at)
            try body(MemoryRegion(address: r.address + UInt(skip), length: n), at)
            at += n
            skip = 0
        }
    }

    /// Runs `body` on a pooled connection and counts `length` bytes moved. A failure drops
    /// the connection (its stream position or queue pair state is unknown).
    ///
    /// A pooled connection may have been closed by the peer meanwhile (its idle timeout): when
    /// one fails with `transfer`, the operation runs once more on a new connection (every
    /// operation may run twice: reads copy the same bytes again, writes write the same bytes to
    /// space not yet visible, or to the same KV ranges).
    private func exchange(_ length: Int, _ body: (PeerConnection) throws(KVError) -> Void) throws(KVError) {
        var (c, pooled) = try take()
        while true {
            do throws(KVError) {
                try body(c)
                break
            } catch {
                c.socket.close()
                if error.code == .transfer && pooled {
                    (c, pooled) = (try connect(), false)
                    continue
                }
                if error.code == .transfer {
                    throw KVError(.transfer, "transfer with peer \(host):\(port) failed: \(error.message)")
                }
                throw error
            }
        }
        counters.bytesCopied.add(length, ordering: .relaxed)
        counters.networkBytes.add(length, ordering: .relaxed)
        counters.copyOps.add(1, ordering: .relaxed)
        let kept = idle.withLock { i -> Bool in
            guard i.count < Self.maxIdle else { return false }
            i.append(c)
            return true
        }
        if !kept { c.socket.close() }
    }

    /// A pooled connection (true) or a new one.
    private func take() throws(KVError) -> (PeerConnection, Bool) {
        if let c = idle.withLock({ $0.popLast() }) { return (c, true) }
        return (try connect(), false)
    }

    private func connect() throws(KVError) -> PeerConnection {
        let s: Socket
        do throws(KVError) {
            s = try Socket.connect(host: host, port: port, timeout: min(timeout, 5))
            s.setTimeout(timeout)
            try PeerHandshake.authenticate(s, token: token.bytes)
        } catch {
            throw KVError(error.code, "peer \(host):\(port): \(error.message)")
        }
        let c = PeerConnection(s)
        if let rdma, rdma.isUp, !rdmaRefused {
            do throws(KVError) {
                c.rdma = try connectQueuePair(c, rdma)
            } catch {
                s.close()
                throw KVError(error.code, "peer \(host):\(port): \(error.message)")
            }
        }
        return c
    }

    /// The connection's RDMA, unless the device reported its port down: then the connection
    /// goes on over TCP (its queue pair is dropped).
    private func usableRDMA(_ c: PeerConnection) -> PeerConnection.RemoteSegment? {
        guard let r = c.rdma else { return nil }
        if rdma?.isUp ?? false { return r }
        c.rdma = nil
        c.dropStaging()
        return nil
    }

    /// Moves the bytes by RDMA when connection `c` can reach them that way (`stage` as in
    /// `PeerConnection.transfer`). False when TCP must carry them: no usable RDMA here, or the
    /// RDMA transfer just failed and moved the connection to TCP (the caller then does the
    /// whole operation over TCP).
    private func viaRDMA(
        _ c: PeerConnection, write: Bool, _ segment: SegmentID, _ offset: Int, _ length: Int,
        _ stage: (MemoryRegion, Int) -> Void
    ) -> Bool {
        guard let r = usableRDMA(c), r.covers(segment, offset, length) else { return false }
        do throws(KVError) {
            try c.transfer(write: write, r, offset: offset, length: length, counters: counters, stage)
            return true
        } catch {
            leaveRDMA(c, error)
            return false
        }
    }

    /// Moves connection `c` to TCP after its RDMA transfer failed.
    private func leaveRDMA(_ c: PeerConnection, _ error: KVError) {
        c.rdma = nil
        c.dropStaging()
        log("RDMA with peer \(host):\(port) failed (\(error.message)); falling back to TCP on this connection")
    }

    /// Connects a queue pair to one of the peer's over the connection and tests the data path
    /// with a small READ. Nil when RDMA is not to be used (the reason logged; the connection
    /// goes on over TCP); throws only when the connection itself failed.
    private func connectQueuePair(_ c: PeerConnection, _ rdma: RDMAContext) throws(KVError) -> PeerConnection.RemoteSegment? {
        let qp: RDMAQueuePair
        do throws(KVError) {
            qp = try RDMAQueuePair(rdma, remote: false)
        } catch {
            log("cannot create an RDMA queue pair for peer \(host):\(port) (\(error.message)); falling back to TCP on this connection")
            return nil
        }
        var w = WireWriter()
        qp.address.encode(into: &w)
        try c.socket.writeFrame(kind: DataFrame.rdmaConnect, payload: w.bytes)
        let payload: [UInt8]
        do throws(KVError) {
            payload = try Self.expect(DataFrame.rdmaAccepted, c.socket)
        } catch  where error.code == .unsupported {
            refuseRDMA() // the peer cannot do RDMA with us (now): TCP, asked again later
            log("peer \(host):\(port) refused RDMA (\(error.message)); using TCP for this peer for now")
            return nil
        }
        let parsed: (RDMAAddress, UInt64, UInt32, Int, SegmentID)
        do throws(KVError) {
            parsed = try WireReader.parse(payload, "rdmaAccepted") { (r) throws(KVError) in
                (try RDMAAddress.decode(&r), try r.u64(), try r.u32(), try r.size(max: MasterLimits.maxSize, "segment size"), try r.u32())
            }
        } catch {
            throw KVError(.transfer, "the peer's RDMA answer does not decode: \(error.message)")
        }
        let (theirs, base, rkey, size, seg) = parsed
        let remote = PeerConnection.RemoteSegment(queuePair: qp, base: base, rkey: rkey, size: size, segment: seg)
        do throws(KVError) {
            try qp.connect(to: theirs)
            try c.probe(remote)
        } catch {
            refuseRDMA()
            log("RDMA with peer \(host):\(port) does not work (\(error.message)); falling back to TCP for this peer for now")
            return nil
        }
        return remote
    }

    /// Reads a response frame: returns on ok, throws the peer's error otherwise.
    static func expectOK(_ s: Socket) throws(KVError) { _ = try expect(DataFrame.ok, s) }

    /// The error an error frame's payload carries.
    static func errorOf(_ payload: [UInt8]) -> KVError {
        guard case .error(let e)? = try? payload.withUnsafeBytes({ try MasterResponse.decode(kind: MasterResponse.errorKind, $0) }) else {
            return KVError(.transfer, "the peer sent an error frame that does not decode")
        }
        return e
    }

    /// Reads a response frame of `kind` and returns its payload; throws the peer's error (or
    /// `transfer` for any other frame).
    private static func expect(_ kind: UInt16, _ s: Socket) throws(KVError) -> [UInt8] {
        let (h, payload) = try s.readFrame(maxPayload: DataFrame.maxPayload, isKnown: DataFrame.isKnown)
        if h.kind == kind { return payload }
        guard h.kind == DataFrame.error else { throw KVError(.transfer, "unexpected frame kind \(h.kind) from the peer") }
        throw errorOf(payload)
    }
}

/// One pooled connection to a peer's segment server, with its RDMA state when it has one.
final class PeerConnection: @unchecked Sendable {
    struct RemoteSegment {
        let queuePair: RDMAQueuePair
        let base: UInt64
        let rkey: UInt32
        let size: Int
        let segment: SegmentID

        /// Whether `offset..<offset+length` of segment `seg` is what this queue pair reaches
        /// (otherwise the TCP request is sent, and the server says what is wrong).
        func covers(_ seg: SegmentID, _ offset: Int, _ length: Int) -> Bool {
            seg == segment && offset >= 0 && length >= 0 && offset <= size && length <= size - offset
        }
    }

    let socket: Socket
    var rdma: RemoteSegment?
    /// Registered memory for RDMA staging, kept for the connection's next transfers.
    private var staging: RDMAMemory?
    /// The largest staging buffer the locked-memory limit allowed (see `stagingBuffer`).
    private var stagingCeiling = Int.max

    init(_ s: Socket) { socket = s }

    /// Moves `length` bytes at `offset` of the remote segment by RDMA, in pieces of at most
    /// the staging buffer's size: `stage(piece, at)` fills the piece before a WRITE, or
    /// empties it after a READ (`at`: the piece's position in the transfer).
    func transfer(
        write: Bool, _ r: RemoteSegment, offset: Int, length: Int, counters: TransferCounters,
        _ stage: (MemoryRegion, Int) -> Void
    ) throws(KVError) {
        let buffer = try stagingBuffer(min(length, PeerLink.stagingLimit), r.queuePair.context)
        var done = 0
        while done < length {
            let piece = MemoryRegion(address: buffer.region.address, length: min(length - done, buffer.region.length))
            if write { stage(piece, done) }
            try r.queuePair.transfer(
                write: write, local: piece, lkey: buffer.lkey, remote: r.base + UInt64(offset + done), rkey: r.rkey,
                timeoutMilliseconds: PeerConnection.transferTimeoutMilliseconds)
            if !write { stage(piece, done) }
            done += piece.length
        }
        counters.rdmaBytes.add(length, ordering: .relaxed)
        counters.bytesStaged.add(length, ordering: .relaxed)
    }

    /// How long one RDMA piece may take before the connection gives up on RDMA (and redoes
    /// the operation over TCP): a 16 MiB piece takes milliseconds on any RDMA link.
    static let transferTimeoutMilliseconds: Int32 = 5_000

    /// Reads a few bytes of the remote segment by RDMA: whether the data path works.
    func probe(_ r: RemoteSegment) throws(KVError) {
        guard r.size > 0 else { throw KVError(.unsupported, "the peer serves an empty segment") }
        let buffer = try stagingBuffer(64, r.queuePair.context)
        try r.queuePair.transfer(
            write: false, local: MemoryRegion(address: buffer.region.address, length: min(64, r.size)),
            lkey: buffer.lkey, remote: r.base, rkey: r.rkey, timeoutMilliseconds: 2_000)
    }

    func dropStaging() { staging = nil }

    /// A registered staging buffer of at least `size` bytes (at least 1 MiB) or, when the
    /// locked-memory limit refuses that, the largest of halving sizes down to 64 KiB.
    /// A size that had to be halved is the connection's ceiling from then on (larger
    /// transfers go in pieces of it, not through a new registration attempt each time).
    private func stagingBuffer(_ size: Int, _ context: RDMAContext) throws(KVError) -> RDMAMemory {
        if let s = staging, s.region.length >= min(size, stagingCeiling) { return s }
        staging = nil // deregistered first: its bytes count against the limit
        var want = min(max(size, 1 << 20), stagingCeiling)
        var failure: KVError? = nil
        while want >= 64 << 10 {
            do throws(KVError) {
                let s = try context.allocate(want)
                staging = s
                if failure != nil { stagingCeiling = want }
                return s
            } catch {
                failure = failure ?? error
                want /= 2
            }
        }
        throw failure ?? KVError(.transfer, "no RDMA staging buffer")
    }
}

/// The range list of kvRead/kvWrite: a count, then (address u64, length u64) pairs.
enum KVRanges {
    static func encode(_ ranges: [MemoryRegion], into w: inout WireWriter) {
        w.count(ranges.count)
        for r in ranges { w.u64(UInt64(r.address)); w.u64(UInt64(r.length)) }
    }

    static func decode(_ r: inout WireReader) throws(KVError) -> [MemoryRegion] {
        let n = try r.count(max: DataFrame.maxKVRanges, minElementSize: 16, "KV ranges")
        var out: [MemoryRegion] = []
        out.reserveCapacity(n)
        for _ in 0..<n {
            let address = UInt(try r.u64())
            out.append(MemoryRegion(address: address, length: try r.size(max: MasterLimits.maxSize, "KV range length")))
        }
        return out
    }
}
