/* kvstore._native.Store: the store type. Each method converts its arguments, calls the C ABI
 * (with the GIL released for large copies and for waits), and converts the result. */
#include "kvpy.h"
#include <stdlib.h>
#include <string.h>

#define key_arg kvpy_key_arg
#define check_nargs kvpy_check_nargs
#define read_begin kvpy_read_begin

int kvpy_ensure_open(StoreObject *self) {
    if (self->store == NULL || kv_store_is_closed(self->store)) {
        kvpy_raise(KV_E_STORE_CLOSED, "the store is closed");
        return -1;
    }
    return 0;
}
#define ensure_open kvpy_ensure_open

/* The common prologue of single-key methods: the store is open (checked first, so a closed
 * store reports StoreClosedError whatever the arguments) and the key converts. */
int kvpy_key_arg(StoreObject *self, PyObject *key, const char **k, Py_ssize_t *klen) {
    if (ensure_open(self) < 0) return -1;
    return kvpy_key(key, k, klen);
}

int kvpy_check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max) {
    if (nargs < min || nargs > max) {
        if (min == max)
            PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, min, nargs);
        else
            PyErr_Format(PyExc_TypeError, "%s() takes at least %zd arguments (%zd given)", name, min, nargs);
        return -1;
    }
    return 0;
}

/* ---- lifecycle ---- */

/* Checks shared by Store() and Store.connect() before the store is created. */
static int store_can_create(StoreObject *self, long long size) {
    if (self->store) {
        kvpy_raise(KV_E_INVALID_ARGUMENT, "the store is already initialised");
        return -1;
    }
    if (size < 0) { /* the ABI takes an unsigned size; the core checks the minimum */
        kvpy_raise(KV_E_INVALID_ARGUMENT, "segment_size must not be negative");
        return -1;
    }
    return 0;
}

/* Takes the handle kv_store_create or kv_store_connect returned with status st. */
static int store_adopt(StoreObject *self, int32_t st, kv_store *s) {
    if (st) {
        kvpy_raise_last(st);
        return -1;
    }
    self->store = s;
    if (!self->registered && !(self->registered = PyDict_New())) return -1;
    return 0;
}

static uint32_t create_flags(int prefault, int pin, int checksum) {
    return (prefault ? KV_CREATE_PREFAULT : 0) | (pin ? 0 : KV_CREATE_NO_PIN) | (checksum ? KV_CREATE_CHECKSUM : 0);
}

static int store_init(StoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"segment_size",   "prefault", "pin_memory", "lease_ttl", "soft_pin_ttl",   "eviction_high_watermark",
                             "eviction_ratio", "checksum", "disk_path",  "disk_size", "disk_admission", NULL};
    long long size = 0, disk_size = 0;
    const char *disk_path = NULL;
    int disk_admission = 0;
    int prefault = 0, pin = 1, checksum = 0;
    PyObject *prefault_obj = Py_False, *pin_obj = Py_True, *lease = NULL, *soft = NULL, *watermark = NULL, *ratio = NULL;
    PyObject *checksum_obj = Py_False;
    kv_store_config config;
    kv_store_config_init(&config);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L|OOOOOOOzLi", kwlist, &size, &prefault_obj, &pin_obj, &lease, &soft, &watermark, &ratio, &checksum_obj,
                                     &disk_path, &disk_size, &disk_admission))
        return -1;
    if (disk_path) {
        if (disk_size <= 0) {
            kvpy_raise(KV_E_INVALID_ARGUMENT, "disk_size must be positive with disk_path");
            return -1;
        }
        config.disk_path = disk_path;
        config.disk_size = (uint64_t)disk_size;
        config.disk_admission = (uint32_t)disk_admission;
    }
    if (kvpy_flag(prefault_obj, "prefault", &prefault) < 0 || kvpy_flag(pin_obj, "pin_memory", &pin) < 0 ||
        kvpy_flag(checksum_obj, "checksum", &checksum) < 0 || (lease && kvpy_seconds(lease, "lease_ttl", &config.lease_ttl) < 0) ||
        (soft && kvpy_seconds(soft, "soft_pin_ttl", &config.soft_pin_ttl) < 0) ||
        (watermark && kvpy_number(watermark, "eviction_high_watermark", "a number", &config.eviction_high_watermark) < 0) ||
        (ratio && kvpy_number(ratio, "eviction_ratio", "a number", &config.eviction_ratio) < 0))
        return -1;
    if (store_can_create(self, size) < 0) return -1;
    kv_store *s = NULL;
    int32_t st;
    Py_BEGIN_ALLOW_THREADS st = kv_store_create((uint64_t)size, create_flags(prefault, pin, checksum), &config, &s);
    Py_END_ALLOW_THREADS return store_adopt(self, st, s);
}

/* _connect(url, segment_size, prefault, pin_memory, token, checksum, segment_file, disk_path,
 * disk_size, disk_admission): makes an uninitialised store a client of the master at url
 * (Store.connect). token None or "": none; segment_file None: new memory; disk_path None: no
 * disk tier. */
static PyObject *store_connect(StoreObject *self, PyObject *args) {
    const char *url, *token = NULL, *file = NULL, *disk_path = NULL;
    long long size = 0, disk_size = 0;
    int disk_admission = 0;
    PyObject *prefault_obj, *pin_obj, *checksum_obj = Py_False;
    int prefault = 0, pin = 1, checksum = 0;
    if (!PyArg_ParseTuple(args, "sLOOz|OzzLi", &url, &size, &prefault_obj, &pin_obj, &token, &checksum_obj, &file, &disk_path, &disk_size, &disk_admission))
        return NULL;
    if (kvpy_flag(prefault_obj, "prefault", &prefault) < 0 || kvpy_flag(pin_obj, "pin_memory", &pin) < 0 || kvpy_flag(checksum_obj, "checksum", &checksum) < 0)
        return NULL;
    if (store_can_create(self, size) < 0) return NULL;
    kv_store *s = NULL;
    int32_t st;
    uint32_t flags = create_flags(prefault, pin, checksum);
    kv_store_config config;
    kv_store_config_init(&config);
    if (disk_path) {
        if (disk_size <= 0) {
            kvpy_raise(KV_E_INVALID_ARGUMENT, "disk_size must be positive with disk_path");
            return NULL;
        }
        config.disk_path = disk_path;
        config.disk_size = (uint64_t)disk_size;
        config.disk_admission = (uint32_t)disk_admission;
    }
    Py_BEGIN_ALLOW_THREADS st = kv_store_connect_config(url, file, (uint64_t)size, flags, token, &config, &s);
    Py_END_ALLOW_THREADS if (store_adopt(self, st, s) < 0) return NULL;
    Py_RETURN_NONE;
}

static void store_close_impl(StoreObject *self) {
    if (self->store) {
        Py_BEGIN_ALLOW_THREADS kv_store_close(self->store);
        Py_END_ALLOW_THREADS
    }
    if (self->registered) PyDict_Clear(self->registered);
}

