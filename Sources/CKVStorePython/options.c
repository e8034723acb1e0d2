/* Keyword options of the write methods (pins and TTLs) and durations in seconds. Only type
 * conversion happens here; the core checks every value (kv_put_options in kvstore_abi.h). */
#include "kvpy.h"

int kvpy_number(PyObject *obj, const char *name, const char *expected, double *out) {
    if (PyBool_Check(obj) || !(PyLong_Check(obj) || PyFloat_Check(obj))) {
        kvpy_type_error(obj, name, expected);
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

int kvpy_seconds(PyObject *obj, const char *name, double *out) { return kvpy_number(obj, name, "a number of seconds (int or float)", out); }

int kvpy_flag(PyObject *obj, const char *name, int *out) {
    if (!PyBool_Check(obj)) {
        kvpy_type_error(obj, name, "True or False");
        return -1;
    }
    *out = obj == Py_True;
    return 0;
}

static int flag_arg(PyObject *obj, const char *name, uint32_t bit, uint32_t *flags) {
    int on;
    if (kvpy_flag(obj, name, &on) < 0) return -1;
    if (on) *flags |= bit;
    return 0;
}

/* replicas=N: an int; the core checks 1..16 (values beyond 32 bits are refused here). */
static int replicas_arg(PyObject *v, kv_put_options *out) {
    if (PyBool_Check(v) || !PyLong_Check(v)) {
        kvpy_type_error(v, "replicas", "an int");
        return -1;
    }
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (n == -1 && PyErr_Occurred()) return -1;
    if (overflow || n < 0 || n > 0xffffffffLL) {
        /* Not even a 32-bit count: the core's range (1...16) is its own to state. */
        kvpy_raise_format(KV_E_INVALID_ARGUMENT, "the replica count %R is out of range", v);
        return -1;
    }
    out->replicas = (uint32_t)n;
    out->flags |= KV_OPT_REPLICAS;
    return 0;
}

int kvpy_put_options(const char *fname, PyObject *const *kwvalues, PyObject *kwnames, kv_put_options *out) {
    out->flags = 0;
    out->ttl = 0;
    out->soft_pin_ttl = 0;
    out->replicas = 1;
    if (!kwnames) return 0;
    Py_ssize_t n = PyTuple_Size(kwnames);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GetItem(kwnames, i), *v = kwvalues[i];
        if (!name) return -1;
        int rc;
        if (PyUnicode_CompareWithASCIIString(name, "hard_pin") == 0) {
            rc = flag_arg(v, "hard_pin", KV_PIN_HARD, &out->flags);
        } else if (PyUnicode_CompareWithASCIIString(name, "soft_pin") == 0) {
            rc = flag_arg(v, "soft_pin", KV_PIN_SOFT, &out->flags);
        } else if (PyUnicode_CompareWithASCIIString(name, "ttl") == 0) {
            rc = v == Py_None ? 0 : kvpy_seconds(v, "ttl", &out->ttl);
            if (rc == 0 && v != Py_None) out->flags |= KV_OPT_TTL;
        } else if (PyUnicode_CompareWithASCIIString(name, "soft_pin_ttl") == 0) {
            rc = v == Py_None ? 0 : kvpy_seconds(v, "soft_pin_ttl", &out->soft_pin_ttl);
            if (rc == 0 && v != Py_None) out->flags |= KV_OPT_SOFT_PIN_TTL;
        } else if (PyUnicode_CompareWithASCIIString(name, "replicas") == 0) {
            rc = replicas_arg(v, out);
        } else if (PyUnicode_CompareWithASCIIString(name, "checksum") == 0) {
            int on;
            rc = kvpy_flag(v, "checksum", &on);
            if (rc == 0) out->flags |= on ? KV_OPT_CHECKSUM : KV_OPT_NO_CHECKSUM;
        } else {
            kvpy_raise_format(KV_E_ARGUMENT_TYPE, "%s() got an unknown option %R; the options are hard_pin, soft_pin, soft_pin_ttl, ttl, replicas, checksum",
                              fname, name);
            return -1;
        }
        if (rc < 0) return -1;
    }
    return 0;
}
