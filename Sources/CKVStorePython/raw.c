/* Raw-memory methods of kvstore._native.Store and tensor helpers of the module: a read that
 * decides its destination after seeing the object's first bytes (tensor reads), registration
 * of memory on any device, the tensor header codec, DLPack capsule parsing, and the device
 * list. Conversion only: the logic is
 * behind the C ABI. */
#include "kvpy.h"
#include <stdlib.h>
#include <string.h>

/* Where resolve() says an object's remaining bytes go. */
typedef struct {
    kv_mut_buffer buf;
    kv_device_part declared; /* length 0: nothing declared */
    int raw; /* a raw part (address, length, ...), not a buffer */
    int has; /* 0: resolve() gave None */
    Py_buffer view;
} kvpy_destination;

/* Calls resolve(prefix_bytes, size) (stealing prefix_bytes), checks that it gave a (result,
 * destination) pair and converts the destination: a writable buffer or a raw part, None only
 * when `rest` is 0. Returns the pair (its item 0 is the result), or NULL with an error set.
 * Release d with release_destination in either case. */
static PyObject *resolve_destination(PyObject *resolve, PyObject *prefix_bytes, uint64_t size, uint64_t rest, kvpy_destination *d) {
    memset(d, 0, sizeof *d);
    PyObject *pair = PyObject_CallFunction(resolve, "NK", prefix_bytes, (unsigned long long)size);
    if (!pair) return NULL;
    if (!PyTuple_Check(pair) || PyTuple_Size(pair) != 2) {
        kvpy_type_error(pair, "resolve()'s result", "a (result, destination) tuple");
        Py_DECREF(pair);
        return NULL;
    }
    PyObject *dest = PyTuple_GetItem(pair, 1);
    if (dest == Py_None) {
        if (rest == 0) return pair;
        kvpy_raise(KV_E_INVALID_ARGUMENT, "resolve() gave no destination for the object's remaining bytes");
        Py_DECREF(pair);
        return NULL;
    }
    d->has = 1;
    int r = kvpy_raw_part(dest, &d->buf.ptr, &d->buf.len, &d->declared);
    if (r == 0 && kvpy_target(dest, &d->view) == 0) {
        d->buf.ptr = d->view.buf;
        d->buf.len = (size_t)d->view.len;
    }
    if (r < 0 || (r == 0 && !d->view.obj)) {
        Py_DECREF(pair);
        return NULL;
    }
    d->raw = r == 1;
    return pair;
}

static void release_destination(kvpy_destination *d) {
    if (d->view.obj) PyBuffer_Release(&d->view);
}

/* One try of _read_object on a held object: the result, or NULL with an error set, or NULL
 * with *stale set (a copy outlived the lease: nothing was returned, begin again). */
static PyObject *read_held_object(StoreObject *self, kv_read *hold, Py_ssize_t prefix, PyObject *resolve, int *stale) {
    PyObject *result = NULL, *pair = NULL;
    kvpy_destination d = {0};
    int32_t st;
    uint64_t have = hold->size < (uint64_t)prefix ? hold->size : (uint64_t)prefix;
    PyObject *prefix_bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)have);
    if (!prefix_bytes) return NULL;
    kv_mut_buffer head = {PyBytes_AsString(prefix_bytes), (size_t)have};
    RUN_UNLOCKED(self, have, st = kv_read_copy_range(self->store, hold, 0, have, &head, 1, KV_HOST_MEMORY, NULL));
    if (st) {
        Py_DECREF(prefix_bytes);
        if (st == KV_STALE)
            *stale = 1;
        else
            kvpy_raise_last(st);
        return NULL;
    }
    uint64_t rest = hold->size - have;
    pair = resolve_destination(resolve, prefix_bytes, hold->size, rest, &d);
    if (!pair) goto done;
    if (d.has && rest > 0) {
        int declared = d.raw && d.declared.length > 0;
        if (declared) kv_call_devices(&d.declared, 1);
        RUN_UNLOCKED(self, rest, st = kv_read_copy_range(self->store, hold, have, rest, &d.buf, 1, d.raw ? 0 : KV_HOST_MEMORY, NULL));
        if (declared) kv_call_devices(NULL, 0);
        if (st == KV_STALE) {
            *stale = 1;
            goto done;
        }
        if (st) {
            kvpy_raise_last(st);
            goto done;
        }
    }
    result = PyTuple_GetItem(pair, 0);
    Py_INCREF(result);
