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
 *  - Every function is thread-safe. kv_batch_put and kv_batch_get_into plan a whole batch and
 *    run its copies grouped per device; each object keeps its own status and message.
 */
#ifndef KVSTORE_ABI_H
#define KVSTORE_ABI_H

#include <stddef.h>
#include <stdint.h>
/* kv_device_part and kv_call_devices: a caller declares the device and stream of memory it
 * passes by address (a tensor's data pointer), so kvstore neither asks the driver nor guesses
 * host memory, and orders device copies after the caller's stream. */
#include "kv_accelerator.h"

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
    KV_E_CHECKSUM = 11,
    /* Not an error: an in-place upsert is rewriting the object; retry (kv_read_begin). */
    KV_BUSY = 64,
    /* Not an error: the copy ended after the read's lease deadline, so the bytes it wrote are
     * not the object's; end the hold and begin the read again (kv_read_copy(_range); the
     * last error says why, for a caller that gives up). */
    KV_STALE = 65,
};

/* Flags of kv_put and kv_batch_put. */
enum { KV_PUT = 0, KV_UPSERT = 1 };
/* Flag of kv_put, kv_get_into, kv_read_copy(_range) and the batch calls: the caller guarantees
 * every buffer is host memory (no lookup). Without it each buffer's device is found by its
 * registration (address range) or, for unregistered memory, by asking the device registry. */
enum { KV_HOST_MEMORY = 2 };
/* Flags of kv_read_begin. */
enum { KV_READ_WAIT = 0, KV_READ_NOWAIT = 1 };
/* Flags of kv_remove. */
enum { KV_REMOVE_FORCE = 1 };

typedef struct kv_store kv_store;

/* A source buffer: `len` readable bytes at `ptr`. */
typedef struct {
    const void *ptr;
    size_t len;
} kv_buffer;
/* A destination buffer: `len` writable bytes at `ptr`. */
typedef struct {
    void *ptr;
    size_t len;
} kv_mut_buffer;
/* A key: `len` UTF-8 bytes at `ptr`. */
typedef struct {
    const char *ptr;
    size_t len;
} kv_key;
/* A read hold on one object version (see kv_read_begin): which replica (segment, offset), for
 * a read under a cluster master's lease the reader's deadline (monotonic ns; 0: held), and the
 * writer's CRC32C when has_checksum is 1 (a copy of the whole object is checked against it). */
typedef struct {
    uint64_t handle;
    uint64_t segment;
    uint64_t offset;
    uint64_t size;
    uint64_t lease_end;
    uint32_t checksum;
    uint32_t has_checksum;
} kv_read;
/* One statistic; `name` is a static NUL-terminated string. */
typedef struct {
    const char *name;
    int64_t value;
} kv_stat;

/* Message of the last failing call on this thread (UTF-8, NUL-terminated); *len gets its
 * length when len is not NULL. Never NULL. */
const char *kv_last_error(size_t *len);

/* Longest key accepted, in bytes. */
size_t kv_max_key_bytes(void);

/* Flags of kv_store_create. */
/* KV_CREATE_CHECKSUM (also for kv_store_connect): writes store a CRC32C unless their options
 * say KV_OPT_NO_CHECKSUM (see kv_put_options). */
enum { KV_CREATE_PREFAULT = 1, KV_CREATE_NO_PIN = 2, KV_CREATE_CHECKSUM = 4 };

/* Cache rules of a store. Durations in seconds; kv_store_config_init fills the defaults
 * (lease 5 s, soft pin 1800 s, high watermark 0.9, eviction ratio 0.05, no disk tier). */
