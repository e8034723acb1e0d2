"""Tensors stored as parallel shards, read back in any shard layout (Mooncake's unified parallel
tensor IO, on kvstore's core).

A writer stores its shard of a tensor, named by parallel axes (TP, DP, EP, PP: kind, rank, size,
and for the axes that split the tensor, the dimension they split). A reader asks for the shard
as stored, for a shard of another layout (TP=4 shards read as TP=2), or for the full tensor: the
read is planned into ranged reads (``kv_batch_read_ranges``) that copy each needed piece of each
stored shard straight into the destination, with every shard held by one master request: no
full tensor is staged to serve a shard.

Storage, per logical key K:

- the shards: one tensor object each (the 304-byte tensor header, then the shard's bytes),
  named K + "_<kind>_<rank>" per axis; a single TP axis gives Mooncake's "K_tp_<rank>";
- the layout: ``K + LAYOUT_SUFFIX``, a small JSON object with the full shape, the dtype code and
  the axes (kind, size, split dimension, expert and stage ids; no ranks). Every writer of the
  same tensor writes the same layout; a different one is refused.

Splitting follows ``numpy.array_split``: along a split dimension of n elements, rank r of size s
gets ``n // s + (1 if r < n % s else 0)`` elements starting after the ranks before it. Axes
without a split dimension (DP replicas, PP stages, EP without one) only name the shard: a
reader takes the rank its own target names for that axis, else rank 0.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native, _tensor
from ._errors import InvalidArgumentError, ObjectExistsError, ObjectNotFoundError

__all__ = ["Axis", "LAYOUT_SUFFIX", "Layout", "get_tensor", "put_shards", "put_tensor", "read_layout", "shard_key",
           "split_range"]

KINDS = ("tp", "dp", "ep", "pp")
LAYOUT_SUFFIX = ".kvstore-layout"
MAX_AXES = 8
MAX_LAYOUT_BYTES = 4096
#: Most shards one tensor is split into (the product of its splitting axes' sizes): a read
#: plans one ranged read per stored shard.
MAX_SHARDS = 4096
#: Largest full tensor a layout may describe (a layout is read from the store: another writer
#: may have forged it, and a read allocates its result before the shards are checked).
MAX_TENSOR_BYTES = 1 << 40


@dataclass(frozen=True)
class Axis:
    """One parallel axis of a shard: ``kind`` ("tp", "dp", "ep", "pp"), this shard's ``rank`` of
    ``size``, and ``split_dim``, the tensor dimension the axis splits (None: it does not split)."""

    kind: str
    rank: int
    size: int
    split_dim: int | None = None
    expert_id: int | None = None
    stage_id: int | None = None

    def check(self, ndim: int | None = None) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"axis kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("rank", "size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidArgumentError(f"axis {name} must be an int, not {v!r}")
        if not 1 <= self.size <= 1 << 16 or not 0 <= self.rank < self.size:
            raise InvalidArgumentError(f"axis {self.kind}: rank {self.rank} of size {self.size} is out of range")
        for name in ("split_dim", "expert_id", "stage_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidArgumentError(f"axis {name} must be None or a non-negative int, not {v!r}")
        if ndim is not None and self.split_dim is not None and self.split_dim >= ndim:
            raise InvalidArgumentError(f"axis {self.kind} splits dimension {self.split_dim} of a {ndim}-d tensor")

    def described(self) -> dict[str, Any]:
        """The axis without its rank, as the layout records it."""
        return {"kind": self.kind, "size": self.size, "split_dim": self.split_dim,
                "expert_id": self.expert_id, "stage_id": self.stage_id}


def check_axes(axes: Sequence[Axis], ndim: int | None = None) -> tuple[Axis, ...]:
    axes = tuple(axes)
    if not 1 <= len(axes) <= MAX_AXES:
        raise InvalidArgumentError(f"a shard has 1 to {MAX_AXES} axes, not {len(axes)}")
    for a in axes:
        if not isinstance(a, Axis):
            raise InvalidArgumentError(f"an axis must be a kvstore.parallel.Axis, not {type(a).__name__}")
        a.check(ndim)
    if len({a.kind for a in axes}) != len(axes):
        raise InvalidArgumentError("each axis kind may appear once")
    if math.prod(a.size for a in axes if a.split_dim is not None) > MAX_SHARDS:
        raise InvalidArgumentError(f"the splitting axes make more than {MAX_SHARDS} shards")
    return axes


def shard_key(key: str, axes: Sequence[Axis]) -> str:
    """The object that holds the shard `axes` of `key`."""
    return key + "".join(f"_{a.kind}_{a.rank}" for a in axes)


def split_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s elements [start, stop) of `n` split `size` ways (numpy.array_split)."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def region(shape: Sequence[int], axes: Sequence[Axis]) -> list[tuple[int, int]]:
    """The part of a tensor of `shape` that shard `axes` holds: [start, stop) per dimension (the
    splitting axes applied in order, each to what the ones before it left)."""
    out = [(0, n) for n in shape]
    for a in axes:
        if a.split_dim is not None:
            lo, hi = out[a.split_dim]
            s, e = split_range(hi - lo, a.size, a.rank)
            out[a.split_dim] = (lo + s, lo + e)
    return out


@dataclass(frozen=True)
class Layout:
    """How a tensor is stored: its full shape, dtype code, and the axes of its shards (ranks
    ignored)."""

    shape: tuple[int, ...]
    code: int
    axes: tuple[Axis, ...]

    def encode(self) -> bytes:
        return json.dumps({"version": 1, "shape": list(self.shape), "dtype": self.code,
                           "axes": [a.described() for a in self.axes]}, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes, key: str) -> Layout:
        try:
            if len(raw) > MAX_LAYOUT_BYTES:
                raise ValueError("too long")
            d = json.loads(raw)
            shape = tuple(d["shape"])
            code = d["dtype"]
            axes = tuple(Axis(a["kind"], 0, a["size"], a["split_dim"], a["expert_id"], a["stage_id"]) for a in d["axes"])
            if d["version"] != 1 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape) \
                    or len(shape) > 8 or code not in _tensor.ITEM_SIZES:
                raise ValueError("bad fields")
            if math.prod(shape) * _tensor.ITEM_SIZES[code] > MAX_TENSOR_BYTES:
                raise ValueError(f"a tensor of shape {shape} is larger than {MAX_TENSOR_BYTES} bytes")
            check_axes(axes, len(shape))
        except (ValueError, KeyError, TypeError, InvalidArgumentError) as e:
            raise InvalidArgumentError(f"{key + LAYOUT_SUFFIX!r} is not a kvstore tensor layout: {e}") from None
        return Layout(shape, code, axes)

    def same_as(self, other: Layout) -> bool:
        return self.shape == other.shape and self.code == other.code and \
            [a.described() for a in self.axes] == [a.described() for a in other.axes]


def _strides(extents: Sequence[int], itemsize: int) -> list[int]:
    out, step = [0] * len(extents), itemsize
    for d in range(len(extents) - 1, -1, -1):
        out[d] = step
        step *= extents[d]
    return out


def runs(src: Sequence[tuple[int, int]], dst: Sequence[tuple[int, int]], itemsize: int) -> np.ndarray | None:
    """The copies that move the part both regions share from a C-contiguous array holding
    region `src` to one holding region `dst` (regions of one tensor, [start, stop) per
    dimension): an int64 array of (source offset, destination offset, length) rows in bytes,
    each run as long as both layouts allow; None when they share nothing."""
    common = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(src, dst)]
    if any(lo >= hi for lo, hi in common):
        return None
    ndim = len(common)
    if ndim == 0:
        return np.array([[0, 0, itemsize]], dtype=np.int64)
    s_ext = [b - a for a, b in src]
    d_ext = [b - a for a, b in dst]
    c_ext = [b - a for a, b in common]
    # Dimensions after j are covered whole in both arrays: a run spans them and c_ext[j] rows of j.
    j = ndim - 1
    while j > 0 and c_ext[j] == s_ext[j] == d_ext[j]:
        j -= 1
    length = c_ext[j] * math.prod(c_ext[j + 1:]) * itemsize
    s_st, d_st = _strides(s_ext, itemsize), _strides(d_ext, itemsize)
    s_base = sum((common[d][0] - src[d][0]) * s_st[d] for d in range(ndim))
    d_base = sum((common[d][0] - dst[d][0]) * d_st[d] for d in range(ndim))
    if j == 0:
        return np.array([[s_base, d_base, length]], dtype=np.int64)
    grids = np.meshgrid(*[np.arange(c_ext[d], dtype=np.int64) for d in range(j)], indexing="ij")
    count = math.prod(c_ext[:j])
    out = np.empty((count, 3), dtype=np.int64)
    out[:, 0] = s_base + sum(g.reshape(-1) * s_st[d] for d, g in enumerate(grids))
    out[:, 1] = d_base + sum(g.reshape(-1) * d_st[d] for d, g in enumerate(grids))
    out[:, 2] = length
    return out


def read_layout(store: Any, key: str) -> Layout | None:
    """`key`'s layout, or None when it is not stored in shards (at most MAX_LAYOUT_BYTES are
    read: a larger object is refused as not a layout)."""
    try:
        raw = store._get_small(key + LAYOUT_SUFFIX, MAX_LAYOUT_BYTES)
    except ObjectNotFoundError:
        return None
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{key + LAYOUT_SUFFIX!r} is not a kvstore tensor layout: {e}") from None
    return Layout.decode(raw, key)


def _write_layout(store: Any, key: str, layout: Layout, upsert: bool) -> None:
    """Records the layout; a writer of the same tensor finds the same one (an upsert replaces
    it)."""
    raw = layout.encode()
    if upsert:
        store.upsert(key + LAYOUT_SUFFIX, raw)
        return
    try:
        store.put(key + LAYOUT_SUFFIX, raw)
    except ObjectExistsError:
        have = read_layout(store, key)
        if have is None or not have.same_as(layout):
            raise InvalidArgumentError(f"{key!r} is already stored with another layout "
                                       f"({have.shape if have else '?'}, {have.axes if have else '?'})") from None


def _shard(ref: _tensor.TensorRef, axes: tuple[Axis, ...], full_input: bool) -> tuple[Layout, list[Any]]:
    """The layout shard `axes` of described tensor `ref` belongs to, and the parts of its
    object (its header, then its bytes: cut out of a full input run by run, nothing staged)."""
    itemsize = _tensor.ITEM_SIZES[ref.code]
    if full_input:
        full = tuple(ref.shape)
        part = region(full, axes)
        shard_shape = tuple(b - a for a, b in part)
        plan = runs([(0, n) for n in full], part, itemsize)
        address, _ = _address(ref)
        # the runs come in the shard's order: the parts of one write, each copied once
        data = [] if plan is None else [(address + int(s), int(n)) for s, _d, n in plan.tolist()]
    else:
        shard_shape = tuple(ref.shape)
        full_list = list(shard_shape)
        for a in reversed(axes):
            if a.split_dim is not None:
                full_list[a.split_dim] *= a.size
        full = tuple(full_list)   # every rank's shard of it has this shard's shape
        data = ref.data_parts
    return Layout(full, ref.code, axes), [_native.tensor_header(ref.code, shard_shape), *data]


def put_tensor(store: Any, key: str, tensor: Any, axes: Sequence[Axis], *, full_input: bool,
               upsert: bool = False, **options: Any) -> None:
    """Stores the shard `axes` of a tensor under `key`. With `full_input`, `tensor` is the full
    tensor and the shard is cut out of it while it is copied (one copy of each run of the shard,
    nothing staged); otherwise `tensor` is the shard itself, and the full tensor is taken to be
    split evenly (its shape is the shard's, multiplied by each splitting axis's size).
    ``options`` are ``put``'s."""
    ref = _tensor.describe(tensor)
    axes = check_axes(axes, len(ref.shape))
    layout, parts = _shard(ref, axes, full_input)
    _write_layout(store, key, layout, upsert)
    store._put_raw(shard_key(key, axes), parts, upsert, **options)


