"""A master restart loses nothing (issue 17, item 6): every segment owner keeps an index of
its segment from the master's notices and reports it to the restarted master, which takes
every object back where it lies — replicas merged, the newest version of each key kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from cluster import Master, wait_for
from test_cluster import _reconnected as back

import kvstore


def test_every_object_comes_back_after_the_master_is_killed():
    m = Master("--client-ttl", "5", "--lease-ttl", "1")
    a = kvstore.Store.connect(m.url, segment_size=16 << 20)
    b = kvstore.Store.connect(m.url, segment_size=16 << 20)
    w = kvstore.Store.connect(m.url, segment_size=0)
    try:
        want: dict[str, bytes] = {}
        for i in range(300):
            v = os.urandom(100 + 37 * i)
            w.put(f"k{i}", v, replicas=2, checksum=i % 2 == 0, soft_pin=i % 3 == 0)
            want[f"k{i}"] = v
        for i in range(0, 300, 10):
            w.remove(f"k{i}")
            del want[f"k{i}"]
        for i in range(5, 300, 10):
            want[f"k{i}"] = os.urandom(77)
            w.upsert(f"k{i}", want[f"k{i}"], replicas=2)
        assert w.exists("k1")                                   # every commit has reached the master
        time.sleep(0.3)                                         # and the owners read their notices
        port = m.port
        m.stop(signal.SIGKILL)
        m = Master("--client-ttl", "5", "--lease-ttl", "1", port=port)
        assert wait_for(lambda: back(a) and back(b), 10)
        reader = kvstore.Store.connect(m.url, segment_size=0)
        try:
            for k, v in want.items():
                assert reader.get(k) == v, k
            for i in range(0, 300, 10):
                assert not reader.exists(f"k{i}"), "a removed object came back"
            assert reader.stats()["objects"] == len(want)
            assert a.stats()["objects_reregistered"] + b.stats()["objects_reregistered"] == 2 * len(want)
            a.close()                                           # the replicas were merged: b still serves all
            for k, v in want.items():
                assert reader.get(k) == v, k
        finally:
            reader.close()
    finally:
        for s in (w, b, a):
            s.close()
        m.stop()


WRITER = """
import sys, kvstore
s = kvstore.Store.connect(sys.argv[1], segment_size=8 << 20)
print("ready", flush=True)
sys.stdin.readline()
s.put("late", b"L" * 5000)          # paused 0.5 s after its ticket: the master is stopped meanwhile
print("stored", flush=True)
sys.stdin.readline()
print(s.get("late") == b"L" * 5000, s.stats()["objects_reregistered"], flush=True)
sys.stdin.readline()
s.close()
"""


def test_a_put_whose_commit_the_dead_master_never_read_comes_back():
    """The writer holds the object in its own segment and its commit was still unread when
    the master died: the writer reports it itself."""
    m = Master("--client-ttl", "5")
    p = subprocess.Popen([sys.executable, "-c", WRITER, m.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "KVSTORE_TEST_WRITE_PAUSE_US": "500000"})
    try:
        assert p.stdout.readline().strip() == "ready"
        p.stdin.write("go\n")
        p.stdin.flush()
        time.sleep(0.2)
        m.proc.send_signal(signal.SIGSTOP)                      # the master reads nothing more
        assert p.stdout.readline().strip() == "stored"          # the commit went out pipelined
        port = m.port
        m.stop(signal.SIGKILL)
        m = Master("--client-ttl", "5", port=port)
        time.sleep(1)
        p.stdin.write("check\n")
        p.stdin.flush()
        found, reregistered = p.stdout.readline().split()
        assert found == "True" and reregistered == "1"
        reader = kvstore.Store.connect(m.url, segment_size=0)
        assert reader.get("late") == b"L" * 5000
        reader.close()
    finally:
        p.stdin.close()
        p.wait(timeout=10)
        m.stop()


HOLDER = """
import sys, time, kvstore
s = kvstore.Store.connect(sys.argv[1], segment_size=4 << 20)
print("ready", flush=True)
sys.stdin.readline()
print(s.stats()["objects_reregistered"], flush=True)
s.close()
"""


def test_space_reused_while_its_owner_was_frozen_does_not_come_back_as_the_old_object():
    """The owner of the only segment is frozen while the master frees an object in it and
    hands its space to other writes; then the master dies. The owner's index still lists the
    freed object (it never heard that it went): reported to the restarted master, that object
    would be read back with the bytes of the writes that took its space. The master hands out
    freed space only once the owner confirmed hearing of it, so the writes wait, then fail
    (`NoSpaceError`) while the owner is frozen, and the object comes back intact (or not at
    all), never with another object's bytes."""
    flags = ("--client-ttl", "30", "--lease-ttl", "0.2")
    m = Master(*flags)
    h = subprocess.Popen([sys.executable, "-c", HOLDER, m.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    w = reader = None
    try:
        assert h.stdout.readline().strip() == "ready"
        w = kvstore.Store.connect(m.url, segment_size=0)
        victim = b"V" * (64 << 10)
        w.put("victim", victim)
        time.sleep(0.3)                                         # the owner indexed it
        h.send_signal(signal.SIGSTOP)
        churned = 0
        for i in range(20000):                                  # notices pile up unread
            try:
                w.upsert(f"churn{i % 16}", bytes([i % 251]) * 4096)
                churned += 1
            except kvstore.NoSpaceError:                        # freed space waits for the frozen owner
                break
        w.remove("victim")
        for i in range(64):                                     # new objects take every free byte
            try:
                w.put(f"fill{i}", b"F" * (64 << 10))
            except kvstore.NoSpaceError:
                break
        port = m.port
        m.stop(signal.SIGKILL)
        m = Master(*flags, port=port)
        h.send_signal(signal.SIGCONT)
        reader = kvstore.Store.connect(m.url, segment_size=0)
        assert wait_for(lambda: reader.exists("churn0") or reader.exists("victim"), 10)   # the owner is back
        end = time.monotonic() + 10
        while True:
            try:
                got = reader.get("victim")
                break
            except kvstore.ObjectNotFoundError:
                got = None
                break
            except kvstore.TransferError:                       # the owner is still remounting: an error, fine
                assert time.monotonic() < end
                time.sleep(0.05)
        assert got in (None, victim), f"read back {got[:8]!r}... for the removed object"
        assert churned < 20000, "freed space was handed out again before its owner heard it was freed"
        h.stdin.write("done\n")
        h.stdin.flush()
        print("re-registered:", h.stdout.readline().strip())
    finally:
        h.send_signal(signal.SIGCONT)
        if h.poll() is None:
            h.stdin.close()
            h.wait(timeout=10)
        for s in (w, reader):
            if s is not None:
                s.close()
        m.stop()


def test_a_full_cluster_still_takes_whole_batches():
    """Space freed by eviction waits for its holder's confirmation before it is reused; a
    batch that needs more than the free space is held back until the holder confirms (the
    evictions it needs done first), so no object of it fails for want of room."""
    m = Master("--client-ttl", "5")
    h = subprocess.Popen([sys.executable, "-c", HOLDER.replace("4 << 20", "32 << 20"), m.url],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    w = None
    try:
        assert h.stdout.readline().strip() == "ready"
        w = kvstore.Store.connect(m.url, segment_size=0)
        value = b"x" * (64 << 10)
        for r in range(8):                                      # 8 x 8 MiB into 32 MiB: evicting from round 4
            failures = [f for f in w.batch_put_from([f"r{r}-{i}" for i in range(128)], [value] * 128) if f is not None]
            assert not failures, (r, failures[:1])
        assert w.stats()["evicted_objects"] > 0
        assert w.get("r7-127") == value
        h.stdin.write("done\n")
        h.stdin.flush()
        h.stdout.readline()
    finally:
        if h.poll() is None:
            h.stdin.close()
            h.wait(timeout=10)
        if w is not None:
            w.close()
        m.stop()


def test_a_call_right_after_a_failed_reconnect_waits_for_the_next_attempt():
    """A client whose last attempt to reach its master failed moments ago (the heartbeat
    thread's, during a restart or an election) dials again when the next attempt is due
    instead of failing at once: the first call after the master is back succeeds."""
    m = Master("--client-ttl", "5")
    w = kvstore.Store.connect(m.url, segment_size=0)
    try:
        assert not w.exists("k")
        port = m.port
        m.stop(signal.SIGKILL)
        with pytest.raises(kvstore.TransferError):
            w.exists("k")                    # this attempt fails: nobody listens
        m = Master("--client-ttl", "5", port=port)   # up in well under 200 ms
        t0 = time.monotonic()
        assert not w.exists("k")             # the master is back: no "unreachable; retrying"
        assert time.monotonic() - t0 < 5
    finally:
        w.close()
        m.stop()
