/// KV-cache layouts for prefill→decode transfer (docs/architecture.md §3, "KV blocks"): an engine's KV
/// cache described as buffers, one per (layer, kind), each an array of equal-sized blocks.
/// Pure logic: validation, the wire codec, and the block-copy plan with contiguous runs
/// coalesced. Which device a location names is checked by the store (KVAccelerator).

/// What a buffer of a layer holds.
public enum KVBufferKind: UInt8, Sendable, CaseIterable, Comparable {
    case key = 0, value = 1, index = 2

    public var name: String {
        switch self {
        case .key: "KEY"
        case .value: "VALUE"
        case .index: "INDEX"
        }
    }

    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

/// One buffer of a KV cache: `length` bytes at `address` in `location`'s memory, holding
/// `length / bytesPerBlock` blocks; block `i` starts at `address + i * bytesPerBlock`.
public struct KVBufferDescriptor: Sendable, Equatable {
    public var layer: Int
    public var kind: KVBufferKind
    public var address: UInt
    public var length: Int
    public var bytesPerBlock: Int
    /// Where the buffer lives, parsed once (the store checks that the device exists).
    public var location: MemoryLocation

    public init(layer: Int, kind: KVBufferKind, address: UInt, length: Int, bytesPerBlock: Int, location: MemoryLocation = .host) {
        self.layer = layer
        self.kind = kind
        self.address = address
        self.length = length
        self.bytesPerBlock = bytesPerBlock
        self.location = location
    }

    public var blocks: Int { length / bytesPerBlock }

    /// "(layer 3, VALUE)", how errors name a descriptor.
    public var name: String { "(layer \(layer), \(kind.name))" }
}

/// A validated layout: every layer 0..<layers has a buffer of every kind in `kinds`, no two
/// buffers overlap, and each length is a whole number of blocks. Descriptors are kept sorted
/// by (layer, kind).
public struct KVLayout: Sendable, Equatable {
    public let descriptors: [KVBufferDescriptor]
    public let layers: Int
    public let kinds: [KVBufferKind]

    /// Most buffers one layout may have.
    public static let maxDescriptors = 3 * 4096

    /// Validates `descriptors`; throws `invalidArgument` naming the first bad descriptor.
    public init(_ descriptors: [KVBufferDescriptor]) throws(KVError) {
        guard !descriptors.isEmpty else { throw .invalidArgument("a KV layout needs at least one buffer descriptor") }
        guard descriptors.count <= Self.maxDescriptors else {
            throw .invalidArgument("a KV layout has at most \(Self.maxDescriptors) buffer descriptors, not \(descriptors.count)")
        }
        for (i, d) in descriptors.enumerated() {
            let what = "descriptor \(i) \(d.name)"
            guard d.layer >= 0, d.layer < 1 << 20 else { throw .invalidArgument("\(what): layer must be from 0 to \((1 << 20) - 1)") }
            guard d.bytesPerBlock > 0 else { throw .invalidArgument("\(what): bytes per block must be greater than 0, not \(d.bytesPerBlock)") }
            guard d.length > 0 else { throw .invalidArgument("\(what): length must be greater than 0, not \(d.length)") }
            guard d.length % d.bytesPerBlock == 0 else {
                throw .invalidArgument("\(what): length \(d.length) is not a multiple of bytes per block \(d.bytesPerBlock)")
            }
            guard d.address != 0, UInt.max - d.address >= UInt(d.length) else {
                throw .invalidArgument("\(what): address \(d.address) with length \(d.length) is not a valid range")
            }
        }
        let sorted = descriptors.enumerated().sorted { a, b in
            (a.element.layer, a.element.kind.rawValue) < (b.element.layer, b.element.kind.rawValue)
        }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.element.layer == b.element.layer && a.element.kind == b.element.kind {
            throw .invalidArgument("descriptors \(a.offset) and \(b.offset) are both \(b.element.name): each (layer, kind) may appear once")
        }
        // Overlaps, per location (the same address on two devices is two places).
        let byAddress = descriptors.enumerated().sorted { a, b in
            (a.element.location.description, a.element.address) < (b.element.location.description, b.element.address)
        }
        for (a, b) in zip(byAddress, byAddress.dropFirst()) where a.element.location == b.element.location {
            if a.element.address + UInt(a.element.length) > b.element.address {
                throw .invalidArgument(
                    "descriptor \(b.offset) \(b.element.name) overlaps descriptor \(a.offset) \(a.element.name) in \(a.element.location) memory")
            }
        }
        let layers = sorted.last!.element.layer + 1
        let kinds = Array(Set(descriptors.map(\.kind))).sorted()
        var present = Set<Int>()
        for d in descriptors { present.insert(d.layer) }
        if let missing = (0..<layers).first(where: { !present.contains($0) }) {
            throw .invalidArgument("layer \(missing) has no buffer: a layout covers layers 0 to \(layers - 1) without gaps")
        }
        if sorted.count != layers * kinds.count {
            // One pass over the sorted descriptors (O(n log n) overall, never layers × n).
            var byLayer: [Int: Set<KVBufferKind>] = [:]
            for d in sorted { byLayer[d.element.layer, default: []].insert(d.element.kind) }
            for layer in 0..<layers {
                let has = byLayer[layer] ?? []
                if let k = kinds.first(where: { !has.contains($0) }) {
                    throw .invalidArgument(
                        "layer \(layer) has no \(k.name) buffer: every layer needs the same kinds (\(kinds.map(\.name).joined(separator: ", ")))")
                }
            }
        }
        self.descriptors = sorted.map(\.element)
        self.layers = layers
        self.kinds = kinds
    }

