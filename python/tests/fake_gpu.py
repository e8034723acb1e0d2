"""Device memory from the CUDA driver test double (doubles/cuda_driver.c), for tests that run
kvstore's CUDA paths on a machine without a GPU.

The double is the library `KVSTORE_CUDA_DRIVER` names (kvstore loads it as its driver); this
module loads the same file with ctypes and uses only its `fakecuda_*` helpers, which never
touch contexts, so a test sees exactly the contexts kvstore retains. Objects here expose
device memory the way frameworks do: `__cuda_array_interface__` (version 3, with `stream`) and
DLPack (`__dlpack__(stream=...)`, device type 2)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from dlpack_producer import _Deleter, _Device, _DType, _Managed, _PyCapsule_New

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = ROOT / "build" / "cuda-double" / "libcuda.so.1"

LEGACY = 1          # CU_STREAM_LEGACY
NON_BLOCKING = 1    # CU_STREAM_NON_BLOCKING flag


def library_path() -> Path:
    return Path(os.environ.get("KVSTORE_CUDA_DOUBLE", DEFAULT_PATH))


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(library_path()))
        lib.fakecuda_alloc.restype = ctypes.c_uint64
        lib.fakecuda_alloc.argtypes = [ctypes.c_int, ctypes.c_size_t]
        lib.fakecuda_read.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.fakecuda_write.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.fakecuda_stream_create.restype = ctypes.c_uint64
        lib.fakecuda_stream_create.argtypes = [ctypes.c_int, ctypes.c_uint]
        lib.fakecuda_fill_async.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                            ctypes.c_size_t, ctypes.c_uint]
        lib.fakecuda_retained.argtypes = [ctypes.c_int]
        lib.cuInit.argtypes = [ctypes.c_uint]
        lib.cuEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuStreamWaitEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        lib.cuEventDestroy_v2.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


def stream(device: int = 0, nonblocking: bool = True) -> int:
    """A stream handle on `device`; non-blocking like PyTorch's side streams by default."""
    h = lib().fakecuda_stream_create(device, NON_BLOCKING if nonblocking else 0)
    assert h, "the double could not create a stream"
    return h


def retained(device: int = 0) -> int:
    """Primary-context retains held on `device` now."""
    return lib().fakecuda_retained(device)


def drain() -> None:
    lib().fakecuda_drain()


class DeviceArray:
    """`nbytes` of uint8 device memory on `device`, with `__cuda_array_interface__` naming
    `stream` (None: the interface's "no synchronisation needed"; omit: version 2, no field)."""

    _unset = object()

    def __init__(self, nbytes: int, device: int = 0, stream: object = _unset, readonly: bool = False):
        self.ptr = lib().fakecuda_alloc(device, nbytes)
        assert self.ptr, "the double is out of device memory"
        self.nbytes = nbytes
        self.device = device
        self.stream = stream
        self.readonly = readonly

    @property
    def __cuda_array_interface__(self) -> dict:
        cai = {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, self.readonly), "version": 3}
        if self.stream is not DeviceArray._unset:
            cai["stream"] = self.stream
        else:
            cai["version"] = 2
        return cai

    def fill_async(self, stream: int, byte: int, delay_ms: float) -> None:
        """Enqueues a kernel on `stream` that fills this array with `byte` after `delay_ms`."""
        assert lib().fakecuda_fill_async(stream, self.device, self.ptr, byte, self.nbytes, int(delay_ms * 1000)) == 0

    def read(self) -> bytes:
        """The bytes now (a direct look, not ordered after any stream)."""
        buf = ctypes.create_string_buffer(self.nbytes)
        assert lib().fakecuda_read(self.ptr, buf, self.nbytes) == 0
        return buf.raw

    def write(self, data: bytes) -> None:
        assert len(data) == self.nbytes
        assert lib().fakecuda_write(self.ptr, data, self.nbytes) == 0


class DLPackDeviceArray:
    """Device memory exported with DLPack (device type 2, uint8). Records the `stream` each
    consumer asked for and, as a producer whose work runs on `producer_stream`, honours it the
    way frameworks do: an event recorded on its own stream, which the consumer's stream then
    waits for (1: the legacy default stream; None: the legacy one too, as the standard says;
    -1: no synchronisation)."""

    def __init__(self, array: DeviceArray, producer_stream: int | None = None):
        self.array = array
        self.producer_stream = producer_stream
        self.requested_streams: list[object] = []
        self._shape = (ctypes.c_int64 * 1)(array.nbytes)
        self._managed = _Managed()
        t = self._managed.dl_tensor
        t.data = array.ptr
        t.device = _Device(2, array.device)
        t.ndim = 1
        t.dtype = _DType(1, 8, 1)
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0
        self._managed.deleter = _Deleter(0)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self.array.device)

    def __dlpack__(self, stream=None):  # noqa: ANN001 - DLPack signature
        self.requested_streams.append(stream)
        if self.producer_stream is not None and stream != -1:
            lib().cuInit(0)
            event = ctypes.c_void_p()
            assert lib().cuEventCreate(ctypes.byref(event), 0) == 0
            assert lib().cuEventRecord(event, self.producer_stream) == 0
            assert lib().cuStreamWaitEvent(LEGACY if stream is None else stream, event, 0) == 0
            lib().cuEventDestroy_v2(event)
        return _PyCapsule_New(ctypes.addressof(self._managed), b"dltensor", None)
