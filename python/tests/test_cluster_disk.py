"""The disk tier of a connected store (docs/disk-tier.md, "In a cluster"): offload ahead of
the master's eviction, read-back by every client through the owner's segment server, one
version across tiers, re-registration after a restart of the owner or of the master, checks
on every byte served."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from cluster import Master, wait_for

import kvstore

SIZE = 1 << 20
SEGMENT = "16MiB"


def value(key: str, size: int = SIZE, salt: int = 0) -> bytes:
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") ^ salt
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def owner(master: Master, path: os.PathLike[str] | str, **kw: object) -> kvstore.Store:
    kw.setdefault("disk_admission", "all")
    return kvstore.Store.connect(master.url, segment_size=SEGMENT, disk_path=path, disk_size="256MiB",
                                 **kw)  # type: ignore[arg-type]


def fill(store: kvstore.Store, keys: list[str], salt: int = 0, writer: kvstore.Store | None = None) -> None:
    """Puts keys (through `writer`, default `store`), letting `store`'s offloader keep up."""
    for k in keys:
        (writer or store).put(k, value(k, salt=salt))
        store.wait_for_disk_copies()


def test_objects_evicted_from_dram_read_back_byte_exact_by_every_client(tmp_path):
    keys = [f"obj-{i}" for i in range(48)]        # 48 MiB through a 16 MiB segment
    with Master() as m, owner(m, tmp_path / "d") as a, kvstore.Store.connect(m.url, segment_size=0) as b:
        fill(a, keys)
        st = a.stats()
        assert st["evicted_objects"] > 24 and st["disk_offloads"] >= st["evicted_objects"] - 2
        # A client with a segment of its own, mounted now (earlier, it would have taken
        # objects, which it has no disk for).
        c = kvstore.Store.connect(m.url, segment_size="8MiB", prefault=True)
        for s in (a, b, c):                        # the owner, a pure client, a client with a segment
            for k in keys:
                assert s.get(k) == value(k), k
            buf = np.empty(SIZE, dtype=np.uint8)
            for k in reversed(keys[:8]):
                assert s.get_into(k, buf) == SIZE
                assert buf.tobytes() == value(k), k
            assert s.get_batch(keys[:12]) == [value(k) for k in keys[:12]]
            rows = np.empty((8, SIZE), dtype=np.uint8)
            s.batch_get_into(keys[12:20], list(rows))
            assert [r.tobytes() for r in rows] == [value(k) for k in keys[12:20]]
            assert s.exists(keys[0]) and s.size(keys[0]) == SIZE
            part = np.zeros(5000, dtype=np.uint8)           # a ranged read (the parallel tensor reads')
            s._read_ranges([keys[1]], [[(part.ctypes.data, 300_000, 5000)]], True)
            assert part.tobytes() == value(keys[1])[300_000:305_000]
        c.close()
        assert set(keys) <= set(b.keys())
        assert a.stats()["disk_hits"] >= 3 * 20
        ms = b.stats()
        assert ms["objects"] < len(keys)           # most of them are only on disk now


def test_tensors_come_back_from_another_clients_disk(tmp_path):
    with Master() as m, owner(m, tmp_path / "d") as a, kvstore.Store.connect(m.url, segment_size=0) as b:
        ts = {f"t{i}": np.arange(i, i + 262_144, dtype=np.float32) for i in range(40)}  # 1 MiB each
        for k, t in ts.items():
            b.put_tensor(k, t)
            a.wait_for_disk_copies()
        assert a.stats()["evicted_objects"] > 10
        for k, t in ts.items():
            np.testing.assert_array_equal(b.get_tensor(k), t)
        into = np.empty(262_144, dtype=np.float32)
        assert b.get_tensor_into("t0", into) is into
        np.testing.assert_array_equal(into, ts["t0"])
        got = b.batch_get_tensor(["t1", "t2"])
        for k, t in zip(["t1", "t2"], got):
            np.testing.assert_array_equal(t, ts[k])


