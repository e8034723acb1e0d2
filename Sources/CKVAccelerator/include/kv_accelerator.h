#ifndef KV_ACCELERATOR_H
#define KV_ACCELERATOR_H
#include <stddef.h>

/* The linker section that holds one registration record (a function pointer) per device kind.
 * Swift code places records there with `@used @section("kvstore_accelerators")`. */
#define KV_ACCELERATOR_SECTION "kvstore_accelerators"

/* The records linked into this module: *count gets how many; returns the first (NULL when
 * none). Each record is a `void *(*)(void)` that returns a retained description of its kind. */
void *const *kv_accelerator_records(size_t *count);

#endif
