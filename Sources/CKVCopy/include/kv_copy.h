/* Copy kernels of the local transport. */
#ifndef KV_COPY_H
#define KV_COPY_H
#include <stddef.h>

/* Copies n bytes with non-temporal (streaming) stores: the destination bypasses the caches,
 * so a large copy neither reads the destination first (no read-for-ownership) nor evicts the
 * working set. For copies whose destination is not read again soon. Falls back to memcpy on
 * processors without SSE2 streaming stores. The ranges must not overlap. */
void kv_copy_streaming(void *dst, const void *src, size_t n);

/* kv_copy_streaming over three sequential streams at once (the thirds of the range): reading
 * memory that is not in any cache, the hardware prefetchers then keep three streams in flight
 * (measured: 16 MiB cold reads at 29 GB/s against 25 GB/s for one stream; 13% slower when the
 * source is already cached). For large copies out of a segment. */
void kv_copy_streaming3(void *dst, const void *src, size_t n);
/* count separate copies (dst[i] <- src[i], len[i] bytes) with streaming stores, the next
 * piece's source prefetched and one fence after the last: many cold pieces, such as the rows
 * of a tensor shard, near the rate of one large copy. The ranges must not overlap. */
void kv_copy_pieces_streaming(void *const *dst, const void *const *src, const size_t *len, size_t count);

/* Cross-process copies on one host (process_vm_readv / process_vm_writev, which glibc
 * declares only under _GNU_SOURCE): `count` pairs of local and remote ranges of equal
 * lengths, moved in one system call. `write` 0: remote -> local. Returns the bytes moved, or
 * -1 with errno set. */
long kv_process_vm_copy(int pid, int write, void *const *local, void *const *remote, const size_t *lengths, size_t count);

/* Descriptor passing over a Unix-domain socket (SCM_RIGHTS): the shared segments of one host
 * travel as open files, never as paths a peer names. kv_send_fd sends `len` bytes of `data`
 * with `fd` attached; kv_recv_fd receives up to `cap` bytes and at most one descriptor
 * (*fd = -1 when none came; any extra descriptors are closed). Both return the bytes moved,
 * or -1 with errno set. Blocking; EINTR is retried. */
long kv_send_fd(int sock, int fd, const void *data, size_t len);
long kv_recv_fd(int sock, int *fd, void *data, size_t cap);

/* CRC32C (Castagnoli, the iSCSI polynomial; check value of "123456789": 0xE3069283).
 * `crc` is the CRC of the bytes before these (0 for none), so a stream's CRC is the chain of
 * calls over its pieces in order. kv_crc32c_copy copies n bytes to dst in the same pass
 * (`streaming`: non-temporal stores, as kv_copy_streaming; 2: the same, into a segment from
 * a buffer that is likely warm, which may fold with carry-less multiplies); dst may be NULL
 * (CRC only). Uses the SSE4.2 crc32 instruction on three interleaved streams when the
 * processor has it (about memcpy's speed), VPCLMULQDQ folding for streaming 2 from 32 KiB
 * when it has AVX-512 and that (KVSTORE_CRC_NO_CLMUL set: never), a table otherwise. The
 * ranges must not overlap. */
unsigned kv_crc32c_copy(void *dst, const void *src, size_t n, unsigned crc, int streaming);
/* 1 when kv_crc32c_copy runs on the hardware instruction, 0 on the table. */
int kv_crc32c_hardware(void);

/* open(2)'s O_DIRECT flag (a _GNU_SOURCE macro Swift does not see). */
int kv_o_direct(void);

/* The file system type of an open file (statfs f_type, e.g. TMPFS_MAGIC), or -1. */
long kv_fs_type(int fd);

#endif