static void store_dealloc(StoreObject *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    store_close_impl(self);
    if (self->store) kv_store_destroy(self->store);
    self->store = NULL;
    Py_CLEAR(self->registered);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *store_close(StoreObject *self, PyObject *unused) {
    (void)unused;
    store_close_impl(self);
    Py_RETURN_NONE;
}

static PyObject *store_get_closed(StoreObject *self, void *unused) {
    (void)unused;
    return PyBool_FromLong(self->store == NULL || kv_store_is_closed(self->store));
}

static PyObject *store_stats(StoreObject *self, PyObject *unused) {
    (void)unused;
    ENSURE_OPEN(self);
    kv_stat stats[128];
    size_t n;
    RUN_UNLOCKED(self, 0, n = kv_stats(self->store, stats, 128));
    if (n > 128) n = 128;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLongLong(stats[i].value);
        if (!v || PyDict_SetItemString(d, stats[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

/* ---- single-object writes ---- */

/* Writes the collected buffers as one object and releases them. Raw (address, length) parts
 * make the core find their device; buffer-protocol parts are host memory. */
static PyObject *put_buffers(StoreObject *self, const char *k, Py_ssize_t klen, kvpy_buffers *b, uint32_t flags, const kv_put_options *options) {
    if (b->raw == 0) flags |= KV_HOST_MEMORY;
    int32_t st;
    RUN_UNLOCKED(self, kvpy_buffers_bytes(b, 0, b->count), st = kv_put(self->store, k, (size_t)klen, b->parts, (size_t)b->count, flags, options));
    kvpy_buffers_release(b);
    if (st) return kvpy_raise_last(st);
    Py_RETURN_NONE;
}

/* A write method's arguments: nargs positional (min..max), then keyword options. */
static int write_args(const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t min, Py_ssize_t max, kv_put_options *options) {
    if (check_nargs(name, nargs, min, max) < 0) return -1;
    return kvpy_put_options(name, args + nargs, kwnames, options);
}

static PyObject *put_impl(StoreObject *self, PyObject *key, PyObject *const *parts, Py_ssize_t nparts, uint32_t flags, const kv_put_options *options) {
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, key, &k, &klen) < 0) return NULL;
    kvpy_buffers b;
    kvpy_buffers_init(&b);
    for (Py_ssize_t i = 0; i < nparts; i++) {
        if (kvpy_buffers_add(&b, parts[i], 0, 0) < 0) {
            kvpy_buffers_release(&b);
            return NULL;
        }
    }
    return put_buffers(self, k, klen, &b, flags, options);
}

/* _put_raw(key, parts: list, upsert, **options) */
static PyObject *store_put_raw(StoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    kv_put_options o;
    if (write_args("_put_raw", args, nargs, kwnames, 3, 3, &o) < 0) return NULL;
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, args[0], &k, &klen) < 0) return NULL;
    int upsert = PyObject_IsTrue(args[2]);
    if (upsert < 0) return NULL;
    kvpy_buffers b;
    kvpy_buffers_init(&b);
    if (kvpy_buffers_add_raw_list(&b, args[1], 0) < 0) {
        kvpy_buffers_release(&b);
        return NULL;
    }
    return put_buffers(self, k, klen, &b, upsert ? KV_UPSERT : KV_PUT, &o);
}

/* The single-object writes: name, positional count (PY_SSIZE_T_MAX: key then any parts), mode. */
#define SINGLE_WRITE(fn, name, max, flags)                                                               \
    static PyObject *fn(StoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) { \
        kv_put_options o;                                                                                \
        if (write_args(name, args, nargs, kwnames, (max) == 2 ? 2 : 1, max, &o) < 0) return NULL;        \
        return put_impl(self, args[0], args + 1, nargs - 1, flags, &o);                                  \
    }
SINGLE_WRITE(store_put, "put", 2, KV_PUT)
SINGLE_WRITE(store_upsert, "upsert", 2, KV_UPSERT)
SINGLE_WRITE(store_put_from, "put_from", 2, KV_PUT)
SINGLE_WRITE(store_upsert_from, "upsert_from", 2, KV_UPSERT)
SINGLE_WRITE(store_put_parts, "put_parts", PY_SSIZE_T_MAX, KV_PUT)
SINGLE_WRITE(store_upsert_parts, "upsert_parts", PY_SSIZE_T_MAX, KV_UPSERT)

/* ---- batches: shared plumbing ---- */

/* Per-key state of a batch: the key (a held reference), its parts, and its outcome. */
typedef struct {
    PyObject *key; /* new reference, or NULL when the key was bad */
    const char *k;
    Py_ssize_t klen;
    Py_ssize_t first, count;
    PyObject *error; /* exception instance found while converting, or NULL */
    int32_t status;
    char *message; /* malloc'd ABI message when status != 0 */
    uint64_t value; /* bytes copied, size, or flag */
} batch_item;

static Py_ssize_t seq_len(PyObject *obj, const char *what) {
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
        kvpy_type_error(obj, what, "a list or tuple");
        return -1;
    }
    return PySequence_Size(obj);
}

/* Validates the batch's lists and converts the keys. Returns the items (n of them) or NULL. */
static batch_item *batch_begin(PyObject *keys, PyObject *second, const char *second_name, Py_ssize_t *n_out) {
    Py_ssize_t n = seq_len(keys, "keys");
    if (n < 0) return NULL;
    if (second) {
        Py_ssize_t m = seq_len(second, second_name);
        if (m < 0) return NULL;
        if (m != n) {
            kvpy_raise_format(KV_E_INVALID_ARGUMENT, "keys and %s have different lengths (%zd and %zd)", second_name, n, m);
            return NULL;
        }
    }
    batch_item *items = PyMem_Calloc((size_t)(n ? n : 1), sizeof(batch_item));
    if (!items) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PySequence_GetItem(keys, i);
        if (!key) {
            items[i].error = kvpy_take_error();
            continue;
        }
        if (kvpy_key(key, &items[i].k, &items[i].klen) < 0) {
            items[i].error = kvpy_take_error();
            Py_DECREF(key);
            continue;
        }
        items[i].key = key;
    }
    *n_out = n;
    return items;
}

/* The converted keys of a batch's items into ks, and each one's item index into index;
 * returns how many. */
static size_t batch_keys(const batch_item *items, Py_ssize_t n, kv_key *ks, Py_ssize_t *index) {
    size_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!items[i].key) continue;
        ks[m] = (kv_key){items[i].k, (size_t)items[i].klen};
        index[m++] = i;
    }
    return m;
}

static void batch_record_failure(batch_item *it, int32_t st) {
    it->status = st;
    if (st) {
        const char *m = kv_last_error(NULL);
        it->message = strdup(m ? m : "");
    }
}

/* The error of item i as an exception instance (new reference), or NULL if it succeeded. */
static PyObject *batch_error(batch_item *it) {
    if (it->error) {
        Py_INCREF(it->error);
        return it->error;
    }
    if (it->status) {
        PyObject *e = kvpy_error_object(it->status, it->message ? it->message : "");
        if (!e) e = kvpy_take_error();
        return e;
    }
    return NULL;
}

static void batch_end(batch_item *items, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(items[i].key);
        Py_XDECREF(items[i].error);
        free(items[i].message);
    }
    PyMem_Free(items);
}

/* Builds the result list: the error instance, or ok(item) for items that succeeded. */
static PyObject *batch_results(batch_item *items, Py_ssize_t n, PyObject *(*ok)(batch_item *)) {
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = batch_error(&items[i]);
        if (!r) r = ok(&items[i]);
        if (!r) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SetItem(list, i, r);
    }
    return list;
}

static PyObject *ok_none(batch_item *it) {
    (void)it;
    Py_RETURN_NONE;
}
static PyObject *ok_value(batch_item *it) { return PyLong_FromUnsignedLongLong(it->value); }
static PyObject *ok_bool(batch_item *it) { return PyBool_FromLong(it->value != 0); }

/* Collects the buffers of every item with a good key into b: each item's value is a buffer or
 * a list or tuple of buffers, or with `raw` a list of buffers and (address, length) parts. An
 * item whose buffers are bad gets its error. */
static void batch_buffers(batch_item *items, Py_ssize_t n, PyObject *seq, int writable, int raw, kvpy_buffers *b) {
    kvpy_buffers_init(b);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!items[i].key) continue;
        PyObject *v = PySequence_GetItem(seq, i);
        Py_ssize_t added = !v ? -1 : raw ? kvpy_buffers_add_raw_list(b, v, writable) : kvpy_buffers_add(b, v, writable, 1);
        Py_XDECREF(v);
        if (added < 0) {
            items[i].error = kvpy_take_error();
            continue;
        }
        items[i].first = b->count - added;
        items[i].count = added;
    }
}

/* Runs the items whose conversion succeeded as one kv_batch_put (or, with `get`, one
 * kv_batch_get_into): the core plans every copy and runs them grouped per device. Records
 * each item's status, message and size. Returns 0, or -1 with an error set when the call
 * itself failed. */
static int run_batch(StoreObject *self, batch_item *items, Py_ssize_t n, const kvpy_buffers *b, int get, uint32_t flags, const kv_put_options *options) {
    size_t cap = (size_t)(n ? n : 1);
    Py_ssize_t *index = PyMem_Calloc(cap, sizeof *index);
    int32_t *statuses = PyMem_Calloc(cap, sizeof *statuses);
    uint64_t *sizes = PyMem_Calloc(cap, sizeof *sizes);
    kv_batch_put_item *puts = get ? NULL : PyMem_Calloc(cap, sizeof *puts);
    kv_batch_get_item *gets = get ? PyMem_Calloc(cap, sizeof *gets) : NULL;
    int rc = -1;
    if (!index || !statuses || !sizes || (!puts && !gets)) {
        PyErr_NoMemory();
        goto done;
    }
    if (b->raw == 0) flags |= KV_HOST_MEMORY;
    size_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        batch_item *it = &items[i];
        if (!it->key || it->error) continue;
        if (get)
            gets[m] = (kv_batch_get_item){it->k, (size_t)it->klen, (const kv_mut_buffer *)(b->parts + it->first), (size_t)it->count};
        else
            puts[m] = (kv_batch_put_item){it->k, (size_t)it->klen, b->parts + it->first, (size_t)it->count};
        index[m++] = i;
    }
    int32_t st;
    RUN_UNLOCKED(self, kvpy_buffers_bytes(b, 0, b->count),
                 st = get ? kv_batch_get_into(self->store, gets, m, flags, statuses, sizes) : kv_batch_put(self->store, puts, m, flags, options, statuses));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    for (size_t j = 0; j < m; j++) {
        batch_item *it = &items[index[j]];
        it->status = statuses[j];
        it->value = sizes[j];
        if (statuses[j]) it->message = strdup(kv_batch_error(j, NULL));
    }
    rc = 0;
done:
    PyMem_Free(index);
    PyMem_Free(statuses);
    PyMem_Free(sizes);
    PyMem_Free(puts);
    PyMem_Free(gets);
    return rc;
}

/* A whole batch call: convert keys and buffers, run, build the per-key results. */
static PyObject *batch_call(StoreObject *self, PyObject *keys, PyObject *values, const char *values_name, int get, int raw, uint32_t flags,
                            const kv_put_options *options, PyObject *(*ok)(batch_item *)) {
    ENSURE_OPEN(self);
    Py_ssize_t n;
    batch_item *items = batch_begin(keys, values, values_name, &n);
    if (!items) return NULL;
    kvpy_buffers b;
    batch_buffers(items, n, values, get, raw, &b);
    PyObject *r = run_batch(self, items, n, &b, get, flags, options) < 0 ? NULL : batch_results(items, n, ok);
    kvpy_buffers_release(&b);
    batch_end(items, n);
    return r;
}

