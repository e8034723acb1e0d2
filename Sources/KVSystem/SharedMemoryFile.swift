#if canImport(Glibc)
import Glibc
#endif
import CKVCopy
import KVCore

/// Checks a descriptor that another process handed over as its shared segment, before it is
/// mapped (a reader) or believed (the master, for the capacity a local client mounts).
public enum SharedMemoryFile {
    /// Throws `invalidArgument` unless `fd` is a regular file on tmpfs or hugetlbfs, open for
    /// reading and writing, holding at least `size` bytes: a descriptor of any other file is
    /// refused, so a peer cannot make this process write into a file of its choosing, nor claim
    /// more memory than it has. Returns the file's size.
    @discardableResult
    public static func check(_ fd: Int32, holding size: Int) throws(KVError) -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            throw .invalidArgument("the segment descriptor is not a regular file")
        }
        let type = kv_fs_type(fd)
        guard type == 0x0102_1994 || type == 0x9584_58f6 else { // TMPFS_MAGIC, HUGETLBFS_MAGIC
            throw .invalidArgument("the segment descriptor is not a shared-memory file (tmpfs or hugetlbfs)")
        }
        guard fcntl(fd, F_GETFL) & O_ACCMODE == O_RDWR else {
            throw .invalidArgument("the segment descriptor is not open for reading and writing")
        }
        guard Int(st.st_size) >= size else {
            throw .invalidArgument("the segment file holds \(st.st_size) bytes, fewer than \(size)")
        }
        return Int(st.st_size)
    }
}
