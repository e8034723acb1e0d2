/* Argument conversion: keys and buffer-protocol objects. */
#include "kvpy.h"
#include <string.h>

int kvpy_utf8(PyObject *obj, const char *what, const char **ptr, Py_ssize_t *len) {
    if (!PyUnicode_Check(obj)) {
        kvpy_type_error(obj, what, "str");
        return -1;
    }
    *ptr = PyUnicode_AsUTF8AndSize(obj, len);
    if (*ptr == NULL) {
        PyErr_Clear();
        kvpy_raise_format(KV_E_INVALID_ARGUMENT, "%s is not valid Unicode (it holds a lone surrogate)", what);
        return -1;
    }
    return 0;
}

int kvpy_key(PyObject *obj, const char **ptr, Py_ssize_t *len) { return kvpy_utf8(obj, "key", ptr, len); }

static int get_view(PyObject *obj, Py_buffer *view, int writable) {
    const char *what = writable ? "target buffer" : "value";
    if (obj == Py_None || !PyObject_CheckBuffer(obj)) {
        kvpy_type_error(obj, what, "a bytes-like object (buffer protocol)");
        return -1;
    }
    /* PyBUF_SIMPLE asks for plain contiguous bytes: the cheapest export (no shape or strides)
     * and exactly what is needed. Only when it fails, find out why. */
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) == 0) return 0;
    PyErr_Clear();
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES) < 0) return -1;
    int readonly = view->readonly, contiguous = PyBuffer_IsContiguous(view, 'C');
    PyBuffer_Release(view);
    if (writable && readonly)
        kvpy_raise(KV_E_INVALID_ARGUMENT, "target buffer is read-only; pass a writable buffer such as a bytearray or numpy array");
    else if (!contiguous)
        kvpy_raise_format(KV_E_INVALID_ARGUMENT, "%s must be C-contiguous (numpy.ascontiguousarray makes a contiguous copy)", what);
    else
        kvpy_raise_format(KV_E_INVALID_ARGUMENT, "%s cannot be exported as %s bytes", what, writable ? "writable" : "contiguous");
    return -1;
}

int kvpy_source(PyObject *obj, Py_buffer *view) { return get_view(obj, view, 0); }
int kvpy_target(PyObject *obj, Py_buffer *view) { return get_view(obj, view, 1); }

void kvpy_buffers_init(kvpy_buffers *b) {
    b->views = b->views_inline;
    b->parts = b->parts_inline;
    b->count = 0;
    b->capacity = 4;
    b->raw = 0;
    b->dev = b->dev_inline;
    b->ndev = 0;
    b->devcap = 2;
}

/* Records a declared raw part and (re)declares this list's parts for the coming calls. */
static int add_declared(kvpy_buffers *b, const kv_device_part *d) {
    if (b->ndev == b->devcap) {
        Py_ssize_t cap = b->devcap * 2;
        kv_device_part *n = PyMem_Malloc(sizeof(kv_device_part) * (size_t)cap);
        if (!n) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(n, b->dev, sizeof(kv_device_part) * (size_t)b->ndev);
        if (b->dev != b->dev_inline) PyMem_Free(b->dev);
        b->dev = n;
        b->devcap = cap;
    }
    b->dev[b->ndev++] = *d;
    kv_call_devices(b->dev, (size_t)b->ndev);
    return 0;
}

static int reserve(kvpy_buffers *b, Py_ssize_t extra) {
    if (b->count + extra <= b->capacity) return 0;
    Py_ssize_t cap = b->capacity * 2;
    while (cap < b->count + extra) cap *= 2;
    Py_buffer *v = PyMem_Malloc(sizeof(Py_buffer) * (size_t)cap);
    kv_buffer *p = PyMem_Malloc(sizeof(kv_buffer) * (size_t)cap);
    if (!v || !p) {
        PyMem_Free(v);
        PyMem_Free(p);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(v, b->views, sizeof(Py_buffer) * (size_t)b->count);
    memcpy(p, b->parts, sizeof(kv_buffer) * (size_t)b->count);
    if (b->views != b->views_inline) {
        PyMem_Free(b->views);
        PyMem_Free(b->parts);
    }
    b->views = v;
    b->parts = p;
    b->capacity = cap;
    return 0;
}

static int add_one(kvpy_buffers *b, PyObject *obj, int writable) {
    if (reserve(b, 1) < 0) return -1;
    Py_buffer *v = &b->views[b->count];
    if (get_view(obj, v, writable) < 0) return -1;
    b->parts[b->count].ptr = v->buf;
    b->parts[b->count].len = (size_t)v->len;
    b->count++;
    return 0;
}

Py_ssize_t kvpy_buffers_add(kvpy_buffers *b, PyObject *obj, int writable, int allow_list) {
    if (allow_list && (PyList_Check(obj) || PyTuple_Check(obj))) {
        Py_ssize_t start = b->count, n = PySequence_Size(obj);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(obj, i);
            if (!item) goto fail;
            int rc = add_one(b, item, writable);
            Py_DECREF(item);
            if (rc < 0) goto fail;
        }
        return n;
    fail:
        while (b->count > start) PyBuffer_Release(&b->views[--b->count]);
        return -1;
    }
    return add_one(b, obj, writable) < 0 ? -1 : 1;
}