/* ---- batch writes ---- */

#define BATCH_WRITE(fn, name, second_name, flags)                                                        \
    static PyObject *fn(StoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) { \
        kv_put_options o;                                                                                \
        if (write_args(name, args, nargs, kwnames, 2, 2, &o) < 0) return NULL;                           \
        return batch_call(self, args[0], args[1], second_name, 0, 0, flags, &o, ok_none);                \
    }
BATCH_WRITE(store_put_batch, "put_batch", "values", KV_PUT)
BATCH_WRITE(store_upsert_batch, "upsert_batch", "values", KV_UPSERT)
BATCH_WRITE(store_batch_put_from, "batch_put_from", "buffers", KV_PUT)
BATCH_WRITE(store_batch_upsert_from, "batch_upsert_from", "buffer_lists", KV_UPSERT)

/* _batch_put_raw(keys, part_lists, upsert, **options) -> [None | exception] */
static PyObject *store_batch_put_raw(StoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    kv_put_options o;
    if (write_args("_batch_put_raw", args, nargs, kwnames, 3, 3, &o) < 0) return NULL;
    int upsert = PyObject_IsTrue(args[2]);
    if (upsert < 0) return NULL;
    return batch_call(self, args[0], args[1], "part_lists", 0, 1, upsert ? KV_UPSERT : KV_PUT, &o, ok_none);
}

/* _batch_flat(keys, addresses, lengths, op, **options) -> [size | None | exception]: one object
 * per key at one (address, length) of memory on any device (Mooncake's batch_put_from /
 * batch_get_into with integer addresses), converted here without a Python object per part.
 * op: 0 get (the bytes read per key), 1 put, 2 upsert. */
static PyObject *store_batch_flat(StoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    kv_put_options o;
    if (write_args("_batch_flat", args, nargs, kwnames, 4, 4, &o) < 0) return NULL;
    long op = PyLong_AsLong(args[3]);
    if (op == -1 && PyErr_Occurred()) return NULL;
    if (op < 0 || op > 2) return kvpy_raise(KV_E_INVALID_ARGUMENT, "op must be 0 (get), 1 (put) or 2 (upsert)");
    ENSURE_OPEN(self);
    Py_ssize_t n;
    batch_item *items = batch_begin(args[0], args[1], "addresses", &n);
    if (!items) return NULL;
    if (seq_len(args[2], "lengths") != n) {
        if (!PyErr_Occurred()) kvpy_raise(KV_E_INVALID_ARGUMENT, "keys, addresses and lengths differ in length");
        batch_end(items, n);
        return NULL;
    }
    kvpy_buffers b;
    kvpy_buffers_init(&b);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!items[i].key) continue;
        PyObject *a = PySequence_GetItem(args[1], i), *l = a ? PySequence_GetItem(args[2], i) : NULL;
        int r = l ? kvpy_buffers_add_raw(&b, a, l) : -1;
        Py_XDECREF(a);
        Py_XDECREF(l);
        if (r < 0) {
            items[i].error = kvpy_take_error();
            continue;
        }
        items[i].first = b.count - 1;
        items[i].count = 1;
    }
    PyObject *r = NULL;
    if (n == 1 && items[0].key && !items[0].error) {
        /* One object: kv_get_into / kv_put, without the batch machinery (about 3 us of a 30 us
         * 1 MiB get). */
        uint32_t flags = 0; /* raw addresses: the core finds their device (registered memory: at once) */
        int32_t st;
        uint64_t copied = 0;
        RUN_UNLOCKED(self, b.parts[0].len,
                     st = op == 0 ? kv_get_into(self->store, items[0].k, (size_t)items[0].klen, (const kv_mut_buffer *)b.parts, 1, flags, &copied)
                                  : kv_put(self->store, items[0].k, (size_t)items[0].klen, b.parts, 1, flags | (op == 2 ? KV_UPSERT : KV_PUT), &o));
        items[0].value = copied;
        if (st) batch_record_failure(&items[0], st);
        r = batch_results(items, n, op == 0 ? ok_value : ok_none);
    } else if (run_batch(self, items, n, &b, op == 0, op == 2 ? KV_UPSERT : KV_PUT, &o) == 0) {
        r = batch_results(items, n, op == 0 ? ok_value : ok_none);
    }
    kvpy_buffers_release(&b);
    batch_end(items, n);
    return r;
}

/* _get_into_addr(key, address, length) -> bytes read: get_into at an integer address (memory on
 * any device; Mooncake's get_into), with no list or batch around it; raises on failure. */
static PyObject *store_get_into_addr(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("_get_into_addr", nargs, 3, 3) < 0) return NULL;
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, args[0], &k, &klen) < 0) return NULL;
    PyObject *pair = PyTuple_Pack(2, args[1], args[2]);
    if (!pair) return NULL;
    kv_mut_buffer dst;
    int r = kvpy_raw_part(pair, &dst.ptr, &dst.len, NULL);
    Py_DECREF(pair);
    if (r < 0) return NULL;
    if (r == 0) return kvpy_type_error(args[1], "address and length", "ints");
    uint64_t copied = 0;
    int32_t st;
    RUN_UNLOCKED(self, dst.len, st = kv_get_into(self->store, k, (size_t)klen, &dst, 1, 0, &copied));
    if (st) return kvpy_raise_last(st);
    return PyLong_FromUnsignedLongLong(copied);
}

/* ---- writes in pieces (sessions) ---- */

static int convert_range_lists(PyObject *lists, Py_ssize_t n, batch_item *items, kv_range **out, size_t *total, uint64_t *bytes);
static PyObject *range_results(const batch_item *it, const kv_range *ranges, const int32_t *statuses, size_t first, Py_ssize_t count);
static PyObject *all_range_results(const batch_item *items, Py_ssize_t n, const kv_range *ranges, const int32_t *statuses);

/* An int list of n (ids) as uint64s into out; -1 with an error set. */
static int ids_arg(PyObject *seq, const char *what, uint64_t *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PySequence_GetItem(seq, i);
        if (!v) return -1;
        unsigned long long id = PyLong_Check(v) ? PyLong_AsUnsignedLongLong(v) : (unsigned long long)-1;
        Py_DECREF(v);
        if (PyErr_Occurred() || id == (unsigned long long)-1) {
            PyErr_Clear();
            kvpy_raise_format(KV_E_INVALID_ARGUMENT, "%s must be a list of write ids", what);
            return -1;
        }
        out[i] = id;
    }
    return 0;
}

/* The outcome list of a session call: ok(i) for a success, else the error of status i. */
static PyObject *statuses_list(const int32_t *statuses, Py_ssize_t n, const batch_item *items, PyObject *(*ok)(Py_ssize_t, void *), void *ctx) {
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        PyObject *v;
        if (items && items[i].error) {
            v = items[i].error;
            Py_INCREF(v);
        } else if (statuses[i]) {
            v = kvpy_error_object(statuses[i], kv_batch_error((size_t)i, NULL));
            if (!v) v = kvpy_take_error();
        } else
            v = ok(i, ctx);
        if (!v) {
            Py_CLEAR(list);
            break;
        }
        PyList_SetItem(list, i, v);
    }
    return list;
}

static PyObject *ok_id(Py_ssize_t i, void *ctx) { return PyLong_FromUnsignedLongLong(((uint64_t *)ctx)[i]); }
static PyObject *ok_nothing(Py_ssize_t i, void *ctx) {
    (void)i;
    (void)ctx;
    Py_RETURN_NONE;
}

/* _write_begin(keys, sizes, upsert, **options) -> [id | exception]: reserves each object's
 * space; nothing is visible until _write_end. */
static PyObject *store_write_begin(StoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    kv_put_options o;
    if (write_args("_write_begin", args, nargs, kwnames, 3, 3, &o) < 0) return NULL;
    int upsert = PyObject_IsTrue(args[2]);
    if (upsert < 0) return NULL;
    ENSURE_OPEN(self);
    Py_ssize_t n;
    batch_item *items = batch_begin(args[0], args[1], "sizes", &n);
    if (!items) return NULL;
    PyObject *result = NULL;
    kv_write_item *wi = PyMem_Calloc((size_t)(n ? n : 1), sizeof *wi);
    uint64_t *ids = PyMem_Calloc((size_t)(n ? n : 1), sizeof *ids);
    int32_t *statuses = PyMem_Calloc((size_t)(n ? n : 1), sizeof *statuses);
    if (!wi || !ids || !statuses) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PySequence_GetItem(args[1], i);
        if (!v) goto done;
        long long size = PyLong_Check(v) ? PyLong_AsLongLong(v) : -1;
        Py_DECREF(v);
        if (PyErr_Occurred() || size < 0) {
            PyErr_Clear();
            kvpy_raise(KV_E_INVALID_ARGUMENT, "sizes must be non-negative ints");
            goto done;
        }
        wi[i] = (kv_write_item){items[i].k, (size_t)items[i].klen, (uint64_t)size};
    }
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_batch_write_begin(self->store, wi, (size_t)n, upsert ? KV_UPSERT : KV_PUT, &o, ids, statuses));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    result = statuses_list(statuses, n, items, ok_id, ids);
    /* a write begun for a key whose Python conversion failed cannot happen: its key was NULL */