def on_disk(store: kvstore.Store, key: str) -> bool:
    """Whether the master answers a read of `key` with a disk tier's copy (DRAM lost it)."""
    try:
        return all(r >= 1 << 31 for r in store.replicas(key))
    except kvstore.ObjectNotFoundError:
        return False


def files(d) -> int:
    return len([n for n in os.listdir(d / "objects") if not n.endswith(".tmp")])


def test_a_newer_version_or_a_removal_is_never_undone_by_a_disk_copy(tmp_path):
    keys = [f"k{i}" for i in range(40)]
    with Master("--lease-ttl", "0.5") as m, owner(m, tmp_path / "d") as a, \
            kvstore.Store.connect(m.url, segment_size=0) as b:
        fill(a, keys)
        old = [k for k in keys if on_disk(b, k)]
        assert len(old) >= 10
        b.upsert(old[0], b"new")                    # a newer version from another client
        b.remove(old[1])                            # a removal
        with pytest.raises(kvstore.ObjectExistsError):
            b.put(old[2], b"again")                 # a put never overwrites, a disk copy included
        assert b.get(old[0]) == b"new"
        assert not b.exists(old[1])
        with pytest.raises(kvstore.ObjectNotFoundError):
            b.get(old[1])
        time.sleep(0.6)                             # the leases of those reads end
        fill(a, [f"more{i}" for i in range(40)])    # "new" leaves DRAM too (copied or not)
        assert b.get(old[0]) == b"new" if b.exists(old[0]) else True
        assert not b.exists(old[1])
        assert b.get(old[2]) == value(old[2])
        # The owner deleted the files of both replaced keys: its files are what it indexes.
        assert wait_for(lambda: a.stats()["disk_objects"] == files(tmp_path / "d"), 5)
        assert b.stats()["disk_objects"] <= a.stats()["disk_objects"]


def test_remove_all_and_ttl_reach_the_disk_copies(tmp_path):
    keys = [f"r{i}" for i in range(32)]
    with Master() as m, owner(m, tmp_path / "d") as a, kvstore.Store.connect(m.url, segment_size=0) as b:
        for k in keys[:16]:
            b.put(k, value(k), ttl=2.0)
            a.wait_for_disk_copies()
        fill(a, keys[16:])
        assert any(on_disk(b, k) for k in keys[:16])
        time.sleep(2.1)
        for k in keys[:16]:
            assert not b.exists(k), k              # expired on disk too
        assert b.remove_all() >= 16
        for k in keys[16:]:
            assert not b.exists(k), k
        assert wait_for(lambda: a.stats()["disk_objects"] == 0 and files(tmp_path / "d") == 0, 5)


def test_a_restarted_owner_re_registers_its_files_but_not_what_changed_while_it_was_away(tmp_path):
    keys = [f"s{i}" for i in range(40)]
    with Master() as m, kvstore.Store.connect(m.url, segment_size=0) as b, \
            kvstore.Store.connect(m.url, segment_size="8MiB"):   # takes the write made while a is away
        a = owner(m, tmp_path / "d")
        fill(a, keys, writer=b)
        copied = [k for k in keys if on_disk(b, k)]
        assert len(copied) >= 10
        a.close()                                   # leaves: its DRAM objects go, its disk stays
        for k in copied:
            assert not b.exists(k), k               # away: not served
        removed, rewritten = copied[0], copied[1]
        b.remove(removed)                           # reaches the copy on the away disk
        b.put(rewritten, b"while away")             # a newer version, in c's segment
        with owner(m, tmp_path / "d") as a2:
            assert wait_for(lambda: b.exists(copied[-1]), 5)
            for k in copied[2:]:
                assert b.get(k) == value(k), k
            assert b.get(rewritten) == b"while away"
            assert not b.exists(removed)            # neither comes back
            assert a2.stats()["disk_recovered"] >= len(copied)
            assert wait_for(lambda: files(tmp_path / "d") == a2.stats()["disk_objects"], 5)