typedef struct {
    double lease_ttl; /* >= 0; 0: reads grant no lease */
    double soft_pin_ttl; /* > 0: how long a soft pin lasts when a put does not say */
    double eviction_high_watermark; /* (0, 1]: evict when a write would take usage above it */
    double eviction_ratio; /* (0, 1]: fraction of capacity one eviction round frees */
    /* The disk tier (kv_store_create, kv_store_connect_config): NULL for none; else a directory this store owns
     * while open (created mode 0700; a second store on it is KV_E_INVALID_ARGUMENT), whose
     * object files take at most disk_size bytes (>= 8192). disk_admission: 0 reuse (keys
     * seen twice), 1 all. */
    const char *disk_path;
    uint64_t disk_size;
    uint32_t disk_admission;
} kv_store_config;
void kv_store_config_init(kv_store_config *config);

/* Creates an embedded store with one host segment of segment_size bytes and the cache rules
 * of config (NULL: the defaults; a bad value is KV_E_INVALID_ARGUMENT naming it). With
 * KV_CREATE_PREFAULT the segment's pages are committed now rather than on first use. The
 * segment is pinned when an accelerator is present, within the budget of the environment
 * (KVSTORE_PIN_MEMORY, KVSTORE_PIN_MEMORY_MAX_BYTES, or their MC_STORE_ aliases; a bad value is
 * KV_E_INVALID_ARGUMENT); KV_CREATE_NO_PIN leaves it pageable. A refused pin is not an error. */
int32_t kv_store_create(uint64_t segment_size, uint32_t flags, const kv_store_config *config, kv_store **out);
/* Hooks run on a thread around a wait that may be long: blocking for the network (after a short
 * spin) or for a lock another thread holds. For a runtime with a global lock: release it in
 * `before`, take it back in `after` (both no-ops on threads that do not hold it). Set once,
 * before any store is created; NULL for either clears both. */
void kv_set_wait_hooks(void (*before)(void), void (*after)(void));
/* Joins the cluster of the master at url ("kvstore://host:port", NUL-terminated): mounts a
 * shared segment of segment_size bytes (0: a pure client storing nothing itself; else at least
 * 64) that other clients on this host map and other hosts reach over TCP. token (NULL or "":
 * none) must match the master's. Flags as for kv_store_create. KV_E_TRANSFER when the master
 * cannot be reached, KV_E_INVALID_ARGUMENT for a bad url or a refused token. Leases and
 * eviction are the master's. */
int32_t kv_store_connect(const char *url, uint64_t segment_size, uint32_t flags, const char *token, kv_store **out);
/* kv_store_connect whose segment is the first segment_size bytes of the shared-memory file at
 * path (tmpfs or hugetlbfs, owned by this user and writable by nobody else, opened without
 * following a link): Mooncake's mount_segment. KV_E_INVALID_ARGUMENT for any other file or one
 * smaller than segment_size. Of the flags only KV_CREATE_CHECKSUM applies (the file is never
 * prefaulted or pinned). */
int32_t kv_store_connect_file(const char *url, const char *path, uint64_t segment_size, uint32_t flags, const char *token, kv_store **out);
/* kv_store_connect (path NULL) or kv_store_connect_file (path a segment file) with a disk
 * tier below the segment: of config only the disk fields apply (the master owns the cache
 * rules); disk_path NULL is none. A disk tier needs segment_size > 0. */
int32_t kv_store_connect_config(const char *url, const char *path, uint64_t segment_size, uint32_t flags, const char *token, const kv_store_config *config,
                                kv_store **out);
/* Closes (waits for operations in flight) and frees the handle. NULL is ignored. */
void kv_store_destroy(kv_store *store);
/* Closes the store; idempotent. */
int32_t kv_store_close(kv_store *store);
/* 1 when closed, else 0. */
int32_t kv_store_is_closed(kv_store *store);

