/* See include/kv_verbs.h. The verbs structures come from <infiniband/verbs.h> (package
 * libibverbs-dev); no verbs function is linked: each is resolved with dlsym. */
#define _GNU_SOURCE
#include "kv_verbs.h"

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static void say(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

#if __has_include(<infiniband/verbs.h>)
#include <infiniband/verbs.h>

/* The library's functions, resolved once. */
static struct {
    void *handle;
    struct ibv_device **(*get_device_list)(int *);
    void (*free_device_list)(struct ibv_device **);
    const char *(*get_device_name)(struct ibv_device *);
    struct ibv_context *(*open_device)(struct ibv_device *);
    int (*close_device)(struct ibv_context *);
    int (*query_port)(struct ibv_context *, uint8_t, struct ibv_port_attr *); /* the exported (compat) entry */
    int (*query_gid)(struct ibv_context *, uint8_t, int, union ibv_gid *);
    struct ibv_pd *(*alloc_pd)(struct ibv_context *);
    int (*dealloc_pd)(struct ibv_pd *);
    struct ibv_mr *(*reg_mr)(struct ibv_pd *, void *, size_t, int);
    int (*dereg_mr)(struct ibv_mr *);
    struct ibv_cq *(*create_cq)(struct ibv_context *, int, void *, struct ibv_comp_channel *, int);
    int (*destroy_cq)(struct ibv_cq *);
    struct ibv_qp *(*create_qp)(struct ibv_pd *, struct ibv_qp_init_attr *);
    int (*destroy_qp)(struct ibv_qp *);
    int (*modify_qp)(struct ibv_qp *, struct ibv_qp_attr *, int);
    /* Optional (NULL when the library lacks them). */
    int (*query_device)(struct ibv_context *, struct ibv_device_attr *);
    int (*query_gid_ex)(struct ibv_context *, uint32_t, uint32_t, struct ibv_gid_entry *, uint32_t, size_t);
    int (*fork_init)(void);
    enum ibv_fork_status (*is_fork_initialized)(void);
    const char *(*wc_status_str)(enum ibv_wc_status);
    int (*get_async_event)(struct ibv_context *, struct ibv_async_event *);
    void (*ack_async_event)(struct ibv_async_event *);
    const char *(*event_type_str)(enum ibv_event_type);
} V;
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

int kv_verbs_load(const char *path, char *err, size_t errlen) {
    pthread_mutex_lock(&load_lock);
    int rc = 0;
    if (V.handle) goto done;
    const char *lib = path && *path ? path : "libibverbs.so.1";
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        say(err, errlen, "cannot load %s: %s", lib, dlerror());
        rc = -1;
        goto done;
    }
#define RESOLVE(field, symbol)                            \
    do {                                                  \
        *(void **)&V.field = dlsym(h, symbol);            \
        if (!V.field) {                                   \
            say(err, errlen, "%s lacks %s", lib, symbol); \
            memset(&V, 0, sizeof V);                      \
            dlclose(h);                                   \
            rc = -1;                                      \
            goto done;                                    \
        }                                                 \
    } while (0)
    RESOLVE(get_device_list, "ibv_get_device_list");
    RESOLVE(free_device_list, "ibv_free_device_list");
    RESOLVE(get_device_name, "ibv_get_device_name");
    RESOLVE(open_device, "ibv_open_device");
    RESOLVE(close_device, "ibv_close_device");
    RESOLVE(query_port, "ibv_query_port");
    RESOLVE(query_gid, "ibv_query_gid");
    RESOLVE(alloc_pd, "ibv_alloc_pd");
    RESOLVE(dealloc_pd, "ibv_dealloc_pd");
    RESOLVE(reg_mr, "ibv_reg_mr");
    RESOLVE(dereg_mr, "ibv_dereg_mr");
    RESOLVE(create_cq, "ibv_create_cq");
    RESOLVE(destroy_cq, "ibv_destroy_cq");
    RESOLVE(create_qp, "ibv_create_qp");
    RESOLVE(destroy_qp, "ibv_destroy_qp");
    RESOLVE(modify_qp, "ibv_modify_qp");
#undef RESOLVE
    *(void **)&V.query_device = dlsym(h, "ibv_query_device");
    *(void **)&V.query_gid_ex = dlsym(h, "_ibv_query_gid_ex");
    *(void **)&V.fork_init = dlsym(h, "ibv_fork_init");
    *(void **)&V.is_fork_initialized = dlsym(h, "ibv_is_fork_initialized");
    *(void **)&V.wc_status_str = dlsym(h, "ibv_wc_status_str");
    *(void **)&V.get_async_event = dlsym(h, "ibv_get_async_event");
    *(void **)&V.ack_async_event = dlsym(h, "ibv_ack_async_event");
    *(void **)&V.event_type_str = dlsym(h, "ibv_event_type_str");
    /* Fork safety before any registration: without copy-on-fork for DMA pages in the kernel
     * (rdma-core answers DISABLED; UNNEEDED when the kernel has it), a fork() would leave the
     * NIC writing into pages the child took. Older libraries lack the query: ask for it. */
    if (V.fork_init && (!V.is_fork_initialized || V.is_fork_initialized() == IBV_FORK_DISABLED)) {
        int frc = V.fork_init();
        if (frc != 0) {
            say(err, errlen, "ibv_fork_init failed (%s): RDMA would not be fork-safe", strerror(frc < 0 ? -frc : frc));
            memset(&V, 0, sizeof V);
            dlclose(h);
            rc = -1;
            goto done;
        }
    }
    V.handle = h;
done:
    pthread_mutex_unlock(&load_lock);
    return rc;
}