done:
    release_destination(&d);
    Py_XDECREF(pair);
    return result;
}

/* _read_object when no hold can be had because the object is on the disk tier and DRAM cannot
 * take it back (everything there leased or pinned): the whole object is read from disk into a
 * host buffer of its own (kv_get_into's disk path), then resolve() sees the prefix and the rest
 * is copied into its destination. Host destinations only: a device destination (a raw part not
 * declared host memory) gets the original NoSpaceError. */
static PyObject *read_object_from_disk_tier(StoreObject *self, const char *k, Py_ssize_t klen, Py_ssize_t prefix, PyObject *resolve) {
    uint64_t size = 0, copied = 0;
    int32_t st;
    kvpy_raise_last(KV_E_NO_SPACE); /* the message to give back when this path cannot help */
    PyObject *no_space = kvpy_take_error();
    PyObject *result = NULL, *whole = NULL, *pair = NULL;
    kvpy_destination d = {0};
    RUN_UNLOCKED(self, 0, st = kv_size(self->store, k, (size_t)klen, &size));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    whole = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!whole) goto done;
    kv_mut_buffer all = {PyBytes_AsString(whole), (size_t)size};
    RUN_UNLOCKED(self, size, st = kv_get_into(self->store, k, (size_t)klen, &all, 1, KV_HOST_MEMORY, &copied));
    if (st) {
        kvpy_raise_last(st);
        goto done;
    }
    if (copied != size) {
        kvpy_raise(KV_E_TRANSFER, "the object changed size while it was read from disk");
        goto done;
    }
    uint64_t have = size < (uint64_t)prefix ? size : (uint64_t)prefix, rest = size - have;
    PyObject *prefix_bytes = PyBytes_FromStringAndSize(PyBytes_AsString(whole), (Py_ssize_t)have);
    if (!prefix_bytes) goto done;
    pair = resolve_destination(resolve, prefix_bytes, size, rest, &d);
    if (!pair) goto done;
    if (d.has && rest > 0) {
        if (d.raw && !(d.declared.length > 0 && d.declared.kind == KV_DEVICE_HOST)) {
            PyErr_SetObject((PyObject *)Py_TYPE(no_space), no_space); /* device memory: not from here */
            goto done;
        }
        if (d.buf.len < rest) {
            kvpy_raise(KV_E_INVALID_ARGUMENT, "resolve() gave a destination smaller than the object's remaining bytes");
            goto done;
        }
        memcpy(d.buf.ptr, PyBytes_AsString(whole) + have, (size_t)rest);
    }
    result = PyTuple_GetItem(pair, 0);
    Py_INCREF(result);
done:
    release_destination(&d);
    Py_XDECREF(pair);
    Py_XDECREF(whole);
    Py_XDECREF(no_space);
    return result;
}

/* _read_object(key, prefix_len, resolve) -> result: reads the first prefix_len bytes,
 * calls resolve(prefix, size) -> (result, destination), copies the rest into destination.
 * A copy that outlived its lease is thrown away and the read begins again (at most 3 times). */
PyObject *kvpy_store_read_object(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (kvpy_check_nargs("_read_object", nargs, 3, 3) < 0) return NULL;
    const char *k;
    Py_ssize_t klen;
    if (kvpy_key_arg(self, args[0], &k, &klen) < 0) return NULL;
    Py_ssize_t prefix = PyLong_AsSsize_t(args[1]);
    if (prefix < 0) {
        if (!PyErr_Occurred()) kvpy_raise(KV_E_INVALID_ARGUMENT, "prefix_len must not be negative");
        return NULL;
    }
    for (int tries = 0;; tries++) {
        kv_read hold;
        int32_t st = kvpy_read_begin(self, k, klen, &hold);
        if (st == KV_E_NO_SPACE) return read_object_from_disk_tier(self, k, klen, prefix, args[2]);
        if (st) return kvpy_raise_last(st);
        int stale = 0;
        PyObject *result = read_held_object(self, &hold, prefix, args[2], &stale);
        if (stale && tries >= 3) kvpy_raise_last(KV_E_TRANSFER);
        kvpy_read_end(self, &hold);
        if (!stale || tries >= 3) return result;
    }
}

