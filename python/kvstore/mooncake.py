"""The Python API of Mooncake Store (0.3.13) over kvstore: connectors switch with one import.

    from kvstore.mooncake import MooncakeDistributedStore, ReplicateConfig

Mooncake's conventions are kept, not kvstore's: calls return integer codes instead of raising
(0 success, -704 object not found, -706 object has a lease, -600 invalid parameters, -200 no
space, -705 already exists, -800 transfer failure), ``get`` of a missing key returns ``b""``,
``put`` of an existing key returns 0 and keeps the stored value, ``is_exist`` returns 1 / 0.
docs/mooncake.md lists every difference.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _errors, _native, _tensor, parallel, structured
from ._errors import StoreError
from ._sizes import parse_size
from ._store import Store

__all__ = ["BufferHandle", "BufferLease", "BufferPool", "ErrorCode", "MooncakeBundleTransfer", "MooncakeDistributedStore",
           "MooncakeDistributedStoreAsync", "MooncakeHostMemAllocator", "ParallelAxis", "ReadTarget", "ReplicaDescriptor",
           "QueryTaskResponse", "ReplicaStatus", "ReplicateConfig", "SoftPinAction", "TaskStatus", "TaskType", "TensorParallelism",
           "bind_to_numa_node", "install_as_mooncake"]


class ErrorCode(enum.IntEnum):
    """Mooncake's return codes that kvstore produces."""

    OK = 0
    INTERNAL_ERROR = -1
    NO_AVAILABLE_HANDLE = -200   # no space
    INVALID_PARAMS = -600
    OBJECT_NOT_FOUND = -704
    OBJECT_ALREADY_EXISTS = -705
    OBJECT_HAS_LEASE = -706
    REPLICA_NOT_FOUND = -710
    REPLICA_ALREADY_EXISTS = -711
    TRANSFER_FAIL = -800
    TASK_NOT_FOUND = -1400
    TASK_PENDING_LIMIT_EXCEEDED = -1401


_CODES: dict[type[BaseException], int] = {
    _errors.ObjectNotFoundError: ErrorCode.OBJECT_NOT_FOUND,
    _errors.ObjectExistsError: ErrorCode.OBJECT_ALREADY_EXISTS,
    _errors.LeaseHeldError: ErrorCode.OBJECT_HAS_LEASE,
    _errors.NoSpaceError: ErrorCode.NO_AVAILABLE_HANDLE,
    _errors.InvalidArgumentError: ErrorCode.INVALID_PARAMS,
    _errors.UnsupportedError: ErrorCode.INVALID_PARAMS,
    _errors.StoreClosedError: ErrorCode.INVALID_PARAMS,
    _errors.TransferError: ErrorCode.TRANSFER_FAIL,
}


def _code(e: BaseException) -> int:
    for cls in type(e).__mro__:
        if cls in _CODES:
            return int(_CODES[cls])
    if isinstance(e, (TypeError, ValueError, OverflowError)):
        return int(ErrorCode.INVALID_PARAMS)
    return int(ErrorCode.INTERNAL_ERROR)


class SoftPinAction(enum.IntEnum):
    """What a write does to the object's soft pin."""

    PRESERVE = 0
    ENABLE = 1
    DISABLE = 2


class ReplicateConfig:
    """Placement and pinning of a write: ``replica_num`` copies in distinct segments (best
    effort), ``with_hard_pin`` (never evicted), ``soft_pin_action`` / ``with_soft_pin`` (evicted
    last) for ``soft_pin_ttl_ms`` (0: the store's default). ``preferred_segments`` and
    ``preferred_segment`` are accepted and ignored: kvstore places the first replica in the
    writer's own segment when it has one."""

    def __init__(self) -> None:
        self.replica_num = 1
        self.with_hard_pin = False
        self.soft_pin_action = SoftPinAction.PRESERVE
        self.soft_pin_ttl_ms: int | None = None
        self.preferred_segments: list[str] = []
        self.preferred_segment = ""
        self.prefer_alloc_in_same_node: bool | str = False
        self.nof_replica_num = 0
        self.dfs_replica_num = 0
        self.group_ids: list[str] | None = None
        self.session_ids: list[str] | None = None

    @property
    def with_soft_pin(self) -> bool:
        return self.soft_pin_action == SoftPinAction.ENABLE

    @with_soft_pin.setter
    def with_soft_pin(self, on: bool) -> None:
        self.soft_pin_action = SoftPinAction.ENABLE if on else SoftPinAction.PRESERVE

    def _check_ids(self, count: int) -> None:
        """``group_ids`` / ``session_ids``: None, or one str per object written (``count``)."""
        for name in ("group_ids", "session_ids"):
            ids = getattr(self, name)
            if ids is None:
                continue
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
                raise _errors.InvalidArgumentError(f"{name} must be None or a list of str")
            if len(ids) != count:
                raise _errors.InvalidArgumentError(f"{name} has {len(ids)} entries for {count} objects")

    def _options(self, count: int = 1, upsert: bool = False) -> dict[str, Any]:
        self._check_ids(count)
        for name in ("nof_replica_num", "dfs_replica_num"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _errors.InvalidArgumentError(f"{name} must be a non-negative int, not {v!r}")
        n = self.replica_num
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _errors.InvalidArgumentError(f"replica_num must be a positive int, not {n!r}")
        if not isinstance(self.with_hard_pin, bool):
            raise _errors.InvalidArgumentError("with_hard_pin must be a bool")
        try:
            action = SoftPinAction(self.soft_pin_action)
        except ValueError:
            raise _errors.InvalidArgumentError(f"soft_pin_action {self.soft_pin_action!r} is not a SoftPinAction") from None
        ttl = self.soft_pin_ttl_ms
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0):
            raise _errors.InvalidArgumentError(f"soft_pin_ttl_ms must be None or a non-negative int, not {ttl!r}")
        if upsert and ttl is not None and action != SoftPinAction.ENABLE:
            raise _errors.InvalidArgumentError("soft_pin_ttl_ms is set but soft_pin_action is not ENABLE")
        options: dict[str, Any] = {"replicas": n, "hard_pin": self.with_hard_pin}
        if action == SoftPinAction.ENABLE and not self.with_hard_pin:   # a hard pin already covers it
            options["soft_pin"] = True
            if ttl:
                options["soft_pin_ttl"] = ttl / 1000
        return options

    def __repr__(self) -> str:
        return (f"ReplicateConfig(replica_num={self.replica_num}, with_hard_pin={self.with_hard_pin}, "
                f"soft_pin_action={SoftPinAction(self.soft_pin_action).name}, soft_pin_ttl_ms={self.soft_pin_ttl_ms}, "
                f"preferred_segments={self.preferred_segments}, preferred_segment={self.preferred_segment!r})")


# What ``get_buffer`` returns: the object's bytes in memory of their own (64-byte aligned,
# writable; the buffer protocol, ``len``, numpy and ``torch.frombuffer`` work on it), with
# Mooncake's ``ptr()`` (their address) and ``size()`` (their length). The bytes are one copy
# made under the object's read lease and verified like every read: they stay valid while the
# handle lives, whatever happens to the object afterwards.
BufferHandle = _native.Buffer


class ReplicaStatus(enum.IntEnum):
    """A replica's state, as Mooncake names them (kvstore describes only complete replicas:
    one being written or removed is not found)."""

    UNDEFINED = 0
    INITIALIZED = 1
    PROCESSING = 2
    COMPLETE = 3
    REMOVED = 4
    FAILED = 5


class BufferDescriptor:
    """Where a memory replica's bytes are: ``transport_endpoint_`` names the segment
    ("kvstore-segment-<id>"), ``buffer_address_`` is the offset in it, ``size_`` the bytes."""

    def __init__(self, endpoint: str, address: int, size: int) -> None:
        self.transport_endpoint_ = endpoint
        self.buffer_address_ = address
        self.size_ = size

    def __repr__(self) -> str:
        return f"BufferDescriptor({self.transport_endpoint_!r}, offset={self.buffer_address_}, size={self.size_})"


class MemoryDescriptor:
    def __init__(self, buffer: BufferDescriptor) -> None:
        self.buffer_descriptor = buffer

    def __repr__(self) -> str:
        return f"MemoryDescriptor({self.buffer_descriptor!r})"


class TaskType(enum.IntEnum):
    """What a task does (``query_task``)."""

    REPLICA_COPY = 0
    REPLICA_MOVE = 1


class TaskStatus(enum.IntEnum):
    """Where a copy or move task is: ``PENDING`` until this client's task thread takes it,
    then ``PROCESSING``, then ``SUCCESS`` or ``FAILED``."""

    PENDING = 0
    PROCESSING = 1
    SUCCESS = 2
    FAILED = 3


def _uuid_pair(u: uuid.UUID) -> tuple[int, int]:
    """A UUID as Mooncake's (high, low) pair of 64-bit ints."""
    return u.int >> 64, u.int & ((1 << 64) - 1)


class QueryTaskResponse:
    """A task's state (``query_task``): ``id`` and ``assigned_client`` as (high, low) pairs,
    ``type``, ``status``, the times it was created and last changed (ms since the epoch) and
    ``message`` (why it failed, or "" )."""

    def __init__(self, task_id: tuple[int, int], kind: TaskType, client: tuple[int, int]) -> None:
        self.id, self.type, self.assigned_client = task_id, kind, client
        self.status = TaskStatus.PENDING
        self.created_at_ms_epoch = self.last_updated_at_ms_epoch = int(time.time() * 1000)
        self.message = ""

    def _set(self, status: TaskStatus, message: str = "") -> None:
        self.status, self.message = status, message
        self.last_updated_at_ms_epoch = int(time.time() * 1000)

    def __repr__(self) -> str:
        return f"<QueryTaskResponse {self.type.name} {self.status.name} {self.message!r}>"


def _segment_id(name: Any) -> int:
    """A segment as ``get_replica_desc`` names it ("kvstore-segment-<id>"), or its id."""
    if isinstance(name, int) and not isinstance(name, bool) and 0 < name < 1 << 32:
        return name
    if isinstance(name, str):
        m = re.fullmatch(r"kvstore-segment-([1-9][0-9]{0,9})", name)
        if m and int(m.group(1)) < 1 << 32:
            return int(m.group(1))
    raise _errors.InvalidArgumentError(f"segment {name!r}: kvstore names segments 'kvstore-segment-<id>' "
                                       "(see get_replica_desc)")


class ReplicaDescriptor:
    """One replica of an object, as ``get_replica_desc`` describes it. Every kvstore replica is in
    memory (there is no disk tier yet): ``is_memory_replica()`` is true, the disk kinds false."""

    def __init__(self, segment: int, offset: int, size: int) -> None:
        self.status = ReplicaStatus.COMPLETE
        self.object_size = size
        self._memory = MemoryDescriptor(BufferDescriptor(f"kvstore-segment-{segment}", offset, size))

    def is_memory_replica(self) -> bool:
        return True

    def is_disk_replica(self) -> bool:
        return False

    def is_local_disk_replica(self) -> bool:
        return False

    def is_nof_replica(self) -> bool:
        return False

    def get_memory_descriptor(self) -> MemoryDescriptor:
        return self._memory

    def get_disk_descriptor(self) -> Any:
        raise _errors.InvalidArgumentError("a kvstore replica is in memory: it has no disk descriptor")

    def __repr__(self) -> str:
        return f"<ReplicaDescriptor {self.status.name} memory {self._memory.buffer_descriptor!r}>"


class ParallelAxis:
    """One axis of a shard's identity (Mooncake's ``ParallelAxis``): ``kind`` ("tp", "dp", "ep",
    "pp"), ``rank`` of ``size``, ``split_dim`` (the dimension it splits; None: it does not),
    ``expert_id``, ``stage_id``."""

    def __init__(self, kind: str = "tp", rank: int = 0, size: int = 1, split_dim: int | None = None,
                 expert_id: int | None = None, stage_id: int | None = None) -> None:
        self.kind, self.rank, self.size, self.split_dim = kind, rank, size, split_dim
        self.expert_id, self.stage_id = expert_id, stage_id

    def _axis(self) -> parallel.Axis:
        split = None if self.split_dim is None or self.split_dim == -1 else self.split_dim
        return parallel.Axis(self.kind, self.rank, self.size, split, self.expert_id, self.stage_id)

    def __repr__(self) -> str:
        return f"ParallelAxis({self.kind!r}, rank={self.rank}, size={self.size}, split_dim={self.split_dim})"


