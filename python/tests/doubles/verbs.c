/* A libibverbs test double: the verbs kvstore calls, compiled against the real
 * <infiniband/verbs.h> (libibverbs-dev) so the compiler checks every prototype and structure,
 * exported as libibverbs.so.1 with the IBVERBS_1.1 symbol versions, loaded by kvstore through
 * KVSTORE_IBVERBS_LIBRARY. The header's inline ibv_post_send and ibv_poll_cq reach it through
 * the context's ops table, as they reach a real provider.
 *
 * The "fabric" is a file every process maps (FAKEVERBS_FABRIC, default
 * /dev/shm/kvstore-fakeverbs-<uid>): queue pairs and memory registrations of all processes, so
 * one process's RDMA READ/WRITE reaches another's registered memory (process_vm_readv/writev,
 * as a NIC would by DMA). Checked on every operation, as hardware checks:
 * - the RC state machine: each ibv_modify_qp transition needs exactly the attribute mask
 *   ibv_modify_qp(3) lists (missing or extra bits: EINVAL), values within the device's limits
 *   (max_qp_rd_atom, FAKEVERBS_MAX_RD_ATOM, default 16), the GRH on Ethernet ports;
 * - addressing: the destination GID must be a GID of the remote port, of the same type as the
 *   source GID; RoCE v1 and link-local GIDs do not cross subnets (FAKEVERBS_SUBNET), so a
 *   wrong GID index gives retry-exceeded completions after a successful handshake; the path
 *   MTU must fit the remote port;
 * - keys and access: the lkey must cover the local buffer with local write for READs; the
 *   rkey must belong to the remote QP's process and cover the range with remote read/write
 *   access, and the remote QP must allow it; errors complete with the statuses a NIC uses;
 * - a dead peer (its process gone) gives retry-exceeded; a QP in error flushes later work;
 *   FAKEVERBS_FAIL_WR=N makes this process's N-th work request fail so (a link that drops).
 * - RLIMIT_MEMLOCK caps the bytes a process registers (ENOMEM past it, root included);
 *   FAKEVERBS_MEMLOCK (bytes) replaces that limit, as a raised `ulimit -l` would.
 * - fork: with FAKEVERBS_FORK=unsafe the "kernel" lacks copy-on-fork for DMA pages: after a
 *   fork, memory registered before it no longer receives DMA in the parent (writes are
 *   silently lost) unless ibv_fork_init ran first.
 * - asynchronous events: each context's async_fd (a pipe) delivers them to
 *   ibv_get_async_event; FAKEVERBS_PORT_DOWN_AFTER_MS=N takes the port down N ms after the
 *   device is opened (IBV_EVENT_PORT_ERR, ibv_query_port says DOWN, every later work request
 *   completes with retry-exceeded), as a cable pulled from the NIC.
 * Devices: FAKEVERBS_DEVICES (count, default 1, "fakerxe0"...), FAKEVERBS_LINK ("ethernet",
 * "infiniband" or "unspecified"), FAKEVERBS_HOST (this process's host number, 1..250, default
 * 1), FAKEVERBS_MTU (bytes, default 1024). An Ethernet port's GID table is mlx5's: 0 RoCE v1
 * fe80::host, 1 RoCE v2 fe80::host, 2 RoCE v1 ::ffff:10.213.<subnet>.<host>, 3 RoCE v2 of it.
 *
 * Test helper: fakeverbs_created_qps() counts the queue pairs this process ever created. */
#define _GNU_SOURCE
#include <infiniband/verbs.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#undef ibv_get_device_list
#undef ibv_query_port
#undef ibv_reg_mr

#define MAX_QPS 1024
#define MAX_MRS 4096
#define NGIDS 4

typedef struct {
    int used;
    pid_t pid;
    uint32_t qpn;
    int state; /* enum ibv_qp_state */
    uint32_t dest_qpn;
    int is_global;
    uint8_t dgid[16];
    uint16_t dlid;
    int sgid_index;
    int path_mtu; /* enum ibv_mtu */
    int access;
    int max_rd_atomic, max_dest_rd_atomic;
    int host, subnet; /* of the owning process */
} fabric_qp;

typedef struct {
    int used;
    pid_t pid;
    uint64_t addr, len;
    uint32_t lkey, rkey;
    int access;
    int stale; /* fork broke copy-on-write for it: DMA goes nowhere */
} fabric_mr;

