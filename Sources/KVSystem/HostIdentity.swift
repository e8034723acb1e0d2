#if canImport(Glibc)
import Glibc
#endif

/// This machine as the master sees it: clients with the same identity map each other's
/// segments; others use TCP. The boot id names the kernel, the network namespace a container
/// or `ip netns` boundary (its /proc, /dev/shm and addresses may differ).
/// `KVSTORE_HOST_ID`, when set, replaces it (to make processes of one machine use TCP).
public func localHostIdentity() -> String {
    if let v = Environment.string("KVSTORE_HOST_ID") { return v }
    func read(_ path: String) -> String {
        guard let f = fopen(path, "r") else { return "" }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 128)
        guard fgets(&buf, Int32(buf.count), f) != nil else { return "" }
        return String(decoding: buf.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
    var ns = [CChar](repeating: 0, count: 64)
    let n = readlink("/proc/self/ns/net", &ns, ns.count - 1)
    let net = n > 0 ? String(decoding: ns[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
    var name = [CChar](repeating: 0, count: 256)
    gethostname(&name, name.count - 1)
    let hostName = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return "\(hostName)/\(read("/proc/sys/kernel/random/boot_id"))/\(net)"
}