static int loaded(char *err, size_t errlen) {
    if (V.handle) return 1;
    say(err, errlen, "libibverbs is not loaded");
    return 0;
}

/* Port attributes: the provider's extended query when it has one, else the exported call
 * (what the header's inline ibv_query_port does, through our resolved pointer). */
static int port_attr(struct ibv_context *c, uint8_t port, struct ibv_port_attr *a) {
    memset(a, 0, sizeof *a);
    struct verbs_context *vctx = verbs_get_ctx_op(c, query_port);
    if (vctx) return vctx->query_port(c, port, a, sizeof *a);
    return V.query_port(c, port, a);
}

static int mtu_bytes(enum ibv_mtu m) {
    switch (m) {
    case IBV_MTU_256: return 256;
    case IBV_MTU_512: return 512;
    case IBV_MTU_1024: return 1024;
    case IBV_MTU_2048: return 2048;
    case IBV_MTU_4096: return 4096;
    default: return 0;
    }
}

int kv_rdma_devices(kv_rdma_device *out, int max, char *err, size_t errlen) {
    if (!loaded(err, errlen)) return -1;
    int n = 0;
    errno = 0;
    struct ibv_device **list = V.get_device_list(&n);
    if (!list) {
        if (errno == ENOSYS || errno == 0) return 0; /* no RDMA stack in this kernel: zero devices */
        say(err, errlen, "ibv_get_device_list failed: %s", strerror(errno));
        return -1;
    }
    for (int i = 0; i < n && i < max; i++) {
        kv_rdma_device *d = &out[i];
        memset(d, 0, sizeof *d);
        snprintf(d->name, sizeof d->name, "%s", V.get_device_name(list[i]));
        struct ibv_context *c = V.open_device(list[i]);
        if (!c) continue;
        /* Ports are numbered from 1; probe until a query fails (at most 8). */
        for (int p = 1; p <= 8; p++) {
            struct ibv_port_attr a;
            if (port_attr(c, (uint8_t)p, &a) != 0) break;
            int active = a.state == IBV_PORT_ACTIVE;
            if (d->port == 0 || (active && !d->active)) {
                d->port = p;
                d->active = active;
                d->link_layer = a.link_layer == IBV_LINK_LAYER_INFINIBAND ? 1 : a.link_layer == IBV_LINK_LAYER_ETHERNET ? 2 : 0;
                d->mtu = mtu_bytes(a.active_mtu);
                d->lid = a.lid;
            }
            if (active) break;
        }
        V.close_device(c);
    }
    V.free_device_list(list);
    return n;
}