def test_a_killed_owner_comes_back_with_every_complete_copy(tmp_path):
    code = textwrap.dedent("""
        import sys, time, kvstore
        s = kvstore.Store.connect(sys.argv[1], segment_size="16MiB", disk_path=sys.argv[2], disk_size="256MiB",
                                  disk_admission="all")
        for i in range(40):
            s.put(f"x{i}", bytes([i]) * (1 << 20))
            s.wait_for_disk_copies()
        print("copied", s.stats()["disk_offloads"], flush=True)
        while True:
            s.put(f"y{time.monotonic_ns()}", b"z" * (1 << 20))   # offloading when killed
    """)
    with Master() as m, kvstore.Store.connect(m.url, segment_size=0) as b:
        p = subprocess.Popen([sys.executable, "-c", code, m.url, str(tmp_path / "d")], stdout=subprocess.PIPE, text=True)
        try:
            line = p.stdout.readline()
            assert line.startswith("copied"), line
            time.sleep(0.3)
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        finally:
            p.kill()
        assert wait_for(lambda: not b.exists("x0"), 10)  # its session went with the process
        with owner(m, tmp_path / "d") as a2:
            assert wait_for(lambda: b.exists("x0"), 5)
            n = 0
            for i in range(40):
                if b.exists(f"x{i}"):
                    assert b.get(f"x{i}") == bytes([i]) * (1 << 20)
                    n += 1
            assert n >= 20
            assert not [f for f in os.listdir(tmp_path / "d" / "objects") if f.endswith(".tmp")]
            assert a2.stats()["disk_recovered"] >= n


def test_a_restarted_master_takes_the_disk_copies_back(tmp_path):
    keys = [f"m{i}" for i in range(40)]
    m = Master("--client-ttl", "5")
    a = owner(m, tmp_path / "d")
    try:
        fill(a, keys)
        copied = [k for k in keys if on_disk(a, k)]
        assert len(copied) >= 10
        port = m.port
        m.stop(signal.SIGKILL)
        m = Master("--client-ttl", "5", port=port)
        with kvstore.Store.connect(m.url, segment_size=0) as b:
            assert wait_for(lambda: b.exists(copied[-1]), 15)
            for k in copied:
                assert b.get(k) == value(k), k
            assert all(on_disk(b, k) for k in copied)     # indexed again as disk copies
    finally:
        a.close()
        m.stop()


def test_a_corrupt_disk_copy_is_never_served(tmp_path):
    keys = [f"c{i}" for i in range(40)]
    with Master() as m, owner(m, tmp_path / "d") as a, kvstore.Store.connect(m.url, segment_size=0) as b:
        fill(a, keys)
        victim = next(k for k in keys if on_disk(b, k))
        # Flip one byte in the middle of the victim's file (found by its key in the header).
        d = tmp_path / "d" / "objects"
        for name in os.listdir(d):
            path = d / name
            data = path.read_bytes()
            if victim.encode() in data[:4096]:
                with open(path, "r+b") as f:
                    f.seek(len(data) - 100_000)
                    byte = f.read(1)
                    f.seek(len(data) - 100_000)
                    f.write(bytes([byte[0] ^ 0xFF]))
                break
        else:
            pytest.fail("no file holds the victim")
        with pytest.raises(kvstore.ChecksumError):
            b.get(victim)                           # from another client: over the network
        assert a.stats()["disk_corrupt"] == 1
        with pytest.raises((kvstore.ChecksumError, kvstore.ObjectNotFoundError)):
            b.get(victim)                           # the same, or gone once the master heard
        assert wait_for(lambda: not b.exists(victim), 5)   # the owner's next round drops it
        with pytest.raises(kvstore.ObjectNotFoundError):
            b.get(victim)
        for k in keys:
            if k != victim and b.exists(k):
                assert b.get(k) == value(k), k


