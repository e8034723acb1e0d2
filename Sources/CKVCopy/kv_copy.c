#define _GNU_SOURCE
#include "kv_copy.h"
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>

/* Head of a streaming copy: brings the destination to a 64-byte boundary with an ordinary
 * copy, and moves the three cursors past it. */
static void copy_head(unsigned char **d, const unsigned char **s, size_t *n) {
    size_t head = (64 - ((uintptr_t)*d & 63)) & 63;
    if (head > *n) head = *n;
    memcpy(*d, *s, head);
    *d += head;
    *s += head;
    *n -= head;
}

/* kv_copy_streaming without its closing fence (the caller fences once after many). */
static void stream_unfenced(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    copy_head(&d, &s, &n);
    while (n >= 128) {
        _mm_prefetch((const char *)s + 1024, _MM_HINT_NTA);
        __m128i a0 = _mm_loadu_si128((const __m128i *)(s + 0));
        __m128i a1 = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i a2 = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i a3 = _mm_loadu_si128((const __m128i *)(s + 48));
        __m128i a4 = _mm_loadu_si128((const __m128i *)(s + 64));
        __m128i a5 = _mm_loadu_si128((const __m128i *)(s + 80));
        __m128i a6 = _mm_loadu_si128((const __m128i *)(s + 96));
        __m128i a7 = _mm_loadu_si128((const __m128i *)(s + 112));
        _mm_stream_si128((__m128i *)(d + 0), a0);
        _mm_stream_si128((__m128i *)(d + 16), a1);
        _mm_stream_si128((__m128i *)(d + 32), a2);
        _mm_stream_si128((__m128i *)(d + 48), a3);
        _mm_stream_si128((__m128i *)(d + 64), a4);
        _mm_stream_si128((__m128i *)(d + 80), a5);
        _mm_stream_si128((__m128i *)(d + 96), a6);
        _mm_stream_si128((__m128i *)(d + 112), a7);
        s += 128;
        d += 128;
        n -= 128;
    }
    memcpy(d, s, n);
}

void kv_copy_streaming(void *dst, const void *src, size_t n) {
    stream_unfenced(dst, src, n);
    /* Streaming stores are weakly ordered: fence before anyone may see the bytes. */
    _mm_sfence();
}

