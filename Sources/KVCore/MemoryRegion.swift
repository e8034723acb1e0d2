/// A contiguous range of memory named by address and length in bytes. A plain value: it does
/// not own or keep alive the memory it names; whoever builds it guarantees the range is valid
/// for the operation it is passed to.
public struct MemoryRegion: Sendable, Hashable {
    public let address: UInt
    public let length: Int

    public init(address: UInt, length: Int) {
        self.address = address
        self.length = length
    }

    public init(_ pointer: UnsafeRawPointer, length: Int) {
        self.init(address: UInt(bitPattern: pointer), length: length)
    }

    public var end: UInt { address + UInt(length) }

    /// The sub-range starting `offset` bytes in, of `length` bytes.
    public func slice(at offset: Int, length: Int) -> MemoryRegion {
        MemoryRegion(address: address + UInt(offset), length: length)
    }
}
