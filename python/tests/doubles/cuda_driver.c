/* A CUDA driver test double: the part of libcuda's API that kvstore calls, compiled against
 * the real cuda.h (from NVIDIA's nvidia-cuda-runtime-cu12 wheel, headers only), so the
 * compiler checks every prototype. Loaded by kvstore through KVSTORE_CUDA_DRIVER; tests load
 * it too (ctypes) for its fakecuda_* helpers.
 *
 * What it emulates, and why each part matters to the tests:
 * - Device memory in an address range of its own that the host cannot touch: every device
 *   has a PROT_NONE reservation; device pointers point into it and the bytes live in a
 *   second, hidden mapping. A device pointer copied with memcpy faults (SIGSEGV), as on a
 *   real GPU.
 * - Primary contexts with retain counts, a current context per thread; copies, streams and
 *   pinning need a current context (CUDA_ERROR_INVALID_CONTEXT otherwise).
 * - Streams that execute later: one worker thread per stream runs its operations in order,
 *   each after FAKECUDA_LATENCY_US (default 300 us). The legacy default stream waits for
 *   every blocking stream of its device and they wait for it; non-blocking streams are
 *   ordered against nothing. Synchronous copies follow the CUDA documentation's "API
 *   synchronization behavior": host-to-device from pageable memory returns once the source
 *   is staged, device-to-device returns at once, device-to-host returns when done. A missing
 *   synchronisation therefore shows up as stale or torn bytes. Events record a point of a
 *   stream; cuStreamWaitEvent makes another stream's later work wait for it (how a
 *   producer honours DLPack's stream argument).
 * - Pointer attributes: device memory answers DEVICE and its ordinal, pinned or registered
 *   host memory HOST, anything else CUDA_ERROR_INVALID_VALUE (the driver's "not mine").
 * - Failure modes, chosen by FAKECUDA_MODE: "retain_refused" (every context retain fails,
 *   as on a GPU in exclusive-process mode held by another process), "pointer_query_fails"
 *   (cuPointerGetAttribute answers CUDA_ERROR_NOT_INITIALIZED). FAKECUDA_DEVICES sets the
 *   device count (default 1).
 *
 * Test helpers (not CUDA API): fakecuda_alloc/free/read/write reach device memory without a
 * context, fakecuda_fill_async enqueues a "kernel" that fills memory after a delay, and
 * fakecuda_stream_create creates a stream on a device without touching contexts.
 */
#define _GNU_SOURCE
#include <cuda.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEVICES 4
#define DEVICE_BYTES ((size_t)1 << 30) /* address space per device */
#define MAX_STREAMS 256
#define MAX_HOST_RANGES 256

typedef struct op op;
typedef struct stream stream;

struct op {
    op *next;
    int kind; /* 0 copy, 1 fill, 2 event marker */
    void *dst;
    const void *src;
    size_t n;
    int byte;
    unsigned delay_us;
    void *owned; /* staging buffer freed after the copy */
    stream *dep_stream[MAX_STREAMS + 1];
    uint64_t dep_seq[MAX_STREAMS + 1];
    int ndeps;
    uint64_t seq;
};

struct stream {
    int used;
    int device;
    int nonblocking;
    int destroyed;
    pthread_t thread;
    op *head, *tail;
    uint64_t enqueued, completed;
};

struct context { /* one primary context per device */
    int retains;
    int total_retains, total_releases;
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int initialized;
    int ndevices;
    int mode_retain_refused, mode_pointer_fails;
    unsigned latency_us;
    char *base[MAX_DEVICES]; /* PROT_NONE: what device pointers point into */
    char *backing[MAX_DEVICES]; /* the bytes */
    size_t used_bytes[MAX_DEVICES];
    struct context ctx[MAX_DEVICES];
    stream streams[MAX_STREAMS];
    stream *legacy[MAX_DEVICES];
    struct {
        uintptr_t start, end;
        int registered;
    } host[MAX_HOST_RANGES];
    int nhost;
} g = {.lock = PTHREAD_MUTEX_INITIALIZER, .changed = PTHREAD_COND_INITIALIZER};

