"""Structured objects: one logical object of named members (arrays and byte strings) plus
metadata, stored as one object per member and a manifest, read back whole, by member, or as
slices of array members planned into ranged reads (Mooncake's
``mooncake.structured_object_store``, on kvstore's core).

    transfer = BundleTransfer(store, key_prefix="rollout")
    ref = transfer.put_structured_object(StructuredObjectPayload(metadata={"step": 7},
                                                                 buffers={"tokens": tokens, "ids": b"..."}))
    spec = transfer.read_spec(ref).select_members(["tokens"]).slice_member("tokens", axis=0, start=2, end=5)
    result = transfer.materialize(spec)          # result.objects["tokens"], result.metadata

Storage under ``<key_prefix>/<id>``: ``.../manifest`` (JSON: the metadata and each member's
kind, dtype and shape) and ``.../m/<name>`` per member (arrays in kvstore's tensor format, so
a slice is a ranged read of exactly its bytes; byte strings as they are). The manifest is
written last: a reader never sees a manifest whose members are not all stored.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _native, _tensor
from ._errors import InvalidArgumentError, ObjectNotFoundError
from .parallel import runs

__all__ = ["BundleRef", "BundleTransfer", "BundleTransferPolicy", "MaterializeResult", "ReadSpec", "StructuredMemberSlice",
           "StructuredObjectPayload"]

MAX_MEMBERS = 1024
MAX_MANIFEST = 1 << 20


@dataclass
class StructuredObjectPayload:
    """What ``put_structured_object`` stores: ``buffers`` (member name -> numpy array or
    bytes-like) and JSON-serializable ``metadata``."""

    buffers: Mapping[str, Any]
    metadata: Any = None


@dataclass(frozen=True)
class StructuredMemberSlice:
    """Elements ``[start, end)`` of an array member along ``axis``."""

    name: str
    axis: int = 0
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class BundleTransferPolicy:
    """``copy_mode``: "auto" or "copy" (kvstore copies every member once, straight into the
    store, in both) or "zero_copy" (members must be arrays or buffers already: no conversion)."""

    copy_mode: str = "auto"


@dataclass(frozen=True)
class BundleRef:
    """A stored structured object (or bundle): the key its objects live under."""

    key: str


@dataclass
class ReadSpec:
    """What ``materialize`` reads: the members (None: all) and slices of array members."""

    ref: BundleRef
    manifest: dict[str, Any]
    members: list[str] | None = None
    slices: dict[str, StructuredMemberSlice] = field(default_factory=dict)

    def select_members(self, names: Iterable[str]) -> ReadSpec:
        names = list(names)
        unknown = [n for n in names if n not in self.manifest["members"]]
        if unknown:
            raise InvalidArgumentError(f"no members {unknown} in {self.ref.key!r}")
        return ReadSpec(self.ref, self.manifest, names, dict(self.slices))

    def slice_member(self, name: str, axis: int = 0, start: int = 0, end: int | None = None) -> ReadSpec:
        member = self.manifest["members"].get(name)
        if member is None:
            raise InvalidArgumentError(f"no member {name!r} in {self.ref.key!r}")
        if member["kind"] != "array":
            raise InvalidArgumentError(f"member {name!r} is bytes: only array members are sliced")
        shape = member["shape"]
        if not isinstance(axis, int) or not 0 <= axis < len(shape):
            raise InvalidArgumentError(f"axis {axis!r} is not a dimension of a {len(shape)}-d member")
        stop = shape[axis] if end is None else end
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= shape[axis]):
            raise InvalidArgumentError(f"slice [{start}, {end}) is outside dimension {axis} of length {shape[axis]}")
        slices = dict(self.slices)
        slices[name] = StructuredMemberSlice(name, axis, start, stop)
        return ReadSpec(self.ref, self.manifest, self.members, slices)

    def shape_of(self, name: str) -> tuple[int, ...]:
        shape = list(self.manifest["members"][name]["shape"])
        s = self.slices.get(name)
        if s is not None:
            shape[s.axis] = s.end - s.start   # type: ignore[operator]
        return tuple(shape)


@dataclass
class MaterializeResult:
    objects: dict[str, Any]
    metadata: Any


MAX_MEMBER_BYTES = 1 << 40


def _check_members(members: Any) -> None:
    """A manifest's members as read from the store: ValueError naming the first bad one."""
    if not isinstance(members, dict) or not 0 < len(members) <= MAX_MEMBERS:
        raise ValueError(f"members must be a mapping of 1 to {MAX_MEMBERS} entries")
    for name, m in members.items():
        if not isinstance(name, str) or not name or "/" in name or not isinstance(m, dict):
            raise ValueError(f"member {name!r} is malformed")
        if m.get("kind") == "bytes":
            size = m.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_MEMBER_BYTES:
                raise ValueError(f"member {name!r} has a bad size")
        elif m.get("kind") == "array":
            shape, code = m.get("shape"), m.get("dtype")
            if code not in _tensor.ITEM_SIZES or isinstance(code, bool) or not isinstance(shape, list) or len(shape) > 8 \
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape) \
                    or math.prod(shape) * _tensor.ITEM_SIZES[code] > MAX_MEMBER_BYTES:
                raise ValueError(f"member {name!r} has a bad dtype or shape")
        else:
            raise ValueError(f"member {name!r} has an unknown kind")


