"""Replica copies and moves (Store.copy_replicas; Mooncake's copy and move tasks): real new
replicas of an object's current version in the segments named, added only once the bytes
are there, never over an object that changed meanwhile, and known to a restarted master."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from cluster import Master, wait_for
from test_cluster import _reconnected as back

import kvstore


@pytest.fixture
def cluster():
    """A master, two holders of 8 MiB and a pure client; yields (master, a, b, writer, ids)
    with ids = (a's segment, b's segment)."""
    m = Master("--client-ttl", "5", "--lease-ttl", "1")
    a = kvstore.Store.connect(m.url, segment_size=8 << 20)
    b = kvstore.Store.connect(m.url, segment_size=8 << 20)
    w = kvstore.Store.connect(m.url, segment_size=0)
    try:
        w.put("probe", b"p", replicas=2)
        ids = sorted(w.replicas("probe"))
        w.remove("probe", force=True)
        a.put("in-a", b"a")                        # a client's own segment is its first choice
        seg_a = a.replicas("in-a")[0]
        a.remove("in-a", force=True)
        yield m, a, b, w, (seg_a, next(s for s in ids if s != seg_a))
    finally:
        for s in (w, b, a):
            s.close()
        m.stop()


def test_a_copy_adds_a_replica_that_serves_when_the_first_is_gone(cluster):
    m, a, b, w, (seg_a, seg_b) = cluster
    value = os.urandom(3 << 20)
    a.put("k", value, checksum=True)
    assert w.replicas("k") == [seg_a]
    w.copy_replicas("k", [seg_b])
    assert sorted(w.replicas("k")) == sorted([seg_a, seg_b])
    assert w.get("k") == value
    a.close()                                        # its segment goes: the copy still serves
    assert w.replicas("k") == [seg_b] and w.get("k") == value


def test_a_move_takes_the_replica_off_its_source(cluster):
    m, a, b, w, (seg_a, seg_b) = cluster
    a.put("k", b"m" * 100_000)
    used = w.stats()["bytes_used"]
    w.copy_replicas("k", [seg_b], drop=seg_a)
    assert w.replicas("k") == [seg_b] and w.get("k") == b"m" * 100_000
    assert wait_for(lambda: w.stats()["bytes_used"] <= used, 5), "the source's space comes back"
    a.close()
    assert w.get("k") == b"m" * 100_000


def test_bad_copies_raise_clear_errors_and_change_nothing(cluster):
    m, a, b, w, (seg_a, seg_b) = cluster
    a.put("k", b"v" * 1000)
    before = (w.replicas("k"), w.stats()["bytes_used"])
    with pytest.raises(kvstore.ObjectNotFoundError):
        w.copy_replicas("missing", [seg_b])
    with pytest.raises(kvstore.InvalidArgumentError, match="already holds"):
        w.copy_replicas("k", [seg_a])
    with pytest.raises(kvstore.InvalidArgumentError, match="not mounted"):
        w.copy_replicas("k", [123456])
    with pytest.raises(kvstore.InvalidArgumentError, match="no replica of 'k' to move"):
        w.copy_replicas("k", [seg_b], drop=seg_b)
    with pytest.raises(kvstore.InvalidArgumentError, match="distinct"):
        w.copy_replicas("k", [seg_b, seg_b])
    with pytest.raises(ValueError):
        w.copy_replicas("k", [])
    with pytest.raises(ValueError):
        w.copy_replicas("k", [-1])
    with pytest.raises(TypeError):
        w.copy_replicas("k", seg_b)
    with pytest.raises(TypeError):
        w.copy_replicas("k", ["1"])
    with pytest.raises(TypeError):
        w.copy_replicas("k", [True])
    with pytest.raises(TypeError):
        w.copy_replicas(5, [seg_b])
    with pytest.raises(TypeError):
        w.copy_replicas("k", [seg_b], drop="1")
    with pytest.raises(ValueError):
        w.copy_replicas("k", [seg_b], drop=0)
    with pytest.raises(TypeError):
        w.replicas(5)
    with pytest.raises(kvstore.ObjectNotFoundError):
        w.replicas("missing")
    b.put("fill", b"f" * ((8 << 20) - 512))
    with pytest.raises(kvstore.NoSpaceError):
        w.copy_replicas("k", [seg_b])
    b.remove("fill", force=True)
    # Nothing was added anywhere (space freed moments before may still await its owner).
    assert wait_for(lambda: w.replicas("k") == before[0] and w.stats()["bytes_used"] <= before[1], 5), \
        (before, w.replicas("k"), w.stats()["bytes_used"])


def test_an_embedded_store_has_nowhere_to_copy_to():
    with kvstore.Store(segment_size=1 << 20) as s:
        s.put("k", b"v")
        with pytest.raises(kvstore.UnsupportedError, match="cluster"):
            s.copy_replicas("k", [1])
        assert s.get("k") == b"v"


def test_a_copy_racing_writers_never_adds_stale_bytes(cluster):
    """Upserts of the key race copies and moves of it: whatever wins, every read returns one
    of the values written in full, and the replicas of the final version agree."""
    m, a, b, w, (seg_a, seg_b) = cluster
    values = [bytes([i]) * 200_000 for i in range(1, 40)]
    a.put("k", values[0])
    stop = threading.Event()
    outcomes: dict[str, int] = {"ok": 0, "changed": 0, "other": 0}

    def copier() -> None:
        while not stop.is_set():
            try:
                where = w.replicas("k")
                if len(where) == 1:                  # each upsert makes a new one-replica version
                    w.copy_replicas("k", [seg_b if where[0] == seg_a else seg_a])
                    outcomes["ok"] += 1
            except kvstore.ObjectNotFoundError:
                outcomes["changed"] += 1
            except kvstore.StoreError:
                outcomes["other"] += 1

    t = threading.Thread(target=copier)
    t.start()
    try:
        for v in values[1:]:
            a.upsert("k", v)
            got = w.get("k")
            assert got in values and got == got[:1] * len(got)
            time.sleep(0.005)
    finally:
        stop.set()
        t.join()
    final = w.get("k")
    assert final == values[-1]
    assert outcomes["ok"] + outcomes["changed"] > 0
    a.close()                                        # whatever replica is left has the final bytes
    try:
        assert w.get("k") == values[-1]
    except kvstore.ObjectNotFoundError:
        pass                                          # its only replica was in a's segment


def test_a_restarted_master_takes_the_copied_replica_back(cluster):
    m, a, b, w, (seg_a, seg_b) = cluster
    a.put("k", b"r" * 50_000)
    w.copy_replicas("k", [seg_b])
    assert w.exists("k")
    time.sleep(0.3)                                   # the owners have read their notices
    port = m.port
    m.stop(signal.SIGKILL)
    m2 = Master("--client-ttl", "5", "--lease-ttl", "1", port=port)
    try:
        assert wait_for(lambda: back(a) and back(b), 10)
        assert a.stats()["objects_reregistered"] == 1 and b.stats()["objects_reregistered"] == 1
        a.close()
        assert w.get("k") == b"r" * 50_000
    finally:
        m2.stop()


def test_a_drained_segment_takes_nothing_new_and_keeps_what_it_holds(cluster):
    m, a, b, w, (seg_a, seg_b) = cluster
    a.put("kept", b"k" * 10_000)
    a.drain_segment()
    for i in range(20):                               # nothing new lands in a's segment
        w.put(f"n{i}", b"n" * 1000)
        assert w.replicas(f"n{i}") == [seg_b]
    a.put("own", b"o" * 1000)                         # not even a's own writes
    assert w.replicas("own") == [seg_b]
    with pytest.raises(kvstore.InvalidArgumentError, match="drained"):
        w.copy_replicas("n0", [seg_a])
    assert w.get("kept") == b"k" * 10_000 and w.replicas("kept") == [seg_a]
    with pytest.raises(kvstore.InvalidArgumentError, match="no segment"):
        w.drain_segment()
    with kvstore.Store(segment_size=1 << 20) as embedded, pytest.raises(kvstore.UnsupportedError):
        embedded.drain_segment()


def test_segment_file_arguments_are_checked(cluster):
    m, a, b, w, _ = cluster
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.Store.connect(m.url, segment_size=1 << 20, segment_file=5)
    with pytest.raises(kvstore.InvalidArgumentError, match="NUL"):
        kvstore.Store.connect(m.url, segment_size=1 << 20, segment_file="/dev/shm/a\0b")
    with pytest.raises(kvstore.InvalidArgumentError, match="segment size"):
        kvstore.Store.connect(m.url, segment_size=0, segment_file="/dev/shm/anything")
    assert w.stats()["segment_id"] == 0 and a.stats()["segment_id"] != b.stats()["segment_id"]


COPIER = r"""
import json, sys, kvstore
s = kvstore.Store.connect(sys.argv[1], segment_size=0)
s.copy_replicas("k", [int(sys.argv[2])], drop=int(sys.argv[3]))
print(json.dumps({"network_bytes": s.stats()["network_bytes"]}))
s.close()
"""


def test_a_copier_on_another_host_moves_a_replica_over_tcp(netns):
    """The copier is in another network namespace: both segments are remote to it, so it
    reads over TCP into staging memory and writes the target over TCP."""
    import json
    import subprocess
    import sys
    token = "replica-copy-token"
    env = {**os.environ, "KVSTORE_MASTER_TOKEN": token}
    with Master("--token", token, host="10.213.0.1") as m:
        a = kvstore.Store.connect(m.url, segment_size=8 << 20, token=token)
        b = kvstore.Store.connect(m.url, segment_size=8 << 20, token=token)
        try:
            value = os.urandom(3 << 20)
            a.put("k", value, checksum=True)
            b.put("in-b", b"b")
            seg_a, seg_b = a.replicas("k")[0], b.replicas("in-b")[0]
            done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", COPIER, m.url, str(seg_b), str(seg_a)],
                                  env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["network_bytes"] >= 2 * len(value)   # read and written over TCP
            assert b.replicas("k") == [seg_b]
            a.close()
            assert b.get("k") == value
        finally:
            b.close()
            a.close()
