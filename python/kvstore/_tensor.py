"""Tensor support: what a tensor object is (dtype, shape, bytes, device), and where a stored
tensor is read into.

Accepted objects: numpy arrays, torch tensors, and any object exposing
``__cuda_array_interface__`` (cupy, numba) or DLPack (``__dlpack__``). torch and cupy are
imported only when the caller hands in such an object or asks for one.

The stored format is Mooncake's (fields in Sources/KVCore/TensorHeader.swift): a 304-byte header, then the raw C-contiguous
element bytes. Non-contiguous inputs are refused (``InvalidArgumentError``): kvstore never
copies a tensor behind your back; call ``np.ascontiguousarray(x)`` / ``x.contiguous()`` first.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from . import _native
from ._errors import ArgumentTypeError, InvalidArgumentError, UnsupportedError

if TYPE_CHECKING:
    import numpy as np


def _numpy() -> Any:
    """numpy, imported on first use: `import kvstore` (and so the master process) does not pay
    for it, nor start OpenBLAS's threads."""
    import numpy
    return numpy

HEADER_SIZE = _native.TENSOR_HEADER_SIZE

#: dtype name -> code, from the core (`TensorDType`). Names are numpy's and torch's (without "torch.").
DTYPE_CODES = {name: code for name, code, _ in _native.DTYPES}
DTYPE_NAMES = {code: name for name, code, _ in _native.DTYPES}
ITEM_SIZES = {code: size for _, code, size in _native.DTYPES}
#: Codes numpy has no type for, and the raw unsigned type of their size their bytes are returned as.
RAW_CODES = {DTYPE_CODES[n]: DTYPE_CODES[f"uint{ITEM_SIZES[DTYPE_CODES[n]] * 8}"]
             for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2")}


def _by_kind(kinds: dict[str, Any]) -> dict[Any, int]:
    """{kinds[k] and the size: code} for the plain types ``<kind><bits>`` and ``bool``."""
    out = {}
    for name, code, size in _native.DTYPES:
        kind = name.rstrip("0123456789")
        if kind in kinds and name[len(kind):] in ("", str(size * 8)) and code not in RAW_CODES:
            out[kinds[kind], size] = code
    return out


# Array interface typestr (without byte order) -> dtype code: "f4", "i8", "b1", ...
_TYPESTR = {f"{k}{size}": code for (k, size), code in _by_kind({"float": "f", "int": "i", "uint": "u", "bool": "b"}).items()}
# DLPack (type code, bits) -> dtype code. Type codes: 0 int, 1 uint, 2 float, 4 bfloat,
# 6 bool, 10 float8_e4m3fn, 12 float8_e5m2 (DLPack 1.1); 5 is complex.
_DLPACK = {(k, size * 8): code for (k, size), code in _by_kind({"int": 0, "uint": 1, "float": 2, "bool": 6}).items()}
_DLPACK.update({(4, 16): DTYPE_CODES["bfloat16"], (10, 8): DTYPE_CODES["float8_e4m3fn"], (12, 8): DTYPE_CODES["float8_e5m2"]})
# DLPack device types: 1 CPU, 2 CUDA, 3 CUDA pinned host, 13 CUDA managed.
_DL_HOST = {1, 3}
_DL_CUDA = {2, 13}


class TensorRef:
    """A tensor's bytes as kvstore moves them (a plain slotted class: built on every call)."""

    __slots__ = ("code", "shape", "nbytes", "part", "location", "writable", "keep")

    def __init__(self, code: int, shape: tuple[int, ...], nbytes: int, part: Any, location: str,
                 writable: bool = True, keep: Any = None) -> None:
        self.code = code
        self.shape = shape
        self.nbytes = nbytes
        #: a buffer-protocol object over the bytes (host memory), or a raw part (address,
        #: length, kind, device, stream) declaring its device and the stream that orders the
        #: owner's work on it (see `raw_part`)
        self.part = part
        #: "cpu", "cuda:N", or "cuda" when the index is the registry's to find
        self.location = location
        self.writable = writable
        #: objects that must stay alive while the bytes are used
        self.keep = keep

    @property
    def data_parts(self) -> list[Any]:
        return [self.part] if self.nbytes else []


# Raw-part device kinds (kv_accelerator.h: KV_DEVICE_HOST, KV_DEVICE_CUDA).
_KIND_HOST, _KIND_CUDA = 0, 1


def raw_part(address: int, nbytes: int, location: str, stream: int | None = None) -> tuple[int, int, int, int, int | None]:
    """A raw part that declares where its bytes are: "cpu", "cuda:N", or "cuda" (the driver
    names the GPU). ``stream``: the CUstream handle whose earlier work the copies must follow
    (0 or 1: the legacy default stream); None when unknown (kvstore then waits for all of
    the device's queued work)."""
    if location == "cpu":
        return (address, nbytes, _KIND_HOST, 0, None)
    kind, _, index = location.partition(":")
    if kind != "cuda":
        raise UnsupportedError(f"kvstore moves tensors in host memory and on CUDA devices, not on {location!r}")
    return (address, nbytes, _KIND_CUDA, int(index) if index else -1, stream)


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, unit: int) -> bool:
    """Whether `strides` (in multiples of `unit`) describe a C-contiguous layout."""
    if strides is None:
        return True
    expected = unit
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if dim > 1 and stride != expected:
            return False
        expected *= dim
    return True


