"""A minimal DLPack producer built with ctypes, for tests: exposes any host memory (a numpy
array's bytes) as a DLPack tensor with a chosen dtype, shape and strides — including dtypes
numpy lacks (bf16, fp8) and layouts numpy would not export. Implements the legacy "dltensor"
capsule protocol (DLPack 0.x struct layout) and, when asked with ``max_version`` (1, x), the
versioned "dltensor_versioned" capsule of DLPack 1.0, with its read-only flag."""

from __future__ import annotations

import ctypes

import numpy as np


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32),
                ("dtype", _DType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Managed))
_Managed._fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]


class _ManagedVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _Tensor)]


READ_ONLY = 1   # DLPACK_FLAG_BITMASK_READ_ONLY

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class DLPackTensor:
    """`storage` (a numpy array) seen as a tensor of DLPack dtype (code, bits, lanes)."""

    def __init__(self, storage: np.ndarray, code: int, bits: int, shape: tuple[int, ...],
                 strides: tuple[int, ...] | None = None, lanes: int = 1, device: tuple[int, int] = (1, 0),
                 read_only: bool = False, versioned: bool = True):
        self.storage = storage
        self.read_only = read_only
        self.versioned = versioned
        self._device = device
        n = len(shape)
        self._shape = (ctypes.c_int64 * max(n, 1))(*shape)
        self._strides = (ctypes.c_int64 * max(n, 1))(*strides) if strides is not None else None
        self._managed = _Managed()
        t = self._managed.dl_tensor
        t.data = storage.ctypes.data
        t.device = _Device(*device)
        t.ndim = n
        t.dtype = _DType(code, bits, lanes)
        t.shape = self._shape
        t.strides = self._strides if self._strides is not None else None
        t.byte_offset = 0
        # The capsule has no destructor: this object owns the memory and outlives the call.
        self._managed.deleter = _Deleter(0)
        self._versioned = _ManagedVersioned(1, 0, None, None, READ_ONLY if read_only else 0, t)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device

    def __dlpack__(self, stream=None, max_version=None):  # noqa: ANN001 - DLPack signature
        if self.versioned and max_version is not None and max_version[0] >= 1:
            return _PyCapsule_New(ctypes.addressof(self._versioned), b"dltensor_versioned", None)
        return _PyCapsule_New(ctypes.addressof(self._managed), b"dltensor", None)
