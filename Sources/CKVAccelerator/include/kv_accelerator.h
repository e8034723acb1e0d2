#ifndef KV_ACCELERATOR_H
#define KV_ACCELERATOR_H
#include <stddef.h>
#include <stdint.h>

/* The linker section that holds one registration record (a function pointer) per device kind.
 * Swift code places records there with `@used @section("kvstore_accelerators")`. */
#define KV_ACCELERATOR_SECTION "kvstore_accelerators"

/* The records linked into this module: *count gets how many; returns the first (NULL when
 * none). Each record is a `void *(*)(void)` that returns a retained description of its kind. */
void *const *kv_accelerator_records(size_t *count);

/* What a caller already knows about memory it passes by address (a tensor's data pointer):
 * which device holds [address, address + length) and which stream orders the caller's work
 * on it. kind: KV_DEVICE_HOST or KV_DEVICE_CUDA; device: the ordinal, or -1 when only the
 * kind is known (the driver then names the device). stream: a CUstream handle (0 or 1: the
 * legacy default stream, 2: the per-thread default stream), meaningful with
 * KV_DEVICE_STREAM_KNOWN in flags; without it the stream is unknown and kvstore waits for all
 * of the device's work before its copies. */
typedef struct {
    uint64_t address;
    uint64_t length;
    uint64_t stream;
    int32_t kind;
    int32_t device;
    uint32_t flags;
    uint32_t reserved;
} kv_device_part;
enum { KV_DEVICE_HOST = 0, KV_DEVICE_CUDA = 1 };
enum { KV_DEVICE_STREAM_KNOWN = 1 };

/* Declares `parts` for the ABI calls this thread makes until the next kv_call_devices
 * (NULL, 0 clears). The array is borrowed: keep it alive until cleared. A buffer that lies in
 * no declared part is found as before (its registration, else the driver). */
void kv_call_devices(const kv_device_part *parts, size_t n);
/* The parts declared on this thread (for kvstore's own use). */
const kv_device_part *kv_call_devices_declared(size_t *n);

#endif