done:
    PyMem_Free(wi);
    PyMem_Free(ids);
    PyMem_Free(statuses);
    batch_end(items, n);
    return result;
}

/* _write_ranges(ids, range_lists, host=False) -> [[length | exception] | total]: range_lists[i]
 * lists (address, offset, length) triples (or packs them, as _read_ranges) copying length
 * bytes at the address to [offset, offset+length) of open write ids[i]. */
static PyObject *store_write_ranges(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("_write_ranges", nargs, 2, 3) < 0) return NULL;
    int host = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (host < 0) return NULL;
    ENSURE_OPEN(self);
    Py_ssize_t n = seq_len(args[0], "ids");
    if (n < 0) return NULL;
    if (seq_len(args[1], "range_lists") != n) {
        if (!PyErr_Occurred()) kvpy_raise(KV_E_INVALID_ARGUMENT, "ids and range_lists have different lengths");
        return NULL;
    }
    PyObject *result = NULL;
    size_t total = 0;
    uint64_t bytes = 0;
    batch_item *items = PyMem_Calloc((size_t)(n ? n : 1), sizeof *items); /* first/count/value per write */
    uint64_t *ids = PyMem_Calloc((size_t)(n ? n : 1), sizeof *ids);
    kv_write_ranges_item *wr = PyMem_Calloc((size_t)(n ? n : 1), sizeof *wr);
    kv_range *ranges = NULL;
    int32_t *statuses = NULL;
    if (!items || !ids || !wr) {
        PyErr_NoMemory();
        goto done;
    }
    if (ids_arg(args[0], "ids", ids, n) < 0) goto done;
    if (convert_range_lists(args[1], n, items, &ranges, &total, &bytes) < 0) goto done;
    statuses = PyMem_Calloc(total ? total : 1, sizeof *statuses);
    if (!statuses) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) wr[i] = (kv_write_ranges_item){ids[i], ranges + items[i].first, (size_t)items[i].count};
    int32_t st;
    RUN_UNLOCKED(self, bytes, st = kv_batch_write_ranges(self->store, wr, (size_t)n, host ? KV_HOST_MEMORY : 0, statuses));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    result = all_range_results(items, n, ranges, statuses);
done:
    PyMem_Free(items);
    PyMem_Free(ids);
    PyMem_Free(wr);
    PyMem_Free(ranges);
    PyMem_Free(statuses);
    return result;
}

/* _write_end(ids, abort=False) -> [None | exception]: commits open writes (visible from now)
 * or frees their space. */
static PyObject *store_write_end(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("_write_end", nargs, 1, 2) < 0) return NULL;
    int abort_ = nargs == 2 ? PyObject_IsTrue(args[1]) : 0;
    if (abort_ < 0) return NULL;
    ENSURE_OPEN(self);
    Py_ssize_t n = seq_len(args[0], "ids");
    if (n < 0) return NULL;
    PyObject *result = NULL;
    uint64_t *ids = PyMem_Calloc((size_t)(n ? n : 1), sizeof *ids);
    int32_t *statuses = PyMem_Calloc((size_t)(n ? n : 1), sizeof *statuses);
    if (!ids || !statuses) {
        PyErr_NoMemory();
        goto done;
    }
    if (ids_arg(args[0], "ids", ids, n) < 0) goto done;
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_batch_write_end(self->store, ids, (size_t)n, abort_ ? KV_WRITE_ABORT : 0, statuses));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    result = statuses_list(statuses, n, NULL, ok_nothing, NULL);
done:
    PyMem_Free(ids);
    PyMem_Free(statuses);
    return result;
}

/* ---- the wait hooks ---- */

/* Per thread: whether the running ABI call kept the GIL, and the thread state once a wait
 * inside it released the GIL. The rest of such a call runs without the GIL (the ABI never
 * touches Python objects; the buffers it writes are held by the caller), and the GIL is
 * taken back when the call returns: taking it back inside the call, holding the core's locks,
 * would make every other thread's call wait for those locks without the GIL, and so on. */
static _Thread_local int keeping_gil;
static _Thread_local PyThreadState *released;

void kvpy_keep_gil_begin(void) { keeping_gil = 1; }

void kvpy_keep_gil_end(void) {
    keeping_gil = 0;
    if (released) {
        PyEval_RestoreThread(released);
        released = NULL;
    }
}

static void wait_begins(void) {
    if (keeping_gil && !released) released = PyEval_SaveThread();
}

static void wait_ends(void) {}

void kvpy_install_wait_hooks(void) { kv_set_wait_hooks(wait_begins, wait_ends); }

/* ---- reads ---- */

/* Takes a read hold; waits (GIL released) while an in-place upsert rewrites the object. */
int32_t kvpy_read_begin(StoreObject *self, const char *k, Py_ssize_t klen, kv_read *hold) {
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_read_begin(self->store, k, (size_t)klen, KV_READ_NOWAIT, hold));
    if (st == KV_BUSY) {
        Py_BEGIN_ALLOW_THREADS st = kv_read_begin(self->store, k, (size_t)klen, KV_READ_WAIT, hold);
        Py_END_ALLOW_THREADS
    }
    return st;
}

/* How many times a read whose copy outlived its lease (KV_STALE) begins again before it fails. */
#define STALE_RETRIES 3

/* Whether a failed copy of one replica may succeed from another (a hold names one replica;
 * kv_get_into tries them all). */
#define REPLICA_FAILURE(st) ((st) == KV_E_CHECKSUM || (st) == KV_E_TRANSFER)

/* Object k as new bytes. NULL: with a Python error set, or, when the hold could not be taken,
 * with no error set and *begin_status the status (so a batch can tell a missing key). A copy
 * that outlived its lease is thrown away and the read begins again; a copy whose replica
 * failed (a dead holder, a checksum mismatch) is read again through kv_get_into, which tries
 * every replica. */
/* A new object of `size` writable bytes to read into: bytes when make is NULL, else
 * make(size), which must return an object exposing at least `size` writable, C-contiguous
 * bytes whose memory stays put while it lives (a numpy array, a bytearray never resized). */
static PyObject *new_value(PyObject *make, uint64_t size, void **ptr) {
    if (!make) {
        PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
        if (bytes) *ptr = PyBytes_AsString(bytes);
        return bytes;
    }
    if (make == kvpy_buffer_type) return kvpy_buffer_new(size, ptr);
    PyObject *value = PyObject_CallFunction(make, "K", (unsigned long long)size);
    if (!value) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(value, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(value);
        return NULL;
    }
    int small = (uint64_t)view.len < size;
    *ptr = view.buf;
    PyBuffer_Release(&view);
    if (small) {
        Py_DECREF(value);
        return kvpy_raise(KV_E_INVALID_ARGUMENT, "make(size) returned a buffer smaller than size");
    }
    return value;
}

/* The value of k when a hold cannot be had because the object is on the disk tier and the
 * segment cannot take it back (everything there leased or pinned): kv_get_into reads the
 * disk copy straight into the new value. */
static PyObject *read_from_disk_tier(StoreObject *self, const char *k, Py_ssize_t klen, PyObject *make, int32_t *begin_status) {
    uint64_t size = 0, copied = 0;
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_size(self->store, k, (size_t)klen, &size));
    if (st == KV_E_OBJECT_NOT_FOUND) {
        *begin_status = st;
        return NULL;
    }
    if (st) return kvpy_raise_last(st);
    void *ptr = NULL;
    PyObject *value = new_value(make, size, &ptr);
    if (!value) return NULL;
    kv_mut_buffer dst = {ptr, (size_t)size};
    RUN_UNLOCKED(self, size, st = kv_get_into(self->store, k, (size_t)klen, &dst, 1, KV_HOST_MEMORY, &copied));
    if (st == 0 && copied == size) return value;
    Py_DECREF(value);
    if (st == KV_E_OBJECT_NOT_FOUND) {
        *begin_status = st;
        return NULL;
    }
    return st ? kvpy_raise_last(st) : kvpy_raise(KV_E_TRANSFER, "the object changed size while it was read");
}