/* Cache options of a write (kv_put, kv_batch_put): flags say which are set. Durations in
 * seconds, each > 0 and at most 365 days. KV_PIN_HARD: never evicted. KV_PIN_SOFT: evicted
 * only after every ordinary object, for soft_pin_ttl when KV_OPT_SOFT_PIN_TTL is set, else the
 * store's default. KV_OPT_TTL: the object expires ttl after it is written. HARD and SOFT are
 * exclusive; unknown flag bits are KV_E_INVALID_ARGUMENT. KV_OPT_REPLICAS: place `replicas`
 * copies (1..16) in distinct segments, best effort when fewer exist (default 1).
 * KV_OPT_CHECKSUM / KV_OPT_NO_CHECKSUM: store a CRC32C of the bytes (computed in the same pass
 * as the copy) or not, whatever the store's default (KV_CREATE_CHECKSUM); every read of a whole
 * object with a CRC checks its copy and fails with KV_E_CHECKSUM when every replica differs. */
enum { KV_PIN_HARD = 1, KV_PIN_SOFT = 2, KV_OPT_TTL = 4, KV_OPT_SOFT_PIN_TTL = 8, KV_OPT_REPLICAS = 16, KV_OPT_CHECKSUM = 32, KV_OPT_NO_CHECKSUM = 64 };
typedef struct {
    uint32_t flags;
    double ttl;
    double soft_pin_ttl;
    uint32_t replicas;
} kv_put_options;

/* Writes the concatenation of parts[0..nparts) as one object (each part copied once), with
 * options (NULL: none). When the store is full it evicts least-recently-used objects;
 * KV_E_NO_SPACE only when nothing evictable is left. */
int32_t kv_put(kv_store *store, const char *key, size_t key_len, const kv_buffer *parts, size_t nparts, uint32_t flags, const kv_put_options *options);
/* Takes a read hold on key: *out gets its size. Every successful kv_read_begin must be
 * matched by one kv_read_end. With KV_READ_NOWAIT it returns KV_BUSY instead of waiting. */
int32_t kv_read_begin(kv_store *store, const char *key, size_t key_len, uint32_t flags, kv_read *out);
/* Copies a held object into dst[0..ndst) (filled in order); *copied gets the bytes copied.
 * KV_STALE: the copy outlived the lease (see KV_STALE). */
int32_t kv_read_copy(kv_store *store, const kv_read *hold, const kv_mut_buffer *dst, size_t ndst, uint32_t flags, uint64_t *copied);
/* Copies bytes [offset, offset+length) of a held object into dst (which must hold length). */
int32_t kv_read_copy_range(kv_store *store, const kv_read *hold, uint64_t offset, uint64_t length, const kv_mut_buffer *dst, size_t ndst, uint32_t flags,
                           uint64_t *copied);
int32_t kv_read_end(kv_store *store, const kv_read *hold);

/* begin + copy + end in one call; *copied gets the object's size. */
int32_t kv_get_into(kv_store *store, const char *key, size_t key_len, const kv_mut_buffer *dst, size_t ndst, uint32_t flags, uint64_t *copied);

/* One object of kv_batch_put: its key and parts. */
typedef struct {
    const char *key;
    size_t key_len;
    const kv_buffer *parts;
    size_t nparts;
} kv_batch_put_item;
/* One object of kv_batch_get_into: its key and destinations. */
typedef struct {
    const char *key;
    size_t key_len;
    const kv_mut_buffer *dst;
    size_t ndst;
} kv_batch_get_item;

/* Writes n objects, each with options (NULL: none); statuses[i] gets each object's status (its
 * message: kv_batch_error(i)). All copies run grouped per device. Returns non-zero only when
 * the call itself is malformed (bad options included). */
int32_t kv_batch_put(kv_store *store, const kv_batch_put_item *items, size_t n, uint32_t flags, const kv_put_options *options, int32_t *statuses);
/* Reads n objects; statuses[i] as above, sizes[i] (may be NULL) gets each object's size. */
int32_t kv_batch_get_into(kv_store *store, const kv_batch_get_item *items, size_t n, uint32_t flags, int32_t *statuses, uint64_t *sizes);
/* kv_size of n keys: sizes[i] gets each found object's size (the object is leased);
 * statuses[i] is KV_E_OBJECT_NOT_FOUND for a missing key. A cluster's master gets one request
 * per 1,024 keys, not one per key. */