    /// The buffer of (layer, kind).
    public func descriptor(layer: Int, kind: KVBufferKind) -> KVBufferDescriptor {
        descriptors[layer * kinds.count + kinds.firstIndex(of: kind)!]
    }

    public func encode(into w: inout WireWriter) {
        w.count(descriptors.count)
        for d in descriptors {
            w.u32(UInt32(d.layer)); w.u8(d.kind.rawValue); w.u64(UInt64(d.address))
            w.u64(UInt64(d.length)); w.u64(UInt64(d.bytesPerBlock)); w.string(d.location.name)
        }
    }

    /// Decodes and validates a layout.
    public static func decode(_ r: inout WireReader) throws(KVError) -> KVLayout {
        let n = try r.count(max: maxDescriptors, minElementSize: 33, "descriptors")
        var ds: [KVBufferDescriptor] = []
        ds.reserveCapacity(n)
        for _ in 0..<n {
            let layer = Int(try r.u32())
            guard let kind = KVBufferKind(rawValue: try r.u8()) else { throw .invalidArgument("unknown KV buffer kind") }
            let address = UInt(try r.u64())
            let length = try r.size(max: MasterLimits.maxSize, "length")
            let bpb = try r.size(max: MasterLimits.maxSize, "bytes per block")
            let location = try MemoryLocation(parsing: try r.string(max: MemoryLocation.maxTextBytes, "location"))
            ds.append(
                KVBufferDescriptor(
                    layer: layer, kind: kind, address: address, length: length, bytesPerBlock: bpb,
                    location: location))
        }
        return try KVLayout(ds)
    }
}

/// A layout as published under a node id: where its memory can be reached.
public struct PublishedLayout: Sendable, Equatable {
    public var node: String
    public var layout: KVLayout
    /// The publisher's host identity and process id (same host: its memory is reachable with
    /// process_vm_readv; same process: directly) and its segment server ("a.b.c.d:port", ""
    /// when it has none).
    public var host: String
    public var pid: Int
    public var endpoint: String

    public init(node: String, layout: KVLayout, host: String, pid: Int, endpoint: String) {
        self.node = node
        self.layout = layout
        self.host = host
        self.pid = pid
        self.endpoint = endpoint
    }

    public func encode(into w: inout WireWriter) {
        w.string(node); layout.encode(into: &w); w.string(host); w.u64(UInt64(pid)); w.string(endpoint)
    }

    public static func decode(_ r: inout WireReader) throws(KVError) -> PublishedLayout {
        PublishedLayout(
            node: try r.string(max: MasterLimits.maxString, "node id"), layout: try KVLayout.decode(&r),
            host: try r.string(max: MasterLimits.maxString, "host"), pid: try r.size(max: Int(Int32.max), "pid"),
            endpoint: try r.string(max: MasterLimits.maxString, "endpoint"))
    }
}

/// One copy of a block run: `length` bytes from `source` to `destination`, both absolute
/// addresses in the memory of the descriptors `sourceDescriptor`/`destinationDescriptor`
/// (indices into the layouts' sorted descriptors).
public struct KVBlockCopy: Sendable, Equatable {
    public var source: UInt
    public var destination: UInt
    public var length: Int
    public var sourceDescriptor: Int
    public var destinationDescriptor: Int

