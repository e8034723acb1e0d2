#if canImport(Glibc)
import Glibc
#endif
import KVAccelerator
import KVCore

/// The thread-local last-error message of the C ABI. Each thread owns one heap buffer
/// (freed by the thread-exit destructor); `kv_last_error` hands out its address.
enum LastError {
    final class Box {
        var bytes: UnsafeMutablePointer<CChar>
        var count: Int
        /// Messages of the items of the last batch call on this thread ("" for successes).
        var batch: [UnsafeMutablePointer<CChar>?] = []
        init() { bytes = .allocate(capacity: 1); bytes[0] = 0; count = 0 }
        deinit {
            bytes.deallocate()
            for p in batch { free(p) }
        }
    }

    static let key: pthread_key_t = {
        var k = pthread_key_t()
        let rc = pthread_key_create(&k) { p in
            if let p { Unmanaged<Box>.fromOpaque(p).release() }
        }
        precondition(rc == 0, "pthread_key_create failed")
        return k
    }()

    static var box: Box {
        if let p = pthread_getspecific(key) { return Unmanaged<Box>.fromOpaque(p).takeUnretainedValue() }
        let b = Box()
        pthread_setspecific(key, Unmanaged.passRetained(b).toOpaque())
        return b
    }

    static func set(_ message: String) {
        let b = box
        var utf8 = Array(message.utf8)
        utf8.append(0)
        let fresh = UnsafeMutablePointer<CChar>.allocate(capacity: utf8.count)
        utf8.withUnsafeBufferPointer { src in
            UnsafeMutableRawPointer(fresh).copyMemory(from: src.baseAddress!, byteCount: src.count)
        }
        b.bytes.deallocate()
        b.bytes = fresh
        b.count = utf8.count - 1
    }

    /// Records the per-item messages of a batch call (only failures allocate).
    static func setBatch(_ errors: [KVError?]) {
        let b = box
        for p in b.batch { free(p) }
        b.batch = errors.map { e in e.map { strdup($0.message)! } }
    }

    /// An empty C string (for out-of-range batch indices).
    nonisolated(unsafe) static let empty: UnsafeMutablePointer<CChar> = {
        let p = UnsafeMutablePointer<CChar>.allocate(capacity: 1)
        p[0] = 0
        return p
    }()

    /// Records `error` and returns its status code.
    static func record(_ error: KVError) -> Int32 {
        set(error.message)
        return error.code.rawValue
    }
}