typedef struct {
    pthread_mutex_t lock;
    int ready;
    uint32_t next_qpn, next_key;
    fabric_qp qps[MAX_QPS];
    fabric_mr mrs[MAX_MRS];
} fabric;

static fabric *F;
static int host_id = 1, subnet_id = 0, link_layer = IBV_LINK_LAYER_ETHERNET, ndevices = 1, max_rd_atom = 16;
static enum ibv_mtu port_mtu = IBV_MTU_1024;
static int fork_unsafe, fork_enabled;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int init_errno;
static int created_qps;
static int port_down;
static pthread_once_t down_once = PTHREAD_ONCE_INIT;
static int event_pipes[16][2];
static int nevent_pipes;
static pthread_mutex_t event_lock = PTHREAD_MUTEX_INITIALIZER;
static int posted_wrs;

static int env_int(const char *name, int dflt) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

static void after_fork_parent(void) {
    if (!F || !fork_unsafe || fork_enabled) return;
    pthread_mutex_lock(&F->lock);
    for (int i = 0; i < MAX_MRS; i++)
        if (F->mrs[i].used && F->mrs[i].pid == getpid()) F->mrs[i].stale = 1;
    pthread_mutex_unlock(&F->lock);
}

static void setup(void) {
    char path[256];
    const char *p = getenv("FAKEVERBS_FABRIC");
    if (!p || !*p) {
        snprintf(path, sizeof path, "/dev/shm/kvstore-fakeverbs-%u", (unsigned)getuid());
        p = path;
    }
    host_id = env_int("FAKEVERBS_HOST", 1);
    subnet_id = env_int("FAKEVERBS_SUBNET", 0);
    ndevices = env_int("FAKEVERBS_DEVICES", 1);
    max_rd_atom = env_int("FAKEVERBS_MAX_RD_ATOM", 16);
    const char *l = getenv("FAKEVERBS_LINK");
    if (l && strcmp(l, "infiniband") == 0)
        link_layer = IBV_LINK_LAYER_INFINIBAND;
    else if (l && strcmp(l, "unspecified") == 0)
        link_layer = IBV_LINK_LAYER_UNSPECIFIED;
    switch (env_int("FAKEVERBS_MTU", 1024)) {
    case 256: port_mtu = IBV_MTU_256; break;
    case 512: port_mtu = IBV_MTU_512; break;
    case 2048: port_mtu = IBV_MTU_2048; break;
    case 4096: port_mtu = IBV_MTU_4096; break;
    default: port_mtu = IBV_MTU_1024;
    }
    const char *f = getenv("FAKEVERBS_FORK");
    fork_unsafe = f && strcmp(f, "unsafe") == 0;
    int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        init_errno = errno;
        return;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || ((size_t)st.st_size < sizeof(fabric) && ftruncate(fd, sizeof(fabric)) != 0)) {
        init_errno = errno;
        close(fd);
        return;
    }
    F = mmap(NULL, sizeof(fabric), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (F == MAP_FAILED) {
        F = NULL;
        init_errno = errno;
        return;
    }
    /* First user initialises the lock (a zeroed file: ready == 0). Tests give each run a
     * fresh file, so the unlocked check is enough here. */
    if (!__atomic_load_n(&F->ready, __ATOMIC_ACQUIRE)) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&F->lock, &a);
        F->next_qpn = 0x100;
        F->next_key = 0x1000;
        __atomic_store_n(&F->ready, 1, __ATOMIC_RELEASE);
    }
    pthread_atfork(NULL, after_fork_parent, NULL);
}

static int lock_fabric(void) {
    pthread_once(&once, setup);
    if (!F) {
        errno = init_errno ? init_errno : ENODEV;
        return -1;
    }
    int rc = pthread_mutex_lock(&F->lock);
    if (rc == EOWNERDEAD) pthread_mutex_consistent(&F->lock);
    return 0;
}
static void unlock_fabric(void) { pthread_mutex_unlock(&F->lock); }

static int alive(pid_t pid) { return pid == getpid() || kill(pid, 0) == 0 || errno == EPERM; }

/* ---- devices ---- */

typedef struct {
    struct ibv_device dev;
} fake_device;

typedef struct {
    struct ibv_context ctx;
    int index;
    int events[2]; /* the async event pipe: [0] is async_fd */
} fake_context;

