"""A master restart loses nothing (issue 17, item 6): every segment owner keeps an index of
its segment from the master's notices and reports it to the restarted master, which takes
every object back where it lies — replicas merged, the newest version of each key kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
