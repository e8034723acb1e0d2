/* kvstore._native.Buffer: bytes of its own, 64-byte aligned, writable, exposed through the
 * buffer protocol, with Mooncake's ptr() and size(). Reads that return a new value of unknown
 * size (Mooncake's get_buffer) copy straight into one: no zero-fill, no second copy. */
#include "kvpy.h"
#include <stdlib.h>
#include <string.h>

typedef struct {
    PyObject_HEAD void *data;
    Py_ssize_t size;
    size_t cap; /* bytes of the block at data */
} BufferObject;

PyObject *kvpy_buffer_type;

/* Memory of freed Buffers, kept warm for the next ones: a new large block is fresh pages
 * (glibc maps it anew), and faulting them in cost more than the copy (batch_get_buffer of
 * 4 MiB objects: 2.3 GB/s with a fresh block each, against memcpy's 20). Blocks of at least
 * 64 KiB, at most CACHE_BLOCKS and CACHE_BYTES in all; a new Buffer takes the smallest
 * cached block that holds it and is at most twice its size. Guarded by the GIL (Buffers are
 * made and freed with it held). */
#define CACHE_BLOCKS 64
#define CACHE_BYTES ((size_t)256 << 20)
#define CACHE_MIN ((size_t)64 << 10)
static struct {
    void *p;
    size_t cap;
} cache[CACHE_BLOCKS];
static int cached_blocks;
static size_t cached_bytes;

static void *block_take(size_t size, size_t *cap) {
    int best = -1;
    for (int i = 0; i < cached_blocks; i++) {
        if (cache[i].cap >= size && cache[i].cap / 2 <= size && (best < 0 || cache[i].cap < cache[best].cap)) best = i;
    }
    if (best >= 0) {
        void *p = cache[best].p;
        *cap = cache[best].cap;
        cached_bytes -= *cap;
        cache[best] = cache[--cached_blocks];
        return p;
    }
    size_t want = size < CACHE_MIN ? (size ? size : 1) : (size + 4095) & ~(size_t)4095;
    void *p = NULL;
    if (posix_memalign(&p, 64, want) != 0) return NULL;
    *cap = want;
    return p;
}

static void block_give(void *p, size_t cap) {
    if (!p) return;
    if (cap >= CACHE_MIN && cap <= CACHE_BYTES) {
        while (cached_blocks > 0 && (cached_blocks == CACHE_BLOCKS || cached_bytes + cap > CACHE_BYTES)) {
            cached_blocks--; /* the oldest-added last-slot block goes first */
            cached_bytes -= cache[cached_blocks].cap;
            free(cache[cached_blocks].p);
        }
        cache[cached_blocks].p = p;
        cache[cached_blocks].cap = cap;
        cached_blocks++;
        cached_bytes += cap;
        return;
    }
    free(p);
}

PyObject *kvpy_buffer_new(uint64_t size, void **data) {
    if (size > (uint64_t)PY_SSIZE_T_MAX) return PyErr_NoMemory();
    PyTypeObject *tp = (PyTypeObject *)kvpy_buffer_type;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    BufferObject *self = (BufferObject *)alloc(tp, 0);
    if (!self) return NULL;
    self->data = block_take((size_t)size, &self->cap);
    if (!self->data) {
        Py_DECREF((PyObject *)self);
        return PyErr_NoMemory();
    }
    self->size = (Py_ssize_t)size;
    *data = self->data;
    return (PyObject *)self;
}

static PyObject *buffer_new(PyTypeObject *tp, PyObject *args, PyObject *kwargs) {
    (void)tp;
    Py_ssize_t n;
    static char *names[] = {"size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n", names, &n)) return NULL;
    if (n < 0) return kvpy_raise(KV_E_INVALID_ARGUMENT, "size must not be negative");
    void *data;
    PyObject *b = kvpy_buffer_new((uint64_t)n, &data);
    if (b) memset(data, 0, (size_t)n);
    return b;
}

static void buffer_dealloc(BufferObject *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    block_give(self->data, self->cap);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static int buffer_getbuffer(BufferObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->size, 0, flags);
}

static void buffer_releasebuffer(BufferObject *self, Py_buffer *view) {
    (void)self;
    (void)view;
}

static PyObject *buffer_ptr(BufferObject *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromVoidPtr(self->data);
}

static PyObject *buffer_size(BufferObject *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromSsize_t(self->size);
}

static Py_ssize_t buffer_len(BufferObject *self) { return self->size; }
static int buffer_bool(BufferObject *self) { return self->size > 0; }

static PyObject *buffer_repr(BufferObject *self) { return PyUnicode_FromFormat("<kvstore Buffer of %zd bytes at %p>", self->size, self->data); }

static PyMethodDef buffer_methods[] = {
    {"ptr", (PyCFunction)buffer_ptr, METH_NOARGS, "ptr() -> int: the address of the bytes."},
    {"size", (PyCFunction)buffer_size, METH_NOARGS, "size() -> int: how many bytes."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot buffer_slots[] = {
    {Py_tp_new, (void *)buffer_new},
    {Py_tp_dealloc, (void *)buffer_dealloc},
    {Py_tp_methods, buffer_methods},
    {Py_tp_repr, (void *)buffer_repr},
    {Py_sq_length, (void *)buffer_len},
    {Py_nb_bool, (void *)buffer_bool},
    {Py_bf_getbuffer, (void *)buffer_getbuffer},
    {Py_bf_releasebuffer, (void *)buffer_releasebuffer},
    {Py_tp_doc, (void *)"Buffer(size): size bytes of its own (zeroed), 64-byte aligned, writable; ptr() and size()."},
    {0, NULL},
};

PyType_Spec kvpy_buffer_spec = {
    "kvstore._native.Buffer", sizeof(BufferObject), 0, Py_TPFLAGS_DEFAULT, buffer_slots,
};