/* _register_raw(address, length, location, owner) */
PyObject *kvpy_store_register_raw(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (kvpy_check_nargs("_register_raw", nargs, 4, 4) < 0) return NULL;
    ENSURE_OPEN(self);
    PyObject *pair = PyTuple_Pack(2, args[0], args[1]);
    if (!pair) return NULL;
    void *p;
    size_t len;
    int r = kvpy_raw_part(pair, &p, &len, NULL);
    Py_DECREF(pair);
    if (r < 0) return NULL;
    if (r == 0) return kvpy_type_error(args[0], "address and length", "ints");
    const char *loc;
    Py_ssize_t loclen;
    if (kvpy_utf8(args[2], "location", &loc, &loclen) < 0) return NULL;
    int32_t st = kvpy_register(self, p, len, loc, (size_t)loclen);
    if (st) return kvpy_raise_last(st);
    PyObject *addr = PyLong_FromVoidPtr(p);
    if (!addr || PyDict_SetItem(self->registered, addr, args[3]) < 0) {
        kvpy_unregister(self, p);
        Py_XDECREF(addr);
        return NULL;
    }
    Py_DECREF(addr);
    Py_RETURN_NONE;
}

/* tensor_header(dtype_code, shape) -> bytes */
PyObject *kvpy_tensor_header(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (kvpy_check_nargs("tensor_header", nargs, 2, 2) < 0) return NULL;
    long dtype = PyLong_AsLong(args[0]);
    if (dtype == -1 && PyErr_Occurred()) return NULL;
    if (!PyTuple_Check(args[1])) return kvpy_type_error(args[1], "shape", "a tuple of ints");
    Py_ssize_t ndim = PyTuple_Size(args[1]);
    if (ndim > KV_TENSOR_MAX_DIMS) { return kvpy_raise_format(KV_E_INVALID_ARGUMENT, "a tensor has at most %d dimensions, got %zd", KV_TENSOR_MAX_DIMS, ndim); }
    int64_t shape[KV_TENSOR_MAX_DIMS];
    for (Py_ssize_t i = 0; i < ndim; i++) {
        shape[i] = PyLong_AsLongLong(PyTuple_GetItem(args[1], i));
        if (shape[i] == -1 && PyErr_Occurred()) return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, KV_TENSOR_HEADER_SIZE);
    if (!out) return NULL;
    int32_t st = kv_tensor_header_encode((int32_t)dtype, (int32_t)ndim, shape, PyBytes_AsString(out), KV_TENSOR_HEADER_SIZE);
    if (st) {
        Py_DECREF(out);
        return kvpy_raise_last(st);
    }
    return out;
}

/* decode_tensor_header(buffer) -> (dtype_code, shape, data_bytes) */
PyObject *kvpy_decode_tensor_header(PyObject *module, PyObject *arg) {
    (void)module;
    Py_buffer view;
    if (kvpy_source(arg, &view) < 0) return NULL;
    kv_tensor_info info;
    int32_t st = kv_tensor_header_decode(view.buf, (size_t)view.len, &info);
    PyBuffer_Release(&view);
    if (st) return kvpy_raise_last(st);
    PyObject *shape = PyTuple_New(info.ndim);
    if (!shape) return NULL;
    for (int32_t i = 0; i < info.ndim; i++) PyTuple_SetItem(shape, i, PyLong_FromLongLong(info.shape[i]));
    return Py_BuildValue("(iNK)", info.dtype, shape, (unsigned long long)info.data_bytes);
}

/* DLPack's C structs (dlpack.h, stable ABI; written here to avoid the dependency). */
typedef struct {
    int32_t device_type;
    int32_t device_id;
} kv_dl_device;
typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} kv_dl_dtype;
typedef struct {
    void *data;
    kv_dl_device device;
    int32_t ndim;
    kv_dl_dtype dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} kv_dl_tensor;
typedef struct {
    kv_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(void *);
} kv_dl_managed;
typedef struct {
    uint32_t major, minor;
    void *manager_ctx;
    void (*deleter)(void *);
    uint64_t flags;
    kv_dl_tensor dl_tensor;
} kv_dl_managed_versioned;