void kv_copy_streaming3(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    copy_head(&d, &s, &n);
    size_t part = (n / 3) & ~(size_t)63; /* multiples of 64: every stream's stores stay aligned */
    const unsigned char *s1 = s + part, *s2 = s + 2 * part;
    unsigned char *d1 = d + part, *d2 = d + 2 * part;
    for (size_t i = 0; i < part; i += 64) {
        __m128i a0 = _mm_loadu_si128((const __m128i *)(s + i)), a1 = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i a2 = _mm_loadu_si128((const __m128i *)(s + i + 32)), a3 = _mm_loadu_si128((const __m128i *)(s + i + 48));
        __m128i b0 = _mm_loadu_si128((const __m128i *)(s1 + i)), b1 = _mm_loadu_si128((const __m128i *)(s1 + i + 16));
        __m128i b2 = _mm_loadu_si128((const __m128i *)(s1 + i + 32)), b3 = _mm_loadu_si128((const __m128i *)(s1 + i + 48));
        __m128i c0 = _mm_loadu_si128((const __m128i *)(s2 + i)), c1 = _mm_loadu_si128((const __m128i *)(s2 + i + 16));
        __m128i c2 = _mm_loadu_si128((const __m128i *)(s2 + i + 32)), c3 = _mm_loadu_si128((const __m128i *)(s2 + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a0);
        _mm_stream_si128((__m128i *)(d + i + 16), a1);
        _mm_stream_si128((__m128i *)(d + i + 32), a2);
        _mm_stream_si128((__m128i *)(d + i + 48), a3);
        _mm_stream_si128((__m128i *)(d1 + i), b0);
        _mm_stream_si128((__m128i *)(d1 + i + 16), b1);
        _mm_stream_si128((__m128i *)(d1 + i + 32), b2);
        _mm_stream_si128((__m128i *)(d1 + i + 48), b3);
        _mm_stream_si128((__m128i *)(d2 + i), c0);
        _mm_stream_si128((__m128i *)(d2 + i + 16), c1);
        _mm_stream_si128((__m128i *)(d2 + i + 32), c2);
        _mm_stream_si128((__m128i *)(d2 + i + 48), c3);
    }
    _mm_sfence();
    memcpy(d + 3 * part, s + 3 * part, n - 3 * part);
}

void kv_copy_pieces_streaming(void *const *dst, const void *const *src, const size_t *len, size_t count) {
    for (size_t i = 0; i < count; i++) {
        if (i + 1 < count) _mm_prefetch((const char *)src[i + 1], _MM_HINT_NTA);
        stream_unfenced(dst[i], src[i], len[i]);
    }
    /* Once for all: a fence per piece cost 8% on 16 KiB pieces. Reading three pieces far apart
     * at once, as kv_copy_streaming3 reads thirds, gained nothing here. */
    _mm_sfence();
}

#else

void kv_copy_streaming(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
void kv_copy_streaming3(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
void kv_copy_pieces_streaming(void *const *dst, const void *const *src, const size_t *len, size_t count) {
    for (size_t i = 0; i < count; i++) memcpy(dst[i], src[i], len[i]);
}

#endif

long kv_process_vm_copy(int pid, int write, void *const *local, void *const *remote, const size_t *lengths, size_t count) {
    if (count > 1024) {
        errno = EINVAL;
        return -1;
    }
    struct iovec l[1024], r[1024];
    for (size_t i = 0; i < count; i++) {
        l[i].iov_base = local[i];
        l[i].iov_len = lengths[i];
        r[i].iov_base = remote[i];
        r[i].iov_len = lengths[i];
    }
    ssize_t n = write ? process_vm_writev(pid, l, count, r, count, 0) : process_vm_readv(pid, l, count, r, count, 0);
    return (long)n;
}

long kv_send_fd(int sock, int fd, const void *data, size_t len) {
    struct iovec iov = {(void *)data, len};
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    ssize_t n;
    do { n = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return (long)n;
}

long kv_recv_fd(int sock, int *fd, void *data, size_t cap) {
    *fd = -1;
    struct iovec iov = {data, cap};
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(4 * sizeof(int))];
    } control;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    ssize_t n;
    do { n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*fd < 0)
                *fd = got;
            else
                close(got); /* one descriptor is expected */
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        if (*fd >= 0) close(*fd);
        *fd = -1;
        errno = EMSGSIZE;
        return -1;
    }
    return (long)n;
}

int kv_o_direct(void) { return O_DIRECT; }

long kv_fs_type(int fd) {
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 ? (long)fs.f_type : -1;
}

/* ---- CRC32C ----------------------------------------------------------------------------
 * Internally the CRC runs on the raw register (no pre/post inversion), which is linear: the
 * register after a block B from state v is shift(v) ^ raw(0, B), where shift advances v over
 * |B| zero bytes. Three streams over three consecutive blocks of CRC_BLOCK bytes run at once
 * (the crc32 instruction has a latency of 3 and a throughput of 1), then are joined with two
 * table-driven shifts. */

#include <pthread.h>

#define CRC_POLY 0x82F63B78u /* reflected Castagnoli polynomial */
#define CRC_BLOCK 4096
#define CRC_PREFETCH 512
#define CRC_SPLIT (192 * 1024) /* from here, three thirds instead of 4 KiB blocks */

static uint32_t crc_table[256];
/* Folding constants for the carry-less multiply path: fold[j] moves a 16-byte lane forward
 * by 16*j bytes (j = 1..16; 16: one round of sixteen lanes). For a lane's low and high halves:
 * the reflected x^(8D-97) and x^(8D-161) mod P, D = 16*j + 16 (found and checked against the
 * bytewise CRC: CopyKernelTests). */
static uint64_t fold_lo[17], fold_hi[17];
static int crc_clmul;
static uint32_t shift_table[4][256]; /* advance over CRC_BLOCK zero bytes, by byte of the register */
static int crc_hw;
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static uint32_t sw_bytes(uint32_t v, const unsigned char *p, size_t n) {
    while (n--) v = crc_table[(v ^ *p++) & 0xFF] ^ (v >> 8);
    return v;
}

static uint32_t sw_zeros(uint32_t v, size_t n) {
    while (n--) v = crc_table[v & 0xFF] ^ (v >> 8);
    return v;
}

static void crc_init_powers(void);

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (CRC_POLY & (0u - (c & 1)));
        crc_table[i] = c;
    }
    uint32_t basis[32];
    for (int i = 0; i < 32; i++) basis[i] = sw_zeros(1u << i, CRC_BLOCK);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int j = 0; j < 8; j++)
                if (b & (1u << j)) v ^= basis[8 * k + j];
            shift_table[k][b] = v;
        }
    crc_init_powers();
    for (int j = 1; j <= 16; j++) {
        int bits = 8 * (16 * j + 16);
        uint32_t v = 1u << 31;
        for (int e = 0; e < bits - 161; e++) v = (v >> 1) ^ (CRC_POLY & (0u - (v & 1)));
        fold_hi[j] = v;
        for (int e = bits - 161; e < bits - 97; e++) v = (v >> 1) ^ (CRC_POLY & (0u - (v & 1)));
        fold_lo[j] = v;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") != 0;
    crc_clmul = crc_hw && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq") &&
                getenv("KVSTORE_CRC_NO_CLMUL") == NULL;
#endif
}

