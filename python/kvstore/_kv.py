"""KV layouts and prefill→decode block transfer (``Store.register_kv_layout`` and friends).

A layout describes an engine's KV cache as buffers, one per (layer, kind), each an array of
``bytes_per_block``-byte blocks. This module checks Python types and packs descriptors and
block lists for the C ABI; the rules themselves are enforced in the core.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from . import _native
from ._errors import ArgumentTypeError, InvalidArgumentError

_ABI = _native.ABI   # the C ABI's constants, as the extension was compiled with them
KINDS = ("key", "value", "index")
_KIND_CODES = (_ABI["KIND_KEY"], _ABI["KIND_VALUE"], _ABI["KIND_INDEX"])
EXECUTORS = ("per_block", "aggregated")
_FIELDS = ("layer", "kind", "address", "length", "bytes_per_block", "location")
_PUSH, _AGGREGATED = _ABI["BLOCKS_PUSH"], _ABI["BLOCKS_AGGREGATED"]
_LOCATION_BYTES = _ABI["BLOCK_BUFFER_LOCATION_BYTES"]


def _record_struct() -> struct.Struct:
    """kv_block_buffer's layout, built from the offsets the extension reports."""
    fields = [("q", "LAYER"), ("i", "KIND"), ("Q", "ADDRESS"), ("Q", "LENGTH"), ("Q", "BYTES_PER_BLOCK"),
              (f"{_LOCATION_BYTES}s", "LOCATION")]
    fmt, at = "<", 0
    for code, name in fields:
        offset = _ABI[f"BLOCK_BUFFER_{name}"]
        fmt += f"{offset - at}x" if offset > at else ""
        fmt += code
        at = offset + struct.calcsize("<" + code)
    size = _ABI["BLOCK_BUFFER_SIZE"]
    fmt += f"{size - at}x" if size > at else ""
    s = struct.Struct(fmt)
    assert s.size == size, (fmt, size)
    return s


_RECORD = _record_struct()


def _int(d: Mapping[str, Any], name: str, i: int) -> int:
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ArgumentTypeError(f"descriptor {i}: {name} must be an int, not {type(v).__name__}")
    if v < 0 or v >= 1 << 64:
        raise InvalidArgumentError(f"descriptor {i}: {name} {v} is out of range")
    return v


