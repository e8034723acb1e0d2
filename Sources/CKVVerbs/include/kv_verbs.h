/* RDMA through libibverbs, loaded with dlopen at run time (docs/architecture.md §8): kvstore links no
 * verbs library, and a machine without one simply has no RDMA devices. This header exposes a
 * small flat API that hides every verbs type; kv_verbs.c implements it over the real
 * <infiniband/verbs.h> structures (the inline ibv_post_send/ibv_poll_cq dispatch through
 * them) and the library's exported functions, resolved with dlsym.
 *
 * Every function that can fail writes a sentence to `err` (at most errlen bytes, NUL-ended). */
#ifndef KV_VERBS_H
#define KV_VERBS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_rdma_context kv_rdma_context;
typedef struct kv_rdma_qp kv_rdma_qp;

/* One RDMA device as discovery sees it. */
typedef struct {
    char name[64];
    int32_t port; /* first ACTIVE port, else the first port; 0 when it has none */
    int32_t active; /* that port is ACTIVE */
    int32_t link_layer; /* 1 InfiniBand, 2 Ethernet (RoCE), 0 unknown */
    int32_t mtu; /* active MTU in bytes */
    uint16_t lid;
} kv_rdma_device;

/* What a peer needs to connect its queue pair to ours (exchanged over TCP). */
typedef struct {
    uint32_t qpn;
    uint32_t psn;
    uint16_t lid;
    uint8_t gid[16];
    int32_t mtu; /* ibv_mtu enum value */
    uint8_t gid_type; /* 0 InfiniBand, 1 RoCE v1, 2 RoCE v2 (enum ibv_gid_type) */
    uint8_t link_layer; /* 1 InfiniBand, 2 Ethernet */
} kv_rdma_address;

/* Loads the library (NULL: "libibverbs.so.1") and resolves its functions. Returns 0, or -1
 * (nothing loaded) with the reason. Idempotent once it succeeded. Where the kernel lacks
 * copy-on-fork for DMA pages (ibv_is_fork_initialized says DISABLED), it calls ibv_fork_init
 * before anything is registered, so a fork() in the process cannot take registered pages
 * away from the NIC. */
int kv_verbs_load(const char *path, char *err, size_t errlen);

/* Lists up to `max` devices into `out`; returns how many there are (0 when the machine has no
 * RDMA stack: ibv_get_device_list fails with ENOSYS), or -1 with the reason. */
int kv_rdma_devices(kv_rdma_device *out, int max, char *err, size_t errlen);

/* Opens device `name` on `port` (protection domain included). `gid_index` selects the GID;
 * -1 chooses one: on RoCE the first RoCE v2 GID holding an IPv4-mapped address, else the first
 * non-link-local RoCE v2 GID, else the first RoCE v2 GID (v1 and link-local GIDs do not route);
 * on InfiniBand GID 0. The RDMA READ depths come from the device (ibv_query_device), at most
 * 16. NULL with the reason on failure (also for a port whose link layer is neither
 * InfiniBand nor Ethernet). */
kv_rdma_context *kv_rdma_open(const char *name, int port, int gid_index, char *err, size_t errlen);
void kv_rdma_close(kv_rdma_context *ctx);

/* Registers [addr, addr+len): for local write always, and for remote read and write when
 * `remote` (a segment peers reach; a staging buffer needs no remote access). Returns the
 * registration and its keys, or NULL with the reason (past RLIMIT_MEMLOCK the reason says so
 * and names the limit). */
void *kv_rdma_register(kv_rdma_context *ctx, void *addr, size_t len, int remote, uint32_t *lkey, uint32_t *rkey, char *err, size_t errlen);
void kv_rdma_deregister(void *mr);

/* A reliable-connected queue pair (INIT state) and the address a peer connects to. `remote`:
 * whether the peer may READ and WRITE through it (the serving side's); the initiating side's
 * allows nothing remote. */
kv_rdma_qp *kv_rdma_qp_create(kv_rdma_context *ctx, int remote, kv_rdma_address *local, char *err, size_t errlen);
/* Moves the queue pair to RTR then RTS towards `remote`. 0, or -1 with the reason: also when
 * the two ports' link layers or GID types differ, or a RoCE peer gives no GID. */
int kv_rdma_qp_connect(kv_rdma_qp *qp, const kv_rdma_address *remote, char *err, size_t errlen);
/* One-sided RDMA READ (write = 0: remote -> local) or WRITE (local -> remote) of `len` bytes,
 * posted in pieces and waited for (busy polling, at most timeout_ms). 0, or -1 with the
 * reason; after a failure the queue pair is in error and must be destroyed. */
int kv_rdma_transfer(kv_rdma_qp *qp, int write, void *local, uint32_t lkey, uint64_t remote, uint32_t rkey, size_t len, int timeout_ms, char *err,
                     size_t errlen);
void kv_rdma_qp_destroy(kv_rdma_qp *qp);

/* The device's next asynchronous event (port down or up, a fatal device error, a queue pair
 * error), waiting at most timeout_ms: 1 with *type (enum ibv_event_type), *port (the port of
 * a port event, else 0) and its name in `text`; 0 when none came; -1 with the reason (also
 * when the library cannot report events). Each event is acknowledged before returning. */
int kv_rdma_next_event(kv_rdma_context *ctx, int timeout_ms, int *type, int *port, char *text, size_t textlen);
/* Event types kvstore acts on (enum ibv_event_type values). */
enum { KV_RDMA_EVENT_DEVICE_FATAL = 8, KV_RDMA_EVENT_PORT_ACTIVE = 9, KV_RDMA_EVENT_PORT_ERR = 10 };

#ifdef __cplusplus
}
#endif
#endif
