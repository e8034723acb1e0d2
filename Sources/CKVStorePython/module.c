#include <Python.h>
PyMODINIT_FUNC PyInit__native(void);
