/* kvstore._native.Buffer: bytes of its own, 64-byte aligned, writable, exposed through the
 * buffer protocol, with Mooncake's ptr() and size(). Reads that return a new value of unknown
 * size (Mooncake's get_buffer) copy straight into one: no zero-fill, no second copy. */
#include "kvpy.h"
#include <stdlib.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    void *data;
    Py_ssize_t size;
} BufferObject;

PyObject *kvpy_buffer_type;

PyObject *kvpy_buffer_new(uint64_t size, void **data) {
    if (size > (uint64_t)PY_SSIZE_T_MAX) return PyErr_NoMemory();
    PyTypeObject *tp = (PyTypeObject *)kvpy_buffer_type;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    BufferObject *self = (BufferObject *)alloc(tp, 0);
    if (!self) return NULL;
    if (posix_memalign(&self->data, 64, size ? (size_t)size : 1) != 0) {
        self->data = NULL;
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
    free(self->data);
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

static PyObject *buffer_repr(BufferObject *self) {
    return PyUnicode_FromFormat("<kvstore Buffer of %zd bytes at %p>", self->size, self->data);
}

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