struct kv_rdma_context {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    uint8_t port;
    int gid_index;
    int gid_type; /* enum ibv_gid_type */
    int link_layer; /* IBV_LINK_LAYER_* */
    union ibv_gid gid;
    uint16_t lid;
    enum ibv_mtu mtu;
    int rd_atomic; /* RDMA READs in flight per queue pair (the device's limit, at most 16) */
};

/* The type of GID `index` (IBV_GID_TYPE_*): the library's query when it has it, else sysfs. */
static int gid_type_of(kv_rdma_context *k, const char *name, int index) {
    if (V.query_gid_ex) {
        struct ibv_gid_entry e;
        if (V.query_gid_ex(k->ctx, k->port, (uint32_t)index, &e, 0, sizeof e) == 0) return (int)e.gid_type;
        return -1;
    }
    if (k->link_layer == IBV_LINK_LAYER_INFINIBAND) return IBV_GID_TYPE_IB; /* sysfs says "IB/RoCE v1" there */
    char path[256], text[32] = {0};
    snprintf(path, sizeof path, "/sys/class/infiniband/%s/ports/%d/gid_attrs/types/%d", name, k->port, index);
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    if (!fgets(text, sizeof text, f)) text[0] = 0;
    fclose(f);
    if (strncmp(text, "RoCE v2", 7) == 0) return IBV_GID_TYPE_ROCE_V2;
    if (strstr(text, "RoCE v1")) return IBV_GID_TYPE_ROCE_V1;
    return -1;
}

static int gid_is_zero(const union ibv_gid *g) {
    static const uint8_t zero[16];
    return memcmp(g->raw, zero, 16) == 0;
}

/* Chooses the GID (see kv_rdma_open). Returns the index or -1 with the reason. */
static int choose_gid(kv_rdma_context *k, const char *name, int table, char *err, size_t errlen) {
    if (k->link_layer == IBV_LINK_LAYER_INFINIBAND) return 0;
    int best = -1, rank = 0;
    for (int i = 0; i < table && i < 256; i++) {
        union ibv_gid g;
        if (V.query_gid(k->ctx, k->port, i, &g) != 0 || gid_is_zero(&g)) continue;
        if (gid_type_of(k, name, i) != IBV_GID_TYPE_ROCE_V2) continue;
        static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        int link_local = g.raw[0] == 0xfe && (g.raw[1] & 0xc0) == 0x80;
        int r = memcmp(g.raw, v4mapped, 12) == 0 ? 3 : !link_local ? 2 : 1;
        if (r > rank) {
            rank = r;
            best = i;
        }
    }
    if (best < 0) say(err, errlen, "port %d of '%s' has no RoCE v2 GID (set KVSTORE_RDMA_GID_INDEX to choose one)", k->port, name);
    return best;
}