int kvpy_raw_part(PyObject *obj, void **ptr, size_t *len, kv_device_part *dev) {
    if (!PyTuple_Check(obj)) return 0;
    Py_ssize_t size = PyTuple_Size(obj);
    if (size != 2 && size != 5) return 0;
    PyObject *a = PyTuple_GetItem(obj, 0), *n = PyTuple_GetItem(obj, 1);
    if (!PyLong_Check(a) || !PyLong_Check(n)) return 0;
    void *p = PyLong_AsVoidPtr(a);
    if (!p && PyErr_Occurred()) return -1;
    long long l = PyLong_AsLongLong(n);
    if (l == -1 && PyErr_Occurred()) return -1;
    if (l < 0 || (!p && l > 0)) {
        kvpy_raise_format(KV_E_INVALID_ARGUMENT, "raw part (address, length) is invalid: length %lld at %p", l, p);
        return -1;
    }
    kv_device_part d = {(uint64_t)(uintptr_t)p, (uint64_t)l, 0, 0, 0, 0, 0};
    if (size == 5) {
        PyObject *k = PyTuple_GetItem(obj, 2), *i = PyTuple_GetItem(obj, 3), *s = PyTuple_GetItem(obj, 4);
        if (!PyLong_Check(k) || !PyLong_Check(i)) {
            kvpy_type_error(obj, "raw part's kind and device", "ints");
            return -1;
        }
        long kind = PyLong_AsLong(k), index = PyLong_AsLong(i);
        if (PyErr_Occurred()) { /* out of a long's range */
            PyErr_Clear();
            kind = -9;
        }
        if ((kind != KV_DEVICE_HOST && kind != KV_DEVICE_CUDA) || index < -1 || index > INT32_MAX) {
            kvpy_raise_format(KV_E_INVALID_ARGUMENT, "raw part's device (kind %ld, index %ld) is invalid", kind, index);
            return -1;
        }
        d.kind = (int32_t)kind;
        d.device = (int32_t)index;
        if (s != Py_None) {
            if (!PyLong_Check(s)) {
                kvpy_type_error(s, "raw part's stream", "an int or None");
                return -1;
            }
            d.stream = PyLong_AsUnsignedLongLong(s);
            if (PyErr_Occurred()) {
                PyErr_Clear();
                kvpy_raise(KV_E_INVALID_ARGUMENT, "raw part's stream must be a stream handle (0 to 2^64-1)");
                return -1;
            }
            d.flags = KV_DEVICE_STREAM_KNOWN;
        }
    } else {
        d.length = 0; /* no declaration */
    }
    *ptr = p;
    *len = (size_t)l;
    if (dev) *dev = d;
    return 1;
}

Py_ssize_t kvpy_buffers_add_raw_list(kvpy_buffers *b, PyObject *list, int writable) {
    if (!PyList_Check(list)) {
        kvpy_type_error(list, "parts", "a list");
        return -1;
    }
    Py_ssize_t start = b->count, start_raw = b->raw, start_dev = b->ndev, n = PyList_Size(list);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GetItem(list, i);
        void *p;
        size_t len;
        kv_device_part d;
        int r = kvpy_raw_part(item, &p, &len, &d);
        if (r < 0) goto fail;
        if (r == 1) {
            if (reserve(b, 1) < 0) goto fail;
            if (d.length > 0 && add_declared(b, &d) < 0) goto fail;
            memset(&b->views[b->count], 0, sizeof(Py_buffer)); /* obj NULL: nothing to release */
            b->parts[b->count].ptr = p;
            b->parts[b->count].len = len;
            b->count++;
            b->raw++;
        } else if (add_one(b, item, writable) < 0) {
            goto fail;
        }
    }
    /* With declared raw parts, the buffer-protocol parts beside them are declared host
     * memory too: nothing in such a list needs a driver query. */
    if (b->ndev > start_dev) {
        for (Py_ssize_t i = start; i < b->count; i++) {
            if (!b->views[i].obj || b->parts[i].len == 0) continue;
            kv_device_part h = {(uint64_t)(uintptr_t)b->parts[i].ptr, (uint64_t)b->parts[i].len, 0, KV_DEVICE_HOST, 0, 0, 0};
            if (add_declared(b, &h) < 0) goto fail;
        }
    }
    return n;
fail:
    while (b->count > start) PyBuffer_Release(&b->views[--b->count]);
    b->raw = start_raw;
    b->ndev = start_dev;
    kv_call_devices(b->ndev ? b->dev : NULL, (size_t)b->ndev);
    return -1;
}

int kvpy_buffers_add_raw(kvpy_buffers *b, PyObject *address, PyObject *length) {
    PyObject *pair = PyTuple_Pack(2, address, length);
    if (!pair) return -1;
    void *p;
    size_t len;
    int r = kvpy_raw_part(pair, &p, &len, NULL);
    Py_DECREF(pair);
    if (r < 0) return -1;
    if (r == 0) {
        kvpy_type_error(address, "an address and a length", "ints");
        return -1;
    }
    if (reserve(b, 1) < 0) return -1;
    memset(&b->views[b->count], 0, sizeof(Py_buffer));
    b->parts[b->count].ptr = p;
    b->parts[b->count].len = len;
    b->count++;
    b->raw++;
    return 0;
}

size_t kvpy_buffers_bytes(const kvpy_buffers *b, Py_ssize_t first, Py_ssize_t n) {
    size_t total = 0;
    for (Py_ssize_t i = first; i < first + n; i++) total += b->parts[i].len;
    return total;
}

void kvpy_buffers_release(kvpy_buffers *b) {
    for (Py_ssize_t i = 0; i < b->count; i++) PyBuffer_Release(&b->views[i]);
    if (b->views != b->views_inline) {
        PyMem_Free(b->views);
        PyMem_Free(b->parts);
    }
    if (b->ndev) kv_call_devices(NULL, 0);
    if (b->dev != b->dev_inline) PyMem_Free(b->dev);
    kvpy_buffers_init(b);
}