def _member_key(ref: BundleRef, name: str) -> str:
    return f"{ref.key}/m/{name}"


class BundleTransfer:
    """Structured objects in a ``kvstore.Store`` (see the module doc)."""

    def __init__(self, store: Any, key_prefix: str = "structured") -> None:
        if not isinstance(key_prefix, str) or not key_prefix:
            raise InvalidArgumentError("key_prefix must be a non-empty str")
        self.store = store
        self.key_prefix = key_prefix

    def put_structured_object(self, payload: StructuredObjectPayload, policy: BundleTransferPolicy | None = None,
                              key: str | None = None) -> BundleRef:
        """Stores the members, then the manifest; returns the reference."""
        policy = policy or BundleTransferPolicy()
        if policy.copy_mode not in ("auto", "copy", "zero_copy"):
            raise InvalidArgumentError(f"copy_mode {policy.copy_mode!r} is not 'auto', 'copy' or 'zero_copy'")
        if not isinstance(payload.buffers, Mapping) or not 0 < len(payload.buffers) <= MAX_MEMBERS:
            raise InvalidArgumentError(f"buffers must be a mapping of 1 to {MAX_MEMBERS} members")
        ref = BundleRef(key or f"{self.key_prefix}/{uuid.uuid4().hex}")
        members: dict[str, Any] = {}
        keys, parts = [], []
        for name, value in payload.buffers.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise InvalidArgumentError(f"member name {name!r} must be a non-empty str without '/'")
            if isinstance(value, (bytes, bytearray, memoryview)):
                members[name] = {"kind": "bytes", "size": len(value)}
                keys.append(_member_key(ref, name))
                parts.append([bytes(value) if isinstance(value, memoryview) else value])
                continue
            if policy.copy_mode == "zero_copy" and not isinstance(value, np.ndarray):
                raise InvalidArgumentError(f"member {name!r}: zero_copy takes arrays or buffers, not {type(value).__name__}")
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            ref_t = _tensor.describe(np.ascontiguousarray(array), f"member {name!r}")
            members[name] = {"kind": "array", "dtype": ref_t.code, "shape": list(ref_t.shape)}
            keys.append(_member_key(ref, name))
            parts.append([_native.tensor_header(ref_t.code, ref_t.shape), *ref_t.data_parts])
        try:
            manifest = json.dumps({"version": 1, "metadata": payload.metadata, "members": members}).encode()
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"metadata is not JSON-serializable: {e}") from None
        if len(manifest) > MAX_MANIFEST:
            raise InvalidArgumentError(f"the manifest is {len(manifest)} bytes, more than {MAX_MANIFEST}")
        failed = [(k, r) for k, r in zip(keys, self.store.put_batch(keys, parts)) if r is not None]
        if failed:
            self.store.batch_remove(keys, force=True)
            raise failed[0][1]
        self.store.put(f"{ref.key}/manifest", manifest)
        return ref

    def put_bundle(self, payloads: Mapping[str, Any], manifest: Any = None, key: str | None = None) -> BundleRef:
        """A bundle: named payloads and a manifest of the caller's (stored as the metadata)."""
        return self.put_structured_object(StructuredObjectPayload(payloads, manifest), key=key)

    def read_spec(self, ref: BundleRef) -> ReadSpec:
        """Every member, whole (narrow it with ``select_members`` / ``slice_member``). The
        manifest is read from the store, so it is checked as any peer's claim: at most
        MAX_MANIFEST bytes, at most MAX_MEMBERS members of known kinds, names without '/',
        array shapes of at most 8 dimensions and MAX_MEMBER_BYTES."""
        if not isinstance(ref, BundleRef):
            raise InvalidArgumentError(f"ref must be a BundleRef, not {type(ref).__name__}")
        try:
            raw = self.store._get_small(f"{ref.key}/manifest", MAX_MANIFEST)
        except ObjectNotFoundError:
            raise ObjectNotFoundError(f"no structured object {ref.key!r}") from None
        try:
            manifest = json.loads(raw)
            if not isinstance(manifest, dict) or manifest.get("version") != 1:
                raise ValueError("not a version-1 manifest")
            _check_members(manifest.get("members"))
        except (ValueError, InvalidArgumentError) as e:
            raise InvalidArgumentError(f"{ref.key!r} has no valid manifest: {e}") from None
        return ReadSpec(ref, manifest)

    def materialize(self, spec: ReadSpec) -> MaterializeResult:
        """The selected members in new arrays / bytes (slices read as ranges)."""
        return self._read(spec, {})

    def materialize_into(self, spec: ReadSpec, destinations: Mapping[str, Any]) -> MaterializeResult:
        """The selected array members read into the caller's arrays (their shape and dtype must
        match the spec's); the returned objects are those arrays."""
        return self._read(spec, dict(destinations))

    def _read(self, spec: ReadSpec, into: dict[str, Any]) -> MaterializeResult:
        names = spec.members if spec.members is not None else list(spec.manifest["members"])
        objects: dict[str, Any] = {}
        keys, plans, targets = [], [], []
        for name in names:
            m = spec.manifest["members"][name]
            if m["kind"] == "bytes":
                if name in into:
                    raise InvalidArgumentError(f"member {name!r} is bytes: materialize it, not into an array")
                objects[name] = None
                continue
            shape = tuple(m["shape"])
            want = spec.shape_of(name)
            dtype = _tensor.numpy_dtype(m["dtype"])
            out = into.get(name)
            if out is None:
                out = np.empty(want, dtype=dtype)
            elif not isinstance(out, np.ndarray) or out.shape != want or out.dtype != dtype or not out.flags.c_contiguous \
                    or not out.flags.writeable:
                raise InvalidArgumentError(f"the destination of {name!r} must be a writable C-contiguous {dtype} array of shape {want}")
            full = [(0, n) for n in shape]
            region = list(full)
            s = spec.slices.get(name)
            if s is not None:
                region[s.axis] = (s.start, s.end)   # type: ignore[assignment]
            plan = runs(full, region, dtype.itemsize)
            objects[name] = out
            if plan is None or out.nbytes == 0:
                continue
            header = np.empty(_tensor.HEADER_SIZE, dtype=np.uint8)   # read in the same hold, then checked
            rows = np.empty((len(plan) + 1, 3), dtype=np.int64)
            rows[0] = (header.ctypes.data, 0, _tensor.HEADER_SIZE)
            rows[1:, 0] = out.ctypes.data + plan[:, 1]
            rows[1:, 1] = _tensor.HEADER_SIZE + plan[:, 0]
            rows[1:, 2] = plan[:, 2]
            keys.append(_member_key(spec.ref, name))
            plans.append(rows)
            targets.append((name, header, m["dtype"], shape))
        for (name, header, code, shape), got in zip(targets, self.store._read_ranges(keys, plans, True)):
            if not isinstance(got, int):
                bad = next(r for r in got if isinstance(r, BaseException))
                raise type(bad)(f"member {name!r} of {spec.ref.key!r}: {bad}") from None
            stored_code, stored_shape, _n = _native.decode_tensor_header(header.tobytes())
            if stored_code != code or tuple(stored_shape) != shape:
                raise InvalidArgumentError(f"member {name!r} of {spec.ref.key!r} does not match its manifest")
        byte_names = [n for n in names if objects[n] is None]
        for name, value in zip(byte_names, self.store.get_batch([_member_key(spec.ref, n) for n in byte_names])):
            if value is None:
                raise ObjectNotFoundError(f"member {name!r} of {spec.ref.key!r} is missing")
            if isinstance(value, BaseException):
                raise value
            if len(value) != spec.manifest["members"][name]["size"]:
                raise InvalidArgumentError(f"member {name!r} of {spec.ref.key!r} does not match its manifest")
            objects[name] = value
        return MaterializeResult(objects, spec.manifest.get("metadata"))

    def remove_bundle(self, ref: BundleRef) -> None:
        """Removes the manifest first (readers stop finding it), then the members."""
        spec = self.read_spec(ref)
        self.store.remove(f"{ref.key}/manifest", force=True)
        self.store.batch_remove([_member_key(ref, n) for n in spec.manifest["members"]], force=True)

    remove_structured_object = remove_bundle
