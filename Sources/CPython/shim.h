// Python headers for CKVStorePython. Found through pkg-config "python3" (setup.py points
// PKG_CONFIG_PATH at the running interpreter) and an explicit -I from the build scripts.
#include <Python.h>