int32_t kv_batch_size(kv_store *store, const kv_key *keys, size_t n, int32_t *statuses, uint64_t *sizes);
/* kv_remove of n keys (flags: KV_REMOVE_FORCE); statuses[i] per key. Chunked like kv_batch_size. */
int32_t kv_batch_remove(kv_store *store, const kv_key *keys, size_t n, uint32_t flags, int32_t *statuses);
/* kv_read_begin (waiting) of n keys, one master request per chunk of keys: holds[i] is valid
 * when statuses[i] is KV_OK, and must then be ended with kv_read_end. */
int32_t kv_batch_read_begin(kv_store *store, const kv_key *keys, size_t n, kv_read *holds, int32_t *statuses);
/* One range of kv_batch_read_ranges / kv_batch_write_ranges: bytes [offset, offset+length) of
 * its item's object, and the caller's memory of length bytes they are copied to (a read) or
 * from (a write). */
typedef struct {
    uint64_t offset;
    uint64_t length;
    void *mem;
} kv_range;
/* One object of kv_batch_read_ranges: its key and its ranges. */
typedef struct {
    const char *key;
    size_t key_len;
    const kv_range *ranges;
    size_t nranges;
} kv_range_item;
/* Ranged reads of n objects: every object held first (one master request per chunk of keys),
 * its ranges copied, its hold ended; an object whose copies outlived the lease is read again
 * on its own. statuses gets one status per range, the ranges of every item in order
 * (kv_batch_error takes the same index): a range outside its object fails alone, a missing
 * object fails all its ranges. Ranges are not checked against a checksum (it covers the
 * whole object). */
int32_t kv_batch_read_ranges(kv_store *store, const kv_range_item *items, size_t n, uint32_t flags, int32_t *statuses);
/* One replica of an object: its segment, its offset there, and the object's size. */
typedef struct {
    uint64_t segment;
    uint64_t offset;
    uint64_t size;
} kv_replica;
/* The replicas of n objects, one master request per chunk of keys (each found object is
 * leased, as by kv_batch_size; nothing is copied): counts[i] gets object i's number of
 * replicas (0 unless statuses[i] is KV_OK), out the replicas of every object in order, the
 * first of each the one a read tries first. KV_E_INVALID_ARGUMENT, with nothing written to
 * out, when they are more than cap. */
int32_t kv_batch_replicas(kv_store *store, const kv_key *keys, size_t n, int32_t *statuses, uint32_t *counts, kv_replica *out, size_t cap);

/* Writes in pieces (sessions): kv_batch_write_begin reserves each object's space (flags
 * KV_PUT or KV_UPSERT, options as kv_batch_put) and gives an open write's id per object;
 * kv_batch_write_ranges copies ranges into open writes (flags: KV_HOST_MEMORY); and
 * kv_batch_write_end commits them (visible from then on) or, with KV_WRITE_ABORT, frees their
 * space. An object is invisible until its write ends; a write not ended within the master's
 * write timeout is aborted by it. At most 4096 writes are open per store. */
typedef struct {
    const char *key;
    size_t key_len;
    uint64_t size;
} kv_write_item;
int32_t kv_batch_write_begin(kv_store *store, const kv_write_item *items, size_t n, uint32_t flags, const kv_put_options *options, uint64_t *ids,
                             int32_t *statuses);