static __thread int current = -1; /* current context's device, -1 none */

static void sleep_us(unsigned us) {
    struct timespec t = {us / 1000000, (long)(us % 1000000) * 1000};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}

/* Context handles are device + 1 cast to a pointer (never dereferenced). */
static CUcontext ctx_handle(int dev) { return (CUcontext)(uintptr_t)(0x1000 + dev); }
static int ctx_device(CUcontext c) {
    uintptr_t v = (uintptr_t)c;
    return v >= 0x1000 && v < 0x1000 + (uintptr_t)g.ndevices ? (int)(v - 0x1000) : -1;
}

static int device_of(CUdeviceptr p) {
    for (int d = 0; d < g.ndevices; d++)
        if (p >= (CUdeviceptr)(uintptr_t)g.base[d] && p < (CUdeviceptr)(uintptr_t)(g.base[d] + DEVICE_BYTES)) return d;
    return -1;
}

/* The hidden bytes behind a device range; NULL when [p, p+n) is not all device memory. */
static char *bytes_of(CUdeviceptr p, size_t n) {
    int d = device_of(p);
    if (d < 0) return NULL;
    size_t off = (size_t)(p - (CUdeviceptr)(uintptr_t)g.base[d]);
    if (off + n > g.used_bytes[d]) return NULL;
    return g.backing[d] + off;
}

static int pinned_host(uintptr_t p) {
    for (int i = 0; i < g.nhost; i++)
        if (p >= g.host[i].start && p < g.host[i].end) return 1;
    return 0;
}

/* ---- streams ---- */

static void *worker(void *arg) {
    stream *s = arg;
    pthread_mutex_lock(&g.lock);
    for (;;) {
        while (!s->head && !s->destroyed) pthread_cond_wait(&g.changed, &g.lock);
        if (!s->head) break;
        op *o = s->head;
        for (int i = 0; i < o->ndeps; i++)
            while (o->dep_stream[i]->completed < o->dep_seq[i]) pthread_cond_wait(&g.changed, &g.lock);
        pthread_mutex_unlock(&g.lock);
        sleep_us(g.latency_us + o->delay_us);
        if (o->kind == 0)
            memcpy(o->dst, o->src, o->n);
        else if (o->kind == 1) {
            /* a kernel that writes its output in two halves, some time apart */
            memset(o->dst, o->byte, o->n / 2);
            sleep_us(g.latency_us);
            memset((char *)o->dst + o->n / 2, o->byte, o->n - o->n / 2);
        }
        free(o->owned);
        pthread_mutex_lock(&g.lock);
        s->head = o->next;
        if (!s->head) s->tail = NULL;
        s->completed = o->seq;
        free(o);
        pthread_cond_broadcast(&g.changed);
    }
    s->used = 0;
    pthread_cond_broadcast(&g.changed);
    pthread_mutex_unlock(&g.lock);
    return NULL;
}

static stream *new_stream(int dev, int nonblocking) { /* lock held */
    for (int i = 0; i < MAX_STREAMS; i++) {
        stream *s = &g.streams[i];
        if (s->used) continue;
        memset(s, 0, sizeof *s);
        s->used = 1;
        s->device = dev;
        s->nonblocking = nonblocking;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&s->thread, &a, worker, s);
        pthread_attr_destroy(&a);
        if (rc != 0) {
            s->used = 0;
            return NULL;
        }
        return s;
    }
    return NULL;
}

static stream *legacy_stream(int dev) { /* lock held */
    if (!g.legacy[dev]) g.legacy[dev] = new_stream(dev, 0);
    return g.legacy[dev];
}

/* The stream a handle names for device `dev`: NULL, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD
 * are the legacy default stream (the double has no per-thread streams). NULL result: invalid. */