def put_shards(store: Any, key: str, tensor: Any, shards: Sequence[Sequence[Axis]], *, upsert: bool = False,
               **options: Any) -> list[Exception | None]:
    """Stores several shards of one full tensor (one writer holding all of it: Mooncake's
    ``put_tensor_with_tp``): the layout written once, the shards in one batch write, each cut
    out of the tensor as it is copied. The shards must share one layout. One result per shard."""
    ref = _tensor.describe(tensor)
    cut = [_shard(ref, check_axes(axes, len(ref.shape)), True) for axes in shards]
    if not cut or any(not layout.same_as(cut[0][0]) for layout, _ in cut):
        raise InvalidArgumentError("the shards must be one or more of one layout")
    _write_layout(store, key, cut[0][0], upsert)
    return store._batch_put_raw([shard_key(key, tuple(axes)) for axes in shards], [parts for _, parts in cut], upsert,
                                **options)


def _address(ref: _tensor.TensorRef) -> tuple[int, int]:
    """(address, length) of a described tensor's bytes."""
    part = ref.part
    if isinstance(part, tuple):
        return int(part[0]), int(part[1])
    view = np.frombuffer(part, dtype=np.uint8) if ref.nbytes else np.empty(0, np.uint8)
    return int(view.ctypes.data) if ref.nbytes else 0, ref.nbytes


