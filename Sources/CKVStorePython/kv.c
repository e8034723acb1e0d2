/* KV layouts and block moves (prefill -> decode): thin wrappers over kv_layout_* and
 * kv_blocks_move. kvstore/_store.py packs descriptors into kv_block_buffer records and block
 * lists into int64 arrays; this file only passes them through. */
#include "kvpy.h"
#include <stddef.h>

_Static_assert(sizeof(kv_block_buffer) == 72, "kv_block_buffer is packed by _store.py as '<qi4xQQQ32s'");

/* A read-only contiguous buffer of whole int64s (the block lists _kv.py packs). */
static int int64_view(PyObject *obj, const char *what, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        kvpy_type_error(obj, what, "an int64 array");
        return -1;
    }
    if (view->len % 8) {
        PyBuffer_Release(view);
        kvpy_raise_format(KV_E_INVALID_ARGUMENT, "%s: %zd bytes is not a whole number of int64s", what, view->len);
        return -1;
    }
    return 0;
}

/* _kv_register(node, packed) */
PyObject *kvpy_kv_register(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (kvpy_check_nargs("_kv_register", nargs, 2, 2) < 0 || kvpy_ensure_open(self) < 0) return NULL;
    const char *node;
    Py_ssize_t nlen;
    if (kvpy_utf8(args[0], "node_id", &node, &nlen) < 0) return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_SIMPLE) < 0) return NULL;
    int32_t st;
    if (v.len % sizeof(kv_block_buffer))
        st = -1;
    else {
        Py_BEGIN_ALLOW_THREADS st =
            kv_layout_register(self->store, node, (size_t)nlen, (const kv_block_buffer *)v.buf, (size_t)(v.len / sizeof(kv_block_buffer)));
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&v);
    if (st < 0) return kvpy_raise(KV_E_INVALID_ARGUMENT, "packed descriptors have a partial record");
    if (st) return kvpy_raise_last(st);
    Py_RETURN_NONE;
}

/* _kv_unregister() */
PyObject *kvpy_kv_unregister(StoreObject *self, PyObject *unused) {
    (void)unused;
    if (kvpy_ensure_open(self) < 0) return NULL;
    int32_t st;
    Py_BEGIN_ALLOW_THREADS st = kv_layout_unregister(self->store);
    Py_END_ALLOW_THREADS if (st) return kvpy_raise_last(st);
    Py_RETURN_NONE;
}

/* _kv_fetch(node) -> bytes of packed kv_block_buffer records */
PyObject *kvpy_kv_fetch(StoreObject *self, PyObject *node_obj) {
    if (kvpy_ensure_open(self) < 0) return NULL;
    const char *node;
    Py_ssize_t nlen;
    if (kvpy_utf8(node_obj, "node_id", &node, &nlen) < 0) return NULL;
    size_t count = 0, capacity = 0;
    kv_block_buffer *buf = NULL;
    for (int attempt = 0; attempt < 4; attempt++) { /* the layout may be replaced between calls */
        int32_t st;
        Py_BEGIN_ALLOW_THREADS st = kv_layout_fetch(self->store, node, (size_t)nlen, buf, capacity, &count);
        Py_END_ALLOW_THREADS if (st) {
            PyMem_Free(buf);
            return kvpy_raise_last(st);
        }
        if (count <= capacity) {
            PyObject *out = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)(count * sizeof(kv_block_buffer)));
            PyMem_Free(buf);
            return out;
        }
        PyMem_Free(buf);
        capacity = count;
        buf = PyMem_Malloc(capacity * sizeof(kv_block_buffer));
        if (!buf) return PyErr_NoMemory();
    }
    PyMem_Free(buf);
    return kvpy_raise(KV_E_TRANSFER, "the layout kept changing while it was fetched");
}