class TensorParallelism:
    """An ordered list of ``ParallelAxis`` naming a stored or requested shard."""

    def __init__(self, axes: Sequence[ParallelAxis] | None = None) -> None:
        self.axes: list[ParallelAxis] = list(axes or [])

    def _axes(self) -> tuple[parallel.Axis, ...]:
        if not isinstance(self.axes, (list, tuple)) or not all(isinstance(a, ParallelAxis) for a in self.axes):
            raise _errors.InvalidArgumentError("TensorParallelism.axes must be a list of ParallelAxis")
        return parallel.check_axes([a._axis() for a in self.axes])

    def __repr__(self) -> str:
        return f"TensorParallelism({self.axes!r})"


class ReadTarget:
    """What a parallel read returns: ``mode`` "as_stored" (the object as written; with a
    ``parallelism``, that shard's object), "shard" (the shard ``parallelism`` names, in any
    stored layout) or "full" (the whole tensor)."""

    MODES = ("as_stored", "shard", "full")

    def __init__(self, mode: str = "as_stored", parallelism: TensorParallelism | None = None) -> None:
        self.mode = mode
        self.parallelism = parallelism


def _axes_of(p: TensorParallelism | None) -> tuple[parallel.Axis, ...] | None:
    if p is None:
        return None
    if not isinstance(p, TensorParallelism):
        raise _errors.ArgumentTypeError(f"parallelism must be a TensorParallelism, not {type(p).__name__}")
    return p._axes()


def _partition(writer_partition: Any) -> tuple[parallel.Axis, ...]:
    """A writer_partition (rank, size, split_dim) as the TP axis it names."""
    if not isinstance(writer_partition, (tuple, list)) or len(writer_partition) != 3:
        raise _errors.InvalidArgumentError("writer_partition must be (rank, size, split_dim)")
    rank, size, dim = writer_partition
    return parallel.check_axes([parallel.Axis("tp", rank, size, dim)])


_NONE = object()   # `_call(fail=_NONE)`: None on failure
_CODE = object()   # `_call_each(fill=_CODE)`: the error's code per key

_SETUP_KEYS = ("local_hostname", "metadata_server", "global_segment_size", "local_buffer_size", "protocol",
               "rdma_devices", "master_server_addr", "enable_ssd_offload", "ssd_offload_path", "tenant_id")
_PORTS = range(12300, 14301)   # where Mooncake picks a client's port when local_hostname names none
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _options(config: ReplicateConfig | None, count: int = 1, upsert: bool = False) -> dict[str, Any]:
    """kvstore's write options for a ReplicateConfig used on `count` objects (an upsert when
    `upsert`)."""
    if config is None:
        return {}
    if not isinstance(config, ReplicateConfig):
        raise _errors.ArgumentTypeError(f"config must be a ReplicateConfig, not {type(config).__name__}")
    return config._options(count, upsert)