/* DLPACK_FLAG_BITMASK_READ_ONLY of a versioned tensor's flags (DLPack 1.0). */
#define KV_DL_READ_ONLY 1u

/* dlpack_info(capsule) -> (address, device_type, device_id, (code, bits, lanes), shape, strides|None,
 * read_only). Reads the capsule without consuming it: its producer frees the tensor when it is
 * dropped. read_only is the versioned capsule's flag (a legacy capsule has none: False). */
PyObject *kvpy_dlpack_info(PyObject *module, PyObject *capsule) {
    (void)module;
    const kv_dl_tensor *t = NULL;
    int read_only = 0;
    if (PyCapsule_IsValid(capsule, "dltensor")) {
        const kv_dl_managed *m = PyCapsule_GetPointer(capsule, "dltensor");
        if (m) t = &m->dl_tensor;
    } else if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
        const kv_dl_managed_versioned *m = PyCapsule_GetPointer(capsule, "dltensor_versioned");
        if (m && m->major != 1) return kvpy_raise_format(KV_E_UNSUPPORTED, "DLPack version %u.%u is not supported (1.x is)", m->major, m->minor);
        if (m) {
            t = &m->dl_tensor;
            read_only = (m->flags & KV_DL_READ_ONLY) != 0;
        }
    }
    if (!t) {
        PyErr_Clear();
        return kvpy_type_error(capsule, "__dlpack__() result", "an unused DLPack capsule");
    }
    if (t->ndim < 0 || t->ndim > 64) return kvpy_raise_format(KV_E_INVALID_ARGUMENT, "DLPack tensor has ndim %d", (int)t->ndim);
    PyObject *shape = PyTuple_New(t->ndim);
    if (!shape) return NULL;
    for (int32_t i = 0; i < t->ndim; i++) PyTuple_SetItem(shape, i, PyLong_FromLongLong(t->shape[i]));
    PyObject *strides;
    if (t->strides) {
        strides = PyTuple_New(t->ndim);
        if (!strides) {
            Py_DECREF(shape);
            return NULL;
        }
        for (int32_t i = 0; i < t->ndim; i++) PyTuple_SetItem(strides, i, PyLong_FromLongLong(t->strides[i]));
    } else {
        strides = Py_None;
        Py_INCREF(strides);
    }
    return Py_BuildValue("(Kii(iii)NNO)", (unsigned long long)((uintptr_t)t->data + t->byte_offset), (int)t->device.device_type, (int)t->device.device_id,
                         (int)t->dtype.code, (int)t->dtype.bits, (int)t->dtype.lanes, shape, strides, read_only ? Py_True : Py_False);
}

/* devices(refresh=False) -> ["cpu:0", ...] */
PyObject *kvpy_devices(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (kvpy_check_nargs("devices", nargs, 0, 1) < 0) return NULL;
    int refresh = nargs ? PyObject_IsTrue(args[0]) : 0;
    if (refresh < 0) return NULL;
    char buf[1024];
    size_t n;
    Py_BEGIN_ALLOW_THREADS n = kv_devices(refresh, buf, sizeof buf);
    Py_END_ALLOW_THREADS if (n >= sizeof buf) n = sizeof buf - 1;
    PyObject *text = PyUnicode_FromStringAndSize(buf, (Py_ssize_t)n);
    if (!text) return NULL;
    PyObject *sep = PyUnicode_FromString(",");
    PyObject *list = sep ? PyUnicode_Split(text, sep, -1) : NULL;
    Py_XDECREF(sep);
    Py_DECREF(text);
    return list;
}

/* rdma_info() -> the text of kv_rdma_info (parsed by kvstore.rdma()) */
PyObject *kvpy_rdma_info(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    (void)args;
    if (kvpy_check_nargs("rdma_info", nargs, 0, 0) < 0) return NULL;
    char buf[4096];
    size_t n;
    Py_BEGIN_ALLOW_THREADS n = kv_rdma_info(buf, sizeof buf);
    Py_END_ALLOW_THREADS if (n >= sizeof buf) n = sizeof buf - 1;
    return PyUnicode_DecodeUTF8(buf, (Py_ssize_t)n, "replace");
}