static stream *resolve(CUstream h, int dev) { /* lock held */
    uintptr_t v = (uintptr_t)h;
    if (v == 0 || v == 1 || v == 2) return dev >= 0 ? legacy_stream(dev) : NULL;
    for (int i = 0; i < MAX_STREAMS; i++)
        if (&g.streams[i] == (stream *)h && g.streams[i].used && !g.streams[i].destroyed) return &g.streams[i];
    return NULL;
}

static void add_dep(op *o, stream *s) {
    if (s->enqueued > s->completed) {
        o->dep_stream[o->ndeps] = s;
        o->dep_seq[o->ndeps] = s->enqueued;
        o->ndeps++;
    }
}

/* Appends `o` to `s` with the legacy stream's implicit ordering. Lock held. */
static void enqueue(stream *s, op *o) {
    if (s == g.legacy[s->device]) {
        for (int i = 0; i < MAX_STREAMS; i++) {
            stream *t = &g.streams[i];
            if (t->used && t != s && t->device == s->device && !t->nonblocking) add_dep(o, t);
        }
    } else if (!s->nonblocking) {
        add_dep(o, legacy_stream(s->device));
    }
    o->seq = ++s->enqueued;
    if (s->tail)
        s->tail->next = o;
    else
        s->head = o;
    s->tail = o;
    pthread_cond_broadcast(&g.changed);
}

static void wait_for(stream *s, uint64_t seq) { /* lock held */
    while (s->completed < seq) pthread_cond_wait(&g.changed, &g.lock);
}

static op *copy_op(void *dst, const void *src, size_t n) {
    op *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    o->dst = dst;
    o->src = src;
    o->n = n;
    return o;
}

/* Resolves an address that may be device memory to where its bytes are; host addresses pass. */
static void *real_address(CUdeviceptr p, size_t n, int *is_device) {
    if (device_of(p) >= 0) {
        *is_device = 1;
        return bytes_of(p, n);
    }
    *is_device = 0;
    return (void *)(uintptr_t)p;
}

/* ---- initialisation, devices, contexts ---- */

CUresult CUDAAPI cuInit(unsigned int Flags) {
    if (Flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g.lock);
    if (!g.initialized) {
        const char *n = getenv("FAKECUDA_DEVICES"), *mode = getenv("FAKECUDA_MODE"), *lat = getenv("FAKECUDA_LATENCY_US");
        g.ndevices = n ? atoi(n) : 1;
        if (g.ndevices < 0) g.ndevices = 0;
        if (g.ndevices > MAX_DEVICES) g.ndevices = MAX_DEVICES;
        g.latency_us = lat ? (unsigned)atoi(lat) : 300;
        if (mode) {
            g.mode_retain_refused = strstr(mode, "retain_refused") != NULL;
            g.mode_pointer_fails = strstr(mode, "pointer_query_fails") != NULL;
        }
        for (int d = 0; d < g.ndevices; d++) {
            g.base[d] = mmap(NULL, DEVICE_BYTES, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            g.backing[d] = mmap(NULL, DEVICE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (g.base[d] == MAP_FAILED || g.backing[d] == MAP_FAILED) {
                pthread_mutex_unlock(&g.lock);
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
        }
        g.initialized = 1;
    }
    pthread_mutex_unlock(&g.lock);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetCount(int *count) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = g.ndevices;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= g.ndevices) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g.ndevices) return CUDA_ERROR_INVALID_DEVICE;
    if (g.mode_retain_refused) return CUDA_ERROR_DEVICE_UNAVAILABLE;
    pthread_mutex_lock(&g.lock);
    g.ctx[dev].retains++;
    g.ctx[dev].total_retains++;
    pthread_mutex_unlock(&g.lock);
    *pctx = ctx_handle(dev);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev < 0 || dev >= g.ndevices) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g.lock);
    CUresult r = CUDA_SUCCESS;
    if (g.ctx[dev].retains == 0)
        r = CUDA_ERROR_INVALID_CONTEXT;
    else {
        g.ctx[dev].retains--;
        g.ctx[dev].total_releases++;
    }
    pthread_mutex_unlock(&g.lock);
    return r;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    *pctx = current >= 0 ? ctx_handle(current) : NULL;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ctx) {
        current = -1;
        return CUDA_SUCCESS;
    }
    int d = ctx_device(ctx);
    if (d < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (g.ctx[d].retains == 0) return CUDA_ERROR_INVALID_CONTEXT; /* a destroyed primary context */
    current = d;
    return CUDA_SUCCESS;
}