static PyObject *read_key_value(StoreObject *self, const char *k, Py_ssize_t klen, PyObject *make, int32_t *begin_status) {
    *begin_status = 0;
    for (int tries = 0;; tries++) {
        kv_read hold;
        int32_t st = read_begin(self, k, klen, &hold);
        if (st == KV_E_NO_SPACE) return read_from_disk_tier(self, k, klen, make, begin_status);
        if (st) {
            *begin_status = st;
            return NULL;
        }
        void *ptr = NULL;
        PyObject *bytes = new_value(make, hold.size, &ptr);
        if (!bytes) {
            kvpy_read_end(self, &hold);
            return NULL;
        }
        kv_mut_buffer dst = {ptr, (size_t)hold.size};
        RUN_UNLOCKED(self, hold.size, st = kv_read_copy(self->store, &hold, &dst, 1, KV_HOST_MEMORY, NULL));
        if (st == 0) {
            kvpy_read_end(self, &hold);
            return bytes;
        }
        if (REPLICA_FAILURE(st)) {
            kvpy_read_end(self, &hold);
            uint64_t copied = 0;
            RUN_UNLOCKED(self, hold.size, st = kv_get_into(self->store, k, (size_t)klen, &dst, 1, KV_HOST_MEMORY, &copied));
            if (st == 0 && copied == hold.size) return bytes;
            if (st == 0) { /* replaced meanwhile by a shorter value */
                void *to = NULL;
                PyObject *shorter = new_value(make, copied, &to);
                if (shorter) memcpy(to, ptr, (size_t)copied);
                Py_DECREF(bytes);
                return shorter;
            }
            Py_DECREF(bytes);
            if (st == KV_E_INVALID_ARGUMENT && tries < STALE_RETRIES) continue; /* replaced by a longer one */
            if (st == KV_E_OBJECT_NOT_FOUND) {
                *begin_status = st;
                return NULL;
            }
            return kvpy_raise_last(st);
        }
        Py_DECREF(bytes);
        if (st == KV_STALE && tries < STALE_RETRIES) {
            kvpy_read_end(self, &hold);
            continue;
        }
        kvpy_raise_last(st == KV_STALE ? KV_E_TRANSFER : st); /* before kv_read_end: its message */
        kvpy_read_end(self, &hold);
        return NULL;
    }
}

static PyObject *store_get(StoreObject *self, PyObject *key) {
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, key, &k, &klen) < 0) return NULL;
    int32_t st;
    PyObject *bytes = read_key_value(self, k, klen, NULL, &st);
    return bytes || !st ? bytes : kvpy_raise_last(st);
}

static PyObject *store_get_into(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("get_into", nargs, 2, 2) < 0) return NULL;
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, args[0], &k, &klen) < 0) return NULL;
    Py_buffer view;
    if (kvpy_target(args[1], &view) < 0) return NULL;
    kv_mut_buffer dst = {view.buf, (size_t)view.len};
    uint64_t copied = 0;
    int32_t st;
    RUN_UNLOCKED(self, (size_t)view.len, st = kv_get_into(self->store, k, (size_t)klen, &dst, 1, KV_HOST_MEMORY, &copied));
    PyBuffer_Release(&view);
    if (st) return kvpy_raise_last(st);
    return PyLong_FromUnsignedLongLong(copied);
}

#define READ_CHUNK 4096

/* get_batch(keys): holds on every key in one kv_batch_read_begin (one master request per
 * chunk), then each object copied into new bytes; a copy that outlived its lease is read
 * again on its own. A missing key gives None. */
static PyObject *get_batch(StoreObject *self, PyObject *keys, PyObject *make) {
    ENSURE_OPEN(self);
    Py_ssize_t n;
    batch_item *items = batch_begin(keys, NULL, NULL, &n);
    if (!items) return NULL;
    PyObject *list = NULL;
    size_t cap = (size_t)(n ? n : 1), m = 0;
    kv_key *ks = PyMem_Calloc(cap, sizeof *ks);
    Py_ssize_t *index = PyMem_Calloc(cap, sizeof *index);
    int32_t *statuses = PyMem_Calloc(cap, sizeof *statuses);
    kv_read *holds = PyMem_Calloc(cap, sizeof *holds);
    if (!ks || !index || !statuses || !holds) {
        PyErr_NoMemory();
        goto done;
    }
    m = batch_keys(items, n, ks, index);
    PyObject **values = PyMem_Calloc(cap, sizeof *values); /* the bytes of each held key */
    if (!values) {
        PyErr_NoMemory();
        goto done;
    }
    /* Chunk by chunk, so a batch of any length holds at most READ_CHUNK objects at a time (a
     * cluster master limits the reads one client has in flight). */
    for (size_t base = 0; base < m; base += READ_CHUNK) {
        size_t cn = m - base < READ_CHUNK ? m - base : READ_CHUNK;
        int32_t st;
        RUN_UNLOCKED(self, 0, st = kv_batch_read_begin(self->store, ks + base, cn, holds + base, statuses + base));
        if (st) {
            kvpy_raise_last(st);
            goto free_values;
        }
        for (size_t j = base; j < base + cn; j++) {
            batch_item *it = &items[index[j]];
            if (statuses[j]) {
                if (statuses[j] != KV_E_OBJECT_NOT_FOUND) {
                    it->status = statuses[j];
                    it->message = strdup(kv_batch_error(j - base, NULL));
                }
                continue;
            }
            void *ptr = NULL;
            PyObject *bytes = new_value(make, holds[j].size, &ptr);
            if (!bytes) {
                it->error = kvpy_take_error();
                kvpy_read_end(self, &holds[j]);
                statuses[j] = -1;
                continue;
            }
            kv_mut_buffer dst = {ptr, (size_t)holds[j].size};
            RUN_UNLOCKED(self, holds[j].size, st = kv_read_copy(self->store, &holds[j], &dst, 1, KV_HOST_MEMORY, NULL));
            if (st == 0)
                values[j] = bytes;
            else {
                Py_DECREF(bytes);
                if (st != KV_STALE && !REPLICA_FAILURE(st)) {
                    it->status = st;
                    it->message = strdup(kv_last_error(NULL));
                } else
                    statuses[j] = KV_STALE; /* read again below, once its hold ended (every replica) */
            }
            kvpy_read_end(self, &holds[j]);
        }
    }
    for (size_t j = 0; j < m; j++) {
        batch_item *it = &items[index[j]];
        if (statuses[j] != KV_STALE) continue;
        int32_t bst;
        values[j] = read_key_value(self, it->k, it->klen, make, &bst);
        if (!values[j] && bst == KV_E_OBJECT_NOT_FOUND)
            statuses[j] = KV_E_OBJECT_NOT_FOUND;
        else if (!values[j] && bst) {
            it->status = bst;
            it->message = strdup(kv_last_error(NULL));
        } else if (!values[j])
            it->error = kvpy_take_error();
    }
    /* Each item: its bytes, None when missing, or its error. */
    list = PyList_New(n);
    for (Py_ssize_t i = 0; i < n && list; i++) {
        PyObject *e = batch_error(&items[i]);
        if (e) {
            PyList_SetItem(list, i, e);
            continue;
        }
        Py_INCREF(Py_None);
        PyList_SetItem(list, i, Py_None);
    }
    for (size_t j = 0; j < m && list; j++) {
        if (values[j]) {
            PyList_SetItem(list, index[j], values[j]);
            values[j] = NULL;
        }
    }
free_values:
    for (size_t j = 0; j < m; j++) Py_XDECREF(values[j]);
    PyMem_Free(values);
done:
    PyMem_Free(ks);
    PyMem_Free(index);
    PyMem_Free(statuses);
    PyMem_Free(holds);
    batch_end(items, n);
    return list;
}

static PyObject *store_get_batch(StoreObject *self, PyObject *keys) { return get_batch(self, keys, NULL); }

/* _get_batch_new(keys, make): get_batch whose values are make(size) objects (see new_value). */
static PyObject *store_get_batch_new(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("_get_batch_new", nargs, 2, 2) < 0) return NULL;
    if (!PyCallable_Check(args[1])) return kvpy_type_error(args[1], "make", "a callable");
    return get_batch(self, args[0], args[1]);
}

/* One ranged read's item result: a list with, per range, its length or its exception. */
static PyObject *range_results(const batch_item *it, const kv_range *ranges, const int32_t *statuses, size_t first, Py_ssize_t count) {
    if (it->value && !it->error) { /* a packed range list that all succeeded: its total */
        uint64_t total = 0;
        Py_ssize_t r = 0;
        for (; r < count && !statuses[first + (size_t)r]; r++) total += ranges[first + (size_t)r].length;
        if (r == count) return PyLong_FromUnsignedLongLong(total);
    }
    PyObject *list = PyList_New(count);
    for (Py_ssize_t r = 0; list && r < count; r++) {
        size_t j = first + (size_t)r;
        PyObject *v;
        if (it->error) {
            v = it->error;
            Py_INCREF(v);
        } else if (statuses[j]) {
            v = kvpy_error_object(statuses[j], kv_batch_error(j, NULL));
            if (!v) v = kvpy_take_error();
        } else
            v = PyLong_FromUnsignedLongLong(ranges[j].length);
        if (!v) {
            Py_CLEAR(list);
            break;
        }
        PyList_SetItem(list, r, v);
    }
    return list;
}

/* The result of a ranged call: range_results for each of its n items. */
static PyObject *all_range_results(const batch_item *items, Py_ssize_t n, const kv_range *ranges, const int32_t *statuses) {
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        PyObject *r = range_results(&items[i], ranges, statuses, (size_t)items[i].first, items[i].count);
        if (!r) {
            Py_CLEAR(list);
            break;
        }
        PyList_SetItem(list, i, r);
    }
    return list;
}

/* How many ranges a range list holds: a list or tuple of (address, offset, length) tuples, or
 * a C-contiguous buffer of native int64 triples (a numpy int64 array of shape (n, 3): plans of
 * thousands of ranges without a Python object each). -1 with an error set otherwise. */
