/* Shared declarations of the CPython extension. The extension only converts between Python
 * objects and the flat C ABI (kvstore_abi.h): it holds no store logic. */
#ifndef KVPY_H
#define KVPY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "kvstore_abi.h"

/* Calls that copy at least this many bytes run with the GIL released; shorter ones keep it
 * except while they wait (releasing it costs more than such a call). */
#define KVPY_GIL_THRESHOLD (64 * 1024)

/* Raises the exception class mapped to `code` (kvstore/_errors.py) with `message`. */
PyObject *kvpy_raise(int32_t code, const char *message);
/* Raises the class mapped to `code` with a PyUnicode_FromFormat message; returns NULL. */
PyObject *kvpy_raise_format(int32_t code, const char *format, ...);
/* Raises ArgumentTypeError "<what> must be <expected>, not <type of obj>"; returns NULL. */
PyObject *kvpy_type_error(PyObject *obj, const char *what, const char *expected);
/* Raises for the ABI's last error on this thread. */
PyObject *kvpy_raise_last(int32_t code);
/* A new exception instance for `code` (for per-key batch results); NULL with an error set. */
PyObject *kvpy_error_object(int32_t code, const char *message);

/* A str argument named `what` as UTF-8. Returns 0, or -1 with a typed error set. */
int kvpy_utf8(PyObject *obj, const char *what, const char **ptr, Py_ssize_t *len);
/* A key argument as UTF-8 (kvpy_utf8 named "key"). */
int kvpy_key(PyObject *obj, const char **ptr, Py_ssize_t *len);
/* A readable C-contiguous buffer. Returns 0, or -1 with a typed error set. */
int kvpy_source(PyObject *obj, Py_buffer *view);
/* A writable C-contiguous buffer. Returns 0, or -1 with a typed error set. */
int kvpy_target(PyObject *obj, Py_buffer *view);

/* A number argument `name` (an int or float, not bool; `expected` words the type error).
 * 0, or -1 with a typed error. */
int kvpy_number(PyObject *obj, const char *name, const char *expected, double *out);
/* kvpy_number for a duration in seconds. */
int kvpy_seconds(PyObject *obj, const char *name, double *out);
/* A flag argument `name`: exactly True or False. 0, or -1 with a typed error. */
int kvpy_flag(PyObject *obj, const char *name, int *out);
/* The keyword options of write method `fname` (hard_pin, soft_pin, soft_pin_ttl, ttl; None
 * for a duration means not given). kwvalues/kwnames as METH_FASTCALL | METH_KEYWORDS passes
 * them (kwnames may be NULL). 0, or -1 with a typed error naming the bad option. */
int kvpy_put_options(const char *fname, PyObject *const *kwvalues, PyObject *kwnames, kv_put_options *out);

/* A growable list of buffer views (sources or targets) and their (ptr, len) pairs. */
typedef struct {
    Py_buffer *views;
    kv_buffer *parts; /* kv_mut_buffer has the same layout; cast for targets */
    Py_ssize_t count, capacity;
    Py_ssize_t raw; /* how many parts are raw (address, length) pairs: memory of unknown device */
    /* Raw parts whose device (and stream) the caller declared: handed to kv_call_devices for
     * the calls made while these buffers live. */
    kv_device_part *dev;
    Py_ssize_t ndev, devcap;
    Py_buffer views_inline[4];
    kv_buffer parts_inline[4];
    kv_device_part dev_inline[2];
} kvpy_buffers;

void kvpy_buffers_init(kvpy_buffers *b);
/* Appends obj (a buffer) or, when allow_list, each item of obj (a list or tuple of buffers).
 * Returns the number appended, or -1 with an error set (nothing appended then). */
Py_ssize_t kvpy_buffers_add(kvpy_buffers *b, PyObject *obj, int writable, int allow_list);
/* Appends each item of `list` (a list): a buffer, or a raw part (see kvpy_raw_part) of
 * memory on any device that the caller keeps alive. Returns the number appended or -1. */
Py_ssize_t kvpy_buffers_add_raw_list(kvpy_buffers *b, PyObject *list, int writable);
/* A raw part: a tuple (address, length) of memory on a device kvstore finds, or (address,
 * length, kind, device, stream) declaring it: kind KV_DEVICE_HOST or KV_DEVICE_CUDA, device
 * the ordinal or -1 (the driver names it), stream a CUstream handle or None (unknown).
 * Returns 1 (filled), 0 (not a raw part) or -1 (error). `dev` (may be NULL) gets the
 * declaration; its length is 0 when there is none. */
int kvpy_raw_part(PyObject *obj, void **ptr, size_t *len, kv_device_part *dev);
/* Appends one raw part (an int address and length); -1 with an error set. */
int kvpy_buffers_add_raw(kvpy_buffers *b, PyObject *address, PyObject *length);
/* Total bytes of parts [first, first + n). */
size_t kvpy_buffers_bytes(const kvpy_buffers *b, Py_ssize_t first, Py_ssize_t n);
void kvpy_buffers_release(kvpy_buffers *b);