/* Waits for every stream of the current context's device. */
CUresult CUDAAPI cuCtxSynchronize(void) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_lock(&g.lock);
    for (int i = 0; i < MAX_STREAMS; i++) {
        stream *s = &g.streams[i];
        if (s->used && s->device == current) wait_for(s, s->enqueued);
    }
    pthread_mutex_unlock(&g.lock);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorString(CUresult error, const char **pStr) {
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    switch (error) {
    case CUDA_SUCCESS: *pStr = "no error"; break;
    case CUDA_ERROR_INVALID_VALUE: *pStr = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *pStr = "out of memory"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *pStr = "initialization error"; break;
    case CUDA_ERROR_DEVICE_UNAVAILABLE: *pStr = "CUDA-capable device(s) is/are busy or unavailable"; break;
    case CUDA_ERROR_INVALID_DEVICE: *pStr = "invalid device ordinal"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *pStr = "invalid device context"; break;
    case CUDA_ERROR_INVALID_HANDLE: *pStr = "invalid resource handle"; break;
    case CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED: *pStr = "part or all of the requested memory range is already mapped"; break;
    case CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED: *pStr = "pointer does not correspond to a registered memory region"; break;
    default: *pStr = NULL; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

/* ---- pointers ---- */

CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (g.mode_pointer_fails) return CUDA_ERROR_NOT_INITIALIZED;
    if (!data) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g.lock);
    int dev = device_of(ptr), host = dev < 0 && pinned_host((uintptr_t)ptr);
    pthread_mutex_unlock(&g.lock);
    if (dev < 0 && !host) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *(unsigned int *)data = dev >= 0 ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_HOST; return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = dev >= 0 ? dev : 0; return CUDA_SUCCESS;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

/* ---- memory ---- */

CUresult CUDAAPI cuMemAlloc(CUdeviceptr *dptr, size_t bytesize) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (!dptr || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g.lock);
    size_t n = (bytesize + 255) & ~(size_t)255;
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    if (g.used_bytes[current] + n <= DEVICE_BYTES) {
        *dptr = (CUdeviceptr)(uintptr_t)(g.base[current] + g.used_bytes[current]);
        g.used_bytes[current] += n;
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g.lock);
    return r;
}

CUresult CUDAAPI cuMemFree(CUdeviceptr dptr) {
    (void)dptr; /* a bump allocator: freed memory stays mapped (tests are short) */
    return g.initialized ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

CUresult CUDAAPI cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags) {
    (void)Flags;
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (!pp || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    void *p = mmap(NULL, bytesize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g.lock);
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    if (g.nhost < MAX_HOST_RANGES) {
        g.host[g.nhost].start = (uintptr_t)p;
        g.host[g.nhost].end = (uintptr_t)p + bytesize;
        g.host[g.nhost].registered = 0;
        g.nhost++;
        *pp = p;
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g.lock);
    if (r != CUDA_SUCCESS) munmap(p, bytesize);
    return r;
}

static int find_host(uintptr_t start, int registered) {
    for (int i = 0; i < g.nhost; i++)
        if (g.host[i].start == start && g.host[i].registered == registered) return i;
    return -1;
}

CUresult CUDAAPI cuMemFreeHost(void *p) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g.lock);
    int i = find_host((uintptr_t)p, 0);
    if (i >= 0) {
        munmap(p, g.host[i].end - g.host[i].start);
        g.host[i] = g.host[--g.nhost];
    }
    pthread_mutex_unlock(&g.lock);
    return i >= 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult CUDAAPI cuMemHostRegister(void *p, size_t bytesize, unsigned int Flags) {
    (void)Flags;
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (!p || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    uintptr_t s = (uintptr_t)p, e = s + bytesize;
    pthread_mutex_lock(&g.lock);
    CUresult r = CUDA_SUCCESS;
    for (int i = 0; i < g.nhost; i++)
        if (s < g.host[i].end && g.host[i].start < e) r = CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    if (r == CUDA_SUCCESS) {
        if (g.nhost == MAX_HOST_RANGES)
            r = CUDA_ERROR_OUT_OF_MEMORY;
        else
            g.host[g.nhost++] = (typeof(g.host[0])){s, e, 1};
    }
    pthread_mutex_unlock(&g.lock);
    return r;
}

CUresult CUDAAPI cuMemHostUnregister(void *p) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_lock(&g.lock);
    int i = find_host((uintptr_t)p, 1);
    if (i >= 0) g.host[i] = g.host[--g.nhost];
    pthread_mutex_unlock(&g.lock);
    return i >= 0 ? CUDA_SUCCESS : CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
}