static void *take_port_down(void *arg) {
    unsigned ms = (unsigned)(uintptr_t)arg;
    usleep(ms * 1000);
    __atomic_store_n(&port_down, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&event_lock);
    int ev = IBV_EVENT_PORT_ERR;
    for (int i = 0; i < nevent_pipes; i++)
        if (write(event_pipes[i][1], &ev, sizeof ev) != sizeof ev) continue;
    pthread_mutex_unlock(&event_lock);
    return NULL;
}

static void start_port_timer(void) {
    int ms = env_int("FAKEVERBS_PORT_DOWN_AFTER_MS", 0);
    if (ms <= 0) return;
    pthread_t t;
    if (pthread_create(&t, NULL, take_port_down, (void *)(uintptr_t)ms) == 0) pthread_detach(t);
}

typedef struct {
    struct ibv_cq cq;
    pthread_mutex_t lock;
    int cap, head, count;
    struct ibv_wc *ring;
} fake_cq;

typedef struct {
    struct ibv_qp qp;
    int slot; /* in F->qps */
    int max_send_wr, max_send_sge, outstanding;
} fake_qp;

static fake_device devices[4];

static void make_gid(int index, int host, int subnet, uint8_t out[16], uint32_t *type) {
    memset(out, 0, 16);
    if (link_layer != IBV_LINK_LAYER_ETHERNET) {
        out[0] = 0xfe;
        out[1] = 0x80;
        out[15] = (uint8_t)host;
        *type = IBV_GID_TYPE_IB;
        return;
    }
    if (index < 2) {
        out[0] = 0xfe;
        out[1] = 0x80;
        out[15] = (uint8_t)host;
    } else {
        out[10] = 0xff;
        out[11] = 0xff;
        out[12] = 10;
        out[13] = 213;
        out[14] = (uint8_t)subnet;
        out[15] = (uint8_t)host;
    }
    *type = index % 2 == 0 ? IBV_GID_TYPE_ROCE_V1 : IBV_GID_TYPE_ROCE_V2;
}

static int ngids(void) { return link_layer == IBV_LINK_LAYER_ETHERNET ? NGIDS : 1; }

struct ibv_device **ibv_get_device_list(int *num_devices) {
    pthread_once(&once, setup);
    int n = ndevices < 0 ? 0 : ndevices > 4 ? 4 : ndevices;
    struct ibv_device **list = calloc((size_t)n + 1, sizeof *list);
    if (!list) {
        errno = ENOMEM;
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        fake_device *d = &devices[i];
        snprintf(d->dev.name, sizeof d->dev.name, "fakerxe%d", i);
        snprintf(d->dev.dev_name, sizeof d->dev.dev_name, "uverbs%d", i);
        d->dev.node_type = IBV_NODE_CA;
        d->dev.transport_type = IBV_TRANSPORT_IB;
        list[i] = &d->dev;
    }
    if (num_devices) *num_devices = n;
    return list;
}

void ibv_free_device_list(struct ibv_device **list) { free(list); }

const char *ibv_get_device_name(struct ibv_device *device) { return device->name; }

static int post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad);
static int post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad) {
    (void)qp;
    *bad = wr;
    return EINVAL;
}
static int poll_cq(struct ibv_cq *cq, int n, struct ibv_wc *wc);

struct ibv_context *ibv_open_device(struct ibv_device *device) {
    fake_context *c = calloc(1, sizeof *c);
    if (!c) {
        errno = ENOMEM;
        return NULL;
    }
    c->ctx.device = device;
    c->ctx.ops.post_send = post_send;
    c->ctx.ops.post_recv = post_recv;
    c->ctx.ops.poll_cq = poll_cq;
    c->ctx.cmd_fd = -1;
    c->ctx.async_fd = -1;
    if (pipe2(c->events, O_CLOEXEC) == 0) {
        c->ctx.async_fd = c->events[0];
        pthread_mutex_lock(&event_lock);
        if (nevent_pipes < 16) {
            event_pipes[nevent_pipes][0] = c->events[0];
            event_pipes[nevent_pipes][1] = c->events[1];
            nevent_pipes++;
        }
        pthread_mutex_unlock(&event_lock);
    }
    pthread_once(&down_once, start_port_timer);
    c->ctx.num_comp_vectors = 1;
    c->ctx.abi_compat = NULL; /* not an extended verbs_context: the exported calls are used */
    pthread_mutex_init(&c->ctx.mutex, NULL);
    c->index = (int)((fake_device *)device - devices);
    return &c->ctx;
}

