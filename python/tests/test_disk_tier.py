"""The embedded store's disk tier (docs/disk-tier.md): offload ahead of eviction, read-back by
every read call, admission, integrity, restart recovery, the directory lock, a full disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import kvstore

SIZE = 256 << 10
SEGMENT = "4MiB"


def value(key: str, size: int = SIZE) -> bytes:
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little")
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def fill(store: kvstore.Store, keys: list[str], every: int = 1) -> None:
    """Puts keys, letting the offloader keep up every `every` puts (as an engine's pace would)."""
    for i, k in enumerate(keys):
        store.put(k, value(k))
        if (i + 1) % every == 0 or i == len(keys) - 1:
            store.wait_for_disk_copies()


def tiered(path: os.PathLike[str] | str, **kw: object) -> kvstore.Store:
    kw.setdefault("disk_admission", "all")
    return kvstore.Store(SEGMENT, lease_ttl=0, disk_path=path, disk_size="64MiB", **kw)  # type: ignore[arg-type]


def test_objects_evicted_from_dram_read_back_from_disk_byte_exact(tmp_path):
    keys = [f"obj-{i}" for i in range(48)]    # 12 MiB through a 4 MiB segment
    with tiered(tmp_path / "d") as s:
        fill(s, keys)
        st = s.stats()
        assert st["evicted_objects"] > 24 and st["disk_offloads"] >= st["evicted_objects"]   # none dropped
        assert st["disk_dropped"] == 0
        assert st["disk_objects"] == st["disk_offloads"]
        for k in keys:                                    # get (bytes)
            assert s.get(k) == value(k), k
        buf = np.empty(SIZE, dtype=np.uint8)
        for k in reversed(keys):                          # get_into
            assert s.get_into(k, buf) == SIZE
            assert buf.tobytes() == value(k), k
        got = s.get_batch(keys[:16])                      # a batch
        assert got == [value(k) for k in keys[:16]]
        rows = np.empty((16, SIZE), dtype=np.uint8)
        s.batch_get_into(keys[16:32], list(rows))
        assert [r.tobytes() for r in rows] == [value(k) for k in keys[16:32]]
        assert s.exists(keys[0]) and s.size(keys[0]) == SIZE
        assert set(keys) <= set(s.keys())
        st = s.stats()
        assert st["disk_hits"] > 0 and st["disk_corrupt"] == 0


def test_tensors_come_back_from_disk(tmp_path):
    with tiered(tmp_path / "d") as s:
        tensors = {f"t-{i}": np.arange(SIZE // 4, dtype=np.float32) * i for i in range(40)}
        for k, t in tensors.items():
            s.put_tensor(k, t)
            s.wait_for_disk_copies()
        assert s.stats()["disk_offloads"] > 20
        for k, t in tensors.items():
            np.testing.assert_array_equal(s.get_tensor(k), t)


def test_reads_find_disk_objects_while_dram_is_all_hard_pinned(tmp_path):
    # DRAM cannot take the object back (every byte hard-pinned): get, get_into and tensor
    # reads into host memory read the disk copy directly; a GPU target could not, and says so.
    with tiered(tmp_path / "d") as s:
        t = np.arange(SIZE // 4, dtype=np.float32)
        s.put_tensor("t", t)
        s.put("b", value("b"))
        fill(s, [f"f{i}" for i in range(40)], every=4)
        pinned = 0
        while True:
            try:
                s.put(f"p{pinned}", b"p" * SIZE, hard_pin=True)
                pinned += 1
            except kvstore.NoSpaceError:
                break
        assert s.stats()["hard_pinned_bytes"] > 0 and s.stats()["disk_objects"] > 0
        assert s.get("b") == value("b")
        np.testing.assert_array_equal(s.get_tensor("t"), t)
        into = np.zeros_like(t)
        assert s.get_tensor_into("t", into) is into
        np.testing.assert_array_equal(into, t)
        assert s.stats()["disk_hits"] >= 3


def test_a_newer_version_or_a_removal_is_never_undone_by_the_disk_copy(tmp_path):
    with tiered(tmp_path / "d") as s:
        fill(s, ["victim"] + [f"f-{i}" for i in range(24)])
        assert s.stats()["disk_offloads"] > 0 and "victim" in s.keys()
        s.upsert("victim", b"new" * 1000)
        fill(s, [f"g-{i}" for i in range(24)])      # the new value is evicted too (and offloaded)
        assert s.get("victim") == b"new" * 1000
        with pytest.raises(kvstore.ObjectExistsError):
            s.put("victim", b"again")               # put (not upsert) sees the object on disk
        s.remove("victim")
        fill(s, [f"h-{i}" for i in range(24)])
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get("victim")
        assert "victim" not in s.keys()
        assert s.remove_all() > 0
        assert s.stats()["disk_objects"] == 0 and s.keys() == []


def test_reuse_admission_writes_only_keys_seen_twice(tmp_path):
    with kvstore.Store(SEGMENT, lease_ttl=0, disk_path=tmp_path / "d", disk_size="64MiB") as s:
        reused = [f"r-{i}" for i in range(4)]
        for k in reused:
            s.put(k, value(k))
            s.get(k)                                # a second sighting
        fill(s, [f"once-{i}" for i in range(40)])   # one-shot values push everything out
        for k in reused:
            assert s.get(k) == value(k)
        missing = sum(not s.exists(f"once-{i}") for i in range(20))
        assert missing == 20, "one-shot values must not have taken disk space"
        assert s.stats()["disk_objects"] == len(reused)


def test_eviction_order_across_tiers(tmp_path):
    """DRAM evicts its least recently used objects to disk, the disk tier evicts its own
    oldest unread ones under disk_size, and a read brings an object back to the hot end of
    both: what survives is the newest writes plus what was read."""
    file_bytes = 4096 + SIZE                      # one header block and the value
    with kvstore.Store(SEGMENT, lease_ttl=0, disk_path=tmp_path / "d", disk_size=8 * file_bytes,
                       disk_admission="all") as s:
        keys = [f"e-{i}" for i in range(40)]
        fill(s, keys)
        st = s.stats()
        assert st["disk_evictions"] > 0 and st["disk_bytes"] <= 8 * file_bytes
        present = [s.exists(k) for k in keys]
        first = present.index(True)
        assert first > 0 and all(present[first:]), present   # the oldest went first, in order
        assert len(keys) - first > st["objects"]       # more survive than DRAM holds: the disk has the rest
        hot = keys[first]                              # the oldest survivor: on disk only
        hits = s.stats()["disk_hits"]
        assert s.get(hot) == value(hot)
        assert s.stats()["disk_hits"] == hits + 1
        more = [f"m-{i}" for i in range(12)]
        fill(s, more)
        assert s.exists(hot) and s.get(hot) == value(hot)   # read since: kept
        assert not s.exists(keys[first + 1])           # its neighbour, never read: evicted
        assert all(s.exists(k) for k in more)


def test_ttl_holds_on_disk(tmp_path):
    with tiered(tmp_path / "d") as s:
        t0 = time.monotonic()
        s.put("short", value("short"), ttl=3.0)
        fill(s, [f"f-{i}" for i in range(24)], every=4)
        assert s.stats()["disk_objects"] > 0
        assert s.get("short") == value("short")     # from disk, within its TTL
        fill(s, [f"g-{i}" for i in range(24)], every=4)
        time.sleep(max(0.0, 3.2 - (time.monotonic() - t0)))
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get("short")


def test_restart_recovers_the_disk_objects(tmp_path):
    keys = [f"obj-{i}" for i in range(40)]
    with tiered(tmp_path / "d") as s:
        fill(s, keys)
        on_disk = s.stats()["disk_objects"]
    assert on_disk > 20
    with tiered(tmp_path / "d") as s:
        st = s.stats()
        assert st["disk_recovered"] == on_disk and st["disk_objects"] == on_disk
        found = 0
        for k in keys:
            try:
                assert s.get(k) == value(k)
                found += 1
            except kvstore.ObjectNotFoundError:
                pass
        assert found == on_disk


def test_one_store_per_disk_path(tmp_path):
    with tiered(tmp_path / "d"):
        with pytest.raises(kvstore.InvalidArgumentError, match="in use by another store"):
            tiered(tmp_path / "d")
    with tiered(tmp_path / "d"):     # released on close
        pass


def test_bad_disk_settings_are_refused(tmp_path):
    with pytest.raises(kvstore.InvalidArgumentError, match="disk_size is required"):
        kvstore.Store(SEGMENT, disk_path=tmp_path / "d")
    with pytest.raises(kvstore.InvalidArgumentError, match="disk_path"):
        kvstore.Store(SEGMENT, disk_size="1GiB")
    with pytest.raises(kvstore.InvalidArgumentError, match="disk_admission"):
        kvstore.Store(SEGMENT, disk_path=tmp_path / "d", disk_size="1GiB", disk_admission="sometimes")
    with pytest.raises(kvstore.InvalidArgumentError, match="at least"):
        kvstore.Store(SEGMENT, disk_path=tmp_path / "d", disk_size=100)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(kvstore.InvalidArgumentError):
        kvstore.Store(SEGMENT, disk_path=tmp_path / "file" / "d", disk_size="1GiB")


@pytest.mark.parametrize("kwargs, error", [
    ({"disk_path": 5, "disk_size": "1GiB"}, kvstore.ArgumentTypeError),
    ({"disk_path": b"/tmp/x", "disk_size": "1GiB"}, kvstore.ArgumentTypeError),
    ({"disk_path": "", "disk_size": "1GiB"}, kvstore.InvalidArgumentError),
    ({"disk_path": "{d}\0x", "disk_size": "1GiB"}, kvstore.InvalidArgumentError),
    ({"disk_path": "{d}", "disk_size": -1}, kvstore.InvalidArgumentError),
    ({"disk_path": "{d}", "disk_size": 0}, kvstore.InvalidArgumentError),
    ({"disk_path": "{d}", "disk_size": "lots"}, kvstore.InvalidArgumentError),
    ({"disk_path": "{d}", "disk_size": 1.5}, kvstore.ArgumentTypeError),
    ({"disk_path": "{d}", "disk_size": "1GiB", "disk_admission": 1}, kvstore.ArgumentTypeError),
    ({"disk_path": "{d}", "disk_size": "1GiB", "disk_admission": ["all"]}, kvstore.ArgumentTypeError),
])
def test_each_wrong_disk_setting_is_a_typed_error_and_creates_nothing(tmp_path, kwargs, error):
    d = str(tmp_path / "d")
    kwargs = {k: (v.replace("{d}", d) if isinstance(v, str) else v) for k, v in kwargs.items()}
    with pytest.raises(error):
        kvstore.Store(SEGMENT, **kwargs)
    assert not os.path.exists(d)


def test_wait_for_disk_copies_checks_its_timeout(tmp_path):
    with tiered(tmp_path / "d") as s:
        with pytest.raises(kvstore.ArgumentTypeError):
            s.wait_for_disk_copies("soon")  # type: ignore[arg-type]
        with pytest.raises(kvstore.InvalidArgumentError):
            s.wait_for_disk_copies(-1)
        with pytest.raises(kvstore.InvalidArgumentError):
            s.wait_for_disk_copies(float("nan"))
        assert s.wait_for_disk_copies(5)


def test_a_directory_others_can_write_to_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(kvstore.InvalidArgumentError, match="mode 777"):
        tiered(d)
    assert os.listdir(d) == []                    # nothing created there
    (d / "objects").mkdir(mode=0o700)
    d.chmod(0o755)                                # readable by others is fine: files are 0600
    (d / "objects").chmod(0o775)
    with pytest.raises(kvstore.InvalidArgumentError, match="disk tier directory"):
        tiered(d)
    (d / "objects").chmod(0o700)
    with tiered(d):
        pass
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(kvstore.InvalidArgumentError, match="not a directory"):
        tiered(link)


def test_a_directory_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another user")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(kvstore.InvalidArgumentError, match="belongs to uid 65534"):
        tiered(d)


def _crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _forge(directory, generation: int, key: str, size: int, payload: bytes = b"") -> str:
    """An object file with a header that checks out, claiming `size` bytes (sparse beyond `payload`)."""
    import struct
    k = key.encode()
    chunks = (size + (1 << 20) - 1) >> 20
    fixed = struct.pack("<8sIIQQqII", b"KVSDISK1", 0, len(k), size, generation, 0, 20, chunks)
    header_bytes = (48 + len(k) + 4 * chunks + 4 + 4095) // 4096 * 4096
    fixed = fixed[:8] + struct.pack("<I", header_bytes) + fixed[12:]
    crcs = b"".join(struct.pack("<I", _crc32c(payload[i << 20:(i + 1) << 20])) for i in range(chunks))
    body = fixed + k + crcs
    header = body + struct.pack("<I", _crc32c(body))
    path = os.path.join(directory, "objects", f"{generation:016x}")
    with open(path, "wb") as f:
        f.write(header.ljust(header_bytes, b"\0"))
        f.write(payload)
        f.truncate(header_bytes + (size + 4095) // 4096 * 4096)
    return path


def test_forged_object_files_are_bounded_checked_and_never_served_wrong(tmp_path):
    d = tmp_path / "d"
    with tiered(d):
        pass
    good = b"G" * 5000
    _forge(d, 0x100, "forged-good", len(good), good)                      # well formed: served
    huge = _forge(d, 0x101, "forged-huge", 10 << 30)                      # 10 GiB claimed: more than the tier
    wrong = _forge(d, 0x102, "forged-wrong", 5000, b"W" * 5000)
    with open(wrong, "r+b") as f:                                         # payload no longer matches its CRC
        f.seek(4096 + 10)
        f.write(b"X")
    too_long = os.path.join(d, "objects", f"{0x103:016x}")               # a header longer than any real one
    with open(too_long, "wb") as f:
        f.write(b"KVSDISK1" + (0xFFFFFFF0).to_bytes(4, "little") + b"\0" * 4084)
    planted = os.path.join(d, "objects", f"{0x104:016x}")                # a link to a good file: not ours
    os.symlink(os.path.join(d, "objects", f"{0x100:016x}"), planted)
    with tiered(d) as s:
        assert s.get("forged-good") == good
        assert not os.path.exists(huge) and not s.exists("forged-huge")
        assert not os.path.exists(too_long) and not os.path.lexists(planted)
        with pytest.raises(kvstore.ChecksumError):
            s.get("forged-wrong")
        assert not s.exists("forged-wrong")
        assert sorted(s.keys()) == ["forged-good"]
        assert s.stats()["disk_recovered"] == 2   # good and wrong (found out on read)
    with pytest.raises(kvstore.ObjectExistsError):
        with tiered(d) as s:
            s.put("forged-good", b"again")


def test_a_removal_racing_reads_that_bring_the_object_back_wins(tmp_path):
    """A reader bringing a disk copy back into DRAM while another thread removes the key:
    once remove returns, no read finds the object (the promotion's commit and the removal's
    drop of the disk copy are ordered under one lock)."""
    import threading

    keys = [f"obj-{i}" for i in range(40)]
    with tiered(tmp_path / "d") as s:
        fill(s, keys)
        on_disk = [k for k in keys[:24] if s.exists(k)]
        stop = threading.Event()
        came_back: list[str] = []
        removed: set[str] = set()
        lock = threading.Lock()

        def reader() -> None:
            buf = np.empty(SIZE, dtype=np.uint8)
            while not stop.is_set():
                for k in on_disk:
                    with lock:
                        gone = k in removed
                    try:
                        s.get_into(k, buf)
                        if gone:
                            came_back.append(k)
                    except kvstore.ObjectNotFoundError:
                        pass

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for k in on_disk:
            time.sleep(0.005)
            s.remove(k)
            with lock:
                removed.add(k)
        time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        assert not came_back, f"removed objects read back: {came_back[:5]}"
        for k in on_disk:
            assert not s.exists(k)


def _object_files(path: os.PathLike[str] | str) -> list[str]:
    d = os.path.join(path, "objects")
    return [os.path.join(d, n) for n in os.listdir(d)]


def test_a_corrupt_disk_copy_raises_and_is_never_returned(tmp_path):
    keys = [f"obj-{i}" for i in range(32)]
    with tiered(tmp_path / "d") as s:
        fill(s, keys)
        victim = keys[0]
        # Find the file holding keys[0] (its header names it) and flip one payload byte.
        target = next(f for f in _object_files(tmp_path / "d") if keys[0].encode() in open(f, "rb").read(4096))
        with open(target, "r+b") as f:
            f.seek(4096 + 1000)
            b = f.read(1)
            f.seek(4096 + 1000)
            f.write(bytes([b[0] ^ 0x40]))
        with pytest.raises(kvstore.ChecksumError):
            s.get(victim)
        assert s.stats()["disk_corrupt"] == 1
        with pytest.raises(kvstore.ObjectNotFoundError):   # dropped: never the corrupt bytes
            s.get(victim)
        assert s.get(keys[1]) == value(keys[1])             # the rest is fine


def test_a_deleted_disk_file_is_a_miss(tmp_path):
    keys = [f"obj-{i}" for i in range(32)]
    with tiered(tmp_path / "d") as s:
        fill(s, keys)
        target = next(f for f in _object_files(tmp_path / "d") if keys[0].encode() in open(f, "rb").read(4096))
        os.unlink(target)
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get(keys[0])
        assert s.get(keys[1]) == value(keys[1])


def test_headers_that_do_not_add_up_are_dropped_at_open(tmp_path):
    keys = [f"obj-{i}" for i in range(32)]
    with tiered(tmp_path / "d") as s:
        fill(s, keys)
        n = s.stats()["disk_objects"]
    files = sorted(_object_files(tmp_path / "d"))
    with open(files[0], "r+b") as f:     # a header byte: its CRC fails
        f.seek(20)
        f.write(b"\xff")
    os.truncate(files[1], 8192)          # shorter than its header says
    with open(os.path.join(tmp_path, "d", "objects", "zz-not-ours"), "wb") as f:
        f.write(b"junk")
    with tiered(tmp_path / "d") as s:
        assert s.stats()["disk_objects"] == n - 2
        for k in keys:
            try:
                assert s.get(k) == value(k)
            except kvstore.ObjectNotFoundError:
                pass


WRITER = textwrap.dedent("""
    import sys, time, numpy as np, kvstore
    sys.path.insert(0, sys.argv[2])
    from test_disk_tier import value
    s = kvstore.Store("4MiB", lease_ttl=0, disk_path=sys.argv[1], disk_size="256MiB", disk_admission="all")
    i = 0
    while True:
        k = f"obj-{i}"
        s.put(k, value(k, 1 << 20))
        i += 1
        if i % 3 == 0:
            print(i, flush=True)
            time.sleep(0.002)
""")


def test_kill_during_offload_leaves_no_partial_object(tmp_path):
    d = tmp_path / "d"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(d), os.path.dirname(__file__)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(60):                      # let it write (and offload) a while
            p.stdout.readline()
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    with kvstore.Store("4MiB", lease_ttl=0, disk_path=d, disk_size="256MiB") as s:
        assert not [f for f in _object_files(d) if f.endswith(".tmp")]
        keys = s.keys()
        assert keys, "some offloads completed before the kill"
        for k in keys:
            assert s.get(k) == value(k, 1 << 20), k


def test_a_full_disk_drops_offloads_and_dram_keeps_working(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        keys = [f"obj-{i}" for i in range(40)]
        with kvstore.Store(SEGMENT, lease_ttl=0, disk_path=mnt / "d", disk_size="64MiB", disk_admission="all") as s:
            fill(s, keys)
            st = s.stats()
            assert st["disk_offload_failures"] > 0, st
            assert st["disk_objects"] >= 1
            for k in keys:                       # every read: the right bytes or not found
                try:
                    assert s.get(k) == value(k)
                except kvstore.ObjectNotFoundError:
                    pass
            s.put("after", b"still works")
            assert s.get("after") == b"still works"
    finally:
        subprocess.run(["umount", str(mnt)])


def test_readers_race_writers_across_tiers(tmp_path):
    import threading

    stop = threading.Event()
    wrong: list[str] = []
    with tiered(tmp_path / "d") as s:
        def writer(t: int) -> None:
            i = 0
            while not stop.is_set() and i < 4000:
                k = f"w{t}-{i % 24}"
                s.upsert(k, value(f"{k}-{i}"))
                i += 1

        def reader() -> None:
            buf = np.empty(SIZE, dtype=np.uint8)
            while not stop.is_set():
                for t in range(2):
                    for j in range(24):
                        k = f"w{t}-{j}"
                        try:
                            s.get_into(k, buf)
                        except (kvstore.ObjectNotFoundError, kvstore.NoSpaceError):
                            continue
                        b = buf.tobytes()
                        # Every value written under k is value(f"{k}-{i}"): check it is one.
                        if b[:16] not in expected[k]:
                            wrong.append(k)

        expected: dict[str, set[bytes]] = {f"w{t}-{j}": set() for t in range(2) for j in range(24)}
        for t in range(2):
            for i in range(4000):
                expected[f"w{t}-{i % 24}"].add(value(f"w{t}-{i % 24}-{i}")[:16])
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)] + [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        assert not wrong, f"{len(wrong)} reads returned bytes no write of their key had written"
        assert s.stats()["disk_offloads"] > 0