def _not_contiguous(what: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{what} is not C-contiguous; kvstore stores tensors as contiguous bytes and never copies "
        "behind your back: pass np.ascontiguousarray(x) or x.contiguous()")


def _code_for(name: str, what: str) -> int:
    code = DTYPE_CODES.get(name)
    if code is None:
        raise InvalidArgumentError(
            f"{what} has dtype {name}, which kvstore cannot store (supported: {', '.join(DTYPE_CODES)})")
    return code


def describe(obj: Any, what: str = "tensor") -> TensorRef:
    """The bytes, dtype code, shape and device of a tensor object (never copies)."""
    np = sys.modules.get("numpy")   # not imported: obj cannot be an ndarray
    if np is not None and isinstance(obj, np.ndarray):
        return _describe_numpy(obj, what)
    module = type(obj).__module__.split(".")[0]
    if module == "torch" and hasattr(obj, "data_ptr"):
        return _describe_torch(obj, what)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _describe_cai(obj, cai, what)
    if hasattr(obj, "__dlpack__"):
        return _describe_dlpack(obj, what)
    raise ArgumentTypeError(
        f"{what} must be a numpy array or a tensor (torch, or an object with __cuda_array_interface__ "
        f"or __dlpack__), not {type(obj).__name__}")


#: Native little-endian numpy dtypes -> code: the fast path (a dict lookup, no dtype.name);
#: built on first use.
_NUMPY_CODES: dict[Any, int] = {}