    public init(source: UInt, destination: UInt, length: Int, sourceDescriptor: Int, destinationDescriptor: Int) {
        self.source = source
        self.destination = destination
        self.length = length
        self.sourceDescriptor = sourceDescriptor
        self.destinationDescriptor = destinationDescriptor
    }
}

/// The copies that move blocks `sourceBlocks[i]` of `source` to `destinationBlocks[i]` of
/// `destination`, for every kind of the given layers (nil: all).
public enum KVBlockPlan {
    /// Validates everything before any byte moves (layers and kinds match, bytes per block
    /// equal, lists of equal length, ids in range, no duplicate destination, layers in range
    /// and distinct), then coalesces runs of consecutive ids on both sides into one copy per
    /// run and buffer.
    public static func copies(
        from source: KVLayout, to destination: KVLayout, sourceBlocks: [Int], destinationBlocks: [Int],
        layers: [Int]? = nil
    ) throws(KVError) -> [KVBlockCopy] {
        guard source.layers == destination.layers else {
            throw .invalidArgument("the layouts have \(source.layers) and \(destination.layers) layers: they must have the same number")
        }
        guard source.kinds == destination.kinds else {
            throw .invalidArgument("the layouts hold kinds \(source.kinds.map(\.name)) and \(destination.kinds.map(\.name)): they must hold the same")
        }
        guard sourceBlocks.count == destinationBlocks.count else {
            throw .invalidArgument("\(sourceBlocks.count) source blocks but \(destinationBlocks.count) destination blocks: the lists must be equally long")
        }
        let chosen = layers ?? Array(0..<source.layers)
        guard !chosen.isEmpty else { throw .invalidArgument("layers must name at least one layer (None: all)") }
        var seenLayers = Set<Int>()
        for l in chosen {
            guard l >= 0, l < source.layers else { throw .invalidArgument("layer \(l) is out of range (the layouts have layers 0 to \(source.layers - 1))") }
            guard seenLayers.insert(l).inserted else { throw .invalidArgument("layer \(l) is listed twice") }
        }
        for (s, d) in zip(source.descriptors, destination.descriptors) where s.bytesPerBlock != d.bytesPerBlock {
            throw .invalidArgument("\(s.name) has \(s.bytesPerBlock) bytes per block here and \(d.bytesPerBlock) there: they must be equal")
        }
        var seen = Set<Int>(minimumCapacity: destinationBlocks.count)
        for d in destinationBlocks where !seen.insert(d).inserted {
            throw .invalidArgument("destination block \(d) is listed twice")
        }
        // Block counts may differ per buffer: check ids against each chosen buffer's.
        let minSource = chosen.flatMap { l in source.kinds.map { source.descriptor(layer: l, kind: $0).blocks } }.min() ?? 0
        let minDestination = chosen.flatMap { l in destination.kinds.map { destination.descriptor(layer: l, kind: $0).blocks } }.min() ?? 0
        if let bad = sourceBlocks.first(where: { $0 < 0 || $0 >= minSource }) {
            throw .invalidArgument("source block \(bad) is out of range (the source buffers hold blocks 0 to \(minSource - 1))")
        }
        if let bad = destinationBlocks.first(where: { $0 < 0 || $0 >= minDestination }) {
            throw .invalidArgument("destination block \(bad) is out of range (the destination buffers hold blocks 0 to \(minDestination - 1))")
        }
        let runs = self.runs(sourceBlocks, destinationBlocks)
        var copies: [KVBlockCopy] = []
        copies.reserveCapacity(runs.count * chosen.count * source.kinds.count)
        for l in chosen {
            for (k, kind) in source.kinds.enumerated() {
                let i = l * source.kinds.count + k
                let s = source.descriptors[i], d = destination.descriptors[i]
                assert(s.kind == kind && d.kind == kind)
                let bpb = s.bytesPerBlock
                for r in runs {
                    copies.append(
                        KVBlockCopy(
                            source: s.address + UInt(r.source * bpb), destination: d.address + UInt(r.destination * bpb),
                            length: r.count * bpb, sourceDescriptor: i, destinationDescriptor: i))
                }
            }
        }
        return copies
    }

    /// Runs of pairs where both ids go up by one: (first source, first destination, count).
    public static func runs(_ source: [Int], _ destination: [Int]) -> [(source: Int, destination: Int, count: Int)] {
        var out: [(source: Int, destination: Int, count: Int)] = []
        for (s, d) in zip(source, destination) {
            if let last = out.last, last.source + last.count == s, last.destination + last.count == d {
                out[out.count - 1].count += 1
            } else {
                out.append((s, d, 1))
            }
        }
        return out
    }
}

/// Published layouts by node id, each owned by the client that published it.
public struct LayoutDirectory: Sendable {
    private var layouts: [String: (owner: UInt64, published: PublishedLayout)] = [:]

    public init() {}

    /// Publishes (or replaces its own) layout; `objectExists` when another client owns the id.
    public mutating func publish(_ p: PublishedLayout, owner: UInt64) throws(KVError) {
        guard !p.node.isEmpty else { throw .invalidArgument("a node id must not be empty") }
        if let have = layouts[p.node], have.owner != owner {
            throw .exists("node id '\(p.node)' is already published by another client")
        }
        layouts[p.node] = (owner, p)
    }

    /// `objectNotFound` when nothing is published under `node`.
    public func fetch(_ node: String) throws(KVError) -> PublishedLayout {
        guard let p = layouts[node] else { throw .notFound("no KV layout is published under node id '\(node)'") }
        return p.published
    }

    /// Removes `owner`'s layout `node`; `objectNotFound` when it has none by that id.
    public mutating func unpublish(_ node: String, owner: UInt64) throws(KVError) {
        guard let have = layouts[node], have.owner == owner else {
            throw .notFound("this client has no KV layout published under node id '\(node)'")
        }
        layouts[node] = nil
    }

    /// Removes every layout of `owner` (it left).
    public mutating func depart(_ owner: UInt64) {
        layouts = layouts.filter { $0.value.owner != owner }
    }

    public var count: Int { layouts.count }

    /// Layouts `owner` has published.
    public func count(of owner: UInt64) -> Int { layouts.values.reduce(0) { $0 + ($1.owner == owner ? 1 : 0) } }
}