static Py_ssize_t range_count(PyObject *lst) {
    if (PyList_Check(lst) || PyTuple_Check(lst)) return PySequence_Size(lst);
    if (!PyObject_CheckBuffer(lst)) {
        kvpy_type_error(lst, "a range list", "a list of (address, offset, length) tuples or an int64 array of triples");
        return -1;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(lst, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    int ok = v.itemsize == 8 && v.format &&
             (strcmp(v.format, "q") == 0 || strcmp(v.format, "l") == 0 || strcmp(v.format, "<q") == 0 || strcmp(v.format, "=q") == 0) && v.len % 24 == 0;
    Py_ssize_t n = v.len / 24;
    PyBuffer_Release(&v);
    if (!ok) {
        kvpy_raise(KV_E_INVALID_ARGUMENT, "a packed range list must be native int64 triples (address, offset, length)");
        return -1;
    }
    return n;
}

/* Reads `count` packed (address, offset, length) int64 triples of lst into out. */
static int range_unpack(PyObject *lst, kv_range *out, Py_ssize_t count, uint64_t *bytes) {
    Py_buffer v;
    if (PyObject_GetBuffer(lst, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    int ok = v.len == count * 24;
    const int64_t *t = v.buf;
    for (Py_ssize_t r = 0; ok && r < count; r++) {
        if (t[3 * r] < 0 || t[3 * r + 1] < 0 || t[3 * r + 2] < 0) {
            ok = 0;
            break;
        }
        out[r] = (kv_range){(uint64_t)t[3 * r + 1], (uint64_t)t[3 * r + 2], (void *)(uintptr_t)t[3 * r]};
        *bytes += (uint64_t)t[3 * r + 2];
    }
    PyBuffer_Release(&v);
    if (!ok) {
        kvpy_raise(KV_E_INVALID_ARGUMENT, "a range's address, offset and length must be non-negative");
        return -1;
    }
    return 0;
}

/* Reads range list lst (it->count ranges, see range_count) into out, adding their lengths to
 * *bytes; marks a packed list in it->value. -1 with an error set. */
static int fill_ranges(PyObject *lst, batch_item *it, kv_range *out, uint64_t *bytes) {
    if (!PyList_Check(lst) && !PyTuple_Check(lst)) { /* packed int64 triples */
        it->value = 1;
        return range_unpack(lst, out, it->count, bytes);
    }
    for (Py_ssize_t r = 0; r < it->count; r++) {
        PyObject *t = PySequence_GetItem(lst, r);
        unsigned long long off = 0, len = 0;
        void *dst = NULL;
        int ok = t && PyTuple_Check(t) && PyTuple_Size(t) == 3 && PyLong_Check(PyTuple_GetItem(t, 0)) && PyLong_Check(PyTuple_GetItem(t, 1)) &&
                 PyLong_Check(PyTuple_GetItem(t, 2));
        if (ok) {
            dst = PyLong_AsVoidPtr(PyTuple_GetItem(t, 0));
            off = PyLong_AsUnsignedLongLong(PyTuple_GetItem(t, 1));
            len = PyLong_AsUnsignedLongLong(PyTuple_GetItem(t, 2));
            if (PyErr_Occurred()) {
                PyErr_Clear();
                Py_XDECREF(t);
                kvpy_raise(KV_E_INVALID_ARGUMENT, "a range's address, offset and length must be non-negative ints that fit 64 bits");
                return -1;
            }
        }
        if (!ok) {
            if (t)
                kvpy_type_error(t, "a range", "an (address, offset, length) tuple of ints");
            else
                PyErr_Clear(), kvpy_raise(KV_E_INVALID_ARGUMENT, "a range list changed during the call");
            Py_XDECREF(t);
            return -1;
        }
        Py_DECREF(t);
        out[r] = (kv_range){off, len, dst};
        *bytes += len;
    }
    return 0;
}

/* Converts n range lists (see range_count) into *out (PyMem_Free it), recording each item's
 * first range, count and packed flag in items; *total ranges, *bytes their lengths. -1 with an
 * error set. */
static int convert_range_lists(PyObject *lists, Py_ssize_t n, batch_item *items, kv_range **out, size_t *total, uint64_t *bytes) {
    *out = NULL;
    *total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *lst = PySequence_GetItem(lists, i);
        if (!lst) return -1;
        Py_ssize_t c = range_count(lst);
        Py_DECREF(lst);
        if (c < 0) return -1;
        items[i].first = (Py_ssize_t)*total;
        items[i].count = c;
        *total += (size_t)c;
    }
    *out = PyMem_Calloc(*total ? *total : 1, sizeof **out);
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *lst = PySequence_GetItem(lists, i);
        if (!lst) return -1;
        int r = range_count(lst) != items[i].count ? -1 : fill_ranges(lst, &items[i], *out + items[i].first, bytes);
        Py_DECREF(lst);
        if (r < 0) {
            if (!PyErr_Occurred()) kvpy_raise(KV_E_INVALID_ARGUMENT, "a range list changed during the call");
            return -1;
        }
    }
    return 0;
}

/* _read_ranges(keys, range_lists, host=False) -> [[length | exception] | total]: range_lists[i]
 * lists (address, offset, length) triples (or packs them, see range_count), each copying bytes
 * [offset, offset+length) of object keys[i] to the address (memory on any device; `host`: the
 * caller vouches it is all host memory). One kv_batch_read_ranges call. A packed list whose
 * ranges all succeeded gives the bytes copied as one int. */
static PyObject *store_read_ranges(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("_read_ranges", nargs, 2, 3) < 0) return NULL;
    int host = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (host < 0) return NULL;
    ENSURE_OPEN(self);
    Py_ssize_t n;
    batch_item *items = batch_begin(args[0], args[1], "range_lists", &n);
    if (!items) return NULL;
    PyObject *result = NULL;
    kv_range_item *ris = PyMem_Calloc((size_t)(n ? n : 1), sizeof *ris);
    kv_range *ranges = NULL;
    int32_t *statuses = NULL;
    size_t total = 0;
    uint64_t bytes = 0;
    if (!ris) {
        PyErr_NoMemory();
        goto done;
    }
    if (convert_range_lists(args[1], n, items, &ranges, &total, &bytes) < 0) goto done;
    statuses = PyMem_Calloc(total ? total : 1, sizeof *statuses);
    if (!statuses) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) { ris[i] = (kv_range_item){items[i].k, (size_t)items[i].klen, ranges + items[i].first, (size_t)items[i].count}; }
    int32_t st;
    RUN_UNLOCKED(self, bytes, st = kv_batch_read_ranges(self->store, ris, (size_t)n, host ? KV_HOST_MEMORY : 0, statuses));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    result = all_range_results(items, n, ranges, statuses);
done:
    PyMem_Free(ris);
    PyMem_Free(ranges);
    PyMem_Free(statuses);
    batch_end(items, n);
    return result;
}

static PyObject *store_batch_get_into(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("batch_get_into", nargs, 2, 2) < 0) return NULL;
    return batch_call(self, args[0], args[1], "buffers", 1, 0, 0, NULL, ok_value);
}

/* _batch_get_raw(keys, part_lists) -> [size | exception]: batch_get_into whose targets are
 * buffers or (address, length) parts of memory on any device. */
static PyObject *store_batch_get_raw(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("_batch_get_raw", nargs, 2, 2) < 0) return NULL;
    return batch_call(self, args[0], args[1], "part_lists", 1, 1, 0, NULL, ok_value);
}

/* ---- queries and removal ---- */

static PyObject *store_exists(StoreObject *self, PyObject *key) {
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, key, &k, &klen) < 0) return NULL;
    int32_t out = 0, st;
    RUN_UNLOCKED(self, 0, st = kv_exists(self->store, k, (size_t)klen, &out));
    if (st) return kvpy_raise_last(st);
    return PyBool_FromLong(out);
}

static PyObject *store_size(StoreObject *self, PyObject *key) {
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, key, &k, &klen) < 0) return NULL;
    uint64_t out = 0;
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_size(self->store, k, (size_t)klen, &out));
    if (st) return kvpy_raise_last(st);
    return PyLong_FromUnsignedLongLong(out);
}

/* "O&" converter of the removal calls' `force`: exactly True or False, into KV_REMOVE_FORCE. */
static int force_flags(PyObject *obj, void *out) {
    int force;
    if (kvpy_flag(obj, "force", &force) < 0) return 0;
    *(uint32_t *)out = force ? KV_REMOVE_FORCE : 0;
    return 1;
}

static PyObject *store_remove(StoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "force", NULL};
    PyObject *key;
    uint32_t flags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O&", kwlist, &key, force_flags, &flags)) return NULL;
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, key, &k, &klen) < 0) return NULL;
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_remove(self->store, k, (size_t)klen, flags));
    if (st) return kvpy_raise_last(st);
    Py_RETURN_NONE;
}

/* A batch of keys only (op 0: sizes, for batch_exists; op 1: removal): one kv_batch_size or
 * kv_batch_remove call for the converted keys (one master request per chunk of keys). */