def _numpy_codes() -> dict[Any, int]:
    if not _NUMPY_CODES:
        np = _numpy()
        _NUMPY_CODES.update({np.dtype(name).newbyteorder("<"): code for name, code in DTYPE_CODES.items()
                             if name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")})
    return _NUMPY_CODES


def _describe_numpy(a: np.ndarray, what: str) -> TensorRef:
    code = _numpy_codes().get(a.dtype)
    if code is not None and a.flags.c_contiguous:
        # A standard dtype: the array itself is the buffer (no view object to build).
        return TensorRef(code, a.shape, a.nbytes, a, "cpu", a.flags.writeable, a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        raise InvalidArgumentError(f"{what} is big-endian; stored tensors are little-endian")
    code = _code_for(a.dtype.name, what)
    if not a.flags.c_contiguous:
        raise _not_contiguous(what)
    flat = a.reshape(-1).view(_numpy().uint8)
    return TensorRef(code, tuple(int(d) for d in a.shape), int(a.nbytes), flat, "cpu", bool(a.flags.writeable), a)


def _torch_location(device: Any) -> str:
    if device.type == "cpu":
        return "cpu"
    return f"{device.type}:{device.index if device.index is not None else _torch_current(device.type)}"


def _torch_current(kind: str) -> int:
    import torch
    return int(torch.cuda.current_device()) if kind == "cuda" else 0


def _describe_torch(t: Any, what: str) -> TensorRef:
    shape = tuple(int(d) for d in t.shape)
    code = _code_for(str(t.dtype).removeprefix("torch."), what)
    if not t.is_contiguous():
        raise _not_contiguous(what)
    nbytes = int(t.numel()) * int(t.element_size())
    location = _torch_location(t.device)
    stream = None
    if t.device.type == "cuda":
        # torch queues its work on the device's current stream (a side stream when the caller
        # is inside `with torch.cuda.stream(s)`): kvstore's copies go after it.
        import torch
        stream = int(torch.cuda.current_stream(t.device).cuda_stream)
    return TensorRef(code, shape, nbytes, raw_part(int(t.data_ptr()), nbytes, location, stream), location, True, t)


def _describe_cai(obj: Any, cai: dict[str, Any], what: str) -> TensorRef:
    shape = tuple(int(d) for d in cai["shape"])
    typestr = cai["typestr"]
    if typestr[0] == ">":
        raise InvalidArgumentError(f"{what} is big-endian; stored tensors are little-endian")
    code = _TYPESTR.get(typestr[1:])
    if code is None:
        raise InvalidArgumentError(f"{what} has element type {typestr!r}, which kvstore cannot store")
    if not _c_contiguous(shape, cai.get("strides"), ITEM_SIZES[code]):
        raise _not_contiguous(what)
    address, readonly = cai["data"]
    nbytes = ITEM_SIZES[code]
    for d in shape:
        nbytes *= d
    # Version 3's "stream": the stream to order after (None: the producer says no
    # synchronisation is needed; the legacy default stream is then as good as any). Without
    # the field the stream is unknown.
    stream = None
    if "stream" in cai:
        stream = cai["stream"]
        if stream is None:
            stream = 0
        elif not isinstance(stream, int) or isinstance(stream, bool):
            raise ArgumentTypeError(f"{what}'s __cuda_array_interface__ stream must be an int or None, "
                                    f"not {type(stream).__name__}")
        elif stream < 0 or stream >= 1 << 64:
            raise InvalidArgumentError(f"{what}'s __cuda_array_interface__ stream {stream} is not a stream handle")
    # __cuda_array_interface__ does not say which GPU: the driver names it ("cuda").
    return TensorRef(code, shape, nbytes, raw_part(int(address), nbytes, "cuda", stream), "cuda", not readonly, obj)


def _describe_dlpack(obj: Any, what: str) -> TensorRef:
    dev_type, dev_id = obj.__dlpack_device__()
    if dev_type in _DL_HOST:
        location = "cpu"
    elif dev_type in _DL_CUDA:
        location = f"cuda:{dev_id}"
    else:
        raise UnsupportedError(f"{what} lives on DLPack device type {dev_type}, which kvstore does not support")
    # Ask for a versioned capsule (DLPack 1.0: it carries the read-only flag) and, for a GPU
    # tensor, for the producer to order its work before the legacy default stream
    # (stream=1), where kvstore then copies. Older producers lack the arguments: the legacy
    # capsule, and an unknown stream.
    stream = None if location == "cpu" else 1
    capsule = None
    for kwargs in ({"max_version": (1, 0), "stream": stream}, {"stream": stream}, {}):
        try:
            capsule = obj.__dlpack__(**kwargs)
            break
        except TypeError:
            continue
    if capsule is None:
        raise ArgumentTypeError(f"{what}'s __dlpack__() takes none of the standard arguments")
    if "stream" not in kwargs:
        stream = None
    address, _, _, (tcode, bits, lanes), shape, strides, read_only = _native.dlpack_info(capsule)
    code = _DLPACK.get((tcode, bits)) if lanes == 1 else None
    if code is None:
        raise InvalidArgumentError(f"{what} has DLPack dtype (code {tcode}, {bits} bits, {lanes} lanes), "
                                   "which kvstore cannot store")
    if not _c_contiguous(shape, strides, 1):
        raise _not_contiguous(what)
    nbytes = ITEM_SIZES[code]
    for d in shape:
        nbytes *= d
    return TensorRef(code, tuple(shape), nbytes, raw_part(int(address), nbytes, location, stream), location, not read_only,
                     (obj, capsule))


# ---- reading ----

def numpy_dtype(code: int) -> np.dtype:
    """The numpy dtype a stored tensor is returned as (raw unsigned for bf16 / fp8)."""
    return _numpy().dtype(DTYPE_NAMES[RAW_CODES.get(code, code)])


def framework(like: Any, device: str | None) -> str:
    """The framework a read returns: "numpy", "torch" or "cupy" (validates ``like``)."""
    if like is not None:
        module = type(like).__module__.split(".")[0]
        if module == "numpy":
            return "numpy"
        if module in ("torch", "cupy"):
            return module
        raise ArgumentTypeError(f"like must be a numpy array, torch tensor or cupy array, not {type(like).__name__}")
    if device is None or device.split(":")[0] == "cpu":
        return "numpy"
    try:
        import torch  # noqa: F401
        return "torch"
    except ImportError:
        pass
    try:
        import cupy  # noqa: F401
        return "cupy"
    except ImportError:
        raise UnsupportedError(f"get_tensor(device={device!r}) needs torch or cupy installed") from None


def check_device(device: str | None) -> None:
    if device is None:
        return
    if not isinstance(device, str):
        raise ArgumentTypeError(f"device must be a str such as 'cpu' or 'cuda:0', not {type(device).__name__}")
    name = device if ":" in device else f"{device}:0"
    if name not in _native.devices():
        raise InvalidArgumentError(f"no device {device!r} on this machine (available: {', '.join(_native.devices())})")


def allocate(code: int, shape: tuple[int, ...], kind: str, like: Any = None,
             device: str | None = None) -> tuple[Any, Any]:
    """A new tensor of framework `kind` for (code, shape), and the destination its bytes are
    copied into."""
    if kind == "numpy":
        np = _numpy()
        out = np.empty(shape, dtype=numpy_dtype(code))
        return out, out.reshape(-1).view(np.uint8)
    if kind == "torch":
        import torch
        dtype = getattr(torch, DTYPE_NAMES[code], None)
        if dtype is None:
            raise UnsupportedError(f"this torch has no {DTYPE_NAMES[code]}")
        dev = device if device is not None else (like.device if like is not None else "cpu")
        t = torch.empty(shape, dtype=dtype, device=dev)
        ref = describe(t)
        return t, ref.part if ref.nbytes else None
    import cupy
    dev_index = int(device.split(":")[1]) if device and ":" in device else None
    if dev_index is not None:
        with cupy.cuda.Device(dev_index):
            arr = cupy.empty(shape, dtype=numpy_dtype(code))
    else:
        arr = cupy.empty(shape, dtype=numpy_dtype(code))
    ref = describe(arr)
    return arr, ref.part if ref.nbytes else None


def compatible(stored: int, target: int) -> bool:
    """Whether a target of dtype `target` may receive a stored tensor of dtype `stored`."""
    return stored == target or RAW_CODES.get(stored) == target


def decode(prefix: bytes, size: int, key: str) -> tuple[int, tuple[int, ...]]:
    """Validates a stored object's header against its size; returns (code, shape)."""
    if len(prefix) < HEADER_SIZE:
        raise InvalidArgumentError(f"object {key!r} is not a tensor: {size} bytes is shorter than a tensor header")
    try:
        code, shape, data_bytes = _native.decode_tensor_header(prefix)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"object {key!r}: {e}") from None
    if HEADER_SIZE + data_bytes != size:
        raise InvalidArgumentError(
            f"object {key!r}: corrupt tensor, header says {data_bytes} data bytes but the object holds {size - HEADER_SIZE}")
    return code, shape