int ibv_close_device(struct ibv_context *context) {
    fake_context *c = (fake_context *)context;
    pthread_mutex_lock(&event_lock);
    for (int i = 0; i < nevent_pipes; i++)
        if (event_pipes[i][0] == c->events[0]) {
            event_pipes[i][0] = event_pipes[nevent_pipes - 1][0];
            event_pipes[i][1] = event_pipes[nevent_pipes - 1][1];
            nevent_pipes--;
            break;
        }
    pthread_mutex_unlock(&event_lock);
    if (c->ctx.async_fd >= 0) {
        close(c->events[0]);
        close(c->events[1]);
    }
    free(context);
    return 0;
}

int ibv_get_async_event(struct ibv_context *context, struct ibv_async_event *event) {
    int ev;
    ssize_t n = read(context->async_fd, &ev, sizeof ev);
    if (n != sizeof ev) {
        errno = n < 0 ? errno : EIO;
        return -1;
    }
    memset(event, 0, sizeof *event);
    event->event_type = (enum ibv_event_type)ev;
    event->element.port_num = 1;
    return 0;
}

void ibv_ack_async_event(struct ibv_async_event *event) { (void)event; }

const char *ibv_event_type_str(enum ibv_event_type event) {
    switch (event) {
    case IBV_EVENT_PORT_ERR: return "port error";
    case IBV_EVENT_PORT_ACTIVE: return "port active";
    case IBV_EVENT_DEVICE_FATAL: return "local catastrophic error";
    default: return "unknown";
    }
}

int ibv_query_device(struct ibv_context *context, struct ibv_device_attr *attr) {
    (void)context;
    memset(attr, 0, sizeof *attr);
    attr->max_qp = MAX_QPS;
    attr->max_qp_wr = 1024;
    attr->max_sge = 4;
    attr->max_cq = 256;
    attr->max_cqe = 4096;
    attr->max_mr = MAX_MRS;
    attr->max_pd = 64;
    attr->max_qp_rd_atom = max_rd_atom;
    attr->max_qp_init_rd_atom = max_rd_atom;
    attr->max_res_rd_atom = max_rd_atom * MAX_QPS;
    attr->phys_port_cnt = 1;
    return 0;
}

int ibv_query_port(struct ibv_context *context, uint8_t port_num, struct _compat_ibv_port_attr *compat) {
    (void)context;
    if (port_num != 1) return EINVAL;
    struct ibv_port_attr *a = (struct ibv_port_attr *)compat;
    memset(a, 0, sizeof *a);
    a->state = __atomic_load_n(&port_down, __ATOMIC_ACQUIRE) ? IBV_PORT_DOWN : IBV_PORT_ACTIVE;
    a->max_mtu = IBV_MTU_4096;
    a->active_mtu = port_mtu;
    a->gid_tbl_len = ngids();
    a->lid = link_layer == IBV_LINK_LAYER_INFINIBAND ? (uint16_t)host_id : 0;
    a->link_layer = (uint8_t)link_layer;
    a->pkey_tbl_len = 1;
    return 0;
}

int ibv_query_gid(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid) {
    (void)context;
    if (port_num != 1 || index < 0 || index >= ngids()) return -1;
    uint32_t type;
    make_gid(index, host_id, subnet_id, gid->raw, &type);
    return 0;
}

int _ibv_query_gid_ex(struct ibv_context *context, uint32_t port_num, uint32_t gid_index, struct ibv_gid_entry *entry, uint32_t flags, size_t entry_size) {
    (void)context;
    if (flags != 0 || entry_size < sizeof *entry || port_num != 1 || gid_index >= (uint32_t)ngids()) return EINVAL;
    memset(entry, 0, sizeof *entry);
    make_gid((int)gid_index, host_id, subnet_id, entry->gid.raw, &entry->gid_type);
    entry->gid_index = gid_index;
    entry->port_num = port_num;
    return 0;
}

const char *ibv_wc_status_str(enum ibv_wc_status status) {
    switch (status) {
    case IBV_WC_SUCCESS: return "success";
    case IBV_WC_LOC_PROT_ERR: return "local protection error";
    case IBV_WC_WR_FLUSH_ERR: return "Work Request Flushed Error";
    case IBV_WC_REM_ACCESS_ERR: return "remote access error";
    case IBV_WC_RETRY_EXC_ERR: return "transport retry counter exceeded";
    case IBV_WC_REM_INV_REQ_ERR: return "remote invalid request error";
    default: return "unknown";
    }
}