static PyObject *keys_batch(StoreObject *self, PyObject *keys, int op, uint32_t flags, PyObject *(*ok)(batch_item *)) {
    ENSURE_OPEN(self);
    Py_ssize_t n;
    batch_item *items = batch_begin(keys, NULL, NULL, &n);
    if (!items) return NULL;
    PyObject *r = NULL;
    size_t cap = (size_t)(n ? n : 1), m = 0;
    kv_key *ks = PyMem_Calloc(cap, sizeof *ks);
    Py_ssize_t *index = PyMem_Calloc(cap, sizeof *index);
    int32_t *statuses = PyMem_Calloc(cap, sizeof *statuses);
    uint64_t *sizes = PyMem_Calloc(cap, sizeof *sizes);
    if (!ks || !index || !statuses || !sizes) {
        PyErr_NoMemory();
        goto done;
    }
    m = batch_keys(items, n, ks, index);
    int32_t st;
    RUN_UNLOCKED(self, 0, st = op == 0 ? kv_batch_size(self->store, ks, m, statuses, sizes) : kv_batch_remove(self->store, ks, m, flags, statuses));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    for (size_t j = 0; j < m; j++) {
        batch_item *it = &items[index[j]];
        if (op == 0 && statuses[j] == KV_E_OBJECT_NOT_FOUND) continue; /* exists: False */
        it->value = op == 0 ? 1 : 0;
        if (statuses[j]) {
            it->status = statuses[j];
            it->message = strdup(kv_batch_error(j, NULL));
        }
    }
    r = batch_results(items, n, ok);
done:
    PyMem_Free(ks);
    PyMem_Free(index);
    PyMem_Free(statuses);
    PyMem_Free(sizes);
    batch_end(items, n);
    return r;
}

static PyObject *store_batch_exists(StoreObject *self, PyObject *keys) { return keys_batch(self, keys, 0, 0, ok_bool); }

#define MAX_REPLICAS 16 /* the most replicas an object has (KV_OPT_REPLICAS) */

/* _replicas(keys) -> [(size, [(segment, offset), ...]) | None | exception]: where each object
 * is (one kv_batch_replicas call; each found object is leased); None for a missing key. */
static PyObject *store_replicas(StoreObject *self, PyObject *keys) {
    ENSURE_OPEN(self);
    Py_ssize_t n;
    batch_item *items = batch_begin(keys, NULL, NULL, &n);
    if (!items) return NULL;
    PyObject *list = NULL;
    size_t cap = (size_t)(n ? n : 1);
    kv_key *ks = PyMem_Calloc(cap, sizeof *ks);
    Py_ssize_t *index = PyMem_Calloc(cap, sizeof *index);
    int32_t *statuses = PyMem_Calloc(cap, sizeof *statuses);
    uint32_t *counts = PyMem_Calloc(cap, sizeof *counts);
    kv_replica *out = PyMem_Calloc(cap * MAX_REPLICAS, sizeof *out);
    if (!ks || !index || !statuses || !counts || !out) {
        PyErr_NoMemory();
        goto done;
    }
    size_t m = batch_keys(items, n, ks, index);
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_batch_replicas(self->store, ks, m, statuses, counts, out, m * MAX_REPLICAS));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    for (size_t j = 0; j < m; j++) {
        if (statuses[j] && statuses[j] != KV_E_OBJECT_NOT_FOUND) {
            items[index[j]].status = statuses[j];
            items[index[j]].message = strdup(kv_batch_error(j, NULL));
        }
    }
    list = PyList_New(n);
    size_t next = 0;
    for (size_t j = 0; list && j < m; j++) {
        if (statuses[j]) continue;
        PyObject *places = PyList_New((Py_ssize_t)counts[j]);
        for (uint32_t r = 0; places && r < counts[j]; r++) {
            PyObject *t = Py_BuildValue("(KK)", (unsigned long long)out[next + r].segment, (unsigned long long)out[next + r].offset);
            if (!t) {
                Py_CLEAR(places);
                break;
            }
            PyList_SetItem(places, r, t);
        }
        PyObject *entry = places ? Py_BuildValue("(KN)", (unsigned long long)(counts[j] ? out[next].size : 0), places) : NULL;
        next += counts[j];
        if (!entry) {
            Py_CLEAR(list);
            break;
        }
        PyList_SetItem(list, index[j], entry);
    }
    for (Py_ssize_t i = 0; list && i < n; i++) {
        if (PyList_GetItem(list, i)) continue;
        PyObject *e = batch_error(&items[i]);
        if (!e) {
            e = Py_None;
            Py_INCREF(e);
        }
        PyList_SetItem(list, i, e);
    }
done:
    PyMem_Free(ks);
    PyMem_Free(index);
    PyMem_Free(statuses);
    PyMem_Free(counts);
    PyMem_Free(out);
    batch_end(items, n);
    return list;
}

static PyObject *store_batch_remove(StoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"keys", "force", NULL};
    PyObject *keys;
    uint32_t flags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O&", kwlist, &keys, force_flags, &flags)) return NULL;
    return keys_batch(self, keys, 1, flags, ok_none);
}

static PyObject *store_remove_all(StoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"force", NULL};
    uint32_t flags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O&", kwlist, force_flags, &flags)) return NULL;
    ENSURE_OPEN(self);
    uint64_t n = 0;
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_remove_all(self->store, flags, &n));
    if (st) return kvpy_raise_last(st);
    return PyLong_FromUnsignedLongLong(n);
}

/* copy_replicas(key, targets, drop=None): a replica of key in each target segment id; with
 * drop (a segment id), a move of that segment's replica. Bad ids are ValueError, not ints TypeError. */
static PyObject *store_copy_replicas(StoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "targets", "drop", NULL};
    PyObject *key, *targets, *drop = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O", kwlist, &key, &targets, &drop)) return NULL;
    const char *k;
    Py_ssize_t klen;
    if (key_arg(self, key, &k, &klen) < 0) return NULL;
    if (!PyList_Check(targets) && !PyTuple_Check(targets)) {
        PyErr_SetString(PyExc_TypeError, "targets must be a list of segment ids");
        return NULL;
    }
    Py_ssize_t n = PySequence_Size(targets);
    if (n < 1 || n > 16) {
        PyErr_Format(PyExc_ValueError, "between 1 and 16 target segments, not %zd", n);
        return NULL;
    }
    uint32_t ids[16], dropped = 0, flags = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i == n && drop == Py_None) break;
        PyObject *v = i < n ? PySequence_GetItem(targets, i) : (Py_INCREF(drop), drop);
        if (!v) return NULL;
        if (!PyLong_Check(v) || PyBool_Check(v)) {
            PyErr_SetString(PyExc_TypeError, "a segment id must be an int");
            Py_DECREF(v);
            return NULL;
        }
        unsigned long long id = PyLong_AsUnsignedLongLong(v);
        Py_DECREF(v);
        if (id == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a segment id must be between 1 and 4294967295");
            return NULL;
        }
        if (id == 0 || id > UINT32_MAX) {
            PyErr_Format(PyExc_ValueError, "a segment id must be between 1 and 4294967295, not %llu", id);
            return NULL;
        }
        if (i < n) {
            ids[i] = (uint32_t)id;
        } else {
            dropped = (uint32_t)id;
            flags = KV_COPY_MOVE;
        }
    }
    ENSURE_OPEN(self);
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_copy_replicas(self->store, k, (size_t)klen, ids, (size_t)n, dropped, flags));
    if (st) return kvpy_raise_last(st);
    Py_RETURN_NONE;
}

static PyObject *store_drain_segment(StoreObject *self, PyObject *unused) {
    (void)unused;
    ENSURE_OPEN(self);
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_drain_segment(self->store));
    if (st) return kvpy_raise_last(st);
    Py_RETURN_NONE;
}

/* ---- registered buffers ---- */

static void capsule_release(PyObject *capsule) {
    Py_buffer *view = PyCapsule_GetPointer(capsule, "kvstore.registered_buffer");
    if (view) {
        PyBuffer_Release(view);
        PyMem_Free(view);
    }
}

static PyObject *store_register_buffer(StoreObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer", "location", NULL};
    PyObject *obj, *location = NULL;
    const char *loc = "cpu";
    Py_ssize_t loclen = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O", kwlist, &obj, &location)) return NULL;
    ENSURE_OPEN(self);
    if (location && kvpy_utf8(location, "location", &loc, &loclen) < 0) return NULL;
    Py_buffer *view = PyMem_Malloc(sizeof(Py_buffer));
    if (!view) return PyErr_NoMemory();
    if (kvpy_source(obj, view) < 0) {
        PyMem_Free(view);
        return NULL;
    }
    int32_t st = kvpy_register(self, view->buf, (size_t)view->len, loc, (size_t)loclen);
    if (st) {
        PyBuffer_Release(view);
        PyMem_Free(view);
        return kvpy_raise_last(st);
    }
    PyObject *capsule = PyCapsule_New(view, "kvstore.registered_buffer", capsule_release);
    PyObject *addr = PyLong_FromVoidPtr(view->buf);
    if (!capsule || !addr || PyDict_SetItem(self->registered, addr, capsule) < 0) {
        kvpy_unregister(self, view->buf);
        if (!capsule) {
            PyBuffer_Release(view);
            PyMem_Free(view);
        }
        Py_XDECREF(capsule);
        Py_XDECREF(addr);
        return NULL;
    }
    Py_DECREF(capsule);
    Py_DECREF(addr);
    Py_RETURN_NONE;
}