/* Advancing the register over 2^k zero bytes, as 32x32 bit matrices (column i: the image of
 * bit i), for lengths up to 2^47 bytes: crc_shift_len joins streams of any length. */
#define CRC_POWERS 48
static uint32_t zeros_op[CRC_POWERS][32];

static uint32_t gf2_apply(const uint32_t *m, uint32_t v) {
    uint32_t r = 0;
    for (int i = 0; v; i++, v >>= 1)
        if (v & 1) r ^= m[i];
    return r;
}

static void gf2_square(uint32_t *out, const uint32_t *m) {
    for (int i = 0; i < 32; i++) out[i] = gf2_apply(m, m[i]);
}

static void crc_init_powers(void) {
    uint32_t bit[32], two[32], four[32];
    bit[0] = CRC_POLY; /* one zero bit */
    for (int i = 1; i < 32; i++) bit[i] = 1u << (i - 1);
    gf2_square(two, bit);
    gf2_square(four, two);
    gf2_square(zeros_op[0], four); /* one zero byte */
    for (int k = 1; k < CRC_POWERS; k++) gf2_square(zeros_op[k], zeros_op[k - 1]);
}

static uint32_t crc_shift_len(uint32_t v, size_t len) {
    for (int k = 0; len && k < CRC_POWERS; k++, len >>= 1)
        if (len & 1) v = gf2_apply(zeros_op[k], v);
    return v;
}

static inline uint32_t crc_shift(uint32_t v) {
    return shift_table[0][v & 0xFF] ^ shift_table[1][(v >> 8) & 0xFF] ^ shift_table[2][(v >> 16) & 0xFF] ^ shift_table[3][v >> 24];
}