/* One open write of kv_batch_write_ranges and its ranges (kv_range: mem is the source). */
typedef struct {
    uint64_t id;
    const kv_range *ranges;
    size_t nranges;
} kv_write_ranges_item;
/* statuses: one per range, the ranges of every item in order (kv_batch_error takes that index). */
int32_t kv_batch_write_ranges(kv_store *store, const kv_write_ranges_item *items, size_t n, uint32_t flags, int32_t *statuses);
enum { KV_WRITE_ABORT = 1 };
int32_t kv_batch_write_end(kv_store *store, const uint64_t *ids, size_t n, uint32_t flags, int32_t *statuses);
/* Message of item `index` of the last batch call on this thread ("" when it succeeded). */
const char *kv_batch_error(size_t index, size_t *len);
/* kv_read_begin, kv_get_into, kv_batch_get_into, kv_exists and kv_size lease the object they
 * find for the store's lease_ttl: a leased object is not evicted, and kv_remove refuses it with
 * KV_E_LEASE_HELD unless KV_REMOVE_FORCE. */
int32_t kv_exists(kv_store *store, const char *key, size_t key_len, int32_t *out);
int32_t kv_size(kv_store *store, const char *key, size_t key_len, uint64_t *out);
int32_t kv_remove(kv_store *store, const char *key, size_t key_len, uint32_t flags);
/* Removes every object that is not leased (with KV_REMOVE_FORCE: every object). */
int32_t kv_remove_all(kv_store *store, uint32_t flags, uint64_t *removed);

/* This client's segment takes no new object from now on (a graceful unmount: what it holds
 * stays readable until the store closes, and after a reconnect too). KV_E_UNSUPPORTED in an
 * embedded store, KV_E_INVALID_ARGUMENT for a client without a segment. */
int32_t kv_drain_segment(kv_store *store);

/* Flags of kv_copy_replicas. */
#define KV_COPY_MOVE 1u
/* Adds a replica of `key` in each of `targets` (ntargets distinct segment ids of the cluster
 * that hold none yet, at most 16); with KV_COPY_MOVE, moves the replica in segment `drop`
 * instead (it goes once the copies are in place). The bytes go through this client (read,
 * verified, then written). KV_E_OBJECT_NOT_FOUND when the object is missing or changed meanwhile (nothing
 * changes then); KV_E_UNSUPPORTED in an embedded store (one segment). */
int32_t kv_copy_replicas(kv_store *store, const char *key, size_t key_len, const uint32_t *targets, size_t ntargets, uint32_t drop, uint32_t flags);

/* Registers [ptr, ptr+len) as user memory at `location` ("cpu", "cuda:N"). */
int32_t kv_register_buffer(kv_store *store, const void *ptr, size_t len, const char *location, size_t location_len);
int32_t kv_unregister_buffer(kv_store *store, const void *ptr);

/* Tensor header (304 bytes; layout in Sources/KVCore/TensorHeader.swift). */
enum { KV_TENSOR_HEADER_SIZE = 304, KV_TENSOR_MAX_DIMS = 8 };
typedef struct {
    int32_t dtype; /* dtype code */
    int32_t ndim;
    int64_t shape[8]; /* unused dims -1 */
    uint64_t data_offset; /* 304 */
    uint64_t data_bytes;
} kv_tensor_info;
/* Writes the header of a full tensor to out[0..out_len) (out_len >= 304). */
int32_t kv_tensor_header_encode(int32_t dtype, int32_t ndim, const int64_t *shape, void *out, size_t out_len);
/* Validates and decodes a header: KV_E_INVALID_ARGUMENT names the bad field. */
int32_t kv_tensor_header_decode(const void *bytes, size_t len, kv_tensor_info *out);
/* The element type of dtype code `code`: its name as numpy and torch spell it (static,
 * NUL-terminated) and its bytes per element. Codes are 0, 1, 2, ... without gaps: the first
 * code that returns KV_E_INVALID_ARGUMENT ends the table. */
int32_t kv_tensor_dtype(int32_t code, const char **name, int32_t *item_size);

/* Devices, comma-separated ("cpu:0,cuda:0"), NUL-terminated into out[0..cap); returns the
 * full length. refresh != 0 probes the machine again first. */
size_t kv_devices(int32_t refresh, char *out, size_t cap);