/* _kv_move(peer, flags, src, dst, layers_or_None) -> transfers issued */
PyObject *kvpy_kv_move(StoreObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (kvpy_check_nargs("_kv_move", nargs, 5, 5) < 0 || kvpy_ensure_open(self) < 0) return NULL;
    const char *peer;
    Py_ssize_t plen;
    if (kvpy_utf8(args[0], "peer", &peer, &plen) < 0) return NULL;
    unsigned long flags = PyLong_AsUnsignedLong(args[1]);
    if (flags == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    Py_buffer s, d, l;
    int have_layers = args[4] != Py_None;
    if (int64_view(args[2], "src_block_ids", &s) < 0) return NULL;
    if (int64_view(args[3], "dst_block_ids", &d) < 0) {
        PyBuffer_Release(&s);
        return NULL;
    }
    if (have_layers && int64_view(args[4], "layers", &l) < 0) {
        PyBuffer_Release(&s);
        PyBuffer_Release(&d);
        return NULL;
    }
    int32_t st;
    uint64_t transfers = 0;
    /* An empty layer list is a list (refused by the core), never "all layers": no NULL. */
    static const int64_t no_layers = 0;
    const int64_t *layers_ptr = have_layers && l.len ? (const int64_t *)l.buf : &no_layers;
    if (s.len != d.len) {
        st = -1;
    } else {
        Py_BEGIN_ALLOW_THREADS st = kv_blocks_move(self->store, peer, (size_t)plen, (uint32_t)flags, (const int64_t *)s.buf, (const int64_t *)d.buf,
                                                   (size_t)(s.len / 8), have_layers ? layers_ptr : NULL, have_layers ? (size_t)(l.len / 8) : 0, &transfers);
        Py_END_ALLOW_THREADS
    }
    Py_ssize_t ns = s.len / 8, nd = d.len / 8;
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    if (have_layers) PyBuffer_Release(&l);
    if (st < 0) return kvpy_raise_format(KV_E_INVALID_ARGUMENT, "%zd source blocks but %zd destination blocks: the lists must be equally long", ns, nd);
    if (st) return kvpy_raise_last(st);
    return PyLong_FromUnsignedLongLong(transfers);
}

/* _keys_page(after: str | None) -> (list[str], more: bool): one page of keys in byte order
 * after `after` (kv_keys_page); Store.keys walks the pages. */
PyObject *kvpy_keys_page(StoreObject *self, PyObject *after) {
    if (kvpy_ensure_open(self) < 0) return NULL;
    const char *a = NULL;
    Py_ssize_t alen = 0;
    if (after != Py_None) {
        if (!PyUnicode_Check(after)) return kvpy_raise_format(KV_E_INVALID_ARGUMENT, "after must be a str or None");
        a = PyUnicode_AsUTF8AndSize(after, &alen);
        if (!a) return NULL;
    }
    unsigned char *buf = PyMem_Malloc(KV_KEYS_PAGE_BYTES);
    if (!buf) return PyErr_NoMemory();
    size_t count = 0;
    int32_t more = 0, st;
    Py_BEGIN_ALLOW_THREADS st = kv_keys_page(self->store, a, (size_t)alen, buf, KV_KEYS_PAGE_BYTES, &count, &more);
    Py_END_ALLOW_THREADS if (st) {
        PyMem_Free(buf);
        return kvpy_raise_last(st);
    }
    PyObject *list = PyList_New((Py_ssize_t)count);
    size_t at = 0;
    for (size_t i = 0; list && i < count; i++) {
        uint32_t n = (uint32_t)buf[at] | (uint32_t)buf[at + 1] << 8 | (uint32_t)buf[at + 2] << 16 | (uint32_t)buf[at + 3] << 24;
        PyObject *k = PyUnicode_DecodeUTF8((const char *)buf + at + 4, (Py_ssize_t)n, "strict");
        if (!k) {
            Py_CLEAR(list);
            break;
        }
        PyList_SetItem(list, (Py_ssize_t)i, k);
        at += 4 + n;
    }
    PyMem_Free(buf);
    if (!list) return NULL;
    return Py_BuildValue("(NO)", list, more ? Py_True : Py_False);
}