def _valid_dim(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def _length(r: Any) -> int:
    """A ranged read's result as Mooncake's int: the bytes copied, or the error's code."""
    return _code(r) if isinstance(r, BaseException) else int(r)


def _count(keys: Any) -> int:
    return len(keys) if isinstance(keys, (list, tuple)) else 0


def _ssd_offload_size(path: str) -> int:
    """``KVSTORE_SSD_OFFLOAD_SIZE``, else 80% of the free space of the file system that holds
    ``path`` (or would: its nearest existing parent) now."""
    given = os.environ.get("KVSTORE_SSD_OFFLOAD_SIZE")
    if given:
        return parse_size(given, name="KVSTORE_SSD_OFFLOAD_SIZE")
    at = os.path.abspath(path)
    while not os.path.exists(at) and os.path.dirname(at) != at:
        at = os.path.dirname(at)
    st = os.statvfs(at)
    return max(int(st.f_bavail * st.f_frsize * 0.8), 1 << 20)


def _master_url(address: str, tenant: str = "") -> str:
    """A kvstore URL for Mooncake's ``master_server_address``: "host:port", a kvstore URL as is,
    or Mooncake's highly available form "etcd://host:port[;host:port...]" (the leader elected
    on that etcd, for the cluster named by ``MC_STORE_CLUSTER_ID``, default "kvstore"), with
    `tenant` ("": none) as the URL's tenant."""
    if address.startswith("etcd://"):
        endpoints = address[len("etcd://"):].rstrip("/").replace(";", ",")
        cluster = os.environ.get("MC_STORE_CLUSTER_ID") or "kvstore"
        url = f"kvstore+etcd://{endpoints}/{cluster}"
    else:
        url = address if "://" in address else f"kvstore://{address}"
    if not tenant:
        return url
    scheme, _, rest = url.partition("://")
    named, at, _ = rest.partition("@")
    if at and named != tenant:
        raise _errors.InvalidArgumentError(f"tenant_id {tenant!r} differs from the tenant {named!r} in {address!r}")
    return url if at else f"{scheme}://{tenant}@{rest}"


def _free_port(host: str) -> int:
    """A port in Mooncake's range (12300-14300) free on `host` right now (any free port when
    the whole range is taken)."""
    start = random.randrange(len(_PORTS))
    for i in range(len(_PORTS)):
        port = _PORTS[(start + i) % len(_PORTS)]
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class MooncakeBundleTransfer(structured.BundleTransfer):
    """Mooncake's structured object helper (``mooncake.structured_object_store``) over a
    ``MooncakeDistributedStore``: ``kvstore.structured.BundleTransfer`` on its store. Unlike
    the store's calls it raises (as Mooncake's helper does), never returns codes."""

    def __init__(self, store: MooncakeDistributedStore, key_prefix: str = "structured") -> None:
        if not isinstance(store, MooncakeDistributedStore):
            raise _errors.ArgumentTypeError(f"store must be a MooncakeDistributedStore, not {type(store).__name__}")
        self._mooncake = store
        super().__init__(None, key_prefix)

    @property   # type: ignore[override]
    def store(self) -> Store:
        s = self._mooncake._store
        if s is None:
            raise _errors.StoreClosedError("the store is not set up (call setup first) or closed")
        return s

    @store.setter
    def store(self, value: Any) -> None:
        pass   # the MooncakeDistributedStore's own store, whatever it is set up with


def install_as_mooncake() -> None:
    """Makes ``import mooncake.store`` (and ``from mooncake.store import ...``) give this module,
    so an engine's unchanged Mooncake connector runs on kvstore. Call it before the engine
    imports Mooncake; it refuses (ImportError) when a real ``mooncake`` is already imported."""
    this = sys.modules[__name__]
    present = sys.modules.get("mooncake")
    if present is not None and getattr(present, "store", None) is not this:
        raise ImportError("a mooncake package is already imported: call install_as_mooncake() before anything imports it")
    package = types.ModuleType("mooncake")
    package.__path__ = []            # a package, so "mooncake.store" resolves to the entry below
    package.store = this             # type: ignore[attr-defined]
    pool = types.ModuleType("mooncake.buffer_pool")
    pool.BufferPool = BufferPool     # type: ignore[attr-defined]
    pool.RegisteredBufferPool = BufferPool   # type: ignore[attr-defined]  (its legacy name)
    package.buffer_pool = pool       # type: ignore[attr-defined]
    objects = types.ModuleType("mooncake.structured_object_store")
    for name in ("StructuredObjectPayload", "StructuredMemberSlice", "BundleTransferPolicy"):
        setattr(objects, name, getattr(structured, name))
    objects.MooncakeBundleTransfer = MooncakeBundleTransfer   # type: ignore[attr-defined]
    package.structured_object_store = objects   # type: ignore[attr-defined]
    sys.modules["mooncake"] = package
    sys.modules["mooncake.store"] = this
    sys.modules["mooncake.buffer_pool"] = pool
    sys.modules["mooncake.structured_object_store"] = objects


def bind_to_numa_node(node: int) -> int:
    """Runs the calling thread on the CPUs of NUMA node ``node`` (as Mooncake's helper, which
    LMCache calls before setup). 0, or -600 for a node this machine does not have."""
    if isinstance(node, bool) or not isinstance(node, int) or node < 0:
        return int(ErrorCode.INVALID_PARAMS)
    try:
        with open(f"/sys/devices/system/node/node{node}/cpulist") as f:
            listed = f.read().strip()
    except OSError:
        return int(ErrorCode.INVALID_PARAMS)
    cpus: set[int] = set()
    for part in filter(None, listed.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        return int(ErrorCode.INVALID_PARAMS)
    os.sched_setaffinity(0, cpus)
    return 0


class BufferLease:
    """Memory leased from a ``BufferPool``: ``ptr`` (its address, registered with the pool's
    store while leased), ``size``, ``buffer`` (a memoryview of it), ``release()``. A context
    manager."""

    def __init__(self, pool: BufferPool, block: Any, size: int) -> None:
        self._pool, self._block, self.size = pool, block, size
        self.ptr = block.ptr()
        self._view: memoryview | None = memoryview(block)[:size]

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise _errors.InvalidArgumentError("the lease was released")
        return self._view

    def release(self) -> None:
        """Returns the lease to its pool. Views of ``buffer`` made before (numpy arrays,
        memoryviews) stay valid: they keep the memory alive, and it goes to no other lease
        until the last of them is gone."""
        if self._view is None:
            return
        try:
            self._view.release()
        except BufferError:
            pass   # an export still uses it: the block lives on with that export
        self._view = None
        self._block = None
        self._pool._give_back(self)

    def __enter__(self) -> BufferLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BufferPool:
    """Mooncake's ``BufferPool``: scratch buffers for the zero-copy calls, registered with the
    store. ``acquire(size, block=True, timeout=None)`` or ``buffer(size)`` give a
    ``BufferLease``; at most ``max_regions`` leases and ``max_bytes`` bytes at once (default: no
    limit on regions, 1 GiB), beyond which ``acquire`` waits (``block``, up to ``timeout``
    seconds) or raises ``NoSpaceError``. Freed memory is reused warm by the next leases.
    ``close()`` fails while leases are active."""

    def __init__(self, store: MooncakeDistributedStore, max_regions: int | None = None, max_bytes: int | None = None) -> None:
        import threading
        if not isinstance(store, MooncakeDistributedStore):
            raise _errors.ArgumentTypeError(f"store must be a MooncakeDistributedStore, not {type(store).__name__}")
        self._store = store
        self._max_regions = max_regions
        self._max_bytes = (1 << 30) if max_bytes is None else max_bytes
        self._active: dict[int, BufferLease] = {}
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, size: int, block: bool = True, timeout: float | None = None) -> BufferLease:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise _errors.InvalidArgumentError(f"size must be a positive int, not {size!r}")
        if size > self._max_bytes:
            raise _errors.NoSpaceError(f"{size} bytes is more than the pool's {self._max_bytes}")
        with self._cond:
            def room() -> bool:
                return self._closed or (self._bytes + size <= self._max_bytes and
                                        (self._max_regions is None or len(self._active) < self._max_regions))
            if not room() and (not block or not self._cond.wait_for(room, timeout)):
                raise _errors.NoSpaceError(f"no room for {size} more bytes in the pool ({self._bytes} leased)")
            if self._closed:
                raise _errors.StoreClosedError("the pool is closed")
            block_ = _native.Buffer(size)
            if self._store.register_buffer(block_.ptr(), size) != 0:
                raise _errors.StoreClosedError("the pool's store is not set up")
            lease = BufferLease(self, block_, size)
            self._active[lease.ptr] = lease
            self._bytes += size
            return lease

    def buffer(self, size: int) -> BufferLease:
        """``acquire(size)``, to use in a ``with`` statement."""
        return self.acquire(size)

    def _give_back(self, lease: BufferLease) -> None:
        with self._cond:
            if self._active.pop(lease.ptr, None) is not None:
                self._store.unregister_buffer(lease.ptr)
                self._bytes -= lease.size
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._active:
                raise _errors.InvalidArgumentError(f"{len(self._active)} leases are still active: release them first")
            self._closed = True
            self._cond.notify_all()


class MooncakeHostMemAllocator:
    """Mooncake's host memory allocator: ``alloc(size)`` gives the address of ``size`` zeroed,
    64-byte-aligned bytes (0 on failure), ``free(ptr)`` returns them (0, or -600 for an address
    it did not give). The memory is host memory of this process; register it with a store
    (``register_buffer``) to use it with the zero-copy calls."""

    def __init__(self) -> None:
        self._blocks: dict[int, Any] = {}

    def alloc(self, size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            return 0
        try:
            block = _native.Buffer(size)
        except (MemoryError, StoreError):
            return 0
        self._blocks[block.ptr()] = block
        return block.ptr()

    def free(self, ptr: int) -> int:
        return 0 if self._blocks.pop(ptr, None) is not None else int(ErrorCode.INVALID_PARAMS)


def _dummy_name(port: str) -> bytes:
    """The abstract Unix socket a client set up with port `port` answers dummy clients on."""
    return b"\0kvstore-mooncake-" + port.encode()


def _same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket runs as this process's user
    (the kernel's SO_PEERCRED, never a claim)."""
    import struct
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.getuid()


class _DummyServer:
    """What a client set up with ``setup`` offers dummy clients on its host (``setup_dummy``):
    the master it joined, told to processes of the same user on an abstract Unix socket named
    by its port. A dummy client then joins the same master without a segment of its own, and
    its objects live in the full clients' segments, reached through shared memory."""

    def __init__(self, port: str, url: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(_dummy_name(port))
        self.sock.listen(16)
        self.answer = json.dumps({"master": url}).encode()
        import threading
        self.thread = threading.Thread(target=self._serve, name="kvstore-mooncake-dummy", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return   # closed
            with c:
                try:
                    c.settimeout(2)
                    if _same_user(c):
                        c.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


def _log(message: str) -> None:
    print(f"kvstore.mooncake: {message}", file=sys.stderr)


class MooncakeDistributedStore:
    """A client of a kvstore master with Mooncake Store's Python API (see the module doc)."""

    def __init__(self) -> None:
        self._store: Store | None = None
        self._hostname = ""
        self._registered: dict[int, int] = {}   # buffers registered here: address -> size
        self._dummies: _DummyServer | None = None
        self._pool = MooncakeHostMemAllocator()   # alloc_from_mem_pool's memory
        self._get_sessions: dict[str, int] = {}  # keys with batch get sessions open: how many
        self._put_sessions: dict[str, int] = {}  # keys with a put session open: its write id
        # Copy and move tasks: run by one thread of this client, kept for query_task (the
        # newest _MAX_TASKS; finished ones go first).
        self._tasks: dict[tuple[int, int], QueryTaskResponse] = {}
        self._task_queue: list[tuple[QueryTaskResponse, str, list[int], int | None]] = []
        self._task_lock = threading.Condition()
        self._task_thread: threading.Thread | None = None
        self._client_id = _uuid_pair(uuid.uuid4())
        self._url = ""   # the master, as setup reached it
        # Segments allocate_and_mount_segment added: each a session of its own, by name; and
        # the timers of those unmounting after a grace period.
        self._extra: dict[str, tuple[Store, bool]] = {}   # and whether mount_segment mounted it (a caller's file)
        self._unmounting: list[tuple[threading.Timer, Store]] = []

    # ---- lifecycle ----

    def setup(self, local_hostname: Any, metadata_server: str = "P2PHANDSHAKE", global_segment_size: int | str = 16 << 20,
              local_buffer_size: int | str = 16 << 20, protocol: str = "tcp", rdma_devices: str = "",
              master_server_addr: str = "127.0.0.1:50051", engine: Any = None, enable_ssd_offload: bool = False,
              ssd_offload_path: str = "", tenant_id: str = "default") -> int:
        """Joins the master at ``master_server_addr`` with a segment of ``global_segment_size``
        bytes (0: a pure client). Also takes one dict with the same keys (sizes as ints or
        strings such as "16MB"; ``master_server_address`` and ``device_name`` are accepted
        spellings). ``local_buffer_size`` and ``rdma_devices`` are accepted and unused (kvstore
        needs no staging buffer; RDMA devices are found at run time). ``tenant_id`` other than
        "default" joins as that kvstore tenant (its own key namespace; its token from
        ``KVSTORE_MASTER_TOKEN``). ``enable_ssd_offload`` with ``ssd_offload_path`` puts a
        kvstore disk tier below the segment (docs/disk-tier.md, "In a cluster"): a directory
        this process alone uses, taking at most ``KVSTORE_SSD_OFFLOAD_SIZE`` bytes (a size
        such as "500GiB"; default 80% of the file system's free space at setup), reuse
        admission. Returns 0 or an error code."""
        if isinstance(local_hostname, dict):
            cfg = dict(local_hostname)
            if "master_server_address" in cfg:
                cfg.setdefault("master_server_addr", cfg.pop("master_server_address"))
            if "device_name" in cfg:
                cfg.setdefault("rdma_devices", cfg.pop("device_name"))
            unknown = sorted(set(cfg) - set(_SETUP_KEYS))
            if unknown:
                _log(f"setup: ignoring unknown keys {', '.join(unknown)}")
            return self.setup(**{k: cfg[k] for k in _SETUP_KEYS if k in cfg})
        try:
            if self._store is not None and not self._store.closed:
                raise _errors.InvalidArgumentError("setup was already called; close() first")
            for name, v in (("local_hostname", local_hostname), ("metadata_server", metadata_server),
                            ("protocol", protocol), ("master_server_addr", master_server_addr)):
                if not isinstance(v, str):
                    raise _errors.ArgumentTypeError(f"{name} must be a str, not {type(v).__name__}")
            if metadata_server != "P2PHANDSHAKE" and not metadata_server.startswith("http://"):
                raise _errors.InvalidArgumentError(f"metadata_server {metadata_server!r}: kvstore takes 'P2PHANDSHAKE' or "
                                                   "'http://host:port/metadata' (and needs neither)")
            if protocol not in ("tcp", "rdma"):
                raise _errors.InvalidArgumentError(f"protocol {protocol!r} is not 'tcp' or 'rdma'")
            size = parse_size(global_segment_size, name="global_segment_size")
            parse_size(local_buffer_size, name="local_buffer_size")
            for name, v in (("enable_ssd_offload", enable_ssd_offload),):
                if not isinstance(v, (bool, str)) or (isinstance(v, str) and v.lower() not in ("true", "false", "1", "0", "")):
                    raise _errors.ArgumentTypeError(f"{name} must be a bool, not {v!r}")
            if not isinstance(ssd_offload_path, str):
                raise _errors.ArgumentTypeError(f"ssd_offload_path must be a str, not {type(ssd_offload_path).__name__}")
            if not isinstance(tenant_id, str) or not (tenant_id in ("", "default") or _TENANT.fullmatch(tenant_id)):
                raise _errors.InvalidArgumentError(f"tenant_id {tenant_id!r}: 1 to 64 of A-Z a-z 0-9 . _ -")
            disk: dict[str, Any] = {}
            if enable_ssd_offload in (True, "true", "True", "1"):
                if not ssd_offload_path:
                    raise _errors.InvalidArgumentError("enable_ssd_offload needs ssd_offload_path (a directory)")
                if size == 0:
                    _log("setup: a client without a segment has nothing to offload: enable_ssd_offload ignored")
                else:
                    disk = {"disk_path": ssd_offload_path, "disk_size": _ssd_offload_size(ssd_offload_path)}
            elif ssd_offload_path:
                _log("setup: ssd_offload_path given without enable_ssd_offload: no disk tier")
            host, _, port = local_hostname.rpartition(":") if ":" in local_hostname else (local_hostname, "", "")
            if not port:
                port = str(_free_port(host))
            url = _master_url(master_server_addr, "" if tenant_id in ("", "default") else tenant_id)
            self._store = Store.connect(url, segment_size=size, **disk)
            self._url = url
            self._hostname = f"{host or 'localhost'}:{port}"
            try:
                self._dummies = _DummyServer(port, url)
            except OSError as e:   # another client of this host took the name: no dummies for this one
                _log(f"setup: dummy clients cannot attach to port {port}: {e}")
            return 0
        except Exception as e:   # noqa: BLE001 - Mooncake's convention: a code, not an exception
            _log(f"setup failed: {e}")
            return _code(e)

    def init_all(self, protocol: str, device_name: str, mount_segment_size: int | str = 16 << 20) -> int:
        """``setup`` with Mooncake's fixed defaults: host "localhost:12345", a segment of
        ``mount_segment_size`` bytes, the master at 127.0.0.1:50051 (Mooncake's metadata
        server address, 127.0.0.1:2379, is not needed). −600 when already set up."""
        return self.setup("localhost:12345", "P2PHANDSHAKE", mount_segment_size, 1 << 30, protocol, device_name,
                          "127.0.0.1:50051")

    def get_hostname(self) -> str:
        """"host:port" of this client (the port picked at setup when none was given)."""
        return self._hostname

    def setup_dummy(self, mem_pool_size: int | str, local_buffer_size: int | str, server_address: str) -> int:
        """Joins as a dummy client of the full client set up at ``server_address`` ("host:port",
        its ``get_hostname()``) on this host: the same master, no segment of its own (its
        objects go to the full clients' segments, reached through shared memory).
        ``mem_pool_size`` and ``local_buffer_size`` are checked and unused (no staging buffer
        is needed). Only a full client run by the same user is accepted. 0, or an error code
        (-800 when no full client answers at that address)."""
        try:
            if self._store is not None and not self._store.closed:
                raise _errors.InvalidArgumentError("setup was already called; close() first")
            parse_size(mem_pool_size, name="mem_pool_size")
            parse_size(local_buffer_size, name="local_buffer_size")
            if not isinstance(server_address, str) or not server_address.rpartition(":")[2].isdigit():
                raise _errors.InvalidArgumentError(f"server_address {server_address!r} must be 'host:port'")
            port = server_address.rpartition(":")[2]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(5)
                try:
                    c.connect(_dummy_name(port))
                except OSError as e:
                    raise _errors.TransferError(f"no full client of this host answers at {server_address}: {e}") from None
                if not _same_user(c):
                    raise _errors.TransferError(f"the client at {server_address} runs as another user: refused")
                raw = c.recv(4096)
            try:
                url = json.loads(raw)["master"]
                if not isinstance(url, str):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise _errors.TransferError(f"the client at {server_address} gave no master address") from None
            self._store = Store.connect(url, segment_size=0)
            self._hostname = server_address
            return 0
        except Exception as e:   # noqa: BLE001
            _log(f"setup_dummy failed: {e}")
            return _code(e)

    def close(self) -> int:
        """Leaves the cluster. Idempotent; returns 0. Tasks not yet done fail."""
        with self._task_lock:
            thread, self._task_thread = self._task_thread, None
            for task, *_ in self._task_queue:
                task._set(TaskStatus.FAILED, "the client closed before the task ran")
            self._task_queue.clear()
            self._task_lock.notify_all()
        if thread is not None:
            thread.join()
        for timer, extra in self._unmounting:
            timer.cancel()
            extra.close()   # idempotent: the timer may have closed it already
        self._unmounting.clear()
        for extra, _ in self._extra.values():
            extra.close()
        self._extra.clear()
        if self._dummies is not None:
            self._dummies.close()
            self._dummies = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._registered.clear()
        self._pool = MooncakeHostMemAllocator()   # the old blocks go when nothing views them
        self._get_sessions.clear()
        self._put_sessions.clear()   # the store's close ended its writes; the master frees their space
        return 0

    def health_check(self) -> int:
        """0 healthy, 1 closed or not set up, 2 master unreachable."""
        if self._store is None or self._store.closed:
            return 1
        try:
            self._store.exists("\x00kvstore-health")
            return 0
        except _errors.TransferError:
            return 2
        except StoreError:
            return 1

    def _run(self, fn: Callable[[Store], Any]) -> Any:
        if self._store is None:
            raise _errors.StoreClosedError("not set up (call setup first) or closed")
        return fn(self._store)

    def _call(self, fn: Callable[[Store], Any], fail: Any = None) -> Any:
        """Runs fn on the store; an exception becomes its code (or `fail`, when given;
        `_NONE` for None)."""
        try:
            return self._run(fn)
        except Exception as e:   # noqa: BLE001
            if fail is None:
                return _code(e)
            return None if fail is _NONE else fail

    def _call_each(self, fn: Callable[[Store], list[Any]], keys: Any, fill: Any = _CODE) -> list[Any]:
        """Runs a batch call; when the whole call fails, one `fill` per key (by default the
        error's code)."""
        try:
            return self._run(fn)
        except Exception as e:   # noqa: BLE001
            n = len(keys) if isinstance(keys, (list, tuple)) else 0
            return [_code(e) if fill is _CODE else fill] * n

    # ---- bytes ----

    def _put_keeping(self, write: Callable[[Store], Any]) -> int:
        """Runs a put: 0 also when the key exists (Mooncake keeps the stored value), or a code."""
        def put(s: Store) -> int:
            try:
                write(s)
            except _errors.ObjectExistsError:
                pass
            return 0
        return self._call(put)

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        """0 (also when the key exists: the stored value is kept), or an error code."""
        return self._put_keeping(lambda s: s.put(key, value, **_options(config)))

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        return self._call(lambda s: s.upsert(key, value, **_options(config, upsert=True)) or 0)

    def put_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        return self._put_keeping(lambda s: s.put_parts(key, *parts, **_options(config)))

    def upsert_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        return self._call(lambda s: s.upsert_parts(key, *parts, **_options(config, upsert=True)) or 0)

    def get(self, key: str) -> bytes:
        """The value, or b"" when it is missing (or on any error)."""
        return self._call(lambda s: s.get(key), fail=b"")

    def get_buffer(self, key: str) -> BufferHandle | None:
        """The object's bytes in a new ``BufferHandle``, or None when it is missing (or on any
        error)."""
        return self.batch_get_buffer([key])[0] if isinstance(key, str) else None

    def batch_get_buffer(self, keys: Sequence[str]) -> list[BufferHandle | None]:
        """One ``BufferHandle`` per key, None for a missing key (or any error): every object held
        in one master request per chunk, each copied once into its new handle."""
        def get(s: Store) -> list[BufferHandle | None]:
            if not isinstance(keys, (list, tuple)):
                raise _errors.ArgumentTypeError(f"keys must be a list of str, not {type(keys).__name__}")
            return [v if isinstance(v, BufferHandle) else None for v in s._get_batch_new(list(keys), BufferHandle)]
        return self._call_each(get, keys, None)

    def get_into_ranges(self, buffer_ptrs: Sequence[int], all_keys: Sequence[Sequence[str]],
                        all_dst_offsets: Sequence[Sequence[Sequence[int]]], all_src_offsets: Sequence[Sequence[Sequence[int]]],
                        all_sizes: Sequence[Sequence[Sequence[int]]]) -> list[list[list[int]]]:
        """Ranged reads, buffer-major: for each buffer i, key j and fragment k, bytes
        ``[all_src_offsets[i][j][k], + all_sizes[i][j][k])`` of object ``all_keys[i][j]`` are
        copied to ``buffer_ptrs[i] + all_dst_offsets[i][j][k]``. Returns ``results[i][j][k]``:
        the bytes copied, or a negative code for that fragment (-600 for a shape that does not
        match, a fragment outside its object, or outside the registered buffer that holds
        ``buffer_ptrs[i]``; -704 for a missing object). Every object is held in one master request
        per chunk; only the ranges are copied, never the whole object."""
        def shape(i: int) -> list[list[int]]:
            keys = all_keys[i] if i < len(all_keys) and isinstance(all_keys[i], (list, tuple)) else [None]
            out = []
            for j in range(len(keys)):
                try:
                    out.append([int(ErrorCode.INVALID_PARAMS)] * max(1, len(all_sizes[i][j])))
                except (IndexError, TypeError):
                    out.append([int(ErrorCode.INVALID_PARAMS)])
            return out

        def run(s: Store) -> list[list[list[int]]]:
            if not all(isinstance(x, (list, tuple)) for x in (buffer_ptrs, all_keys, all_dst_offsets, all_src_offsets, all_sizes)):
                raise _errors.InvalidArgumentError("get_into_ranges takes lists")
            results = [shape(i) for i in range(len(buffer_ptrs))]
            if not len(buffer_ptrs) == len(all_keys) == len(all_dst_offsets) == len(all_src_offsets) == len(all_sizes):
                return results
            keys: list[str] = []
            ranges: list[list[tuple[int, int, int]]] = []
            where: list[tuple[int, int, list[int]]] = []   # (buffer, key, per fragment: -600 or 0 to read)
            for i, ptr in enumerate(buffer_ptrs):
                ks, dsts, srcs, sizes = all_keys[i], all_dst_offsets[i], all_src_offsets[i], all_sizes[i]
                if not all(isinstance(x, (list, tuple)) for x in (ks, dsts, srcs, sizes)) or \
                        not len(ks) == len(dsts) == len(srcs) == len(sizes) or \
                        not all(isinstance(x, (list, tuple)) and len(x) == len(sizes[j])
                                for j in range(len(ks)) for x in (dsts[j], srcs[j], sizes[j])):
                    continue
                region = self._region(ptr)
                for j, key in enumerate(ks):
                    fragments, marks = [], []
                    for d, o, n in zip(dsts[j], srcs[j], sizes[j]):
                        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (d, o, n)) and \
                            region is not None and ptr + d + n <= region[0] + region[1]
                        marks.append(0 if ok else int(ErrorCode.INVALID_PARAMS))
                        if ok:
                            fragments.append((ptr + d, o, n))
                    keys.append(key)
                    ranges.append(fragments)
                    where.append((i, j, marks))
            for (i, j, marks), got in zip(where, s._read_ranges(keys, ranges)):
                done = iter(got)
                results[i][j] = [m or _length(next(done)) for m in marks]
            return results
        try:
            return self._run(run)
        except Exception as e:   # noqa: BLE001
            code = _code(e)
            return [[[code] * len(f) for f in shape(i)] for i in range(len(buffer_ptrs) if isinstance(buffer_ptrs, (list, tuple)) else 0)]

    def _region(self, address: Any) -> tuple[int, int] | None:
        """The buffer registered through ``register_buffer`` that holds `address`: (start, size)."""
        if address.__class__ is not int:
            return None
        for start, size in self._registered.items():
            if start <= address < start + size:
                return start, size
        return None

    def get_replica_desc(self, key: str) -> list[ReplicaDescriptor]:
        """The object's replicas, the one a read tries first first; [] when it is missing (or on
        any error). Leases the object, as ``is_exist``; copies nothing."""
        return self.batch_get_replica_desc([key]).get(key, []) if isinstance(key, str) else []

    def batch_get_replica_desc(self, keys: Sequence[str]) -> dict[str, list[ReplicaDescriptor]]:
        """Each found key's replicas (``get_replica_desc``), in one master request per chunk of
        keys; a missing key is left out (as Mooncake does)."""
        def describe(s: Store) -> dict[str, list[ReplicaDescriptor]]:
            if not isinstance(keys, (list, tuple)):
                raise _errors.ArgumentTypeError(f"keys must be a list of str, not {type(keys).__name__}")
            out: dict[str, list[ReplicaDescriptor]] = {}
            for key, found in zip(keys, s._replicas(list(keys))):
                if isinstance(key, str) and isinstance(found, tuple):
                    out[key] = [ReplicaDescriptor(segment, offset, found[0]) for segment, offset in found[1]]
            return out
        try:
            return self._run(describe)
        except Exception:   # noqa: BLE001 - Mooncake's convention: nothing found, never an exception
            return {}

    # ---- segments ----

    def allocate_and_mount_segment(self, size: Any, protocol: str = "tcp", location: str = "") -> dict[str, Any]:
        """Allocates ``size`` bytes in this process and mounts them as one more segment of the
        cluster: a real segment, mounted by a session of its own at the master and served like
        this client's, named "kvstore-segment-<id>". Returns {"ret": 0, "segment_ids": [name],
        "allocated_size": bytes}, or {"ret": code, "segment_ids": [], "allocated_size": 0}.
        ``protocol`` ("tcp" or "rdma") and ``location`` are checked and not used (kvstore picks
        the transport; the memory is host memory)."""
        def mount(s: Store) -> dict[str, Any]:
            name = self._mount_extra(self._extra_size(size, protocol, location))
            return {"ret": 0, "segment_ids": [name], "allocated_size": self._extra[name][0].stats()["segment_size"]}
        try:
            return self._run(mount)
        except Exception as e:   # noqa: BLE001 - Mooncake's convention
            return {"ret": _code(e), "segment_ids": [], "allocated_size": 0}

    def mount_segment(self, path: str, size: Any, offset: int = 0, protocol: str = "tcp",
                      location: str = "") -> dict[str, Any]:
        """Mounts the first ``size`` bytes of the shared-memory file at ``path`` (tmpfs such as
        /dev/shm, or hugetlbfs; this user's and writable by nobody else) as one more segment of
        the cluster, by a session of its own at the master: objects are written into that
        file. Returns {"ret": 0, "segment_ids": ["kvstore-segment-<id>"]} or {"ret": code,
        "segment_ids": []}. ``offset`` must be 0 (kvstore maps a segment file from its start);
        ``protocol`` and ``location`` are checked and not used."""
        def mount(s: Store) -> dict[str, Any]:
            if not isinstance(path, str):
                raise _errors.ArgumentTypeError(f"path must be a str, not {type(path).__name__}")
            if offset != 0 or isinstance(offset, bool):
                raise _errors.InvalidArgumentError(f"offset {offset!r}: kvstore mounts a segment file from its start (0)")
            n = self._extra_size(size, protocol, location)
            try:
                name = self._mount_extra(n, path)
            except _errors.InvalidArgumentError as e:   # a file that cannot be mounted: -1, as Mooncake
                _log(f"mount_segment {path!r}: {e}")
                return {"ret": int(ErrorCode.INTERNAL_ERROR), "segment_ids": []}
            return {"ret": 0, "segment_ids": [name]}
        try:
            return self._run(mount)
        except Exception as e:   # noqa: BLE001 - Mooncake's convention
            return {"ret": _code(e), "segment_ids": []}

    def unmount_segment(self, segment_ids: Sequence[str], grace_period_seconds: int = 0) -> int:
        """Unmounts segments ``mount_segment`` mounted (their files stay, with whatever the
        objects left in them): at once, or drained for ``grace_period_seconds`` first, as
        ``unmount_and_free_segment``. 0, or −600 (nothing done)."""
        return self._unmount(segment_ids, grace_period_seconds, files=True)

    def unmount_and_free_segment(self, segment_ids: Sequence[str], grace_period_seconds: int = 0) -> int:
        """Unmounts segments ``allocate_and_mount_segment`` added and frees their memory: at
        once, or after ``grace_period_seconds``, during which they take no new object but what
        they hold stays readable (the master drains them). Objects with no replica elsewhere are
        lost, as when any client leaves. 0, or −600 (nothing done) for a name this client did
        not mount that way or a bad grace period."""
        return self._unmount(segment_ids, grace_period_seconds, files=False)

    def _extra_size(self, size: Any, protocol: Any, location: Any) -> int:
        """The checked size of an extra segment (its protocol and location checked too)."""
        n = parse_size(size, name="size")
        if n <= 0:
            raise _errors.InvalidArgumentError(f"size must be positive, not {size!r}")
        if protocol not in ("tcp", "rdma"):
            raise _errors.InvalidArgumentError(f"protocol {protocol!r} is not 'tcp' or 'rdma'")
        if not isinstance(location, str):
            raise _errors.ArgumentTypeError(f"location must be a str, not {type(location).__name__}")
        if not self._url:
            raise _errors.InvalidArgumentError("a dummy client mounts no segment")
        return n

    def _mount_extra(self, size: int, path: str | None = None) -> str:
        """A session of its own with a segment of ``size`` bytes (in ``path`` when given); its name."""
        extra = Store.connect(self._url, segment_size=size, segment_file=path)
        name = f"kvstore-segment-{extra.stats()['segment_id']}"
        self._extra[name] = (extra, path is not None)
        return name

    def _unmount(self, segment_ids: Any, grace_period_seconds: Any, files: bool) -> int:
        try:
            if not isinstance(segment_ids, (list, tuple)) or not segment_ids or \
                    any(not isinstance(n, str) for n in segment_ids) or len(set(segment_ids)) != len(segment_ids):
                raise _errors.InvalidArgumentError(f"segment_ids {segment_ids!r}: a list of names, each once")
            if any(n not in self._extra or self._extra[n][1] != files for n in segment_ids):
                _log(f"unmount: {segment_ids!r} are not all segments this client mounted that way")
                return int(ErrorCode.INTERNAL_ERROR)   # an unknown segment id: -1, as Mooncake
            if not isinstance(grace_period_seconds, int) or isinstance(grace_period_seconds, bool) or \
                    not 0 <= grace_period_seconds <= 86_400:
                raise _errors.InvalidArgumentError(f"grace_period_seconds must be an int from 0 to 86400, not {grace_period_seconds!r}")
            for name in segment_ids:
                extra, _ = self._extra.pop(name)
                if grace_period_seconds == 0:
                    extra.close()
                    continue
                extra.drain_segment()
                timer = threading.Timer(grace_period_seconds, extra.close)
                timer.daemon = True
                timer.start()
                self._unmounting.append((timer, extra))
            return 0
        except Exception as e:   # noqa: BLE001
            return _code(e)

    # ---- copy and move tasks ----

    _MAX_TASKS = 10_000

    def create_copy_task(self, key: str, targets: Sequence[str]) -> tuple[tuple[int, int], int]:
        """Queues a copy of ``key`` to each of ``targets`` (segment names as
        ``get_replica_desc`` gives them, "kvstore-segment-<id>"): a real replica, made by this
        client's task thread (``Store.copy_replicas``). Returns (task id, 0), or ((0, 0), code)
        when it cannot be queued (the object is missing, a name is bad, too many tasks)."""
        def check(s: Store) -> tuple[str, list[int], int | None]:
            if not isinstance(key, str):
                raise _errors.ArgumentTypeError(f"key must be a str, not {type(key).__name__}")
            s.replicas(key)   # missing: OBJECT_NOT_FOUND first, as Mooncake
            if not isinstance(targets, (list, tuple)) or not 1 <= len(targets) <= 16:
                raise _errors.InvalidArgumentError("targets must be a list of 1 to 16 segment names")
            return key, [_segment_id(t) for t in targets], None
        return self._submit(TaskType.REPLICA_COPY, check)

    def create_move_task(self, key: str, source: str, target: str) -> tuple[tuple[int, int], int]:
        """Queues a move of ``key``'s replica in segment ``source`` to segment ``target``
        (names as for ``create_copy_task``). ((0, 0), code) when the object or its replica in
        ``source`` is missing now."""
        def check(s: Store) -> tuple[str, list[int], int | None]:
            if not isinstance(key, str):
                raise _errors.ArgumentTypeError(f"key must be a str, not {type(key).__name__}")
            where = s.replicas(key)   # missing: OBJECT_NOT_FOUND first, as Mooncake
            src, dst = _segment_id(source), _segment_id(target)
            if src not in where:
                raise _errors.InvalidArgumentError(f"segment {source!r} holds no replica of {key!r}")
            return key, [dst], src
        return self._submit(TaskType.REPLICA_MOVE, check)

    def query_task(self, task_id: Any) -> tuple[QueryTaskResponse | None, int]:
        """(the task's state, 0), or (None, TASK_NOT_FOUND) for an id this client did not
        create or has forgotten (it keeps the newest 10,000)."""
        with self._task_lock:
            found = self._tasks.get(tuple(task_id)) if isinstance(task_id, (tuple, list)) else None
        return (found, 0) if found is not None else (None, int(ErrorCode.TASK_NOT_FOUND))

    def _submit(self, kind: TaskType, check: Callable[[Store], tuple[str, list[int], int | None]]) -> tuple[tuple[int, int], int]:
        try:
            key, targets, drop = self._run(check)
        except Exception as e:   # noqa: BLE001 - Mooncake's convention
            return (0, 0), _code(e)
        with self._task_lock:
            if len(self._task_queue) >= self._MAX_TASKS:
                return (0, 0), int(ErrorCode.TASK_PENDING_LIMIT_EXCEEDED)
            task = QueryTaskResponse(_uuid_pair(uuid.uuid4()), kind, self._client_id)
            while len(self._tasks) >= self._MAX_TASKS:   # forget the oldest finished one
                old = next((t for t, q in self._tasks.items() if q.status in (TaskStatus.SUCCESS, TaskStatus.FAILED)), None)
                if old is None:
                    break
                del self._tasks[old]
            self._tasks[task.id] = task
            self._task_queue.append((task, key, targets, drop))
            if self._task_thread is None:
                self._task_thread = threading.Thread(target=self._run_tasks, name="kvstore-mooncake-tasks", daemon=True)
                self._task_thread.start()
            self._task_lock.notify_all()
        return task.id, 0

    def _run_tasks(self) -> None:
        """The task thread: runs queued tasks one by one until the client closes. A task
        that finds no room is tried again up to 3 times, 0.1 s apart (as Mooncake retries
        NO_AVAILABLE_HANDLE)."""
        me = threading.current_thread()
        while True:
            with self._task_lock:
                while not self._task_queue and self._task_thread is me:
                    self._task_lock.wait()
                if self._task_thread is not me:
                    return
                task, key, targets, drop = self._task_queue.pop(0)
                task._set(TaskStatus.PROCESSING)
            for attempt in range(4):
                try:
                    self._run(lambda s: s.copy_replicas(key, targets, drop))
                    task._set(TaskStatus.SUCCESS)
                    break
                except _errors.NoSpaceError as e:
                    if attempt == 3:
                        task._set(TaskStatus.FAILED, f"{ErrorCode.NO_AVAILABLE_HANDLE.name}: {e}")
                    else:
                        time.sleep(0.1)
                except Exception as e:   # noqa: BLE001 - the task records it
                    task._set(TaskStatus.FAILED, f"{ErrorCode(_code(e)).name}: {e}")
                    break

    def get_size(self, key: str) -> int:
        return self._call(lambda s: s.size(key))

    def is_exist(self, key: str) -> int:
        """1 present, 0 absent, or an error code."""
        return self._call(lambda s: int(s.exists(key)))

    def _batch_codes(self, results: list[Any], ok: Callable[[Any], int] = lambda _: 0,
                     exists_ok: bool = False) -> list[int]:
        return [ok(r) if not isinstance(r, BaseException)
                else 0 if exists_ok and isinstance(r, _errors.ObjectExistsError) else _code(r) for r in results]

    def put_batch(self, keys: Sequence[str], values: Sequence[Any], config: ReplicateConfig | None = None) -> int:
        """0 when every value is stored (existing keys count as stored), else the first error."""
        def put(s: Store) -> int:
            codes = self._batch_codes(s.put_batch(list(keys), list(values), **_options(config, _count(keys))), exists_ok=True)
            return next((c for c in codes if c), 0)
        return self._call(put)

    def upsert_batch(self, keys: Sequence[str], values: Sequence[Any], config: ReplicateConfig | None = None) -> int:
        def upsert(s: Store) -> int:
            codes = self._batch_codes(s.upsert_batch(list(keys), list(values), **_options(config, _count(keys), upsert=True)))
            return next((c for c in codes if c), 0)
        return self._call(upsert)

    def get_batch(self, keys: Sequence[str]) -> list[bytes]:
        """One value per key; b"" for a missing key."""
        def get(s: Store) -> list[bytes]:
            return [v if isinstance(v, bytes) else b"" for v in s.get_batch(list(keys))]
        return self._call_each(get, keys, b"")

    def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        def exist(s: Store) -> list[int]:
            return [int(r) if not isinstance(r, BaseException) else _code(r) for r in s.batch_exists(list(keys))]
        return self._call_each(exist, keys)

    def remove(self, key: str, force: bool = False) -> int:
        return self._call(lambda s: s.remove(key, force=force) or 0)

    def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        return self._call_each(lambda s: self._batch_codes(s.batch_remove(list(keys), force=force)), keys)

    def remove_by_regex(self, regex: str, force: bool = False) -> int:
        """Removes every object whose key matches ``regex`` (Python ``re.search``); returns how
        many were removed (leased ones are skipped without ``force``), or an error code."""
        def remove(s: Store) -> int:
            if not isinstance(regex, str):
                raise _errors.ArgumentTypeError(f"regex must be a str, not {type(regex).__name__}")
            try:
                pattern = re.compile(regex)
            except re.error as e:
                raise _errors.InvalidArgumentError(f"bad regex {regex!r}: {e}") from None
            matched = [k for k in s.scan_keys() if pattern.search(k)]
            return sum(1 for r in s.batch_remove(matched, force=force) if r is None) if matched else 0
        return self._call(remove)

    def remove_all(self, force: bool = False) -> int:
        """The number of objects removed, or an error code."""
        return self._call(lambda s: s.remove_all(force=force))

    # ---- tensors ----
    # Tensors are stored as kvstore's tensor format (the 304-byte header, then the data), read back as
    # torch tensors on the CPU when torch is installed, numpy arrays otherwise.

    @staticmethod
    def _as_torch(a: Any) -> Any:
        try:
            import torch
        except ImportError:
            return a
        return torch.from_numpy(a) if isinstance(a, np.ndarray) else a

    def put_tensor(self, key: str, tensor: Any, config: ReplicateConfig | None = None) -> int:
        """0 (also when the key exists: the stored tensor is kept), or an error code."""
        return self._put_keeping(lambda s: s.put_tensor(key, tensor, **_options(config)))

    def upsert_tensor(self, key: str, tensor: Any, config: ReplicateConfig | None = None) -> int:
        return self._call(lambda s: s.upsert_tensor(key, tensor, **_options(config, upsert=True)) or 0)

    def get_tensor(self, key: str) -> Any:
        """The tensor, or None when it is missing or not a tensor."""
        return self._call(lambda s: self._as_torch(s.get_tensor(key)), fail=_NONE)

    def batch_put_tensor(self, keys: Sequence[str], tensors_list: Sequence[Any],
                         config: ReplicateConfig | None = None) -> list[int]:
        def put(s: Store) -> list[int]:
            options = _options(config, _count(keys))
            return self._batch_codes(s.batch_put_tensor(list(keys), list(tensors_list), **options), exists_ok=True)
        return self._call_each(put, keys)

    def batch_upsert_tensor(self, keys: Sequence[str], tensors_list: Sequence[Any],
                            config: ReplicateConfig | None = None) -> list[int]:
        def upsert(s: Store) -> list[int]:
            options = _options(config, _count(keys), upsert=True)
            return self._batch_codes(s.batch_upsert_tensor(list(keys), list(tensors_list), **options))
        return self._call_each(upsert, keys)

    def batch_get_tensor(self, keys: Sequence[str]) -> list[Any]:
        """One tensor per key; None for a missing key."""
        def get(s: Store) -> list[Any]:
            return [None if isinstance(t, BaseException) or t is None else self._as_torch(t) for t in s.batch_get_tensor(list(keys))]
        return self._call_each(get, keys, None)

    def put_tensor_from(self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None) -> int:
        """Stores `size` bytes at `buffer_ptr` that hold a tensor as ``get_tensor_into`` leaves
        it (header, then data); the header is checked first."""
        def put(s: Store) -> int:
            _tensor.decode(bytes((ctypes.c_char * min(size, _tensor.HEADER_SIZE)).from_address(buffer_ptr)), size, key)
            return self.put_from(key, buffer_ptr, size, config)
        return self._call(put)

    def get_tensor_into(self, key: str, buffer_ptr: int, size: int) -> Any:
        """Reads the stored tensor (header and data) into host memory at `buffer_ptr` and
        returns a tensor viewing its data there, or None (missing, too small, not a tensor)."""
        def get(s: Store) -> Any:
            n = self.get_into(key, buffer_ptr, size)
            if n < 0:
                return None
            header = bytes((ctypes.c_char * min(n, _tensor.HEADER_SIZE)).from_address(buffer_ptr))
            code, shape = _tensor.decode(header, n, key)
            data = (ctypes.c_uint8 * (n - _tensor.HEADER_SIZE)).from_address(buffer_ptr + _tensor.HEADER_SIZE)
            return self._as_torch(np.frombuffer(data, dtype=_tensor.numpy_dtype(code)).reshape(shape))
        return self._call(get, fail=_NONE)

    # ---- publishing (puts with a config) and tensors from addresses ----

    def pub_tensor(self, key: str, tensor: Any, config: ReplicateConfig | None = None) -> int:
        """``put_tensor`` with a config (Mooncake's name for it)."""
        return self.put_tensor(key, tensor, config)

    def batch_pub_tensor(self, keys: Sequence[str], tensors_list: Sequence[Any], config: ReplicateConfig | None = None) -> list[int]:
        return self.batch_put_tensor(keys, tensors_list, config)

    def upsert_pub_tensor(self, key: str, tensor: Any, config: ReplicateConfig | None = None) -> int:
        return self.upsert_tensor(key, tensor, config)

    def batch_upsert_pub_tensor(self, keys: Sequence[str], tensors_list: Sequence[Any],
                                config: ReplicateConfig | None = None) -> list[int]:
        return self.batch_upsert_tensor(keys, tensors_list, config)

    def _tensor_at(self, buffer_ptr: int, size: int, what: str = "buffer") -> np.ndarray:
        """The tensor serialized at `buffer_ptr` ([header][data], `size` bytes), viewed in place."""
        for name, v in ((f"{what}_ptr", buffer_ptr), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _errors.InvalidArgumentError(f"{name} must be a positive int")
        header = bytes((ctypes.c_char * min(size, _tensor.HEADER_SIZE)).from_address(buffer_ptr))
        code, shape = _tensor.decode(header, size, what)
        data = (ctypes.c_uint8 * (size - _tensor.HEADER_SIZE)).from_address(buffer_ptr + _tensor.HEADER_SIZE)
        return np.frombuffer(data, dtype=_tensor.numpy_dtype(code)).reshape(shape)

    def _tensor_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int], upsert: bool,
                     config: ReplicateConfig | None) -> list[int]:
        def run(s: Store) -> list[int]:
            if not (len(keys) == len(buffer_ptrs) == len(sizes)):
                raise _errors.InvalidArgumentError("keys, buffer pointers and sizes differ in length")
            codes = []
            for p, n in zip(buffer_ptrs, sizes):
                try:
                    self._tensor_at(p, n)   # a tensor object, checked before anything is written
                    codes.append(0)
                except Exception as e:   # noqa: BLE001
                    codes.append(_code(e))
            ok = [i for i, c in enumerate(codes) if c == 0]
            done = self._raw("upsert" if upsert else "put", [keys[i] for i in ok], [buffer_ptrs[i] for i in ok],
                             [sizes[i] for i in ok], config, single=True)
            for i, c in zip(ok, done):
                codes[i] = c
            return codes
        return self._call_each(run, keys)

    def batch_put_tensor_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                              config: ReplicateConfig | None = None) -> list[int]:
        """Tensors serialized at addresses ([header][data], as ``get_tensor_into`` leaves them)."""
        return self._tensor_from(keys, buffer_ptrs, sizes, False, config)

    def upsert_tensor_from(self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None) -> int:
        return self._tensor_from([key], [buffer_ptr], [size], True, config)[0]

    def batch_upsert_tensor_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                                 config: ReplicateConfig | None = None) -> list[int]:
        return self._tensor_from(keys, buffer_ptrs, sizes, True, config)

    def batch_get_tensor_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int]) -> list[Any]:
        """``get_tensor_into`` per key: a tensor viewing its buffer, or None."""
        if not isinstance(keys, (list, tuple)) or not isinstance(buffer_ptrs, (list, tuple)) or \
                not isinstance(sizes, (list, tuple)) or not len(keys) == len(buffer_ptrs) == len(sizes):
            return [None] * (len(keys) if isinstance(keys, (list, tuple)) else 0)
        return [self.get_tensor_into(k, p, n) for k, p, n in zip(keys, buffer_ptrs, sizes)]

    def put_from_with_metadata(self, key: str, buffer_ptr: int, metadata_buffer_ptr: int, size: int, metadata_size: int,
                               config: ReplicateConfig | None = None) -> int:
        """One object of the metadata's bytes then the data's (as Mooncake lays it out)."""
        return self._raw("put", [key], [[metadata_buffer_ptr, buffer_ptr]], [[metadata_size, size]], config)[0] \
            if isinstance(key, str) else int(ErrorCode.INVALID_PARAMS)

    # ---- unified parallel tensor IO (kvstore.parallel) ----

    def _put_parallel(self, key: str, tensor: Any, axes: tuple[parallel.Axis, ...] | None, full_input: bool,
                      upsert: bool, config: ReplicateConfig | None) -> int:
        def run(s: Store) -> int:
            options = _options(config, upsert=upsert)
            try:
                if axes is None:
                    (s.upsert_tensor if upsert else s.put_tensor)(key, tensor, **options)
                else:
                    parallel.put_tensor(s, key, tensor, axes, full_input=full_input, upsert=upsert, **options)
            except _errors.ObjectExistsError:
                pass   # Mooncake's put keeps the stored value
            return 0
        return self._call(run)

    def _parallel_args(self, parallelism: Any, writer_partition: Any) -> tuple[tuple[parallel.Axis, ...] | None, bool]:
        """The axes a parallel write stores and whether its input is the full tensor: a
        writer_partition names a TP shard of a full input; a parallelism with a TP axis among
        others takes the full tensor (the shard is cut out of it); a single axis, the shard."""
        if parallelism is not None and writer_partition is not None:
            raise _errors.InvalidArgumentError("give parallelism or writer_partition, not both")
        if writer_partition is not None:
            return _partition(writer_partition), True
        axes = _axes_of(parallelism)
        return axes, axes is not None and len(axes) > 1 and any(a.kind == "tp" for a in axes)

    def put_tensor_with_parallelism(self, key: str, tensor: Any, parallelism: TensorParallelism | None = None,
                                    config: ReplicateConfig | None = None, writer_partition: Any = None) -> int:
        """Stores a full tensor (no parallelism), or the shard its parallelism names (see
        ``kvstore.parallel``). 0, or an error code."""
        try:
            axes, full = self._parallel_args(parallelism, writer_partition)
        except Exception as e:   # noqa: BLE001
            return _code(e)
        return self._put_parallel(key, tensor, axes, full, False, config)

    def upsert_tensor_with_parallelism(self, key: str, tensor: Any, parallelism: TensorParallelism | None = None,
                                       config: ReplicateConfig | None = None, writer_partition: Any = None) -> int:
        try:
            axes, full = self._parallel_args(parallelism, writer_partition)
        except Exception as e:   # noqa: BLE001
            return _code(e)
        return self._put_parallel(key, tensor, axes, full, True, config)

    def _batch_parallel(self, one: Callable[..., int], keys: Sequence[str], tensors: Sequence[Any], parallelisms: Any,
                        config: ReplicateConfig | None, writer_partitions: Any) -> list[int]:
        n = len(keys) if isinstance(keys, (list, tuple)) else 0
        bad = [int(ErrorCode.INVALID_PARAMS)] * n
        if not isinstance(keys, (list, tuple)) or not isinstance(tensors, (list, tuple)) or len(tensors) != n:
            return bad
        ps = [None] * n if parallelisms is None else list(parallelisms)
        ws = [None] * n if writer_partitions is None else list(writer_partitions)
        if len(ps) != n or len(ws) != n:
            return bad
        return [one(k, t, p, config, w) for k, t, p, w in zip(keys, tensors, ps, ws)]

    def batch_put_tensor_with_parallelism(self, keys: Sequence[str], tensors: Sequence[Any], parallelisms: Any = None,
                                          config: ReplicateConfig | None = None, writer_partitions: Any = None) -> list[int]:
        return self._batch_parallel(self.put_tensor_with_parallelism, keys, tensors, parallelisms, config, writer_partitions)

    def batch_upsert_tensor_with_parallelism(self, keys: Sequence[str], tensors: Sequence[Any], parallelisms: Any = None,
                                             config: ReplicateConfig | None = None,
                                             writer_partitions: Any = None) -> list[int]:
        return self._batch_parallel(self.upsert_tensor_with_parallelism, keys, tensors, parallelisms, config,
                                    writer_partitions)

    def _parallel_from(self, write: Callable[..., int], key: str, buffer_ptr: int, size: int, parallelism: Any,
                       config: ReplicateConfig | None, writer_partition: Any) -> int:
        """`write` (a parallel put or upsert) of the tensor serialized at an address."""
        try:
            tensor = self._tensor_at(buffer_ptr, size)
        except Exception as e:   # noqa: BLE001
            return _code(e)
        return write(key, tensor, parallelism, config, writer_partition)

    def put_tensor_with_parallelism_from(self, key: str, buffer_ptr: int, size: int,
                                         parallelism: TensorParallelism | None = None,
                                         config: ReplicateConfig | None = None, writer_partition: Any = None) -> int:
        """``put_tensor_with_parallelism`` of the tensor serialized at an address."""
        return self._parallel_from(self.put_tensor_with_parallelism, key, buffer_ptr, size, parallelism, config,
                                   writer_partition)

    def upsert_tensor_with_parallelism_from(self, key: str, buffer_ptr: int, size: int,
                                            parallelism: TensorParallelism | None = None,
                                            config: ReplicateConfig | None = None, writer_partition: Any = None) -> int:
        return self._parallel_from(self.upsert_tensor_with_parallelism, key, buffer_ptr, size, parallelism, config,
                                   writer_partition)

    def batch_put_tensor_with_parallelism_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                                               parallelisms: Any = None, config: ReplicateConfig | None = None,
                                               writer_partitions: Any = None) -> list[int]:
        return self._batch_from(self.put_tensor_with_parallelism_from, keys, buffer_ptrs, sizes, parallelisms, config,
                                writer_partitions)

    def batch_upsert_tensor_with_parallelism_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int],
                                                  sizes: Sequence[int], parallelisms: Any = None,
                                                  config: ReplicateConfig | None = None,
                                                  writer_partitions: Any = None) -> list[int]:
        return self._batch_from(self.upsert_tensor_with_parallelism_from, keys, buffer_ptrs, sizes, parallelisms, config,
                                writer_partitions)

    def _batch_from(self, one: Callable[..., int], keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int],
                    parallelisms: Any, config: ReplicateConfig | None, writer_partitions: Any) -> list[int]:
        n = len(keys) if isinstance(keys, (list, tuple)) else 0
        if not isinstance(ptrs, (list, tuple)) or not isinstance(sizes, (list, tuple)) or not n == len(ptrs) == len(sizes):
            return [int(ErrorCode.INVALID_PARAMS)] * n
        ps = [None] * n if parallelisms is None else list(parallelisms)
        ws = [None] * n if writer_partitions is None else list(writer_partitions)
        if len(ps) != n or len(ws) != n:
            return [int(ErrorCode.INVALID_PARAMS)] * n
        return [one(k, p, m, q, config, w) for k, p, m, q, w in zip(keys, ptrs, sizes, ps, ws)]

    @staticmethod
    def _target(target: ReadTarget | None) -> tuple[str, tuple[parallel.Axis, ...] | None]:
        """A read target's mode and axes, checked."""
        if target is None:
            target = ReadTarget()
        if not isinstance(target, ReadTarget) or target.mode not in ReadTarget.MODES:
            raise _errors.InvalidArgumentError("target must be a ReadTarget with mode 'as_stored', 'shard' or 'full'")
        axes = _axes_of(target.parallelism)
        if target.mode == "shard" and not axes:
            raise _errors.InvalidArgumentError("a 'shard' read needs target.parallelism")
        return target.mode, axes

    def _read_parallel(self, s: Store, key: str, target: ReadTarget | None, into: Any = None,
                       layout: parallel.Layout | None = None) -> Any:
        """A parallel read (see ``get_tensor_with_parallelism``); `into` a target array or None;
        `layout` the caller already read (or None)."""
        mode, axes = self._target(target)
        if mode == "as_stored":
            name = key if axes is None else parallel.shard_key(key, axes)
            return s.get_tensor(name) if into is None else s.get_tensor_into(name, into)
        layout = layout or parallel.read_layout(s, key)
        if layout is None and mode == "full":   # stored whole, not in shards
            return s.get_tensor(key) if into is None else s.get_tensor_into(key, into)
        return parallel.get_tensor(s, key, axes if mode == "shard" else None, into=into, layout=layout)

    def get_tensor_with_parallelism(self, key: str, target: ReadTarget | None = None) -> Any:
        """The tensor as ``target`` asks (None: as stored), or None when it is missing."""
        return self._call(lambda s: self._as_torch(self._read_parallel(s, key, target)), fail=_NONE)

    def batch_get_tensor_with_parallelism(self, keys: Sequence[str], targets: Any = None) -> list[Any]:
        if not isinstance(keys, (list, tuple)):
            return []
        ts = [None] * len(keys) if targets is None else list(targets)
        if len(ts) != len(keys):
            return [None] * len(keys)
        return [self.get_tensor_with_parallelism(k, t) for k, t in zip(keys, ts)]

    def _shape_of(self, s: Store, key: str, target: ReadTarget | None) -> tuple[int, tuple[int, ...], parallel.Layout | None]:
        """(dtype code, shape) that a parallel read of `key` for `target` gives, and the layout
        it was found in: from the layout, or (stored whole) from the object's header alone (a
        ranged read of its first bytes)."""
        mode, axes = self._target(target)
        layout = None if mode == "as_stored" else parallel.read_layout(s, key)
        if layout is None:
            name = key if mode != "as_stored" or axes is None else parallel.shard_key(key, axes)
            header = np.empty(_tensor.HEADER_SIZE, np.uint8)
            got = s._read_ranges([name], [[(header.ctypes.data, 0, _tensor.HEADER_SIZE)]], True)[0][0]
            if isinstance(got, BaseException):
                raise got
            code, shape, _n = _native.decode_tensor_header(header.tobytes())
            return code, tuple(shape), None
        want = parallel.region(layout.shape, axes if mode == "shard" and axes else ())
        return layout.code, tuple(b - a for a, b in want), layout

    def get_tensor_with_parallelism_into(self, key: str, buffer_ptr: int, size: int, target: ReadTarget | None = None) -> Any:
        """The parallel read into host memory at `buffer_ptr` (``size`` bytes), laid out as
        ``get_tensor_into`` leaves a tensor (header, then data): a tensor viewing the data, or
        None."""
        def run(s: Store) -> Any:
            for name, v in (("buffer_ptr", buffer_ptr), ("size", size)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise _errors.InvalidArgumentError(f"{name} must be a positive int")
            code, shape, layout = self._shape_of(s, key, target)
            nbytes = math.prod(shape) * _tensor.ITEM_SIZES[code]
            if _tensor.HEADER_SIZE + nbytes > size:
                raise _errors.InvalidArgumentError(f"the buffer holds {size} bytes; the tensor needs {_tensor.HEADER_SIZE + nbytes}")
            data = (ctypes.c_uint8 * nbytes).from_address(buffer_ptr + _tensor.HEADER_SIZE)
            view = np.frombuffer(data, dtype=_tensor.numpy_dtype(code)).reshape(shape)
            self._read_parallel(s, key, target, into=view, layout=layout)
            ctypes.memmove(buffer_ptr, _native.tensor_header(code, shape), _tensor.HEADER_SIZE)
            return self._as_torch(view)
        return self._call(run, fail=_NONE)

    def batch_get_tensor_with_parallelism_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                                               targets: Any = None) -> list[Any]:
        if not isinstance(keys, (list, tuple)):
            return []
        ts = [None] * len(keys) if targets is None else list(targets)
        if not isinstance(buffer_ptrs, (list, tuple)) or not isinstance(sizes, (list, tuple)) or \
                not len(keys) == len(buffer_ptrs) == len(sizes) == len(ts):
            return [None] * len(keys)
        return [self.get_tensor_with_parallelism_into(k, p, n, t) for k, p, n, t in zip(keys, buffer_ptrs, sizes, ts)]

    # ---- the TP wrappers (Mooncake's legacy names, lowered to the parallel IO) ----

    @staticmethod
    def _tp_target(tp_rank: int, tp_size: int, split_dim: int) -> ReadTarget:
        return ReadTarget("shard", TensorParallelism([ParallelAxis("tp", tp_rank, tp_size, split_dim)]))

    def _put_all_tp(self, key: str, tensor: Any, tp_size: int, split_dim: int, config: ReplicateConfig | None,
                    upsert: bool = False) -> int:
        """Every TP shard of a full tensor, as "key_tp_<rank>" (tp_size 1: the tensor at key)."""
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            return int(ErrorCode.INVALID_PARAMS)
        if tp_size == 1:
            return self._put_parallel(key, tensor, None, False, upsert, config)
        if not _valid_dim(split_dim):
            return int(ErrorCode.INVALID_PARAMS)

        def put(s: Store) -> int:
            shards = [_partition((r, tp_size, split_dim)) for r in range(tp_size)]
            results = parallel.put_shards(s, key, tensor, shards, upsert=upsert, **_options(config, tp_size, upsert))
            return next((_code(e) for e in results if e is not None and not isinstance(e, _errors.ObjectExistsError)), 0)
        return self._call(put)

    def put_tensor_with_tp(self, key: str, tensor: Any, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0) -> int:
        """Splits a full tensor into ``tp_size`` shards along ``split_dim`` and stores them all
        ("key_tp_<rank>"; ``tp_rank`` is accepted for Mooncake's signature)."""
        return self._put_all_tp(key, tensor, tp_size, split_dim, None)

    def pub_tensor_with_tp(self, key: str, tensor: Any, config: ReplicateConfig | None = None, tp_rank: int = 0,
                           tp_size: int = 1, split_dim: int = 0) -> int:
        return self._put_all_tp(key, tensor, tp_size, split_dim, config)

    def batch_put_tensor_with_tp(self, base_keys: Sequence[str], tensors_list: Sequence[Any], tp_rank: int = 0,
                                 tp_size: int = 1, split_dim: int = 0) -> list[int]:
        if not isinstance(base_keys, (list, tuple)) or not isinstance(tensors_list, (list, tuple)) or \
                len(base_keys) != len(tensors_list):
            return [int(ErrorCode.INVALID_PARAMS)] * (len(base_keys) if isinstance(base_keys, (list, tuple)) else 0)
        return [self._put_all_tp(k, t, tp_size, split_dim, None) for k, t in zip(base_keys, tensors_list)]

    def batch_pub_tensor_with_tp(self, base_keys: Sequence[str], tensors_list: Sequence[Any],
                                 config: ReplicateConfig | None = None, tp_rank: int = 0, tp_size: int = 1,
                                 split_dim: int = 0) -> list[int]:
        if not isinstance(base_keys, (list, tuple)) or not isinstance(tensors_list, (list, tuple)) or \
                len(base_keys) != len(tensors_list):
            return [int(ErrorCode.INVALID_PARAMS)] * (len(base_keys) if isinstance(base_keys, (list, tuple)) else 0)
        return [self._put_all_tp(k, t, tp_size, split_dim, config) for k, t in zip(base_keys, tensors_list)]

    def put_tensor_with_tp_from(self, key: str, buffer_ptr: int, size: int, tp_rank: int = 0, tp_size: int = 1,
                                split_dim: int = 0) -> int:
        """``put_tensor_with_tp`` of the full tensor serialized at an address."""
        try:
            tensor = self._tensor_at(buffer_ptr, size)
        except Exception as e:   # noqa: BLE001
            return _code(e)
        return self._put_all_tp(key, tensor, tp_size, split_dim, None)

    def batch_put_tensor_with_tp_from(self, base_keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                                      tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0) -> list[int]:
        n = len(base_keys) if isinstance(base_keys, (list, tuple)) else 0
        if not isinstance(buffer_ptrs, (list, tuple)) or not isinstance(sizes, (list, tuple)) or \
                not n == len(buffer_ptrs) == len(sizes):
            return [int(ErrorCode.INVALID_PARAMS)] * n
        return [self.put_tensor_with_tp_from(k, p, m, tp_rank, tp_size, split_dim) for k, p, m in zip(base_keys, buffer_ptrs, sizes)]

    def get_tensor_with_tp(self, key: str, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0) -> Any:
        """The TP shard ``tp_rank`` of ``tp_size`` along ``split_dim`` (tp_size 1: the tensor at
        key), read from whatever layout it was stored in; None when missing."""
        if tp_size == 1:
            return self.get_tensor(key)
        return self.get_tensor_with_parallelism(key, self._tp_target(tp_rank, tp_size, split_dim))

    def get_tensor_with_tp_into(self, key: str, buffer_ptr: int, size: int, tp_rank: int = 0, tp_size: int = 1,
                                split_dim: int = 0) -> Any:
        if tp_size == 1:
            return self.get_tensor_into(key, buffer_ptr, size)
        return self.get_tensor_with_parallelism_into(key, buffer_ptr, size, self._tp_target(tp_rank, tp_size, split_dim))

    def batch_get_tensor_with_tp(self, base_keys: Sequence[str], tp_rank: int = 0, tp_size: int = 1) -> list[Any]:
        """Each key's stored shard "key_tp_<rank>" (tp_size 1: the tensor at key), as written."""
        if not isinstance(base_keys, (list, tuple)):
            return []
        if tp_size == 1:
            return self.batch_get_tensor(base_keys)
        return self.batch_get_tensor([f"{k}_tp_{tp_rank}" for k in base_keys])

    def batch_get_tensor_with_tp_into(self, base_keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                                      tp_rank: int = 0, tp_size: int = 1) -> list[Any]:
        if not isinstance(base_keys, (list, tuple)):
            return []
        keys = list(base_keys) if tp_size == 1 else [f"{k}_tp_{tp_rank}" for k in base_keys]
        return self.batch_get_tensor_into(keys, buffer_ptrs, sizes)

    # ---- batch sessions: reads held across calls, writes in pieces ----

    def _ranges_of(self, name: str, all_buffer_ptrs: Any, all_sizes: Any, all_offsets: Any, n: int) -> list[Any]:
        """Per key, its (address, object offset, length) triples; -600 for a key whose lists do
        not match."""
        out: list[Any] = []
        if not all(isinstance(x, (list, tuple)) and len(x) == n for x in (all_buffer_ptrs, all_sizes, all_offsets)):
            return [int(ErrorCode.INVALID_PARAMS)] * n
        for ptrs, sizes, offsets in zip(all_buffer_ptrs, all_sizes, all_offsets):
            ok = all(isinstance(x, (list, tuple)) for x in (ptrs, sizes, offsets)) and len(ptrs) == len(sizes) == len(offsets) \
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*ptrs, *sizes, *offsets))
            out.append([(p, o, n) for p, o, n in zip(ptrs, offsets, sizes)] if ok else int(ErrorCode.INVALID_PARAMS))
        return out

    def _host(self, addresses: Any) -> bool:
        """Whether every address lies in host memory registered here (no device lookup needed)."""
        return all(self._region(a) is not None for a in addresses)

    def batch_get_session_start(self, keys: Sequence[str]) -> list[int]:
        """Starts reads of several keys that later calls copy ranges of: 0 per key found (the
        object is leased, so it is neither evicted nor removed without force while the session
        lasts), else its code. Reads between start and end each take a fresh, verified hold."""
        def start(s: Store) -> list[int]:
            codes = [0 if r is True else _code(r) if isinstance(r, BaseException) else int(ErrorCode.OBJECT_NOT_FOUND)
                     for r in s.batch_exists(list(keys))]
            for k, c in zip(keys, codes):
                if c == 0:
                    self._get_sessions[k] = self._get_sessions.get(k, 0) + 1
            return codes
        return self._call_each(start, keys)

    def batch_get_into_multi_buffer_ranges(self, keys: Sequence[str], all_buffer_ptrs: Any, all_sizes: Any,
                                           all_src_offsets: Any) -> list[int]:
        """Per key, its ranges ``all_sizes[i][k]`` bytes from ``all_src_offsets[i][k]`` of the
        object to ``all_buffer_ptrs[i][k]``: the bytes copied per key, or a code. One ranged
        read of every key (one master request per chunk)."""
        def run(s: Store) -> list[int]:
            plans = self._ranges_of("src", all_buffer_ptrs, all_sizes, all_src_offsets, len(keys))
            good = [i for i, p in enumerate(plans) if isinstance(p, list)]
            codes = [p if isinstance(p, int) else 0 for p in plans]
            host = self._host(a for i in good for a, _o, _n in plans[i])
            for i, got in zip(good, s._read_ranges([keys[i] for i in good], [plans[i] for i in good], host)):
                bad = next((r for r in got if isinstance(r, BaseException)), None)
                codes[i] = _code(bad) if bad is not None else sum(got)
            return codes
        return self._call_each(run, keys)

    def batch_get_session_end(self, keys: Sequence[str]) -> int:
        """Ends the reads ``batch_get_session_start`` began (their leases end as usual). 0."""
        for k in keys if isinstance(keys, (list, tuple)) else ():
            left = self._get_sessions.get(k, 0) - 1
            if left > 0:
                self._get_sessions[k] = left
            else:
                self._get_sessions.pop(k, None)
        return 0

    def batch_put_session_start(self, keys: Sequence[str], sizes: Sequence[int], config: ReplicateConfig | None = None) -> list[int]:
        """Reserves space for objects of ``sizes`` bytes, written later in ranges
        (``batch_put_from_multi_buffer_ranges``) and visible only at ``batch_put_session_end``:
        0 per key, -705 for a key that exists, -600 for one with a session open here, or a code."""
        def start(s: Store) -> list[int]:
            if not isinstance(sizes, (list, tuple)) or len(sizes) != len(keys):
                raise _errors.InvalidArgumentError("keys and sizes differ in length")
            codes = [int(ErrorCode.INVALID_PARAMS) if k in self._put_sessions or not isinstance(k, str) else 0 for k in keys]
            if len({k for k in keys if isinstance(k, str)}) != len(keys):
                raise _errors.InvalidArgumentError("a key appears twice")
            ask = [i for i, c in enumerate(codes) if c == 0]
            got = s._write_begin([keys[i] for i in ask], [sizes[i] for i in ask], False, **_options(config, len(ask)))
            for i, r in zip(ask, got):
                if isinstance(r, BaseException):
                    codes[i] = _code(r)
                else:
                    self._put_sessions[keys[i]] = r
            return codes
        return self._call_each(start, keys)

    def batch_put_from_multi_buffer_ranges(self, keys: Sequence[str], all_buffer_ptrs: Any, all_sizes: Any,
                                           all_dst_offsets: Any) -> list[int]:
        """Per key with a put session open, its ranges ``all_sizes[i][k]`` bytes from
        ``all_buffer_ptrs[i][k]`` to ``all_dst_offsets[i][k]`` of the object: the bytes copied
        per key, or a code."""
        def run(s: Store) -> list[int]:
            plans = self._ranges_of("dst", all_buffer_ptrs, all_sizes, all_dst_offsets, len(keys))
            codes = [p if isinstance(p, int) else 0 for p in plans]
            for i, k in enumerate(keys):
                if codes[i] == 0 and k not in self._put_sessions:
                    codes[i] = int(ErrorCode.INVALID_PARAMS)
            good = [i for i, c in enumerate(codes) if c == 0]
            host = self._host(a for i in good for a, _o, _n in plans[i])
            got = s._write_ranges([self._put_sessions[keys[i]] for i in good], [plans[i] for i in good], host)
            for i, r in zip(good, got):
                bad = next((x for x in r if isinstance(x, BaseException)), None)
                codes[i] = _code(bad) if bad is not None else sum(r)
            return codes
        return self._call_each(run, keys)

    def _end_puts(self, keys: Sequence[str], abort: bool) -> list[int]:
        def end(s: Store) -> list[int]:
            codes = [0 if k in self._put_sessions else int(ErrorCode.INVALID_PARAMS) for k in keys]
            ends = [i for i, c in enumerate(codes) if c == 0]
            got = s._write_end([self._put_sessions.pop(keys[i]) for i in ends], abort)
            for i, r in zip(ends, got):
                codes[i] = _code(r) if isinstance(r, BaseException) else 0
            return codes
        return self._call_each(end, keys)

    def batch_put_session_end(self, keys: Sequence[str]) -> list[int]:
        """Commits the put sessions of `keys`: each object visible from now. 0 per key or a code."""
        return self._end_puts(keys, False)

    def batch_put_session_revoke(self, keys: Sequence[str]) -> list[int]:
        """Abandons the put sessions of `keys`: their space is freed, nothing becomes visible."""
        return self._end_puts(keys, True)

    # ---- zero copy with integer addresses ----

    def alloc_from_mem_pool(self, size: int) -> int:
        """The address of ``size`` bytes of host memory (zeroed, 64-byte aligned) registered
        with this store for the zero-copy calls, kept until ``close``; 0 on failure."""
        if self._store is None or isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            return 0
        address = self._pool.alloc(size)
        if address and self.register_buffer(address, size) != 0:
            self._pool.free(address)
            return 0
        return address

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        """Registers host memory at an integer address (device memory: register it through
        ``kvstore.Store.register_buffer`` with its tensor, which captures its device)."""
        def register(s: Store) -> int:
            for name, v in (("buffer_ptr", buffer_ptr), ("size", size)):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise _errors.InvalidArgumentError(f"{name} must be a positive int")
            s._register_raw(buffer_ptr, size, "cpu", None)
            self._registered[buffer_ptr] = size
            return 0
        return self._call(register)

    def unregister_buffer(self, buffer_ptr: int) -> int:
        def unregister(s: Store) -> int:
            s.unregister_buffer(buffer_ptr)
            self._registered.pop(buffer_ptr, None)
            return 0
        return self._call(unregister)

    def put_from(self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None) -> int:
        s = self._store
        if s is None or config is not None:
            return self.batch_put_from([key], [buffer_ptr], [size], config)[0]
        try:   # the common case straight to the core: a 1 MiB put is tens of microseconds
            r = s._batch_flat([key], [buffer_ptr], [size], 1)[0]
        except Exception as e:   # noqa: BLE001
            return _code(e)
        return 0 if r is None or isinstance(r, _errors.ObjectExistsError) else _code(r)

    def upsert_from(self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None) -> int:
        return self.batch_upsert_from([key], [buffer_ptr], [size], config)[0]

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        """Bytes read into the buffer, or an error code."""
        s = self._store
        if s is None:
            return int(ErrorCode.INVALID_PARAMS)
        try:
            return s._get_into_addr(key, buffer_ptr, size)
        except Exception as e:   # noqa: BLE001
            return _code(e)

    def batch_put_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                       config: ReplicateConfig | None = None) -> list[int]:
        return self._raw("put", keys, buffer_ptrs, sizes, config, single=True)

    def batch_upsert_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int],
                          config: ReplicateConfig | None = None) -> list[int]:
        return self._raw("upsert", keys, buffer_ptrs, sizes, config, single=True)

    def batch_put_from_multi_buffers(self, keys: Sequence[str], all_buffer_ptrs: Sequence[Sequence[int]],
                                     all_sizes: Sequence[Sequence[int]], config: ReplicateConfig | None = None) -> list[int]:
        """Each object gathered from several buffers, each copied once into place."""
        return self._raw("put", keys, all_buffer_ptrs, all_sizes, config)

    def batch_get_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int], sizes: Sequence[int]) -> list[int]:
        """Bytes read per key, or its error code."""
        return self._raw("get", keys, buffer_ptrs, sizes, single=True)

    def batch_get_into_multi_buffers(self, keys: Sequence[str], all_buffer_ptrs: Sequence[Sequence[int]],
                                     all_sizes: Sequence[Sequence[int]], prefer_same_node: bool = True) -> list[int]:
        """Each object scattered over several buffers, in order."""
        return self._raw("get", keys, all_buffer_ptrs, all_sizes)

    def _raw(self, op: str, keys: Sequence[str], all_ptrs: Any, all_sizes: Any, config: ReplicateConfig | None = None,
             single: bool = False) -> list[int]:
        """Puts (`op` "put": existing keys count as stored), upserts or gets of objects made of
        (address, length) parts (`single`: one buffer per key): one code (gets: the bytes
        read) per key."""
        def run(s: Store) -> list[int]:
            if single:   # one (address, length) per key: converted in C, no Python object per part
                ks = keys if isinstance(keys, list) else list(keys)
                ps = all_ptrs if isinstance(all_ptrs, list) else list(all_ptrs)
                ns = all_sizes if isinstance(all_sizes, list) else list(all_sizes)
                if op == "get":
                    return [r if r.__class__ is int else _code(r) for r in s._batch_flat(ks, ps, ns, 0)]
                options = _options(config, len(ks), op == "upsert")
                exists = _errors.ObjectExistsError if op == "put" else ()
                return [0 if r is None or isinstance(r, exists) else _code(r)
                        for r in s._batch_flat(ks, ps, ns, 2 if op == "upsert" else 1, **options)]
            ptrs, sizes = all_ptrs, all_sizes
            if not (len(keys) == len(ptrs) == len(sizes)) or any(len(p) != len(n) for p, n in zip(ptrs, sizes)):
                raise _errors.InvalidArgumentError("keys, buffer pointers and sizes differ in length")
            parts = [[(int(p), int(n)) for p, n in zip(ps, ns)] for ps, ns in zip(ptrs, sizes)]
            if op == "get":
                return self._batch_codes(s._batch_get_raw(list(keys), parts), ok=int)
            options = _options(config, len(keys), op == "upsert")
            return self._batch_codes(s._batch_put_raw(list(keys), parts, op == "upsert", **options), exists_ok=op == "put")
        return self._call_each(run, keys)

    def __repr__(self) -> str:
        state = "closed" if self._store is None else self._hostname
        return f"<kvstore.mooncake.MooncakeDistributedStore {state}>"


class MooncakeDistributedStoreAsync(MooncakeDistributedStore):
    """The async wrapper: every call also as ``async_<name>``, a coroutine that runs the call
    in a worker thread (``asyncio.to_thread``; kvstore's calls leave the GIL while they wait
    or copy, so other coroutines and threads run meanwhile)."""

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("async_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        call = getattr(self, name[len("async_"):], None)
        if call is None or not callable(call):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r} (nor {name[6:]!r})")

        async def run(*args: Any, **kwargs: Any) -> Any:
            import asyncio
            return await asyncio.to_thread(call, *args, **kwargs)
        run.__name__ = name
        return run
