/*
 * kvstore's flat C ABI, implemented in Swift (Sources/KVStoreABI, `@c` functions).
 *
 * Rules, written once here:
 *  - Every function that can fail returns an int32 status: KV_OK (0) or a KVError code
 *    (KV_E_*). On failure the thread-local message is set: kv_last_error() returns it,
 *    valid until the next failing call on the same thread. KV_BUSY is not an error.
 *  - kv_store handles are opaque. kv_store_create hands one out; kv_store_destroy closes the
 *    store and frees the handle (exactly once, with no call on the handle in flight or after).
 *    kv_store_close only closes: every later call on the handle returns KV_E_STORE_CLOSED.
 *  - Memory passed in (keys, buffers, arrays) is borrowed for the duration of the call only;
 *    the ABI never keeps a pointer past the return, except registered buffers, which the
 *    caller keeps alive until kv_unregister_buffer or close.
 *  - Keys are UTF-8, (pointer, byte length), not NUL-terminated.
 *  - Every function is thread-safe. Batches are loops over the single-object calls on the
 *    caller's side, so each object keeps its own status and message.
 */
#ifndef KVSTORE_ABI_H
#define KVSTORE_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    KV_OK = 0,
    KV_E_OBJECT_NOT_FOUND = 1,
    KV_E_OBJECT_EXISTS = 2,
    KV_E_NO_SPACE = 3,
    KV_E_LEASE_HELD = 4,
    KV_E_INVALID_ARGUMENT = 5,
    KV_E_TRANSFER = 6,
    KV_E_STORE_CLOSED = 7,
    KV_E_UNSUPPORTED = 8,
    KV_E_INTERNAL = 9,
    KV_E_ARGUMENT_TYPE = 10,
    /* Not an error: an in-place upsert is rewriting the object; retry (kv_read_begin). */
    KV_BUSY = 64,
};

/* Flags of kv_put. */
enum { KV_PUT = 0, KV_UPSERT = 1 };
/* Flags of kv_read_begin. */
enum { KV_READ_WAIT = 0, KV_READ_NOWAIT = 1 };
/* Flags of kv_remove. */
enum { KV_REMOVE_FORCE = 1 };

typedef struct kv_store kv_store;

/* A source buffer: `len` readable bytes at `ptr`. */
typedef struct { const void *ptr; size_t len; } kv_buffer;
/* A destination buffer: `len` writable bytes at `ptr`. */
typedef struct { void *ptr; size_t len; } kv_mut_buffer;
/* A key: `len` UTF-8 bytes at `ptr`. */
typedef struct { const char *ptr; size_t len; } kv_key;
/* A read hold on one object version (see kv_read_begin). */
typedef struct { uint64_t handle; uint64_t offset; uint64_t size; } kv_read;
/* One statistic; `name` is a static NUL-terminated string. */
typedef struct { const char *name; int64_t value; } kv_stat;

/* Message of the last failing call on this thread (UTF-8, NUL-terminated); *len gets its
 * length when len is not NULL. Never NULL. */
const char *kv_last_error(size_t *len);

/* Longest key accepted, in bytes. */
size_t kv_max_key_bytes(void);

/* Flags of kv_store_create. */
enum { KV_CREATE_PREFAULT = 1 };

/* Creates an embedded store with one host segment of segment_size bytes. With
 * KV_CREATE_PREFAULT the segment's pages are committed now rather than on first use. */
int32_t kv_store_create(uint64_t segment_size, uint32_t flags, kv_store **out);
/* Closes (waits for operations in flight) and frees the handle. NULL is ignored. */
void kv_store_destroy(kv_store *store);
/* Closes the store; idempotent. */
int32_t kv_store_close(kv_store *store);
/* 1 when closed, else 0. */
int32_t kv_store_is_closed(kv_store *store);

/* Writes the concatenation of parts[0..nparts) as one object (each part copied once). */
int32_t kv_put(kv_store *store, const char *key, size_t key_len,
               const kv_buffer *parts, size_t nparts, uint32_t flags);
/* Takes a read hold on key: *out gets its size. Every successful kv_read_begin must be
 * matched by one kv_read_end. With KV_READ_NOWAIT it returns KV_BUSY instead of waiting. */
int32_t kv_read_begin(kv_store *store, const char *key, size_t key_len, uint32_t flags, kv_read *out);
/* Copies a held object into dst[0..ndst) (filled in order); *copied gets the bytes copied. */
int32_t kv_read_copy(kv_store *store, const kv_read *hold, const kv_mut_buffer *dst, size_t ndst,
                     uint64_t *copied);
int32_t kv_read_end(kv_store *store, const kv_read *hold);

/* begin + copy + end in one call; *copied gets the object's size. */
int32_t kv_get_into(kv_store *store, const char *key, size_t key_len,
                    const kv_mut_buffer *dst, size_t ndst, uint64_t *copied);
int32_t kv_exists(kv_store *store, const char *key, size_t key_len, int32_t *out);
int32_t kv_size(kv_store *store, const char *key, size_t key_len, uint64_t *out);
int32_t kv_remove(kv_store *store, const char *key, size_t key_len, uint32_t flags);
int32_t kv_remove_all(kv_store *store, uint64_t *removed);

/* Registers [ptr, ptr+len) as user memory at `location` ("cpu", "cuda:N"). */
int32_t kv_register_buffer(kv_store *store, const void *ptr, size_t len,
                           const char *location, size_t location_len);
int32_t kv_unregister_buffer(kv_store *store, const void *ptr);

/* Writes up to cap statistics to out; returns how many exist (call with cap 0 to count). */
size_t kv_stats(kv_store *store, kv_stat *out, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