def test_one_client_per_disk_path_and_bad_settings(tmp_path):
    with Master() as m, owner(m, tmp_path / "d"):
        with pytest.raises(kvstore.InvalidArgumentError, match="in use"):
            owner(m, tmp_path / "d")
        with pytest.raises(kvstore.InvalidArgumentError, match="needs a segment"):
            kvstore.Store.connect(m.url, segment_size=0, disk_path=tmp_path / "e", disk_size="1GiB")
        with pytest.raises(kvstore.InvalidArgumentError, match="disk_size"):
            kvstore.Store.connect(m.url, segment_size=SEGMENT, disk_path=tmp_path / "e")
        with pytest.raises(kvstore.InvalidArgumentError, match="disk_admission"):
            kvstore.Store.connect(m.url, segment_size=SEGMENT, disk_path=tmp_path / "e", disk_size="1GiB",
                                  disk_admission="sometimes")


def test_forged_disk_requests_get_errors_never_bytes(tmp_path):
    import wire
    from test_hostile import _segment_endpoint, authenticated

    keys = [f"h{i}" for i in range(40)]
    with Master() as m, owner(m, tmp_path / "d") as a:
        fill(a, keys)
        victim = next(k for k in keys if on_disk(a, k))
        gen = max(int(n, 16) for n in os.listdir(tmp_path / "d" / "objects"))
        seg = a.stats()["segment_id"]
        host, port = _segment_endpoint(m, keys[-1])
        d = wire.Raw.tcp(port, host)
        assert d.authenticate(wire.data_key(wire.read_token(m.port)), data_plane=True) == wire.D_OK

        def disk_read(segment: int, generation: int, offset: int, length: int) -> tuple[int, bytes]:
            d.send(DISK_READ, struct.pack("<IQQQ", segment, generation, offset, length))
            kind, body = d.read()
            return kind, (d.recv_exactly(length) if kind == wire.D_OK else body)

        disk = seg | 1 << 31
        assert disk_read(disk, gen, 0, 4096)[0] == wire.D_OK                  # a member may read a copy
        for bad in ((seg, gen, 0, 16), (disk ^ 1, gen, 0, 16), (disk, gen + 1000, 0, 16), (disk, gen, SIZE, 1),
                    (disk, gen, 0, SIZE + 1), (disk, gen, 1 << 47, 16)):
            kind, body = disk_read(*bad)
            assert kind == wire.D_ERROR, bad                                  # an error frame, no byte
        d.close()
        # The master: a disk round or a registration for a segment this connection does not own.
        r = authenticated(m)
        kind, body = r.call(33, struct.pack("<IQQI", seg, 7, 1 << 30, 0) + struct.pack("<I", 0) * 2)
        assert kind == wire.ERROR and "not mounted by this client" in wire.error_message(body)
        kind, body = r.call(34, struct.pack("<I", seg) + struct.pack("<I", 0))
        assert kind == wire.ERROR
        r.close()
        assert a.get(victim) == value(victim)                                # nothing changed


DISK_READ = 208


def test_reuse_admission_copies_only_objects_read_since_their_write(tmp_path):
    keys = [f"u{i}" for i in range(40)]
    with Master("--lease-ttl", "0.05") as m, owner(m, tmp_path / "d", disk_admission="reuse") as a, \
            kvstore.Store.connect(m.url, segment_size=0) as b:
        for i, k in enumerate(keys):
            b.put(k, value(k))
            if i % 2 == 0:
                assert b.get(k) == value(k)        # read once: worth a disk copy
            a.wait_for_disk_copies()
        assert a.stats()["evicted_objects"] > 10
        gone = [k for k in keys[:20] if not b.exists(k)]
        kept = [k for k in keys[:20] if on_disk(b, k)]
        assert kept and all(keys.index(k) % 2 == 0 for k in kept)    # only the objects read
        assert gone and all(keys.index(k) % 2 == 1 for k in gone)   # never read: dropped
        for k in kept:
            assert b.get(k) == value(k), k
