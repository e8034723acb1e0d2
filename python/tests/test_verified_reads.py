"""Reads that outlive their lease (issue 17): a reader paused between its lease and its copy
while the object's space is freed and written again must never return the new bytes as the
old object's. The pause is the test hook KVSTORE_TEST_READ_PAUSE_US of the reader process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cluster import Master, wait_for
from test_cluster import TOKEN

import kvstore

SIZE = 32 << 20

READER = """
import array, ctypes, json, sys, kvstore
url, how, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = kvstore.Store.connect(url, segment_size=0)
print("ready", flush=True)
sys.stdin.readline()
out = {}
try:
    if how == "get_into":
        buf = bytearray(size)
        n = s.get_into("victim", buf)
        data = bytes(buf[:n])
    elif how == "batch":
        data = s.get_batch(["victim"])[0]
        if isinstance(data, Exception):
            raise data
        if data is None:
            raise KeyError("victim")
    elif how == "ranges":
        buf = bytearray(size)
        address = ctypes.addressof((ctypes.c_char * size).from_buffer(buf))
        n = s._read_ranges(["victim"], [[(address, 0, size)]])[0][0]
        if isinstance(n, Exception):
            raise n
        data = bytes(buf[:n])
    elif how == "ranges-packed":   # the mapped, host-memory path: one lease check per object
        buf = bytearray(size)
        address = ctypes.addressof((ctypes.c_char * size).from_buffer(buf))
        n = s._read_ranges(["victim"], [array.array("q", [address, 0, size // 2, address + size // 2, size // 2, size // 2])],
                           True)[0]
        if isinstance(n, list):
            raise next(r for r in n if isinstance(r, Exception))
        data = bytes(buf[:n])
    elif how == "buffer":
        data = s._get_batch_new(["victim"], kvstore._native.Buffer)[0]
        if isinstance(data, Exception):
            raise data
        if data is None:
            raise KeyError("victim")
        data = bytes(data)
    else:
        data = s.get("victim")
    out["ok"] = True
    out["distinct"] = sorted(set(data))
except Exception as e:
    out["ok"] = False
    out["error"] = type(e).__name__
out["reads_expired"] = s.stats()["reads_expired"]
out["network_bytes"] = s.stats()["network_bytes"]
s.close()
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def master():
    with Master("--lease-ttl", "0.3", "--client-ttl", "5") as m:
        yield m


def race(url: str, how: str, env: dict[str, str] | None = None, namespace: str | None = None) -> dict:
    """A reader paused 0.9 s between its lease (0.3 s) and its copy, while the owner (this
    process) removes the object and writes another into the same space; the reader's outcome."""
    env = {**os.environ, **(env or {}), "KVSTORE_TEST_READ_PAUSE_US": "900000"}
    # The owner's segment holds one object of this size at a time: the next one reuses its space.
    owner = kvstore.Store.connect(url, segment_size=SIZE + (1 << 20), token=env.get("KVSTORE_MASTER_TOKEN"))
    cmd = [sys.executable, "-c", READER, url, how, str(SIZE)]
    if namespace:
        cmd = ["ip", "netns", "exec", namespace, *cmd]
    reader = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        owner.put("victim", b"\x11" * SIZE)
        assert reader.stdout.readline().strip() == "ready"
        reader.stdin.write("go\n")
        reader.stdin.flush()
        # The reader has its lease once the master counts it; then the owner removes the object
        # and writes another into the same space as soon as the lease lets it.
        assert wait_for(lambda: owner.stats()["leases_active"] > 0, 5, interval=0.002)
        owner.remove("victim", force=True)
        deadline = time.monotonic() + 5
        while True:
            try:
                owner.put("other", b"\x22" * SIZE)
                break
            except kvstore.NoSpaceError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        out = json.loads(reader.stdout.readline())
        assert reader.wait(timeout=10) == 0
        return out
    finally:
        reader.kill()
        reader.wait()
        owner.close()


def check(out: dict) -> None:
    # Never the other object's bytes: an error, or (had it won the race) the victim's own.
    if out["ok"]:
        assert out["distinct"] == [0x11]
    else:
        assert out["error"] in ("KeyError", "ObjectNotFoundError", "TransferError")
        assert out["reads_expired"] >= 1


@pytest.mark.parametrize("how", ["get", "get_into", "batch", "ranges", "ranges-packed", "buffer"])
def test_a_read_that_outlives_its_lease_never_returns_another_objects_bytes(master, how):
    check(race(master.url, how))   # the reader maps the owner's segment (same host)


def test_a_read_over_tcp_that_outlives_its_lease_is_thrown_away(netns):
    # The reader in another network namespace reaches the owner's segment over TCP.
    with Master("--token", TOKEN, "--lease-ttl", "0.3", host="10.213.0.1") as m:
        out = race(m.url, "get_into", env={"KVSTORE_MASTER_TOKEN": TOKEN}, namespace=netns)
        check(out)
        assert out["network_bytes"] >= SIZE   # the copy went over TCP (and was thrown away)


def test_a_slow_read_inside_its_lease_returns_the_object(master):
    # Paused, but for less than the lease: nothing is thrown away.
    owner = kvstore.Store.connect(master.url, segment_size=SIZE + (1 << 20))
    reader = subprocess.Popen([sys.executable, "-c", READER, master.url, "get", str(SIZE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "KVSTORE_TEST_READ_PAUSE_US": "50000"})
    try:
        owner.put("victim", b"\x11" * SIZE)
        assert reader.stdout.readline().strip() == "ready"
        reader.stdin.write("go\n")
        reader.stdin.flush()
        out = json.loads(reader.stdout.readline())
        assert out == {"ok": True, "distinct": [0x11], "reads_expired": 0, "network_bytes": 0}
    finally:
        reader.kill()
        reader.wait()
        owner.close()


def test_a_remounted_segment_takes_no_object_while_old_leases_may_run(master):
    # A client whose master restarts remounts the same memory: readers of the old master's
    # objects may still be copying out of it, so it takes new objects only a lease TTL later.
    s = kvstore.Store.connect(master.url, segment_size=4 << 20)
    try:
        s.put("before", b"x" * 1000)
        port = master.port
        master.stop()
        with Master("--lease-ttl", "2", "--client-ttl", "5", port=port):
            assert wait_for(lambda: _put_or_none(s, "probe"), 10)   # reconnected; the put fails
            assert s.stats()["master_reconnects"] >= 1
            with pytest.raises(kvstore.NoSpaceError):
                s.put("early", b"y" * 1000)
            assert wait_for(lambda: _put_ok(s, "late"), 5)
            assert s.get("late") == b"z" * 1000
    finally:
        s.close()


def _put_or_none(s: kvstore.Store, key: str) -> bool:
    """True once the store is connected again (a put then fails for want of space, not master)."""
    try:
        s.put(key, b"p")
        return True
    except kvstore.NoSpaceError:
        return True
    except kvstore.TransferError:
        return False


def _put_ok(s: kvstore.Store, key: str) -> bool:
    try:
        s.put(key, b"z" * 1000)
        return True
    except kvstore.NoSpaceError:
        return False
