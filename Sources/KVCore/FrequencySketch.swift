/// A count-min sketch of 4 rows of 4,096 four-bit-ish counters (bytes, capped at 15) that
/// halves every counter after 40,960 additions, so old popularity fades: how often a key was
/// seen (written or looked up), what the disk tiers' reuse admission asks.
public struct FrequencySketch: Sendable {
    public init() {}
    static let width = 4096
    var counters = [UInt8](repeating: 0, count: 4 * width)
    var additions = 0

    public static func hash(_ key: ObjectKey) -> UInt64 {
        key.withUTF8 { b in
            var h: UInt64 = 0xcbf2_9ce4_8422_2325
            for x in b { h = (h ^ UInt64(x)) &* 0x100_0000_01b3 }
            return h ^ (h >> 29)
        }
    }

    private static func index(_ h: UInt64, _ row: Int) -> Int {
        row * width + Int(((h >> UInt64(row * 13)) &* 0x9E37_79B9_7F4A_7C15) >> 52) // the top 12 bits: < width
    }

    public mutating func add(_ h: UInt64) {
        for r in 0..<4 {
            let i = Self.index(h, r)
            if counters[i] < 15 { counters[i] += 1 }
        }
        additions += 1
        if additions >= 10 * Self.width {
            for i in counters.indices { counters[i] >>= 1 }
            additions = 0
        }
    }

    public func estimate(_ h: UInt64) -> Int {
        var m = 15
        for r in 0..<4 { m = min(m, Int(counters[Self.index(h, r)])) }
        return m
    }
}