/* RDMA as this process found it (libibverbs loaded at run time), NUL-terminated into
 * out[0..cap); returns the full length. First line: "<library loaded 0|1>\t<in use 0|1>\t<why
 * not, or empty>"; then one line per device: "name\tport\tactive 0|1\tlink layer\tmtu". */
size_t kv_rdma_info(char *out, size_t cap);

/* The network master, with the command line of the kvstore-master executable (both parse it
 * in KVMaster.MasterCommandLine): argv holds argc NUL-terminated arguments without the program
 * name; program names it in messages. Prints --help or an error to stdout/stderr, else binds
 * and serves until SIGINT or SIGTERM (handlers installed for the call and restored after).
 * Returns the process exit status: 0 after a clean stop or --help, 2 for bad arguments or a
 * master that cannot start. */
int32_t kv_master_main(const char *program, const char *const *argv, size_t argc);

/* Writes up to cap statistics to out; returns how many exist (call with cap 0 to count). */
size_t kv_stats(kv_store *store, kv_stat *out, size_t cap);

/* One page of keys (of the cluster, for a connected store) in byte order after the key
 * `after` (after_len bytes; NULL: the first page), packed into out as (u32 little-endian byte
 * length, UTF-8 bytes) records. A page takes at most KV_KEYS_PAGE_BYTES: out must hold that
 * many. *count receives the number of keys, *more 1 when keys after the last one remain
 * (ask again after it, like Redis SCAN: a key present for the whole walk comes exactly once). */
enum { KV_KEYS_PAGE_BYTES = 1 << 20 };
int32_t kv_keys_page(kv_store *s, const char *after, size_t after_len, void *out, size_t cap, size_t *count, int32_t *more);

/* ---- KV layouts and block transfer (prefill -> decode) ----
 * A node publishes its KV cache as buffers (kv_block_buffer), one per (layer, kind), each
 * an array of `bytes_per_block`-byte blocks; peers move blocks between their layout and a
 * published one. Validation errors name the bad descriptor. */
enum { KV_KIND_KEY = 0, KV_KIND_VALUE = 1, KV_KIND_INDEX = 2 };
typedef struct {
    int64_t layer;
    int32_t kind; /* KV_KIND_* */
    uint64_t address;
    uint64_t length;
    uint64_t bytes_per_block;
    char location[32]; /* "cpu" or "cuda:N", NUL-terminated */
} kv_block_buffer;

/* Validates and publishes this store's layout under node (UTF-8, node_len bytes), replacing
 * its previous one. Buffers are borrowed for the call; the memory they describe must stay
 * valid until kv_layout_unregister, another kv_layout_register, or close. */
int32_t kv_layout_register(kv_store *s, const char *node, size_t node_len, const kv_block_buffer *buffers, size_t count);
/* Withdraws this store's layout (none: KV_OK). */
int32_t kv_layout_unregister(kv_store *s);
/* The layout published under node: *count is set to its number of buffers; they are written
 * to out (sorted by layer, then kind) only when capacity >= *count. */
int32_t kv_layout_fetch(kv_store *s, const char *node, size_t node_len, kv_block_buffer *out, size_t capacity, size_t *count);

/* Flags of kv_blocks_move. */
enum { KV_BLOCKS_PULL = 0, KV_BLOCKS_PUSH = 1, KV_BLOCKS_AGGREGATED = 2 };
/* Pull (peer's src blocks -> this store's dst blocks) or push (this store's src blocks ->
 * peer's dst blocks) for every kind of the listed layers (layers NULL: all). Everything is
 * validated before any byte moves; runs of consecutive ids are coalesced. KV_BLOCKS_AGGREGATED
 * issues many runs per operation. *transfers (may be NULL) receives the operations issued. */
int32_t kv_blocks_move(kv_store *s, const char *peer, size_t peer_len, uint32_t flags, const int64_t *src, const int64_t *dst, size_t count,
                       const int64_t *layers, size_t layer_count, uint64_t *transfers);

#ifdef __cplusplus
}
#endif
#endif