kv_rdma_context *kv_rdma_open(const char *name, int port, int gid_index, char *err, size_t errlen) {
    if (!loaded(err, errlen)) return NULL;
    if (port < 1 || port > 255) {
        say(err, errlen, "bad RDMA port %d", port);
        return NULL;
    }
    int n = 0;
    struct ibv_device **list = V.get_device_list(&n);
    if (!list) {
        say(err, errlen, "no RDMA devices");
        return NULL;
    }
    struct ibv_device *dev = NULL;
    for (int i = 0; i < n; i++) {
        if (strcmp(V.get_device_name(list[i]), name) == 0) {
            dev = list[i];
            break;
        }
    }
    if (!dev) {
        V.free_device_list(list);
        say(err, errlen, "no RDMA device named '%s'", name);
        return NULL;
    }
    kv_rdma_context *k = calloc(1, sizeof *k);
    if (!k) {
        V.free_device_list(list);
        say(err, errlen, "out of memory");
        return NULL;
    }
    k->ctx = V.open_device(dev);
    V.free_device_list(list);
    if (!k->ctx) {
        say(err, errlen, "cannot open RDMA device '%s': %s", name, strerror(errno));
        free(k);
        return NULL;
    }
    struct ibv_port_attr a;
    if (port_attr(k->ctx, (uint8_t)port, &a) != 0) {
        say(err, errlen, "cannot query port %d of '%s'", port, name);
        goto fail;
    }
    if (a.state != IBV_PORT_ACTIVE) {
        say(err, errlen, "port %d of '%s' is not active", port, name);
        goto fail;
    }
    if (a.link_layer != IBV_LINK_LAYER_INFINIBAND && a.link_layer != IBV_LINK_LAYER_ETHERNET) {
        say(err, errlen,
            "port %d of '%s' has link layer %d, neither InfiniBand nor Ethernet (RoCE): no reliable-connected "
            "RDMA there",
            port, name, a.link_layer);
        goto fail;
    }
    k->port = (uint8_t)port;
    k->lid = a.lid;
    k->mtu = a.active_mtu;
    k->link_layer = a.link_layer;
    k->rd_atomic = 16;
    if (V.query_device) {
        struct ibv_device_attr d;
        if (V.query_device(k->ctx, &d) == 0) {
            int lim = d.max_qp_rd_atom < d.max_qp_init_rd_atom ? d.max_qp_rd_atom : d.max_qp_init_rd_atom;
            if (lim < k->rd_atomic) k->rd_atomic = lim;
        }
    }
    if (k->rd_atomic < 1) {
        say(err, errlen, "'%s' allows no RDMA READ in flight", name);
        goto fail;
    }
    if (gid_index < 0) {
        gid_index = choose_gid(k, name, a.gid_tbl_len, err, errlen);
        if (gid_index < 0) goto fail;
    }
    k->gid_index = gid_index;
    if (V.query_gid(k->ctx, k->port, gid_index, &k->gid) != 0) {
        say(err, errlen, "cannot read GID %d of '%s'", gid_index, name);
        goto fail;
    }
    k->gid_type = gid_type_of(k, name, gid_index);
    if (k->link_layer == IBV_LINK_LAYER_ETHERNET && (gid_is_zero(&k->gid) || k->gid_type < 0)) {
        say(err, errlen, "GID %d of '%s' is empty or of unknown type: RoCE needs a GID", gid_index, name);
        goto fail;
    }
    if (k->gid_type < 0) k->gid_type = IBV_GID_TYPE_IB;
    k->pd = V.alloc_pd(k->ctx);
    if (!k->pd) {
        say(err, errlen, "cannot allocate a protection domain on '%s'", name);
        goto fail;
    }
    return k;
fail:
    V.close_device(k->ctx);
    free(k);
    return NULL;
}

void kv_rdma_close(kv_rdma_context *k) {
    if (!k) return;
    if (k->pd) V.dealloc_pd(k->pd);
    V.close_device(k->ctx);
    free(k);
}

static const int access_remote = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;