def _stored_shards(layout: Layout, want: Sequence[Axis] | None) -> list[tuple[Axis, ...]]:
    """The stored shards that together hold the tensor: every rank of each splitting axis;
    for the others, the rank the request names for that kind, else 0."""
    asked = {a.kind: a.rank for a in want or ()}
    choices = []
    for a in layout.axes:
        if a.split_dim is not None:
            choices.append([Axis(a.kind, r, a.size, a.split_dim, a.expert_id, a.stage_id) for r in range(a.size)])
        else:
            r = asked.get(a.kind, 0)
            choices.append([Axis(a.kind, r if r < a.size else 0, a.size, None, a.expert_id, a.stage_id)])
    return [tuple(c) for c in itertools.product(*choices)]


def get_tensor(store: Any, key: str, want: Sequence[Axis] | None = None, *, into: Any = None,
               kind: str = "numpy", like: Any = None, device: str | None = None, layout: Layout | None = None) -> Any:
    """Reads shard `want` (None: the full tensor) of `key`, stored sharded by ``put_tensor``
    in any layout: a new tensor of `kind` ("numpy", "torch", "cupy"), or `into` (a writable
    C-contiguous tensor of the result's shape and dtype, any device), returned. When the
    stored layout holds exactly that shard it is one ranged read of that object; otherwise each
    needed piece of each stored shard is copied straight into place, every shard held by one
    master request. ``ObjectNotFoundError`` when the tensor or a shard it needs is missing.
    `layout`: the one the caller read with ``read_layout`` (not read again)."""
    if kind not in ("numpy", "torch", "cupy"):
        raise InvalidArgumentError(f"kind {kind!r} is not 'numpy', 'torch' or 'cupy'")
    if layout is None:
        layout = read_layout(store, key)
    if layout is None:
        raise ObjectNotFoundError(f"tensor {key!r} is not stored in shards (no {key + LAYOUT_SUFFIX!r})")
    ndim = len(layout.shape)
    want = check_axes(want, ndim) if want else ()
    target = region(layout.shape, want)
    shape = tuple(b - a for a, b in target)
    itemsize = _tensor.ITEM_SIZES[layout.code]
    if into is not None:
        ref = _tensor.describe(into, "into")
        if ref.shape != shape or not _tensor.compatible(layout.code, ref.code) or not ref.writable:
            raise InvalidArgumentError(f"into must be a writable {_tensor.DTYPE_NAMES[layout.code]} tensor of shape {shape}")
        result, dst = into, ref
    else:
        result, _part = _tensor.allocate(layout.code, shape, kind, like, device)
        dst = _tensor.describe(result)
    address, _ = _address(dst)
    shards = _stored_shards(layout, want)
    keys, plans, headers, expected = [], [], [], []
    for axes in shards:
        part = region(layout.shape, axes)
        plan = runs(part, target, itemsize)
        if plan is None:
            continue
        header = np.empty(_tensor.HEADER_SIZE, dtype=np.uint8)
        rows = np.empty((len(plan) + 1, 3), dtype=np.int64)
        rows[0] = (header.ctypes.data, 0, _tensor.HEADER_SIZE)
        rows[1:, 0] = address + plan[:, 1]
        rows[1:, 1] = _tensor.HEADER_SIZE + plan[:, 0]
        rows[1:, 2] = plan[:, 2]
        keys.append(shard_key(key, axes))
        plans.append(rows)
        headers.append(header)
        expected.append(tuple(b - a for a, b in part))
    host = dst.location == "cpu"
    for k, got, header, shard_shape in zip(keys, store._read_ranges(keys, plans, host), headers, expected):
        if not isinstance(got, int):   # a list: some range failed
            bad = next(r for r in got if isinstance(r, BaseException))
            raise type(bad)(f"shard {k!r} of {key!r}: {bad}") from None
        code, stored_shape, _n = _native.decode_tensor_header(header.tobytes())
        if code != layout.code or tuple(stored_shape) != shard_shape:
            raise InvalidArgumentError(f"shard {k!r} holds a {_tensor.DTYPE_NAMES.get(code, code)} tensor of shape "
                                       f"{tuple(stored_shape)}; its layout says {_tensor.DTYPE_NAMES[layout.code]} {shard_shape}")
    return result
