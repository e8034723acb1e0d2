/* Exception mapping: the table of classes comes from kvstore/_errors.py through
 * _native._set_error_classes, so the code -> class mapping lives in exactly one place. */
#include "kvpy.h"
#include <stdarg.h>

#define KVPY_MAX_CODE 16
static PyObject *error_classes[KVPY_MAX_CODE];

PyObject *kvpy_set_error_classes(PyObject *module, PyObject *mapping) {
    (void)module;
    if (!PyDict_Check(mapping)) {
        PyErr_SetString(PyExc_TypeError, "_set_error_classes takes a dict {code: class}");
        return NULL;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(mapping, &pos, &key, &value)) {
        long code = PyLong_AsLong(key);
        if (code == -1 && PyErr_Occurred()) return NULL;
        if (code <= 0 || code >= KVPY_MAX_CODE || !PyType_Check(value)) {
            PyErr_SetString(PyExc_ValueError, "bad entry in error class mapping");
            return NULL;
        }
        Py_INCREF(value);
        PyObject *old = error_classes[code];
        error_classes[code] = value;
        Py_XDECREF(old);
    }
    Py_RETURN_NONE;
}

static PyObject *class_for(int32_t code) {
    if (code > 0 && code < KVPY_MAX_CODE && error_classes[code]) return error_classes[code];
    return PyExc_RuntimeError;
}

PyObject *kvpy_raise(int32_t code, const char *message) {
    PyErr_SetString(class_for(code), message);
    return NULL;
}

PyObject *kvpy_raise_format(int32_t code, const char *format, ...) {
    va_list args;
    va_start(args, format);
    PyErr_FormatV(class_for(code), format, args);
    va_end(args);
    return NULL;
}

PyObject *kvpy_type_error(PyObject *obj, const char *what, const char *expected) {
    PyObject *tname = PyType_GetName(Py_TYPE(obj));
    if (!tname) return NULL;
    kvpy_raise_format(KV_E_ARGUMENT_TYPE, "%s must be %s, not %U", what, expected, tname);
    Py_DECREF(tname);
    return NULL;
}

PyObject *kvpy_raise_last(int32_t code) { return kvpy_raise(code, kv_last_error(NULL)); }

PyObject *kvpy_error_object(int32_t code, const char *message) { return PyObject_CallFunction(class_for(code), "s", message); }

PyObject *kvpy_take_error(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value && tb) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}
