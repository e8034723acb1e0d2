/* Module init of kvstore._native. */
#include "kvpy.h"

static PyMethodDef module_methods[] = {
    {"_set_error_classes", (PyCFunction)kvpy_set_error_classes, METH_O,
     "Installs the {code: exception class} mapping (called once by kvstore._errors)."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m) {
    PyObject *type = PyType_FromSpec(&kvpy_store_spec);
    if (!type) return -1;
    if (PyModule_AddObject(m, "Store", type) < 0) { Py_DECREF(type); return -1; }
    if (PyModule_AddIntConstant(m, "MAX_KEY_BYTES", (long)kv_max_key_bytes()) < 0) return -1;
    if (PyModule_AddIntConstant(m, "GIL_RELEASE_BYTES", KVPY_GIL_THRESHOLD) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "kvstore._native",
    "Native core of kvstore (Swift, through a flat C ABI). Use the kvstore package instead.",
    0, module_methods, module_slots, NULL, NULL, NULL,
};

__attribute__((visibility("default"))) PyMODINIT_FUNC PyInit__native(void) {
    return PyModuleDef_Init(&module_def);
}
