#include "kv_accelerator.h"

/* The linker defines __start_/__stop_ for a section whose name is a C identifier. Weak, so a
 * module that links no record still links (and sees zero records). */
extern void *const __start_kvstore_accelerators[] __attribute__((weak, visibility("hidden")));
extern void *const __stop_kvstore_accelerators[] __attribute__((weak, visibility("hidden")));

void *const *kv_accelerator_records(size_t *count) {
    if (__start_kvstore_accelerators == NULL || __stop_kvstore_accelerators == NULL) {
        *count = 0;
        return NULL;
    }
    *count = (size_t)(__stop_kvstore_accelerators - __start_kvstore_accelerators);
    return __start_kvstore_accelerators;
}
