/* Shared declarations of the CPython extension. The extension only converts between Python
 * objects and the flat C ABI (kvstore_abi.h): it holds no store logic. */
#ifndef KVPY_H
#define KVPY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "kvstore_abi.h"

/* Copies of at least this many bytes run with the GIL released. */
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

/* A growable list of buffer views (sources or targets) and their (ptr, len) pairs. */
typedef struct {
    Py_buffer *views;
    kv_buffer *parts; /* kv_mut_buffer has the same layout; cast for targets */
    Py_ssize_t count, capacity;
    Py_buffer views_inline[4];
    kv_buffer parts_inline[4];
} kvpy_buffers;

void kvpy_buffers_init(kvpy_buffers *b);
/* Appends obj (a buffer) or, when allow_list, each item of obj (a list or tuple of buffers).
 * Returns the number appended, or -1 with an error set (nothing appended then). */
Py_ssize_t kvpy_buffers_add(kvpy_buffers *b, PyObject *obj, int writable, int allow_list);
/* Total bytes of parts [first, first + n). */
size_t kvpy_buffers_bytes(const kvpy_buffers *b, Py_ssize_t first, Py_ssize_t n);
void kvpy_buffers_release(kvpy_buffers *b);

/* The pending exception as an object (normalized); clears it. */
PyObject *kvpy_take_error(void);

PyObject *kvpy_set_error_classes(PyObject *module, PyObject *mapping);

extern PyType_Spec kvpy_store_spec;

#endif
