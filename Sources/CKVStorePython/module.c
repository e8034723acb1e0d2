/* Module init of kvstore._native. */
#include "kvpy.h"

#include <stddef.h>
#include <string.h>

/* master_main(program, args): the network master with its command line (kv_master_main);
 * returns the exit status. The GIL is released while it serves. */
static PyObject *kvpy_master_main(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyList_Check(args[1]))
        return kvpy_raise_format(KV_E_ARGUMENT_TYPE, "master_main(program: str, args: list[str])");
    const char *program = PyUnicode_AsUTF8AndSize(args[0], NULL);
    if (!program) return NULL;
    Py_ssize_t n = PyList_Size(args[1]);
    const char **argv = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (!argv) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyList_GetItem(args[1], i);
        argv[i] = a && PyUnicode_Check(a) ? PyUnicode_AsUTF8AndSize(a, NULL) : NULL;
        if (!argv[i]) {
            PyMem_Free(argv);
            if (!PyErr_Occurred()) kvpy_raise_format(KV_E_ARGUMENT_TYPE, "master_main: every argument must be a str");
            return NULL;
        }
    }
    int32_t status;
    Py_BEGIN_ALLOW_THREADS status = kv_master_main(program, argv, (size_t)n);
    Py_END_ALLOW_THREADS PyMem_Free(argv);
    return PyLong_FromLong(status);
}

static PyMethodDef module_methods[] = {
    {"master_main", (PyCFunction)(void (*)(void))kvpy_master_main, METH_FASTCALL,
     "master_main(program, args) -> int: the network master with the kvstore-master command line; the exit status."},
    {"_set_error_classes", (PyCFunction)kvpy_set_error_classes, METH_O, "Installs the {code: exception class} mapping (called once by kvstore._errors)."},
    {"tensor_header", (PyCFunction)(void (*)(void))kvpy_tensor_header, METH_FASTCALL,
     "tensor_header(dtype_code, shape) -> bytes: the 304-byte header of a full tensor."},
    {"decode_tensor_header", (PyCFunction)kvpy_decode_tensor_header, METH_O,
     "decode_tensor_header(buffer) -> (dtype_code, shape, data_bytes); InvalidArgumentError when corrupt."},
    {"dlpack_info", (PyCFunction)kvpy_dlpack_info, METH_O,
     "dlpack_info(capsule) -> (address, device_type, device_id, (code, bits, lanes), shape, strides, read_only)."},
    {"devices", (PyCFunction)(void (*)(void))kvpy_devices, METH_FASTCALL, "devices(refresh=False) -> list of locations ('cpu:0', 'cuda:0', ...)."},
    {"rdma_info", (PyCFunction)(void (*)(void))kvpy_rdma_info, METH_FASTCALL, "rdma_info() -> text: RDMA discovery (parsed by kvstore.rdma())."},
    {NULL, NULL, 0, NULL},
};

/* _native.DTYPES: ((name, code, item size), ...) of every element type the core stores, read
 * from the core (kv_tensor_dtype), so that Python does not keep its own table. */
static int add_dtypes(PyObject *m) {
    PyObject *list = PyList_New(0);
    if (!list) return -1;
    const char *name;
    int32_t size;
    for (int32_t code = 0; kv_tensor_dtype(code, &name, &size) == KV_OK; code++) {
        PyObject *t = Py_BuildValue("(sii)", name, (int)code, (int)size);
        if (!t || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return -1;
        }
        Py_DECREF(t);
    }
    PyObject *tuple = PyList_AsTuple(list);
    Py_DECREF(list);
    if (!tuple || PyModule_AddObject(m, "DTYPES", tuple) < 0) {
        Py_XDECREF(tuple);
        return -1;
    }
    return 0;
}

/* The C ABI's constants, so that Python reads them from here instead of repeating them:
 * _native.ABI maps each name to its value (error codes, flags, record sizes and offsets). */
