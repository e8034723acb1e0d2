"""The Pythonic store: ``kvstore.Store``."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from . import _native, _tensor
from ._errors import ArgumentTypeError, InvalidArgumentError, ObjectNotFoundError, StoreClosedError
from ._kv import KVLayoutMixin
from ._sizes import parse_size

#: Default size of the embedded store's host segment. Pages are committed on first use.
DEFAULT_SEGMENT_SIZE = 1 << 30


#: Disk-tier admission policies, by the number the C ABI takes.
_DISK_ADMISSION = {"reuse": 0, "all": 1}



def _disk_tier(disk_path: str | os.PathLike[str] | None, disk_size: int | str | None,
               disk_admission: str) -> tuple[str | None, int, int]:
    """The disk tier arguments of ``Store()`` and ``Store.connect()``, checked: (absolute
    path, bytes, admission code), or (None, 0, 0) for none."""
    disk: tuple[str | None, int, int] = (None, 0, 0)
    if disk_path is not None:
        if not isinstance(disk_path, (str, os.PathLike)):
            raise ArgumentTypeError(f"disk_path must be a str or path, got {type(disk_path).__name__}")
        raw = os.fspath(disk_path)
        if not isinstance(raw, str) or not raw:
            raise InvalidArgumentError("disk_path must be a non-empty str path")
        path = os.path.abspath(raw)
        if "\0" in path:
            raise InvalidArgumentError("disk_path must not contain a NUL character")
        if disk_size is None:
            raise InvalidArgumentError("disk_size is required with disk_path (for example disk_size='100GiB')")
        if not isinstance(disk_admission, str):
            raise ArgumentTypeError(f"disk_admission must be a str, got {type(disk_admission).__name__}")
        if disk_admission not in _DISK_ADMISSION:
            raise InvalidArgumentError(f"disk_admission must be one of {sorted(_DISK_ADMISSION)}, got {disk_admission!r}")
        disk = (path, parse_size(disk_size, name="disk_size"), _DISK_ADMISSION[disk_admission])
    elif disk_size is not None:
        raise InvalidArgumentError("disk_size needs disk_path")
    return disk


class Store(KVLayoutMixin, _native.Store):
    """An embedded, in-process KV-cache store: an in-process master and one host segment.

    Values are any C-contiguous buffer-protocol object (bytes, bytearray, memoryview, numpy
    arrays); each put copies the caller's bytes once, straight into the segment. Safe to use
    from many threads. Also a context manager (``with kvstore.Store() as s: ...``) that closes
    the store on exit; any call after ``close()`` raises ``StoreClosedError``.

    ``segment_size`` is in bytes, as an int or a string such as ``"1GiB"`` (default 1 GiB).
    Segment memory is committed on first use; ``prefault=True`` commits all of it now, so
    creation takes longer and later writes never wait for page faults.

    When an accelerator (a CUDA GPU) is present the segment is pinned (page-locked for fast
    DMA) in 64 MiB chunks, each when a GPU copy first touches it, within a byte budget:
    ``KVSTORE_PIN_MEMORY=0`` turns pinning off, ``KVSTORE_PIN_MEMORY_MAX_BYTES`` caps the bytes
    pinned by the process (``MC_STORE_`` names are aliases). A refused pin leaves that chunk
    pageable and shows in ``stats()`` (``page_locked_bytes``, ``page_lock_fallbacks``); it never
    fails. ``pin_memory=False`` skips pinning for this store.

    The store is a cache (docs/cache.md):

    - ``lease_ttl`` (seconds, default 5; 0 turns leases off): ``get``, ``get_into``,
      ``exists`` and ``size`` lease the object they find. A leased object is never evicted,
      ``remove`` raises ``LeaseHeldError`` unless ``force=True``, and an ``upsert`` of it never
      overwrites its bytes: the new value goes to fresh space and the old bytes are freed when
      the lease ends.
    - When a write would take usage above ``eviction_high_watermark`` (a fraction of the
      segment, default 0.9) or does not fit, approximately least-recently-used objects are
      evicted, at least ``eviction_ratio`` of the segment (default 0.05) per round. Leased,
      hard-pinned and incomplete objects are never evicted; soft-pinned ones only after all
      others. ``NoSpaceError`` only when nothing evictable is left.
    - Writes take ``hard_pin=True`` (never evicted), ``soft_pin=True`` (evicted last, for
      ``soft_pin_ttl`` seconds; default ``soft_pin_ttl`` of the store, 1800) and ``ttl``
      (seconds until the object expires).

    End-to-end checksums: ``checksum=True`` (per store, or per write as a keyword, which
    overrides the store's) stores a CRC32C of the object's bytes, computed in the same pass as
    the copy (the SSE4.2 instruction where present). Every read of a whole object that has one
    checks its copy: a difference is tried on the object's other replicas, then raises
    ``ChecksumError`` (a ``TransferError``); the bytes are never returned. Ranged reads
    (``get_into`` with an offset, ``kv_read_copy_range``) and KV block moves are not checked.
    ``stats()`` counts ``checksums_verified`` and ``checksum_failures``.

    Disk tier (docs/disk-tier.md): ``disk_path`` (a directory this store alone uses while
    open) and ``disk_size`` (bytes its files may take) put a disk below the segment. Objects
    about to be evicted are copied there in the background, when ``disk_admission`` lets them
    (``"reuse"``, the default: keys written or looked up again after their first write;
    ``"all"``); any read finds them there, checks their CRC32C and brings them back into the
    segment. They survive a restart of the store with the same ``disk_path``. A second store
    on the same directory raises ``InvalidArgumentError``.
    """

    def wait_for_disk_copies(self, timeout: float = 30.0) -> bool:
        """With a disk tier: waits until its background copier has caught up (its count of
        copies unchanged for 50 ms); False when ``timeout`` seconds pass first. For a workload
        that wants the copier to keep up, as an engine's compute between writes lets it."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ArgumentTypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
        if not timeout >= 0:
            raise InvalidArgumentError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            n = self.stats()["disk_offloads"]
            if n == last:
                return True
            last = n
            time.sleep(0.05)
        return False

    def replicas(self, key: str) -> list[int]:
        """The segments holding ``key``'s replicas (segment ids, the one a read tries first
        first); ``ObjectNotFoundError`` when it is missing. Leases the object, as ``exists``."""
        found = self._replicas([key])[0]
        if isinstance(found, Exception):
            raise found
        if found is None:
            raise ObjectNotFoundError(f"object '{key}' not found")
        return [segment for segment, _ in found[1]]

    def copy_replicas(self, key: str, targets: Sequence[int], drop: int | None = None) -> None:
        """Adds a replica of ``key`` in each of ``targets`` (segment ids of the cluster that
        hold none yet, at most 16); with ``drop``, moves the replica in that segment instead
        (it goes once the copies are in place). The bytes go through this client: read and
        verified as any read, then written. Readers see the object all along. When it is
        removed or replaced meanwhile nothing changes and ``ObjectNotFoundError`` is raised;
        ``NoSpaceError`` when a target has no room (nothing is evicted for a copy);
        ``UnsupportedError`` in an embedded store, which has one segment."""
        super().copy_replicas(key, targets, drop)

    def keys(self, pattern: str | None = None) -> list[str]:
        """Every key (of the cluster, when connected), or those ``pattern`` matches (Python
        ``re.search``), in byte order. Read page by page (``scan_keys``): no answer is ever
        larger than one page, however many keys there are."""
        return list(self.scan_keys(pattern))

    def scan_keys(self, pattern: str | None = None) -> Iterator[str]:
        """The keys one page at a time (like Redis ``SCAN``): a key present for the whole walk
        comes exactly once; keys added or removed meanwhile may or may not."""
        if pattern is not None and not isinstance(pattern, str):
            raise ArgumentTypeError(f"pattern must be a str or None, not {type(pattern).__name__}")
        try:
            matcher = re.compile(pattern) if pattern is not None else None
        except re.error as e:
            raise InvalidArgumentError(f"bad pattern {pattern!r}: {e}") from None
        after: str | None = None
        while True:
            page, more = self._keys_page(after)
            for k in page:
                if matcher is None or matcher.search(k):
                    yield k
            if not more or not page:
                return
            after = page[-1]

    def __init__(self, segment_size: int | str = DEFAULT_SEGMENT_SIZE, *, prefault: bool = False,
                 pin_memory: bool = True, lease_ttl: float = 5.0, soft_pin_ttl: float = 1800.0,
                 eviction_high_watermark: float = 0.9, eviction_ratio: float = 0.05, checksum: bool = False,
                 disk_path: str | os.PathLike[str] | None = None, disk_size: int | str | None = None,
                 disk_admission: str = "reuse") -> None:
        # The extension checks every setting's type, the core its value.
        disk = _disk_tier(disk_path, disk_size, disk_admission)
        super().__init__(parse_size(segment_size, name="segment_size"), prefault, pin_memory, lease_ttl, soft_pin_ttl,
                         eviction_high_watermark, eviction_ratio, checksum, *disk)

    @classmethod
    def connect(cls, url: str = "kvstore://127.0.0.1:50051", *, segment_size: int | str = DEFAULT_SEGMENT_SIZE,
                token: str | None = None, prefault: bool = False, pin_memory: bool = True, checksum: bool = False,
                segment_file: str | None = None, disk_path: str | os.PathLike[str] | None = None,
                disk_size: int | str | None = None, disk_admission: str = "reuse") -> Store:
        """Joins the cluster of the master server at ``url`` (``python -m kvstore master``).

        The client mounts a shared-memory segment of ``segment_size`` bytes (``0``: a pure
        client that stores nothing itself) and reads and writes objects in every segment of
        the cluster with the same API as the embedded store: other processes on this host map
        its segment (one memcpy per transfer), other hosts reach it over TCP. ``token`` must
        match the master's (default: ``KVSTORE_MASTER_TOKEN`` from the environment). Writes
        take ``replicas=N`` to place copies in N distinct segments (best effort).
        ``checksum=True`` makes every write store a CRC32C of its bytes (see ``Store``).
        ``segment_file``: the segment is the first ``segment_size`` bytes of this
        shared-memory file (tmpfs such as /dev/shm, or hugetlbfs; this user's and writable by
        nobody else) instead of new memory; objects are written into it (Mooncake's
        ``mount_segment``).

        Leases and eviction are the master's settings. The client heartbeats in the
        background; after a lost connection it reconnects on its next call and resumes its
        session, segment and objects kept (``stats()['sessions_resumed']``), when the master
        still knows it (within the master's client TTL); after a master restart it remounts
        its segment and reports the objects in it, which the new master takes back
        (``stats()['objects_reregistered']``; ``stats()['master_reconnects']`` counts both).
        ``close()`` leaves the cluster at once (its segment's objects go with it).
        ``disk_path``, ``disk_size``, ``disk_admission``: a disk tier below the segment, as
        for ``Store`` (docs/disk-tier.md, "In a cluster"): objects of this client's segment
        about to be evicted are copied there, and every client of the cluster reads them back
        (from this client's segment server) once DRAM has lost them. It needs a segment.
        ``TransferError`` when the master cannot be reached, ``InvalidArgumentError`` for a
        bad address or a refused token.
        """
        if token is None:
            token = os.environ.get("KVSTORE_MASTER_TOKEN") or None
        if not isinstance(url, str):
            raise ArgumentTypeError(f"url must be a str such as 'kvstore://127.0.0.1:50051', got {type(url).__name__}")
        if token is not None and not isinstance(token, str):
            raise ArgumentTypeError(f"token must be a str or None, got {type(token).__name__}")
        if segment_file is not None and not isinstance(segment_file, str):
            raise ArgumentTypeError(f"segment_file must be a str or None, got {type(segment_file).__name__}")
        for name, text in (("url", url), ("token", token or ""), ("segment_file", segment_file or "")):
            if "\0" in text:
                raise InvalidArgumentError(f"{name} must not contain a NUL character")
        disk = _disk_tier(disk_path, disk_size, disk_admission)
        store = cls.__new__(cls)
        store._connect(url, parse_size(segment_size, name="segment_size"), prefault, pin_memory, token, checksum, segment_file,
                       *disk)
        return store

    # ---- tensors (header layout: Sources/KVCore/TensorHeader.swift; helpers in _tensor.py) ----

    def _require_open(self) -> None:
        if self.closed:
            raise StoreClosedError("the store is closed")

    def put_tensor(self, key: str, tensor: Any, **options: Any) -> None:
        """Stores a tensor (numpy, torch, cupy, DLPack; CPU or GPU) as header + raw bytes.

        The 304-byte header and the tensor's bytes are two parts of one multi-buffer write:
        each copied once into the segment, nothing concatenated. A GPU tensor is copied by its
        device (device→host). ``ObjectExistsError`` when the key exists. ``options`` are the
        write options of ``put`` (``hard_pin``, ``soft_pin``, ``soft_pin_ttl``, ``ttl``).
        """
        self._put_tensor(key, tensor, False, options)

    def upsert_tensor(self, key: str, tensor: Any, **options: Any) -> None:
        """``put_tensor`` that replaces an existing object."""
        self._put_tensor(key, tensor, True, options)

    def _put_tensor(self, key: str, tensor: Any, upsert: bool, options: dict[str, Any]) -> None:
        self._require_open()
        ref = _tensor.describe(tensor)
        header = _native.tensor_header(ref.code, ref.shape)
        self._put_raw(key, [header, *ref.data_parts], upsert, **options)

    def batch_put_tensor(self, keys: Sequence[str], tensors: Sequence[Any], **options: Any) -> list[Exception | None]:
        """Stores several tensors; one result per key (``None`` or the exception). The copies of
        the whole batch run grouped per device. ``options`` as for ``put_tensor``."""
        return self._batch_put_tensor(keys, tensors, False, options)

    def batch_upsert_tensor(self, keys: Sequence[str], tensors: Sequence[Any], **options: Any) -> list[Exception | None]:
        return self._batch_put_tensor(keys, tensors, True, options)

    def _batch_put_tensor(self, keys: Sequence[str], tensors: Sequence[Any], upsert: bool,
                          options: dict[str, Any]) -> list[Exception | None]:
        self._require_open()
        _check_batch(keys, tensors, "tensors")
        results: list[Exception | None] = [None] * len(keys)
        good_keys, part_lists, where, keep = [], [], [], []
        for i, (key, t) in enumerate(zip(keys, tensors)):
            try:
                ref = _tensor.describe(t)
                header = _native.tensor_header(ref.code, ref.shape)
            except Exception as e:  # noqa: BLE001 - the per-key result is the exception
                results[i] = e
                continue
            keep.append(ref)
            good_keys.append(key)
            part_lists.append([header, *ref.data_parts])
            where.append(i)
        for i, r in zip(where, self._batch_put_raw(good_keys, part_lists, upsert, **options)):
            results[i] = r
        return results

    def get_tensor(self, key: str, *, like: Any = None, device: str | None = None) -> Any:
        """Reads a stored tensor: a new numpy array by default (bf16 / fp8 as uint16 / uint8
        holding the raw bits), or a tensor of ``like``'s framework and device, or a tensor on
        ``device`` ("cuda:0": torch when installed, else cupy). One copy, straight into the new
        tensor's memory."""
        self._require_open()
        _tensor.check_device(device)
        kind = _tensor.framework(like, device)

        def resolve(prefix: bytes, size: int) -> tuple[Any, Any]:
            code, shape = _tensor.decode(prefix, size, key)
            return _tensor.allocate(code, shape, kind, like, device)

        return self._read_object(key, _tensor.HEADER_SIZE, resolve)

    def _get_small(self, key: str, limit: int) -> bytes:
        """The bytes of a small object (a layout, a manifest) that another writer may have
        forged: at most `limit` bytes are copied, and a larger object raises
        ``InvalidArgumentError`` (one read hold; nothing past the limit is copied)."""
        def resolve(prefix: bytes, size: int) -> tuple[bytes, None]:
            if size > limit:
                raise InvalidArgumentError(f"object {key!r} holds {size} bytes; at most {limit} are expected here")
            return prefix, None
        return self._read_object(key, limit, resolve)

    def get_tensor_into(self, key: str, target: Any) -> Any:
        """Reads a stored tensor into ``target`` (an existing array or tensor of the same shape
        and dtype, on any device; a uint16 / uint8 target also takes bf16 / fp8). Returns
        ``target``. Nothing is written when the shapes or dtypes differ."""
        self._require_open()
        ref = _tensor.describe(target, "target")
        if not ref.writable:
            raise InvalidArgumentError("target is read-only")

        def resolve(prefix: bytes, size: int) -> tuple[Any, Any]:
            code, shape = _tensor.decode(prefix, size, key)
            if shape != ref.shape or not _tensor.compatible(code, ref.code):
                raise InvalidArgumentError(
                    f"object {key!r} is a {_tensor.DTYPE_NAMES[code]} tensor of shape {shape}; the target is "
                    f"{_tensor.DTYPE_NAMES[ref.code]} of shape {ref.shape}")
            return target, (ref.part if ref.nbytes else None)

        return self._read_object(key, _tensor.HEADER_SIZE, resolve)

    def batch_get_tensor(self, keys: Sequence[str], *, like: Any = None,
                         device: str | None = None) -> list[Any]:
        """``get_tensor`` for each key: the tensor, ``None`` for a missing key, or the exception."""
        self._require_open()
        if not isinstance(keys, (list, tuple)):
            raise ArgumentTypeError(f"keys must be a list or tuple, not {type(keys).__name__}")
        _tensor.check_device(device)
        out: list[Any] = []
        for key in keys:
            try:
                out.append(self.get_tensor(key, like=like, device=device))
            except ObjectNotFoundError:
                out.append(None)
            except Exception as e:  # noqa: BLE001 - the per-key result is the exception
                out.append(e)
        return out

    # ---- buffers of any device ----

    def register_buffer(self, buffer: Any, location: str | None = None) -> None:
        """Registers memory for zero-copy transfers with its device, captured now: later
        transfers find the device by address range, with no driver query. ``buffer`` is a
        buffer-protocol object (host memory) or a tensor (numpy, torch, cupy, DLPack) on any
        device; ``location`` ("cpu", "cuda:N") defaults to the tensor's own device and must
        match it. Keep using the same object; it is kept alive until unregistered."""
        if _has_buffer(buffer):
            super().register_buffer(buffer, "cpu" if location is None else location)
            return
        self._require_open()
        ref = _tensor.describe(buffer, "buffer")
        if location is None:
            location = ref.location
        elif not isinstance(location, str):
            raise ArgumentTypeError(f"location must be a str, not {type(location).__name__}")
        elif ref.location != "cuda" and _normal(location) != _normal(ref.location):
            raise InvalidArgumentError(f"buffer lives on {ref.location}, not {location}")
        if ref.nbytes == 0:
            raise InvalidArgumentError("cannot register an empty buffer")
        self._register_raw(ref.part[0], ref.nbytes, location, buffer)

    def unregister_buffer(self, buffer: Any) -> None:
        """Forgets a registration (by the object registered, or its address as an int)."""
        if isinstance(buffer, int) or _has_buffer(buffer):
            super().unregister_buffer(buffer)
            return
        self._require_open()
        ref = _tensor.describe(buffer, "buffer")
        super().unregister_buffer(ref.part[0])  # a non-buffer tensor's part is (address, length)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<kvstore.Store closed>"
        s = self.stats()
        return f"<kvstore.Store objects={s['objects']} bytes_used={s['bytes_used']} capacity={s['capacity']}>"


def _has_buffer(obj: Any) -> bool:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return True
    try:
        memoryview(obj).release()
        return True
    except TypeError:
        return False


def _normal(location: str) -> str:
    return location if ":" in location else f"{location}:0"


def _check_batch(keys: Any, values: Any, name: str) -> None:
    for what, seq in (("keys", keys), (name, values)):
        if not isinstance(seq, (list, tuple)):
            raise ArgumentTypeError(f"{what} must be a list or tuple, not {type(seq).__name__}")
    if len(keys) != len(values):
        raise InvalidArgumentError(f"keys and {name} have different lengths ({len(keys)} and {len(values)})")