/* The pending exception as an object (normalized); clears it. */
PyObject *kvpy_take_error(void);

PyObject *kvpy_set_error_classes(PyObject *module, PyObject *mapping);

extern PyType_Spec kvpy_store_spec;
extern PyType_Spec kvpy_buffer_spec;
extern PyObject *kvpy_buffer_type; /* kvstore._native.Buffer */
/* A new Buffer of size bytes (not zeroed); *data gets its address. */
PyObject *kvpy_buffer_new(uint64_t size, void **data);

/* ---- shared by store.c and raw.c ---- */

typedef struct {
    PyObject_HEAD kv_store *store;
    PyObject *registered; /* {address: capsule holding the registered Py_buffer, or the object kept alive} */
} StoreObject;

/* The wait hooks of the core (kv_set_wait_hooks): a call that keeps the GIL marks itself with
 * kvpy_keep_gil_begin(); a wait inside it (blocking on the network or a contended lock) then
 * releases the GIL and takes it back when the wait ends. */
void kvpy_keep_gil_begin(void);
void kvpy_keep_gil_end(void);
void kvpy_install_wait_hooks(void);

/* Runs stmt, a call of self's store moving `bytes`: with the GIL released for copies of
 * KVPY_GIL_THRESHOLD bytes or more; otherwise keeping it, except while the call waits (see
 * the wait hooks), so a thread stalled on the master or a peer never stops the others. */
#define RUN_UNLOCKED(self, bytes, stmt)               \
    do {                                              \
        if ((bytes) >= KVPY_GIL_THRESHOLD) {          \
            PyThreadState *_ts = PyEval_SaveThread(); \
            stmt;                                     \
            PyEval_RestoreThread(_ts);                \
        } else {                                      \
            (void)(self);                             \
            kvpy_keep_gil_begin();                    \
            stmt;                                     \
            kvpy_keep_gil_end();                      \
        }                                             \
    } while (0)

/* kv_read_end, kv_register_buffer and kv_unregister_buffer, marked as calls that keep the GIL
 * (a wait inside them releases it: see RUN_UNLOCKED). */
static inline int32_t kvpy_read_end(StoreObject *self, const kv_read *hold) {
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_read_end(self->store, hold));
    return st;
}
static inline int32_t kvpy_register(StoreObject *self, const void *p, size_t len, const char *loc, size_t loclen) {
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_register_buffer(self->store, p, len, loc, loclen));
    return st;
}
static inline int32_t kvpy_unregister(StoreObject *self, const void *p) {
    int32_t st;
    RUN_UNLOCKED(self, 0, st = kv_unregister_buffer(self->store, p));
    return st;
}

/* 0 when the store is open, else -1 with StoreClosedError set. */
int kvpy_ensure_open(StoreObject *self);
#define ENSURE_OPEN(self) \
    if (kvpy_ensure_open(self) < 0) return NULL
/* The store is open and `key` converts (the prologue of single-key methods). */
int kvpy_key_arg(StoreObject *self, PyObject *key, const char **k, Py_ssize_t *klen);
int kvpy_check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max);
/* Takes a read hold; waits (GIL released) while an in-place upsert rewrites the object. */
int32_t kvpy_read_begin(StoreObject *self, const char *k, Py_ssize_t klen, kv_read *hold);

/* Methods of raw.c: tensor reads and registration of memory on any device. */
PyObject *kvpy_store_read_object(StoreObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvpy_store_register_raw(StoreObject *self, PyObject *const *args, Py_ssize_t nargs);
#define KVPY_RAW_METHODS                                                                                                                                  \
    {"_read_object", (PyCFunction)(void (*)(void))kvpy_store_read_object, METH_FASTCALL,                                                                  \
     "_read_object(key, prefix_len, resolve) -> object: reads the prefix, resolve(prefix_bytes, size) returns (result, destination), the rest is copied " \
     "there under one read hold."},                                                                                                                       \
        {"_register_raw", (PyCFunction)(void (*)(void))kvpy_store_register_raw, METH_FASTCALL,                                                            \
         "_register_raw(address, length, location, owner): registers device memory, keeping owner alive."},

/* Module functions of raw.c. */
PyObject *kvpy_tensor_header(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvpy_decode_tensor_header(PyObject *module, PyObject *arg);
PyObject *kvpy_dlpack_info(PyObject *module, PyObject *capsule);
PyObject *kvpy_devices(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvpy_rdma_info(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* KV layouts and block moves (kv.c). */
PyObject *kvpy_kv_register(StoreObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvpy_kv_unregister(StoreObject *self, PyObject *unused);
PyObject *kvpy_kv_fetch(StoreObject *self, PyObject *node);
PyObject *kvpy_kv_move(StoreObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *kvpy_keys_page(StoreObject *self, PyObject *after);

#endif