static PyObject *store_unregister_buffer(StoreObject *self, PyObject *obj) {
    ENSURE_OPEN(self);
    void *ptr;
    if (PyLong_Check(obj)) {
        ptr = PyLong_AsVoidPtr(obj);
        if (!ptr && PyErr_Occurred()) return NULL;
    } else {
        Py_buffer view;
        if (kvpy_source(obj, &view) < 0) return NULL;
        ptr = view.buf;
        PyBuffer_Release(&view);
    }
    int32_t st = kvpy_unregister(self, ptr);
    if (st) return kvpy_raise_last(st);
    PyObject *addr = PyLong_FromVoidPtr(ptr);
    if (!addr) return NULL;
    int rc = PyDict_DelItem(self->registered, addr);
    Py_DECREF(addr);
    if (rc < 0) PyErr_Clear();
    Py_RETURN_NONE;
}

/* ---- type ---- */

static PyMethodDef store_methods[] = {
    {"put", (PyCFunction)(void (*)(void))store_put, METH_FASTCALL | METH_KEYWORDS,
     "put(key, value, *, hard_pin=False, soft_pin=False, soft_pin_ttl=None, ttl=None): store a new object."},
    {"upsert", (PyCFunction)(void (*)(void))store_upsert, METH_FASTCALL | METH_KEYWORDS, "upsert(key, value): store or replace."},
    {"put_from", (PyCFunction)(void (*)(void))store_put_from, METH_FASTCALL | METH_KEYWORDS, "put_from(key, buffer): put from a (registered) buffer."},
    {"upsert_from", (PyCFunction)(void (*)(void))store_upsert_from, METH_FASTCALL | METH_KEYWORDS, "upsert_from(key, buffer)."},
    {"put_parts", (PyCFunction)(void (*)(void))store_put_parts, METH_FASTCALL | METH_KEYWORDS, "put_parts(key, *parts): one object from several buffers."},
    {"upsert_parts", (PyCFunction)(void (*)(void))store_upsert_parts, METH_FASTCALL | METH_KEYWORDS, "upsert_parts(key, *parts)."},
    {"put_batch", (PyCFunction)(void (*)(void))store_put_batch, METH_FASTCALL | METH_KEYWORDS, "put_batch(keys, values) -> list."},
    {"upsert_batch", (PyCFunction)(void (*)(void))store_upsert_batch, METH_FASTCALL | METH_KEYWORDS, "upsert_batch(keys, values) -> list."},
    {"batch_put_from", (PyCFunction)(void (*)(void))store_batch_put_from, METH_FASTCALL | METH_KEYWORDS, "batch_put_from(keys, buffers) -> list."},
    {"batch_upsert_from", (PyCFunction)(void (*)(void))store_batch_upsert_from, METH_FASTCALL | METH_KEYWORDS,
     "batch_upsert_from(keys, buffer_lists) -> list."},
    {"get", (PyCFunction)store_get, METH_O, "get(key) -> bytes."},
    {"get_into", (PyCFunction)(void (*)(void))store_get_into, METH_FASTCALL, "get_into(key, buffer) -> int."},
    {"get_batch", (PyCFunction)store_get_batch, METH_O, "get_batch(keys) -> list."},
    {"_get_batch_new", (PyCFunction)(void (*)(void))store_get_batch_new, METH_FASTCALL,
     "_get_batch_new(keys, make) -> list: get_batch into make(size) objects."},
    {"_get_into_addr", (PyCFunction)(void (*)(void))store_get_into_addr, METH_FASTCALL,
     "_get_into_addr(key, address, length) -> int: get_into at an integer address."},
    {"_batch_flat", (PyCFunction)(void (*)(void))store_batch_flat, METH_FASTCALL | METH_KEYWORDS,
     "_batch_flat(keys, addresses, lengths, op, **options) -> list: one (address, length) per key; op 0 get, 1 put, 2 upsert."},
    {"_write_begin", (PyCFunction)(void (*)(void))store_write_begin, METH_FASTCALL | METH_KEYWORDS,
     "_write_begin(keys, sizes, upsert, **options) -> [id | exception]: reserves space; nothing visible until _write_end."},
    {"_write_ranges", (PyCFunction)(void (*)(void))store_write_ranges, METH_FASTCALL,
     "_write_ranges(ids, range_lists, host=False) -> [[length | exception] | total]: ranges into open writes."},
    {"_write_end", (PyCFunction)(void (*)(void))store_write_end, METH_FASTCALL,
     "_write_end(ids, abort=False) -> [None | exception]: commits (or frees) open writes."},
    {"_read_ranges", (PyCFunction)(void (*)(void))store_read_ranges, METH_FASTCALL,
     "_read_ranges(keys, range_lists, host=False) -> list of lists: ranged reads to raw addresses (host: all in host memory)."},
    {"batch_get_into", (PyCFunction)(void (*)(void))store_batch_get_into, METH_FASTCALL, "batch_get_into(keys, buffers) -> list."},
    {"exists", (PyCFunction)store_exists, METH_O, "exists(key) -> bool."},
    {"batch_exists", (PyCFunction)store_batch_exists, METH_O, "batch_exists(keys) -> list."},
    {"_replicas", (PyCFunction)store_replicas, METH_O, "_replicas(keys) -> [(size, [(segment, offset)]) | None | exception]."},
    {"size", (PyCFunction)store_size, METH_O, "size(key) -> int."},
    {"remove", (PyCFunction)(void (*)(void))store_remove, METH_VARARGS | METH_KEYWORDS, "remove(key, force=False)."},
    {"batch_remove", (PyCFunction)(void (*)(void))store_batch_remove, METH_VARARGS | METH_KEYWORDS, "batch_remove(keys, force=False) -> list."},
    {"drain_segment", (PyCFunction)store_drain_segment, METH_NOARGS, "drain_segment() -> None: this client's segment takes no new object from now on."},
    {"copy_replicas", (PyCFunction)(void (*)(void))store_copy_replicas, METH_VARARGS | METH_KEYWORDS,
     "copy_replicas(key, targets, drop=None) -> None: adds a replica of key in each target segment (a move of drop's)."},
    {"remove_all", (PyCFunction)(void (*)(void))store_remove_all, METH_VARARGS | METH_KEYWORDS,
     "remove_all(force=False) -> int: removes every object that is not leased (every object with force)."},
    {"register_buffer", (PyCFunction)(void (*)(void))store_register_buffer, METH_VARARGS | METH_KEYWORDS, "register_buffer(buffer, location='cpu')."},
    {"unregister_buffer", (PyCFunction)store_unregister_buffer, METH_O, "unregister_buffer(buffer)."},
    {"_put_raw", (PyCFunction)(void (*)(void))store_put_raw, METH_FASTCALL | METH_KEYWORDS,
     "_put_raw(key, parts: list, upsert): parts are buffers or (address, length) of memory on any device."},
    {"_batch_get_raw", (PyCFunction)(void (*)(void))store_batch_get_raw, METH_FASTCALL,
     "_batch_get_raw(keys, part_lists) -> list: batch_get_into into buffers or (address, length) parts."},
    {"_batch_put_raw", (PyCFunction)(void (*)(void))store_batch_put_raw, METH_FASTCALL | METH_KEYWORDS,
     "_batch_put_raw(keys, part_lists, upsert) -> list: like _put_raw per key; copies grouped per device."},
    KVPY_RAW_METHODS{"stats", (PyCFunction)store_stats, METH_NOARGS, "stats() -> dict."},
    {"_keys_page", (PyCFunction)kvpy_keys_page, METH_O,
     "_keys_page(after) -> (list[str], more): one page of keys in byte order after `after` (None: the first)."},
    {"_kv_register", (PyCFunction)(void (*)(void))kvpy_kv_register, METH_FASTCALL, "_kv_register(node_id, packed_descriptors)."},
    {"_kv_unregister", (PyCFunction)kvpy_kv_unregister, METH_NOARGS, "_kv_unregister()."},
    {"_kv_fetch", (PyCFunction)kvpy_kv_fetch, METH_O, "_kv_fetch(node_id) -> packed descriptors."},
    {"_kv_move", (PyCFunction)(void (*)(void))kvpy_kv_move, METH_FASTCALL, "_kv_move(peer, flags, src, dst, layers) -> transfers."},
    {"_connect", (PyCFunction)store_connect, METH_VARARGS, "_connect(url, segment_size, prefault, pin_memory, token)."},
    {"close", (PyCFunction)store_close, METH_NOARGS, "close(): idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef store_getset[] = {
    {"closed", (getter)store_get_closed, NULL, "True once close() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot store_slots[] = {
    {Py_tp_init, (void *)store_init},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_dealloc, (void *)store_dealloc},
    {Py_tp_methods, store_methods},
    {Py_tp_getset, store_getset},
    {Py_tp_doc, (void *)"Native embedded store. Use kvstore.Store."},
    {0, NULL},
};

PyType_Spec kvpy_store_spec = {
    "kvstore._native.Store", sizeof(StoreObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, store_slots,
};