/* ---- copies ---- */

/* One copy on stream `h` of the current context. `wait`: 0 return at once, 1 return once the
 * source is staged (pageable host source), 2 return when done. */
static CUresult copy_on(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h, int sync_kind) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (n == 0) return CUDA_SUCCESS;
    pthread_mutex_lock(&g.lock);
    int dd, sd;
    void *d = real_address(dst, n, &dd);
    const void *s = real_address(src, n, &sd);
    stream *st = resolve(h, current);
    if (!d || !s || !st) {
        pthread_mutex_unlock(&g.lock);
        return !st ? CUDA_ERROR_INVALID_HANDLE : CUDA_ERROR_INVALID_VALUE;
    }
    if (st->device != current) {
        pthread_mutex_unlock(&g.lock);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    op *o = copy_op(d, s, n);
    if (!o) {
        pthread_mutex_unlock(&g.lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    int wait = 0;
    if (sync_kind == 1) { /* synchronous API, by direction */
        if (!sd && dd) {
            if (pinned_host((uintptr_t)src))
                wait = 1;
            else { /* pageable: staged now, lands later */
                o->owned = malloc(n);
                if (!o->owned) {
                    free(o);
                    pthread_mutex_unlock(&g.lock);
                    return CUDA_ERROR_OUT_OF_MEMORY;
                }
                memcpy(o->owned, s, n);
                o->src = o->owned;
            }
        } else if (sd && !dd)
            wait = 1; /* device to host: done on return */
    }
    enqueue(st, o);
    if (wait) wait_for(st, o->seq);
    pthread_mutex_unlock(&g.lock);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemcpyHtoD(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount) {
    return copy_on(dstDevice, (CUdeviceptr)(uintptr_t)srcHost, ByteCount, NULL, 1);
}
CUresult CUDAAPI cuMemcpyDtoH(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
    return copy_on((CUdeviceptr)(uintptr_t)dstHost, srcDevice, ByteCount, NULL, 1);
}
CUresult CUDAAPI cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount) { return copy_on(dst, src, ByteCount, NULL, 1); }
CUresult CUDAAPI cuMemcpyHtoDAsync(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount, CUstream hStream) {
    return copy_on(dstDevice, (CUdeviceptr)(uintptr_t)srcHost, ByteCount, hStream, 0);
}
CUresult CUDAAPI cuMemcpyDtoHAsync(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount, CUstream hStream) {
    return copy_on((CUdeviceptr)(uintptr_t)dstHost, srcDevice, ByteCount, hStream, 0);
}
CUresult CUDAAPI cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount, CUstream hStream) { return copy_on(dst, src, ByteCount, hStream, 0); }

/* Copies are enqueued in order until one is invalid: then that index is reported and the
 * copies before it still land later (the caller must synchronize before trusting either). */
CUresult CUDAAPI cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count, CUmemcpyAttributes *attrs, size_t *attrsIdxs,
                                    size_t numAttrs, size_t *failIdx, CUstream hStream) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (failIdx) *failIdx = SIZE_MAX;
    uintptr_t h = (uintptr_t)hStream;
    if (h == 0 || h == 1) return CUDA_ERROR_INVALID_VALUE; /* "must not be legacy NULL stream" */
    if (!dsts || !srcs || !sizes || !attrs || !attrsIdxs || numAttrs == 0 || numAttrs > count || attrsIdxs[0] != 0 || !failIdx) return CUDA_ERROR_INVALID_VALUE;
    for (size_t k = 0; k < numAttrs; k++) {
        if (attrs[k].srcAccessOrder == CU_MEMCPY_SRC_ACCESS_ORDER_INVALID) return CUDA_ERROR_INVALID_VALUE;
        if (k > 0 && attrsIdxs[k] <= attrsIdxs[k - 1]) return CUDA_ERROR_INVALID_VALUE;
    }
    for (size_t i = 0; i < count; i++) {
        CUresult r = copy_on(dsts[i], srcs[i], sizes[i], hStream, 0);
        if (r != CUDA_SUCCESS) {
            *failIdx = i;
            return r;
        }
    }
    return CUDA_SUCCESS;
}