int kv_crc32c_hardware(void) {
    pthread_once(&crc_once, crc_init);
    return crc_hw;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* 16 bytes to each of three destinations: streaming stores (16-byte aligned) or plain ones.
 * The CRC loops load 16 bytes a stream and store them whole: 8-byte streaming stores
 * (movnti) cost a fifth of put_from's speed against the 16-byte ones of the plain copy. */
__attribute__((target("sse4.2"), always_inline)) static inline void store3(unsigned char *d0, unsigned char *d1, unsigned char *d2, __m128i x, __m128i y,
                                                                           __m128i z, int nt) {
    if (nt) {
        _mm_stream_si128((__m128i *)d0, x);
        _mm_stream_si128((__m128i *)d1, y);
        _mm_stream_si128((__m128i *)d2, z);
    } else {
        _mm_storeu_si128((__m128i *)d0, x);
        _mm_storeu_si128((__m128i *)d1, y);
        _mm_storeu_si128((__m128i *)d2, z);
    }
}

/* The raw CRC (register 0) of n bytes (a multiple of 256, at least 512), copied to d when
 * copy is set, by folding sixteen 16-byte lanes (four 64-byte registers) with carry-less
 * multiplies (VPCLMULQDQ: four lanes an instruction, two instructions per 64 bytes). The
 * crc32 instruction takes 8 bytes a cycle on its one port, which held put_from with
 * checksum=True 25% below the plain copy; then the lanes fold into one, whose 16 bytes go
 * through crc32. */
#define FOLD512(x, k, y) _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128((x), (k), 0x00), _mm512_clmulepi64_epi128((x), (k), 0x11), (y), 0x96)
__attribute__((target("sse4.2,avx512f,avx512vl,vpclmulqdq"))) static uint32_t fold_run(unsigned char *d, const unsigned char *s, size_t n, int copy, int nt) {
    __m512i x[4];
    for (int j = 0; j < 4; j++) {
        x[j] = _mm512_loadu_si512((const void *)(s + 64 * j));
        if (copy) {
            if (nt)
                _mm512_stream_si512((void *)(d + 64 * j), x[j]);
            else
                _mm512_storeu_si512((void *)(d + 64 * j), x[j]);
        }
    }
    const __m512i k16 = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)fold_hi[16], (long long)fold_lo[16]));
    for (size_t i = 256; i < n; i += 256) {
        for (int j = 0; j < 4; j++) {
            __m512i y = _mm512_loadu_si512((const void *)(s + i + 64 * j));
            if (copy) {
                if (nt)
                    _mm512_stream_si512((void *)(d + i + 64 * j), y);
                else
                    _mm512_storeu_si512((void *)(d + i + 64 * j), y);
            }
            x[j] = FOLD512(x[j], k16, y);
        }
    }
    /* Four registers into the last one (each lane moves 192, 128 or 64 bytes on), then its
     * four lanes into the last (48, 32, 16 bytes on). */
    __m512i f = x[3];
    for (int j = 0; j < 3; j++) {
        const __m512i k = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)fold_hi[4 * (3 - j)], (long long)fold_lo[4 * (3 - j)]));
        f = FOLD512(x[j], k, f);
    }
    __m128i g = _mm512_extracti32x4_epi32(f, 3);
    for (int j = 0; j < 3; j++) {
        const __m128i k = _mm_set_epi64x((long long)fold_hi[3 - j], (long long)fold_lo[3 - j]);
        __m128i lane = j == 0 ? _mm512_extracti32x4_epi32(f, 0) : j == 1 ? _mm512_extracti32x4_epi32(f, 1) : _mm512_extracti32x4_epi32(f, 2);
        g = _mm_xor_si128(g, _mm_xor_si128(_mm_clmulepi64_si128(lane, k, 0x00), _mm_clmulepi64_si128(lane, k, 0x11)));
    }
    uint64_t r = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(g));
    return (uint32_t)_mm_crc32_u64(r, (uint64_t)_mm_extract_epi64(g, 1));
}

/* From this length, the folding path (its final joins cost about a microsecond). */
#define CRC_FOLD_MIN (32 * 1024)

/* 16 bytes of each of three streams: into their CRC registers, and copied when copy is set. */
__attribute__((target("sse4.2"), always_inline)) static inline void step3(const unsigned char *s0, const unsigned char *s1, const unsigned char *s2,
                                                                          unsigned char *d0, unsigned char *d1, unsigned char *d2, uint64_t *a, uint64_t *b,
                                                                          uint64_t *c, int copy, int nt) {
    __m128i x = _mm_loadu_si128((const __m128i *)s0);
    __m128i y = _mm_loadu_si128((const __m128i *)s1);
    __m128i z = _mm_loadu_si128((const __m128i *)s2);
    *a = _mm_crc32_u64(*a, (uint64_t)_mm_cvtsi128_si64(x));
    *b = _mm_crc32_u64(*b, (uint64_t)_mm_cvtsi128_si64(y));
    *c = _mm_crc32_u64(*c, (uint64_t)_mm_cvtsi128_si64(z));
    *a = _mm_crc32_u64(*a, (uint64_t)_mm_extract_epi64(x, 1));
    *b = _mm_crc32_u64(*b, (uint64_t)_mm_extract_epi64(y, 1));
    *c = _mm_crc32_u64(*c, (uint64_t)_mm_extract_epi64(z, 1));
    if (copy) store3(d0, d1, d2, x, y, z, nt);
}