int ibv_fork_init(void) {
    fork_enabled = 1;
    return 0;
}

enum ibv_fork_status ibv_is_fork_initialized(void) {
    pthread_once(&once, setup);
    return fork_enabled ? IBV_FORK_ENABLED : fork_unsafe ? IBV_FORK_DISABLED : IBV_FORK_UNNEEDED;
}

/* ---- protection domains and memory ---- */

struct ibv_pd *ibv_alloc_pd(struct ibv_context *context) {
    struct ibv_pd *pd = calloc(1, sizeof *pd);
    if (!pd) {
        errno = ENOMEM;
        return NULL;
    }
    pd->context = context;
    return pd;
}

int ibv_dealloc_pd(struct ibv_pd *pd) {
    free(pd);
    return 0;
}

struct ibv_mr *ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length, int access) {
    if (!addr || length == 0) {
        errno = EINVAL;
        return NULL;
    }
    if ((access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC)) && !(access & IBV_ACCESS_LOCAL_WRITE)) {
        errno = EINVAL;
        return NULL;
    }
    if (lock_fabric() != 0) return NULL;
    struct rlimit rl;
    uint64_t mine = 0;
    for (int i = 0; i < MAX_MRS; i++)
        if (F->mrs[i].used && F->mrs[i].pid == getpid()) mine += F->mrs[i].len;
    const char *cap = getenv("FAKEVERBS_MEMLOCK");
    if (cap && *cap) {
        rl.rlim_cur = strtoull(cap, NULL, 10);
    } else if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0)
        rl.rlim_cur = RLIM_INFINITY;
    if (rl.rlim_cur != RLIM_INFINITY && mine + length > rl.rlim_cur) {
        unlock_fabric();
        errno = ENOMEM; /* pinning past RLIMIT_MEMLOCK */
        return NULL;
    }
    int slot = -1;
    for (int i = 0; i < MAX_MRS && slot < 0; i++)
        if (!F->mrs[i].used || !alive(F->mrs[i].pid)) slot = i;
    if (slot < 0) {
        unlock_fabric();
        errno = ENOMEM;
        return NULL;
    }
    struct ibv_mr *mr = calloc(1, sizeof *mr);
    if (!mr) {
        unlock_fabric();
        errno = ENOMEM;
        return NULL;
    }
    fabric_mr *m = &F->mrs[slot];
    memset(m, 0, sizeof *m);
    m->used = 1;
    m->pid = getpid();
    m->addr = (uint64_t)(uintptr_t)addr;
    m->len = length;
    m->access = access;
    m->lkey = F->next_key++;
    m->rkey = F->next_key++;
    unlock_fabric();
    mr->context = pd->context;
    mr->pd = pd;
    mr->addr = addr;
    mr->length = length;
    mr->handle = (uint32_t)slot;
    mr->lkey = m->lkey;
    mr->rkey = m->rkey;
    return mr;
}

int ibv_dereg_mr(struct ibv_mr *mr) {
    if (lock_fabric() != 0) return errno;
    fabric_mr *m = &F->mrs[mr->handle];
    if (m->used && m->pid == getpid() && m->lkey == mr->lkey) m->used = 0;
    unlock_fabric();
    free(mr);
    return 0;
}

/* ---- completion queues ---- */

struct ibv_cq *ibv_create_cq(struct ibv_context *context, int cqe, void *cq_context, struct ibv_comp_channel *channel, int comp_vector) {
    (void)comp_vector;
    if (cqe <= 0 || cqe > 4096) {
        errno = EINVAL;
        return NULL;
    }
    fake_cq *c = calloc(1, sizeof *c);
    if (!c) {
        errno = ENOMEM;
        return NULL;
    }
    c->ring = calloc((size_t)cqe, sizeof *c->ring);
    if (!c->ring) {
        free(c);
        errno = ENOMEM;
        return NULL;
    }
    c->cap = cqe;
    pthread_mutex_init(&c->lock, NULL);
    c->cq.context = context;
    c->cq.channel = channel;
    c->cq.cq_context = cq_context;
    c->cq.cqe = cqe;
    return &c->cq;
}

int ibv_destroy_cq(struct ibv_cq *cq) {
    fake_cq *c = (fake_cq *)cq;
    free(c->ring);
    free(c);
    return 0;
}