def pack_descriptors(descriptors: Any) -> bytes:
    if not isinstance(descriptors, (list, tuple)):
        raise ArgumentTypeError(f"descriptors must be a list or tuple of dicts, not {type(descriptors).__name__}")
    out = bytearray()
    for i, d in enumerate(descriptors):
        if not isinstance(d, Mapping):
            raise ArgumentTypeError(f"descriptor {i} must be a dict, not {type(d).__name__}")
        missing = [f for f in _FIELDS[:-1] if f not in d]
        if missing:
            raise InvalidArgumentError(f"descriptor {i} lacks {', '.join(missing)}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise InvalidArgumentError(f"descriptor {i} has unknown fields {', '.join(map(str, unknown))}")
        kind = d["kind"]
        if not isinstance(kind, str):
            raise ArgumentTypeError(f"descriptor {i}: kind must be a str ('key', 'value' or 'index'), not {type(kind).__name__}")
        if kind.lower() not in KINDS:
            raise InvalidArgumentError(f"descriptor {i}: kind {kind!r} is not 'key', 'value' or 'index'")
        location = d.get("location", "cpu")
        if not isinstance(location, str):
            raise ArgumentTypeError(f"descriptor {i}: location must be a str, not {type(location).__name__}")
        loc = location.encode()
        if not loc or len(loc) > _LOCATION_BYTES - 1 or b"\0" in loc:
            raise InvalidArgumentError(f"descriptor {i}: location {location!r} must be 1 to {_LOCATION_BYTES - 1} bytes without NUL")
        layer = _int(d, "layer", i)
        if layer >= 1 << 63:
            raise InvalidArgumentError(f"descriptor {i}: layer {layer} is out of range")
        out += _RECORD.pack(layer, _KIND_CODES[KINDS.index(kind.lower())], _int(d, "address", i), _int(d, "length", i),
                            _int(d, "bytes_per_block", i), loc)
    return bytes(out)


def unpack_descriptors(packed: bytes) -> list[dict[str, Any]]:
    out = []
    for layer, kind, address, length, bpb, loc in _RECORD.iter_unpack(packed):
        out.append({"layer": layer, "kind": KINDS[_KIND_CODES.index(kind)], "address": address, "length": length,
                    "bytes_per_block": bpb, "location": loc.split(b"\0", 1)[0].decode()})
    return out


def block_ids(name: str, ids: Any) -> array:
    """A sequence of ints (or an integer numpy array) as an int64 array."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ArgumentTypeError(f"{name} must be a sequence of ints, not {type(ids).__name__}")
    dtype = getattr(ids, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "") not in ("i", "u"):
        raise ArgumentTypeError(f"{name} must hold integers, not {dtype}")
    if dtype is not None:
        ids = ids.tolist()
    values = ids if isinstance(ids, (list, tuple)) else list(ids)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ArgumentTypeError(f"{name} must hold ints, not {type(v).__name__}")
    try:
        return array("q", values)
    except OverflowError:
        raise InvalidArgumentError(f"{name} holds a block id out of range") from None


def move_flags(push: bool, executor: Any) -> int:
    if not isinstance(executor, str):
        raise ArgumentTypeError(f"executor must be a str, not {type(executor).__name__}")
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"executor {executor!r} is not 'per_block' or 'aggregated'")
    return (_PUSH if push else 0) | (_AGGREGATED if executor == "aggregated" else 0)


class KVLayoutMixin:
    """The KV-transfer methods of ``kvstore.Store``."""

    def register_kv_layout(self, node_id: str, descriptors: Sequence[Mapping[str, Any]]) -> None:
        """Publishes this store's KV cache under ``node_id`` (replacing its previous layout).

        Each descriptor is a dict: ``layer`` (0, 1, ...), ``kind`` ("key", "value" or
        "index"), ``address`` and ``length`` (bytes) of the buffer, ``bytes_per_block``, and
        ``location`` ("cpu" by default, or "cuda:N"). Checked: no overlapping buffers, lengths
        that are whole blocks, each (layer, kind) once, layers 0..N-1 without gaps and with the
        same kinds, devices that exist; the error names the bad descriptor. The memory must
        stay valid until ``unregister_kv_layout()``, the next registration, or ``close()``.
        """
        self._kv_register(node_id, pack_descriptors(descriptors))

    def unregister_kv_layout(self) -> None:
        """Withdraws this store's layout (peers can no longer reach it)."""
        self._kv_unregister()

    def get_registered_memory(self, node_id: str) -> list[dict[str, Any]]:
        """The descriptors published under ``node_id``, sorted by layer, then kind."""
        return unpack_descriptors(self._kv_fetch(node_id))

    def pull_kv_blocks(self, peer: str, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                       layers: Sequence[int] | None = None, *, executor: str = "per_block") -> int:
        """Copies the peer's blocks ``src_block_ids[i]`` into this store's ``dst_block_ids[i]``
        for every kind of ``layers`` (None: all). Everything is checked before any byte moves;
        runs of consecutive ids on both sides are coalesced into one copy. ``executor``
        "aggregated" issues many copies per operation. Returns the transfer operations issued.
        """
        return self._move_kv_blocks(peer, False, src_block_ids, dst_block_ids, layers, executor)

    def push_kv_blocks(self, peer: str, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                       layers: Sequence[int] | None = None, *, executor: str = "per_block") -> int:
        """Copies this store's blocks ``src_block_ids[i]`` into the peer's ``dst_block_ids[i]``
        (the other direction of ``pull_kv_blocks``)."""
        return self._move_kv_blocks(peer, True, src_block_ids, dst_block_ids, layers, executor)

    def _move_kv_blocks(self, peer: str, push: bool, src: Any, dst: Any, layers: Any, executor: Any) -> int:
        return self._kv_move(peer, move_flags(push, executor), block_ids("src_block_ids", src), block_ids("dst_block_ids", dst),
                             None if layers is None else block_ids("layers", layers))