__attribute__((target("sse4.2"), always_inline)) static inline uint32_t hw_run(unsigned char *d, const unsigned char *s, size_t n, uint32_t v, int copy,
                                                                               int nt) {
    uint64_t a = v;
    if (n >= CRC_SPLIT) {
        /* Three long sequential streams (thirds of the buffer): the hardware prefetchers follow
         * each, so cold memory streams at full speed; joined by shifts of a third's length. */
        size_t part = (n / 3) & ~(size_t)63;
        const unsigned char *s1 = s + part, *s2 = s + 2 * part;
        unsigned char *d1 = d + part, *d2 = d + 2 * part;
        uint64_t b = 0, c = 0;
        for (size_t i = 0; i < part; i += 16) { step3(s + i, s1 + i, s2 + i, d + i, d1 + i, d2 + i, &a, &b, &c, copy, nt); }
        a = crc_shift_len(crc_shift_len((uint32_t)a, part) ^ (uint32_t)b, part) ^ (uint32_t)c;
        s += 3 * part;
        n -= 3 * part;
        if (copy) d += 3 * part;
    }
    while (n >= 3 * CRC_BLOCK) {
        uint64_t b = 0, c = 0;
        const unsigned char *s1 = s + CRC_BLOCK, *s2 = s + 2 * CRC_BLOCK;
        unsigned char *d1 = d + CRC_BLOCK, *d2 = d + 2 * CRC_BLOCK;
        for (size_t line = 0; line < CRC_BLOCK; line += 64) {
            /* Each stream enters a new 4 KiB page every block, where the hardware prefetchers
             * start over: fetch ahead by hand (cold segments read at half speed without). */
            _mm_prefetch((const char *)(s + line + CRC_PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(s1 + line + CRC_PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(s2 + line + CRC_PREFETCH), _MM_HINT_T0);
            for (size_t i = line; i < line + 64; i += 16) { step3(s + i, s1 + i, s2 + i, d + i, d1 + i, d2 + i, &a, &b, &c, copy, nt); }
        }
        a = crc_shift(crc_shift((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
        s += 3 * CRC_BLOCK;
        n -= 3 * CRC_BLOCK;
        if (copy) d += 3 * CRC_BLOCK;
    }
    while (n >= 8) {
        uint64_t x;
        memcpy(&x, s, 8);
        a = _mm_crc32_u64(a, x);
        if (copy) memcpy(d, &x, 8), d += 8;
        s += 8;
        n -= 8;
    }
    uint32_t r = (uint32_t)a;
    while (n--) {
        if (copy) *d++ = *s;
        r = _mm_crc32_u8(r, *s++);
    }
    if (nt) _mm_sfence();
    return r;
}

__attribute__((target("sse4.2"))) static uint32_t hw_crc(unsigned char *d, const unsigned char *s, size_t n, uint32_t v, int streaming) {
    /* Folding for copies into a segment (streaming 2: put_from's source is the caller's
     * buffer, usually warm): reads of cold memory (get_into's segment side, a verification
     * without a copy) keep the three crc32 streams, which the prefetchers serve better than
     * one (folding measured 8-12% slower there, and 5% faster than the plain copy here). */
    if (crc_clmul && d && streaming == 2 && n >= CRC_FOLD_MIN) {
        /* The register is linear: v over the run is v shifted over its length, xor the run's CRC from 0. */
        size_t run = n & ~(size_t)255;
        int nt = ((uintptr_t)d & 63) == 0;
        v = crc_shift_len(v, run) ^ fold_run(d, s, run, 1, nt);
        if (nt) _mm_sfence();
        s += run;
        n -= run;
        d += run;
        if (!n) return v;
    }
    if (!d) return hw_run(NULL, s, n, v, 0, 0);
    if (streaming && ((uintptr_t)d & 15) == 0) return hw_run(d, s, n, v, 1, 1);
    return hw_run(d, s, n, v, 1, 0);
}
#endif

unsigned kv_crc32c_copy(void *dst, const void *src, size_t n, unsigned crc, int streaming) {
    pthread_once(&crc_once, crc_init);
    uint32_t v = ~(uint32_t)crc;
#if defined(__x86_64__)
    if (crc_hw) return ~hw_crc(dst, src, n, v, streaming);
#endif
    if (dst) memcpy(dst, src, n);
    return ~sw_bytes(v, src, n);
}