/* ---- streams ---- */

CUresult CUDAAPI cuStreamCreate(CUstream *phStream, unsigned int Flags) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (!phStream || (Flags & ~(unsigned)CU_STREAM_NON_BLOCKING)) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g.lock);
    stream *s = new_stream(current, (Flags & CU_STREAM_NON_BLOCKING) != 0);
    pthread_mutex_unlock(&g.lock);
    if (!s) return CUDA_ERROR_OUT_OF_MEMORY;
    *phStream = (CUstream)s;
    return CUDA_SUCCESS;
}

/* Like the driver: returns at once; pending work still completes, then the stream goes. */
CUresult CUDAAPI cuStreamDestroy(CUstream hStream) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g.lock);
    uintptr_t v = (uintptr_t)hStream;
    stream *s = v > 2 ? resolve(hStream, -1) : NULL;
    if (s) {
        s->destroyed = 1;
        pthread_cond_broadcast(&g.changed);
    }
    pthread_mutex_unlock(&g.lock);
    return s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult CUDAAPI cuStreamSynchronize(CUstream hStream) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g.lock);
    uintptr_t v = (uintptr_t)hStream;
    if (v <= 2 && current < 0) {
        pthread_mutex_unlock(&g.lock);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    stream *s = resolve(hStream, current);
    if (s) wait_for(s, s->enqueued);
    pthread_mutex_unlock(&g.lock);
    return s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

/* ---- events ---- */

struct CUevent_st {
    stream *s; /* NULL until recorded */
    uint64_t seq;
};

CUresult CUDAAPI cuEventCreate(CUevent *phEvent, unsigned int Flags) {
    (void)Flags;
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!phEvent) return CUDA_ERROR_INVALID_VALUE;
    CUevent e = calloc(1, sizeof *e);
    if (!e) return CUDA_ERROR_OUT_OF_MEMORY;
    *phEvent = e;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventDestroy(CUevent hEvent) {
    if (!hEvent) return CUDA_ERROR_INVALID_HANDLE;
    free(hEvent);
    return CUDA_SUCCESS;
}

/* The device a stream handle means: a created stream's own, else (the legacy and per-thread
 * handles) the current context's, else GPU 0. */
static int handle_device(CUstream h) {
    uintptr_t v = (uintptr_t)h;
    if (v > 2) return ((stream *)h)->device;
    return current >= 0 ? current : 0;
}

CUresult CUDAAPI cuEventRecord(CUevent hEvent, CUstream hStream) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!hEvent) return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&g.lock);
    stream *st = resolve(hStream, handle_device(hStream));
    if (st) {
        hEvent->s = st;
        hEvent->seq = st->enqueued;
    }
    pthread_mutex_unlock(&g.lock);
    return st ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

