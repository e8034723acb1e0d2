"""End-to-end checksums (issue 17, item 2): ``checksum=True`` stores a CRC32C computed in the
copy's pass; every whole-object read checks its copy, falls back to another replica, and
raises ChecksumError rather than return corrupt bytes."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import wire
from cluster import Master

import kvstore


def crc32c(data: bytes) -> int:
    """A plain bytewise CRC32C (Castagnoli), independent of the store's kernel."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    c = 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def test_reference_crc():
    assert crc32c(b"123456789") == 0xE3069283


def test_checked_reads_count_and_the_per_write_option_overrides_the_store():
    with kvstore.Store(64 << 20, checksum=True) as s:
        v = os.urandom(300_000)
        s.put("a", v)
        s.put_parts("parts", v[:1000], v[1000:])
        s.put("plain", v, checksum=False)
        assert s.get("a") == v and s.get("parts") == v and s.get("plain") == v
        assert s.stats()["checksums_verified"] == 2
        out = np.empty(len(v), np.uint8)
        assert s.get_into("a", out) == len(v) and out.tobytes() == v
        assert s.batch_put_from(["b1", "b2"], [v[:5000], [v[:10], v[10:7000]]]) == [None, None]
        assert s.get_batch(["b1", "b2", "plain"]) == [v[:5000], v[:7000], v]
        assert s.stats()["checksums_verified"] == 5
        assert s.stats()["checksum_failures"] == 0
    with kvstore.Store(16 << 20) as s:
        s.put("x", b"abc", checksum=True)
        s.put("y", b"abc")
        assert s.get("x") == s.get("y") == b"abc"
        assert s.stats()["checksums_verified"] == 1
        with pytest.raises(kvstore.ArgumentTypeError):
            s.put("z", b"abc", checksum=1)


def test_wrong_checksum_values_are_refused_and_change_nothing():
    for bad in ("yes", 1, None, 0.0):
        with pytest.raises(kvstore.ArgumentTypeError):
            kvstore.Store(16 << 20, checksum=bad)
        with pytest.raises(kvstore.ArgumentTypeError):
            kvstore.Store.connect("kvstore://127.0.0.1:1", segment_size=0, checksum=bad)
    with kvstore.Store(16 << 20) as s:
        s.put("keep", b"v")
        before = s.stats()
        for bad in ("yes", 1, None):
            for call in (lambda: s.put("x", b"abc", checksum=bad), lambda: s.upsert("keep", b"new", checksum=bad),
                         lambda: s.put_batch(["y"], [b"abc"], checksum=bad)):
                with pytest.raises(kvstore.ArgumentTypeError):
                    call()
        after = s.stats()
        assert s.get("keep") == b"v" and not s.exists("x") and not s.exists("y")
        assert (after["objects"], after["bytes_used"], after["puts"]) == (before["objects"], before["bytes_used"], before["puts"])


@pytest.fixture
def master():
    with Master() as m:
        yield m


def found(master: Master, key: str) -> tuple[int, list[tuple[int, int]], int | None]:
    """The master's answer to a get of ``key`` through the raw protocol: size, replicas
    (segment, offset) in order, and the stored CRC32C."""
    r = wire.Raw.tcp(master.port)
    try:
        assert r.authenticate(wire.read_token(master.port)) == 102
        kind, body = r.call(wire.GET, wire.lp(key.encode()) + wire.lp(b"elsewhere"))
        assert kind == 105, wire.error_message(body)
        size, n = struct.unpack_from("<QI", body, 0)
        replicas = [struct.unpack_from("<IQ", body, 12 + 12 * i) for i in range(n)]
        at = 12 + 12 * n + 8
        crc = struct.unpack_from("<I", body, at + 1)[0] if body[at] else None
        return size, replicas, crc
    finally:
        r.close()


def segment_fd(size: int) -> int:
    """This process's descriptor of its shared segment of ``size`` bytes (an unnamed file in
    /dev/shm)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
            if link.startswith(("/dev/shm/", "/memfd:")) and os.fstat(int(name)).st_size == size:
                return int(name)
        except OSError:
            continue
    raise AssertionError(f"no segment of {size} bytes among this process's descriptors")


def test_the_master_stores_the_writers_crc(master):
    a = kvstore.Store.connect(master.url, segment_size=8 << 20, checksum=True)
    try:
        v = os.urandom(70_000)
        a.put("k", v)
        a.put("n", v, checksum=False)
        assert found(master, "k")[2] == crc32c(v)
        assert found(master, "n")[2] is None
    finally:
        a.close()


def test_corrupt_bytes_are_never_returned(master):
    owner = kvstore.Store.connect(master.url, segment_size=8 << 20, checksum=True)
    reader = kvstore.Store.connect(master.url, segment_size=0)
    try:
        v = os.urandom(1 << 20)
        owner.put("k", v)
        assert reader.get("k") == v
        _, [(_, offset)], _ = found(master, "k")
        os.pwrite(segment_fd(8 << 20), b"\xff" * 16, offset + 12345)   # a bit flip in the segment
        with pytest.raises(kvstore.ChecksumError):
            reader.get("k")
        with pytest.raises(kvstore.TransferError):                     # a ChecksumError is a TransferError
            reader.get_into("k", bytearray(len(v)))
        assert isinstance(reader.get_batch(["k"])[0], kvstore.ChecksumError)
        assert reader.stats()["checksum_failures"] >= 3   # (a bytes get may try a replica twice)
        assert reader.exists("k"), "the store is unchanged: the object stays (its other readers decide)"
    finally:
        reader.close()
        owner.close()


def test_a_corrupt_replica_falls_back_to_a_good_one(master):
    a = kvstore.Store.connect(master.url, segment_size=8 << 20)
    b = kvstore.Store.connect(master.url, segment_size=12 << 20)
    reader = kvstore.Store.connect(master.url, segment_size=0)
    try:
        v = os.urandom(200_000)
        a.put("k", v, replicas=2, checksum=True)
        _, replicas, _ = found(master, "k")
        assert len(replicas) == 2
        seg, offset = replicas[0]
        r = wire.Raw.tcp(master.port)
        assert r.authenticate(wire.read_token(master.port)) == 102
        kind, body = r.call(wire.SEGMENT_INFO, struct.pack("<I", seg))
        r.close()
        size = struct.unpack_from("<Q", body, 4)[0]
        os.pwrite(segment_fd(size), b"\x00" * 8, offset)
        out = bytearray(len(v))
        assert reader.get_into("k", out) == len(v) and out == v
        st = reader.stats()
        assert st["checksum_failures"] == 1 and st["checksums_verified"] == 1
        assert reader.get("k") == v
        assert reader.get_batch(["k"]) == [v]
    finally:
        reader.close()
        b.close()
        a.close()