static void complete(struct ibv_cq *cq, uint64_t wr_id, enum ibv_wc_status status, enum ibv_wc_opcode op, uint32_t len, uint32_t qpn) {
    fake_cq *c = (fake_cq *)cq;
    pthread_mutex_lock(&c->lock);
    if (c->count < c->cap) { /* an overrun is the caller's bug: completions are lost */
        struct ibv_wc *w = &c->ring[(c->head + c->count) % c->cap];
        memset(w, 0, sizeof *w);
        w->wr_id = wr_id;
        w->status = status;
        w->opcode = op;
        w->byte_len = len;
        w->qp_num = qpn;
        w->vendor_err = status == IBV_WC_SUCCESS ? 0 : 0x81;
        c->count++;
    }
    pthread_mutex_unlock(&c->lock);
}

static int poll_cq(struct ibv_cq *cq, int n, struct ibv_wc *wc) {
    fake_cq *c = (fake_cq *)cq;
    pthread_mutex_lock(&c->lock);
    int got = 0;
    while (got < n && c->count > 0) {
        wc[got++] = c->ring[c->head];
        c->head = (c->head + 1) % c->cap;
        c->count--;
    }
    pthread_mutex_unlock(&c->lock);
    return got;
}

/* ---- queue pairs ---- */

struct ibv_qp *ibv_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *ia) {
    if (ia->qp_type != IBV_QPT_RC || !ia->send_cq || !ia->recv_cq || ia->cap.max_send_wr == 0 || ia->cap.max_send_wr > 1024 || ia->cap.max_send_sge == 0 ||
        ia->cap.max_send_sge > 4) {
        errno = EINVAL;
        return NULL;
    }
    if (lock_fabric() != 0) return NULL;
    int slot = -1;
    for (int i = 0; i < MAX_QPS && slot < 0; i++)
        if (!F->qps[i].used || !alive(F->qps[i].pid)) slot = i;
    if (slot < 0) {
        unlock_fabric();
        errno = ENOMEM;
        return NULL;
    }
    fake_qp *q = calloc(1, sizeof *q);
    if (!q) {
        unlock_fabric();
        errno = ENOMEM;
        return NULL;
    }
    fabric_qp *f = &F->qps[slot];
    memset(f, 0, sizeof *f);
    f->used = 1;
    f->pid = getpid();
    f->qpn = F->next_qpn++ & 0xffffff;
    f->state = IBV_QPS_RESET;
    f->host = host_id;
    f->subnet = subnet_id;
    unlock_fabric();
    __atomic_add_fetch(&created_qps, 1, __ATOMIC_RELAXED);
    q->slot = slot;
    q->max_send_wr = (int)ia->cap.max_send_wr;
    q->max_send_sge = (int)ia->cap.max_send_sge;
    q->qp.context = pd->context;
    q->qp.qp_context = ia->qp_context;
    q->qp.pd = pd;
    q->qp.send_cq = ia->send_cq;
    q->qp.recv_cq = ia->recv_cq;
    q->qp.qp_num = f->qpn;
    q->qp.state = IBV_QPS_RESET;
    q->qp.qp_type = IBV_QPT_RC;
    pthread_mutex_init(&q->qp.mutex, NULL);
    pthread_cond_init(&q->qp.cond, NULL);
    return &q->qp;
}

int ibv_destroy_qp(struct ibv_qp *qp) {
    fake_qp *q = (fake_qp *)qp;
    if (lock_fabric() == 0) {
        if (F->qps[q->slot].pid == getpid() && F->qps[q->slot].qpn == qp->qp_num) F->qps[q->slot].used = 0;
        unlock_fabric();
    }
    free(q);
    return 0;
}

static int ibv_mtu_ok(int m) { return m >= IBV_MTU_256 && m <= IBV_MTU_4096; }