void *kv_rdma_register(kv_rdma_context *k, void *addr, size_t len, int remote, uint32_t *lkey, uint32_t *rkey, char *err, size_t errlen) {
    struct ibv_mr *mr = V.reg_mr(k->pd, addr, len, remote ? access_remote : IBV_ACCESS_LOCAL_WRITE);
    if (!mr) {
        int e = errno;
        struct rlimit rl;
        if (e == ENOMEM && getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
            say(err, errlen, "cannot register %zu bytes for RDMA: %s (the locked-memory limit, ulimit -l, is %llu bytes)", len, strerror(e),
                (unsigned long long)rl.rlim_cur);
        else
            say(err, errlen, "cannot register %zu bytes for RDMA: %s", len, strerror(e));
        return NULL;
    }
    *lkey = mr->lkey;
    *rkey = mr->rkey;
    return mr;
}

void kv_rdma_deregister(void *mr) {
    if (mr) V.dereg_mr((struct ibv_mr *)mr);
}

enum { SEND_DEPTH = 32, PIECE = 8 << 20 };

struct kv_rdma_qp {
    kv_rdma_context *k;
    struct ibv_cq *cq;
    struct ibv_qp *qp;
    uint32_t psn;
};

kv_rdma_qp *kv_rdma_qp_create(kv_rdma_context *k, int remote, kv_rdma_address *local, char *err, size_t errlen) {
    kv_rdma_qp *q = calloc(1, sizeof *q);
    if (!q) {
        say(err, errlen, "out of memory");
        return NULL;
    }
    q->k = k;
    q->cq = V.create_cq(k->ctx, 2 * SEND_DEPTH, NULL, NULL, 0);
    if (!q->cq) {
        say(err, errlen, "cannot create a completion queue: %s", strerror(errno));
        free(q);
        return NULL;
    }
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = q->cq;
    ia.recv_cq = q->cq;
    ia.qp_type = IBV_QPT_RC;
    ia.cap.max_send_wr = SEND_DEPTH;
    ia.cap.max_recv_wr = 1;
    ia.cap.max_send_sge = 1;
    ia.cap.max_recv_sge = 1;
    q->qp = V.create_qp(k->pd, &ia);
    if (!q->qp) {
        say(err, errlen, "cannot create a queue pair: %s", strerror(errno));
        V.destroy_cq(q->cq);
        free(q);
        return NULL;
    }
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = k->port;
    a.qp_access_flags = remote ? IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE : 0;
    if (V.modify_qp(q->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) != 0) {
        say(err, errlen, "cannot move the queue pair to INIT: %s", strerror(errno));
        kv_rdma_qp_destroy(q);
        return NULL;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    q->psn = (uint32_t)(ts.tv_nsec ^ (long)q) & 0xffffff;
    memset(local, 0, sizeof *local);
    local->qpn = q->qp->qp_num;
    local->psn = q->psn;
    local->lid = k->lid;
    memcpy(local->gid, k->gid.raw, 16);
    local->mtu = (int32_t)k->mtu;
    local->gid_type = (uint8_t)k->gid_type;
    local->link_layer = k->link_layer == IBV_LINK_LAYER_INFINIBAND ? 1 : 2;
    return q;
}

int kv_rdma_qp_connect(kv_rdma_qp *q, const kv_rdma_address *r, char *err, size_t errlen) {
    if (r->mtu < IBV_MTU_256 || r->mtu > IBV_MTU_4096) {
        say(err, errlen, "bad peer MTU %d", r->mtu);
        return -1;
    }
    int mine = q->k->link_layer == IBV_LINK_LAYER_INFINIBAND ? 1 : 2;
    if (r->link_layer != mine) {
        say(err, errlen, "the peer's port is %s, ours %s", r->link_layer == 1 ? "InfiniBand" : "Ethernet (RoCE)", mine == 1 ? "InfiniBand" : "Ethernet (RoCE)");
        return -1;
    }
    static const uint8_t zero[16];
    int peer_gid = memcmp(r->gid, zero, 16) != 0;
    if (mine == 2 && !peer_gid) {
        say(err, errlen, "the RoCE peer sent no GID");
        return -1;
    }
    if (peer_gid && r->gid_type != q->k->gid_type) {
        say(err, errlen,
            "GID types differ (ours %d, the peer's %d: RoCE v1 and v2 do not talk; set KVSTORE_RDMA_GID_INDEX "
            "alike on both)",
            q->k->gid_type, r->gid_type);
        return -1;
    }
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = (enum ibv_mtu)r->mtu < q->k->mtu ? (enum ibv_mtu)r->mtu : q->k->mtu;
    a.dest_qp_num = r->qpn;
    a.rq_psn = r->psn & 0xffffff;
    a.max_dest_rd_atomic = (uint8_t)q->k->rd_atomic;
    a.min_rnr_timer = 12;
    a.ah_attr.dlid = r->lid;
    a.ah_attr.port_num = q->k->port;
    if (mine == 2 || peer_gid) { /* RoCE always carries the routing header; IB across subnets too */
        a.ah_attr.is_global = 1;
        memcpy(a.ah_attr.grh.dgid.raw, r->gid, 16);
        a.ah_attr.grh.sgid_index = (uint8_t)q->k->gid_index;
        a.ah_attr.grh.hop_limit = 64;
    }
    if (V.modify_qp(q->qp, &a,
                    IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER) != 0) {
        say(err, errlen, "cannot move the queue pair to RTR: %s", strerror(errno));
        return -1;
    }
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_RTS;
    a.timeout = 14; /* 4.096 us * 2^14 = 67 ms per try */
    a.retry_cnt = 7;
    a.rnr_retry = 7;
    a.sq_psn = q->psn;
    a.max_rd_atomic = (uint8_t)q->k->rd_atomic;
    if (V.modify_qp(q->qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC) != 0) {
        say(err, errlen, "cannot move the queue pair to RTS: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int kv_rdma_transfer(kv_rdma_qp *q, int write, void *local, uint32_t lkey, uint64_t remote, uint32_t rkey, size_t len, int timeout_ms, char *err,
                     size_t errlen) {
    size_t posted = 0, done = 0;
    int outstanding = 0, idle = 0;
    long long deadline = now_ms() + timeout_ms;
    while (done < len) {
        while (posted < len && outstanding < SEND_DEPTH) {
            size_t n = len - posted < PIECE ? len - posted : PIECE;
            struct ibv_sge sge = {.addr = (uintptr_t)local + posted, .length = (uint32_t)n, .lkey = lkey};
            struct ibv_send_wr wr, *bad = NULL;
            memset(&wr, 0, sizeof wr);
            wr.wr_id = n;
            wr.sg_list = &sge;
            wr.num_sge = 1;
            wr.opcode = write ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
            wr.send_flags = IBV_SEND_SIGNALED;
            wr.wr.rdma.remote_addr = remote + posted;
            wr.wr.rdma.rkey = rkey;
            int rc = ibv_post_send(q->qp, &wr, &bad);
            if (rc != 0) {
                say(err, errlen, "posting an RDMA %s failed: %s", write ? "WRITE" : "READ", strerror(rc));
                return -1;
            }
            posted += n;
            outstanding++;
        }
        struct ibv_wc wc[16];
        int got = ibv_poll_cq(q->cq, 16, wc);
        if (got < 0) {
            say(err, errlen, "polling the completion queue failed");
            return -1;
        }
        for (int i = 0; i < got; i++) {
            if (wc[i].status != IBV_WC_SUCCESS) {
                say(err, errlen, "RDMA %s failed: %s (completion status %d, vendor error 0x%x)", write ? "WRITE" : "READ",
                    V.wc_status_str ? V.wc_status_str(wc[i].status) : "error", (int)wc[i].status, wc[i].vendor_err);
                return -1;
            }
            done += (size_t)wc[i].wr_id;
            outstanding--;
        }
        if (got == 0) {
            if (now_ms() > deadline) {
                say(err, errlen, "RDMA %s of %zu bytes timed out after %d ms", write ? "WRITE" : "READ", len, timeout_ms);
                return -1;
            }
            /* Spin briefly (completions usually come within microseconds), then give the CPU
             * away between polls instead of burning it for the whole timeout. */
            if (++idle > 4096) sched_yield();
        } else {
            idle = 0;
        }
    }
    return 0;
}

void kv_rdma_qp_destroy(kv_rdma_qp *q) {
    if (!q) return;
    if (q->qp) V.destroy_qp(q->qp);
    if (q->cq) V.destroy_cq(q->cq);
    free(q);
}

int kv_rdma_next_event(kv_rdma_context *k, int timeout_ms, int *type, int *port, char *text, size_t textlen) {
    if (!V.get_async_event || !V.ack_async_event) {
        say(text, textlen, "libibverbs reports no async events");
        return -1;
    }
    struct pollfd p = {.fd = k->ctx->async_fd, .events = POLLIN};
    int n = poll(&p, 1, timeout_ms);
    if (n == 0 || (n < 0 && errno == EINTR)) return 0;
    if (n < 0 || k->ctx->async_fd < 0) {
        say(text, textlen, "waiting for RDMA events failed: %s", strerror(errno));
        return -1;
    }
    struct ibv_async_event e;
    if (V.get_async_event(k->ctx, &e) != 0) {
        say(text, textlen, "reading an RDMA event failed: %s", strerror(errno));
        return -1;
    }
    *type = (int)e.event_type;
    *port = e.event_type == IBV_EVENT_PORT_ACTIVE || e.event_type == IBV_EVENT_PORT_ERR || e.event_type == IBV_EVENT_LID_CHANGE ||
                    e.event_type == IBV_EVENT_PKEY_CHANGE || e.event_type == IBV_EVENT_SM_CHANGE || e.event_type == IBV_EVENT_GID_CHANGE ||
                    e.event_type == IBV_EVENT_CLIENT_REREGISTER
                ? e.element.port_num
                : 0;
    say(text, textlen, "%s", V.event_type_str ? V.event_type_str(e.event_type) : "event");
    V.ack_async_event(&e);
    return 1;
}

#else /* built without <infiniband/verbs.h>: no RDMA, every call says why */

static const char *why = "kvstore was built without libibverbs headers (install libibverbs-dev and rebuild)";
int kv_verbs_load(const char *path, char *err, size_t errlen) {
    (void)path;
    say(err, errlen, "%s", why);
    return -1;
}
int kv_rdma_devices(kv_rdma_device *out, int max, char *err, size_t errlen) {
    (void)out;
    (void)max;
    say(err, errlen, "%s", why);
    return -1;
}
kv_rdma_context *kv_rdma_open(const char *n, int p, int g, char *err, size_t errlen) {
    (void)n;
    (void)p;
    (void)g;
    say(err, errlen, "%s", why);
    return NULL;
}
void kv_rdma_close(kv_rdma_context *k) { (void)k; }
void *kv_rdma_register(kv_rdma_context *k, void *a, size_t l, int r, uint32_t *lk, uint32_t *rk, char *err, size_t errlen) {
    (void)k;
    (void)a;
    (void)l;
    (void)r;
    (void)lk;
    (void)rk;
    say(err, errlen, "%s", why);
    return NULL;
}
void kv_rdma_deregister(void *mr) { (void)mr; }
kv_rdma_qp *kv_rdma_qp_create(kv_rdma_context *k, int r, kv_rdma_address *l, char *err, size_t errlen) {
    (void)k;
    (void)r;
    (void)l;
    say(err, errlen, "%s", why);
    return NULL;
}
int kv_rdma_qp_connect(kv_rdma_qp *q, const kv_rdma_address *r, char *err, size_t errlen) {
    (void)q;
    (void)r;
    say(err, errlen, "%s", why);
    return -1;
}
int kv_rdma_transfer(kv_rdma_qp *q, int w, void *l, uint32_t lk, uint64_t r, uint32_t rk, size_t n, int t, char *err, size_t errlen) {
    (void)q;
    (void)w;
    (void)l;
    (void)lk;
    (void)r;
    (void)rk;
    (void)n;
    (void)t;
    say(err, errlen, "%s", why);
    return -1;
}
void kv_rdma_qp_destroy(kv_rdma_qp *q) { (void)q; }
int kv_rdma_next_event(kv_rdma_context *k, int t, int *ty, int *p, char *text, size_t textlen) {
    (void)k;
    (void)t;
    (void)ty;
    (void)p;
    say(text, textlen, "%s", why);
    return -1;
}
#endif
