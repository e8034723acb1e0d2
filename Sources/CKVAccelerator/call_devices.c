#include "kv_accelerator.h"

/* The device parts the current thread declared for its next ABI calls (see kv_call_devices).
 * Borrowed pointers: the caller keeps the array alive until it clears them. */
static _Thread_local const kv_device_part *declared;
static _Thread_local size_t declared_count;

void kv_call_devices(const kv_device_part *parts, size_t n) {
    declared = n ? parts : NULL;
    declared_count = parts ? n : 0;
}

const kv_device_part *kv_call_devices_declared(size_t *n) {
    *n = declared_count;
    return declared;
}