static int add_abi_constants(PyObject *m) {
    static const struct {
        const char *name;
        long value;
    } table[] = {
        {"E_OBJECT_NOT_FOUND", KV_E_OBJECT_NOT_FOUND},
        {"E_OBJECT_EXISTS", KV_E_OBJECT_EXISTS},
        {"E_NO_SPACE", KV_E_NO_SPACE},
        {"E_LEASE_HELD", KV_E_LEASE_HELD},
        {"E_INVALID_ARGUMENT", KV_E_INVALID_ARGUMENT},
        {"E_TRANSFER", KV_E_TRANSFER},
        {"E_STORE_CLOSED", KV_E_STORE_CLOSED},
        {"E_UNSUPPORTED", KV_E_UNSUPPORTED},
        {"E_INTERNAL", KV_E_INTERNAL},
        {"E_ARGUMENT_TYPE", KV_E_ARGUMENT_TYPE},
        {"E_CHECKSUM", KV_E_CHECKSUM},
        {"KIND_KEY", KV_KIND_KEY},
        {"KIND_VALUE", KV_KIND_VALUE},
        {"KIND_INDEX", KV_KIND_INDEX},
        {"BLOCKS_PUSH", KV_BLOCKS_PUSH},
        {"BLOCKS_AGGREGATED", KV_BLOCKS_AGGREGATED},
        {"BLOCK_BUFFER_SIZE", (long)sizeof(kv_block_buffer)},
        {"BLOCK_BUFFER_LAYER", (long)offsetof(kv_block_buffer, layer)},
        {"BLOCK_BUFFER_KIND", (long)offsetof(kv_block_buffer, kind)},
        {"BLOCK_BUFFER_ADDRESS", (long)offsetof(kv_block_buffer, address)},
        {"BLOCK_BUFFER_LENGTH", (long)offsetof(kv_block_buffer, length)},
        {"BLOCK_BUFFER_BYTES_PER_BLOCK", (long)offsetof(kv_block_buffer, bytes_per_block)},
        {"BLOCK_BUFFER_LOCATION", (long)offsetof(kv_block_buffer, location)},
        {"BLOCK_BUFFER_LOCATION_BYTES", (long)sizeof(((kv_block_buffer *)0)->location)},
        {"KEYS_PAGE_BYTES", KV_KEYS_PAGE_BYTES},
    };
    PyObject *d = PyDict_New();
    if (!d) return -1;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        PyObject *v = PyLong_FromLong(table[i].value);
        if (!v || PyDict_SetItemString(d, table[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return -1;
        }
        Py_DECREF(v);
    }
    if (PyModule_AddObject(m, "ABI", d) < 0) {
        Py_DECREF(d);
        return -1;
    }
    return 0;
}

static int module_exec(PyObject *m) {
    if (add_abi_constants(m) < 0) return -1;
    PyObject *type = PyType_FromSpec(&kvpy_store_spec);
    if (!type) return -1;
    if (PyModule_AddObject(m, "Store", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    PyObject *buffer = PyType_FromSpec(&kvpy_buffer_spec);
    if (!buffer) return -1;
    Py_INCREF(buffer);
    kvpy_buffer_type = buffer; /* kept for the module's life */
    if (PyModule_AddObject(m, "Buffer", buffer) < 0) {
        Py_DECREF(buffer);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "MAX_KEY_BYTES", (long)kv_max_key_bytes()) < 0) return -1;
    if (PyModule_AddIntConstant(m, "GIL_RELEASE_BYTES", KVPY_GIL_THRESHOLD) < 0) return -1;
    kvpy_install_wait_hooks(); /* a wait of a call that kept the GIL releases it */
    if (PyModule_AddIntConstant(m, "TENSOR_HEADER_SIZE", KV_TENSOR_HEADER_SIZE) < 0) return -1;
    return add_dtypes(m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "kvstore._native",
    "Native core of kvstore (Swift, through a flat C ABI). Use the kvstore package instead.",
    0,
    module_methods,
    module_slots,
    NULL,
    NULL,
    NULL,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&module_def); }