int ibv_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *a, int mask) {
    fake_qp *q = (fake_qp *)qp;
    if (!(mask & IBV_QP_STATE)) return EINVAL;
    if (lock_fabric() != 0) return errno;
    fabric_qp *f = &F->qps[q->slot];
    int from = f->state, to = a->qp_state, rc = 0;
    const int init = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
    const int rtr = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
    const int rts = IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC;
    if (to == IBV_QPS_RESET || to == IBV_QPS_ERR) {
        if (mask != IBV_QP_STATE) rc = EINVAL;
    } else if (from == IBV_QPS_RESET && to == IBV_QPS_INIT) {
        if (mask != init || a->port_num != 1 || a->pkey_index != 0)
            rc = EINVAL;
        else
            f->access = a->qp_access_flags;
    } else if (from == IBV_QPS_INIT && to == IBV_QPS_RTR) {
        if (mask != rtr || !ibv_mtu_ok(a->path_mtu) || (int)a->path_mtu > (int)port_mtu || a->max_dest_rd_atomic > max_rd_atom || a->ah_attr.port_num != 1 ||
            (link_layer == IBV_LINK_LAYER_ETHERNET && !a->ah_attr.is_global) || (a->ah_attr.is_global && a->ah_attr.grh.sgid_index >= ngids()))
            rc = EINVAL;
        else {
            f->dest_qpn = a->dest_qp_num;
            f->is_global = a->ah_attr.is_global;
            memcpy(f->dgid, a->ah_attr.grh.dgid.raw, 16);
            f->dlid = a->ah_attr.dlid;
            f->sgid_index = a->ah_attr.grh.sgid_index;
            f->path_mtu = a->path_mtu;
            f->max_dest_rd_atomic = a->max_dest_rd_atomic;
        }
    } else if (from == IBV_QPS_RTR && to == IBV_QPS_RTS) {
        if (mask != rts || a->max_rd_atomic > max_rd_atom)
            rc = EINVAL;
        else
            f->max_rd_atomic = a->max_rd_atomic;
    } else {
        rc = EINVAL;
    }
    if (rc == 0) {
        f->state = to;
        qp->state = (enum ibv_qp_state)to;
    }
    unlock_fabric();
    return rc;
}

static void debug(const char *what, const fabric_qp *l, const fabric_qp *r) {
    if (getenv("FAKEVERBS_DEBUG"))
        fprintf(stderr, "fakeverbs: qp 0x%x -> 0x%x: %s (remote state %d, dest 0x%x)\n", l->qpn, l->dest_qpn, what, r ? r->state : -1, r ? r->dest_qpn : 0);
}

/* Whether a packet from QP `l` reaches QP `r` (lock held). */
static int reachable(const fabric_qp *l, const fabric_qp *r) {
    if (r->state != IBV_QPS_RTR && r->state != IBV_QPS_RTS) {
        debug("remote not ready", l, r);
        return 0;
    }
    if (r->dest_qpn != l->qpn || l->dest_qpn != r->qpn) {
        debug("not connected to each other", l, r);
        return 0;
    }
    if (l->path_mtu > r->path_mtu && r->path_mtu) {
        debug("path MTU too large", l, r);
        return 0;
    }
    if (link_layer != IBV_LINK_LAYER_ETHERNET) {
        if (!l->is_global) return l->dlid == (uint16_t)r->host;
    }
    /* The destination GID must be one of the remote port's, of the source GID's type. */
    uint8_t src[16], g[16];
    uint32_t stype, type;
    make_gid(l->sgid_index, l->host, l->subnet, src, &stype);
    /* (A RoCE port lists each address twice, as a v1 and a v2 GID: the packet's type is the
     * source GID's.) */
    int same_bytes = 0;
    for (int i = 0; i < ngids(); i++) {
        make_gid(i, r->host, r->subnet, g, &type);
        if (memcmp(g, l->dgid, 16) != 0) continue;
        same_bytes = 1;
        if (type != stype) continue;
        int link_local = g[0] == 0xfe && g[1] == 0x80;
        if ((type == IBV_GID_TYPE_ROCE_V1 || link_local) && l->subnet != r->subnet) {
            debug("GID does not route", l, r);
            return 0;
        }
        return 1;
    }
    debug(same_bytes ? "GID types differ" : "no such destination GID", l, r);
    return 0;
}

static fabric_mr *find_mr(pid_t pid, uint32_t key, int remote, uint64_t addr, uint64_t len) {
    for (int i = 0; i < MAX_MRS; i++) {
        fabric_mr *m = &F->mrs[i];
        if (!m->used || m->pid != pid || (remote ? m->rkey : m->lkey) != key) continue;
        if (addr < m->addr || addr + len > m->addr + m->len || addr + len < addr) return NULL;
        return m;
    }
    return NULL;
}