/* Later work on hStream waits until the event's point of its stream has run. */
CUresult CUDAAPI cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!hEvent || Flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g.lock);
    stream *st = resolve(hStream, hEvent->s ? hEvent->s->device : handle_device(hStream));
    CUresult r = st ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
    if (st && hEvent->s && hEvent->s->completed < hEvent->seq) {
        op *o = calloc(1, sizeof *o); /* a marker: runs once the event's point has */
        if (!o)
            r = CUDA_ERROR_OUT_OF_MEMORY;
        else {
            o->kind = 2;
            o->dep_stream[0] = hEvent->s;
            o->dep_seq[0] = hEvent->seq;
            o->ndeps = 1;
            enqueue(st, o);
        }
    }
    pthread_mutex_unlock(&g.lock);
    return r;
}

CUresult CUDAAPI cuEventSynchronize(CUevent hEvent) {
    if (!g.initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!hEvent) return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&g.lock);
    if (hEvent->s) wait_for(hEvent->s, hEvent->seq);
    pthread_mutex_unlock(&g.lock);
    return CUDA_SUCCESS;
}

/* ---- test helpers (not CUDA API) ---- */

/* Device memory on `dev` without a context (tests must not disturb kvstore's contexts). */
CUdeviceptr fakecuda_alloc(int dev, size_t n) {
    if (cuInit(0) != CUDA_SUCCESS || dev < 0 || dev >= g.ndevices || n == 0) return 0;
    pthread_mutex_lock(&g.lock);
    size_t rounded = (n + 255) & ~(size_t)255;
    CUdeviceptr p = 0;
    if (g.used_bytes[dev] + rounded <= DEVICE_BYTES) {
        p = (CUdeviceptr)(uintptr_t)(g.base[dev] + g.used_bytes[dev]);
        g.used_bytes[dev] += rounded;
    }
    pthread_mutex_unlock(&g.lock);
    return p;
}

/* Reads or writes device bytes directly (as a test's check; no stream ordering). */
int fakecuda_read(CUdeviceptr src, void *dst, size_t n) {
    char *b = bytes_of(src, n);
    if (!b) return -1;
    memcpy(dst, b, n);
    return 0;
}
int fakecuda_write(CUdeviceptr dst, const void *src, size_t n) {
    char *b = bytes_of(dst, n);
    if (!b) return -1;
    memcpy(b, src, n);
    return 0;
}

/* A stream on `dev` (flags as cuStreamCreate), made without a current context. */
uintptr_t fakecuda_stream_create(int dev, unsigned flags) {
    if (cuInit(0) != CUDA_SUCCESS || dev < 0 || dev >= g.ndevices) return 0;
    pthread_mutex_lock(&g.lock);
    stream *s = new_stream(dev, (flags & CU_STREAM_NON_BLOCKING) != 0);
    pthread_mutex_unlock(&g.lock);
    return (uintptr_t)s;
}

/* A "kernel" on stream h (0, 1, 2: the legacy stream of `dev`) that fills [p, p+n) with
 * `byte` after delay_us. */
int fakecuda_fill_async(uintptr_t h, int dev, CUdeviceptr p, int byte, size_t n, unsigned delay_us) {
    pthread_mutex_lock(&g.lock);
    stream *s = resolve((CUstream)h, dev);
    char *b = bytes_of(p, n);
    if (!s || !b) {
        pthread_mutex_unlock(&g.lock);
        return -1;
    }
    op *o = calloc(1, sizeof *o);
    o->kind = 1;
    o->dst = b;
    o->n = n;
    o->byte = byte;
    o->delay_us = delay_us;
    enqueue(s, o);
    pthread_mutex_unlock(&g.lock);
    return 0;
}

/* Waits for everything on every stream of every device. */
void fakecuda_drain(void) {
    pthread_mutex_lock(&g.lock);
    for (int i = 0; i < MAX_STREAMS; i++)
        if (g.streams[i].used) wait_for(&g.streams[i], g.streams[i].enqueued);
    pthread_mutex_unlock(&g.lock);
}

/* Primary-context retains held now on `dev`. */
int fakecuda_retained(int dev) { return dev >= 0 && dev < MAX_DEVICES ? g.ctx[dev].retains : -1; }