static int move_bytes(pid_t pid, int write, void *local, uint64_t remote, size_t len) {
    if (pid == getpid()) {
        if (write)
            memcpy((void *)(uintptr_t)remote, local, len);
        else
            memcpy(local, (const void *)(uintptr_t)remote, len);
        return 0;
    }
    struct iovec l = {local, len}, r = {(void *)(uintptr_t)remote, len};
    ssize_t n = write ? process_vm_writev(pid, &l, 1, &r, 1, 0) : process_vm_readv(pid, &l, 1, &r, 1, 0);
    return n == (ssize_t)len ? 0 : -1;
}

static enum ibv_wc_status execute(fabric_qp *l, struct ibv_send_wr *wr) {
    fabric_qp *r = NULL;
    for (int i = 0; i < MAX_QPS; i++)
        if (F->qps[i].used && F->qps[i].qpn == l->dest_qpn) {
            r = &F->qps[i];
            break;
        }
    if (!r || !alive(r->pid)) {
        debug("no remote queue pair", l, r);
        return IBV_WC_RETRY_EXC_ERR;
    }
    if (!reachable(l, r)) return IBV_WC_RETRY_EXC_ERR;
    int write = wr->opcode == IBV_WR_RDMA_WRITE;
    if (!write && (l->max_rd_atomic < 1 || r->max_dest_rd_atomic < 1)) return IBV_WC_REM_INV_REQ_ERR;
    uint64_t raddr = wr->wr.rdma.remote_addr;
    for (int s = 0; s < wr->num_sge; s++) {
        struct ibv_sge *g = &wr->sg_list[s];
        fabric_mr *lm = find_mr(getpid(), g->lkey, 0, g->addr, g->length);
        if (!lm || (!write && !(lm->access & IBV_ACCESS_LOCAL_WRITE))) return IBV_WC_LOC_PROT_ERR;
        fabric_mr *rm = find_mr(r->pid, wr->wr.rdma.rkey, 1, raddr, g->length);
        int need = write ? IBV_ACCESS_REMOTE_WRITE : IBV_ACCESS_REMOTE_READ;
        if (!rm || !(rm->access & need) || !(r->access & need)) return IBV_WC_REM_ACCESS_ERR;
        /* DMA into memory whose pages fork took away from this process goes nowhere. */
        int lost = write ? rm->stale : lm->stale;
        if (!lost && move_bytes(r->pid, write, (void *)(uintptr_t)g->addr, raddr, g->length) != 0) return IBV_WC_RETRY_EXC_ERR;
        raddr += g->length;
    }
    return IBV_WC_SUCCESS;
}

static int post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad) {
    fake_qp *q = (fake_qp *)qp;
    for (; wr; wr = wr->next) {
        if ((wr->opcode != IBV_WR_RDMA_READ && wr->opcode != IBV_WR_RDMA_WRITE) || wr->num_sge < 1 || wr->num_sge > q->max_send_sge) {
            *bad = wr;
            return EINVAL;
        }
        if (lock_fabric() != 0) {
            *bad = wr;
            return errno;
        }
        fabric_qp *l = &F->qps[q->slot];
        if (l->state != IBV_QPS_RTS && l->state != IBV_QPS_ERR) {
            unlock_fabric();
            *bad = wr;
            return EINVAL;
        }
        int nth = __atomic_add_fetch(&posted_wrs, 1, __ATOMIC_RELAXED);
        enum ibv_wc_status st = l->state == IBV_QPS_ERR                                                                   ? IBV_WC_WR_FLUSH_ERR
                                : nth == env_int("FAKEVERBS_FAIL_WR", 0) || __atomic_load_n(&port_down, __ATOMIC_ACQUIRE) ? IBV_WC_RETRY_EXC_ERR
                                                                                                                          : execute(l, wr);
        if (st != IBV_WC_SUCCESS) {
            l->state = IBV_QPS_ERR;
            qp->state = IBV_QPS_ERR;
        }
        unlock_fabric();
        uint32_t len = 0;
        for (int s = 0; s < wr->num_sge; s++) len += wr->sg_list[s].length;
        if ((wr->send_flags & IBV_SEND_SIGNALED) || st != IBV_WC_SUCCESS)
            complete(qp->send_cq, wr->wr_id, st, wr->opcode == IBV_WR_RDMA_WRITE ? IBV_WC_RDMA_WRITE : IBV_WC_RDMA_READ, len, qp->qp_num);
    }
    return 0;
}

/* ---- test helpers ---- */

int fakeverbs_created_qps(void) { return __atomic_load_n(&created_qps, __ATOMIC_RELAXED); }
