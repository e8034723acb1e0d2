"""Many processes around a master server (issue 5): shared memory on one host, TCP between
hosts (separate host identities and network namespaces), replicas, client death, master
restart, and a master fuzzed over its socket. Every server and process started is stopped."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import time

import numpy as np
import pytest
from cluster import Master, wait_for, worker
from cluster_worker import value_of

import kvstore


@pytest.fixture
def master():
    with Master("--client-ttl", "2") as m:
        yield m


def connect(m: Master, **kw) -> kvstore.Store:
    kw.setdefault("segment_size", "16MiB")
    return kvstore.Store.connect(m.url, **kw)


# ---- one process, several clients ----

def test_clients_share_objects_through_the_master(master):
    a, b, pure = connect(master), connect(master), connect(master, segment_size=0)
    try:
        a.put("k", b"hello" * 1000)
        assert b.get("k") == b"hello" * 1000          # a's segment, mapped by b
        assert pure.get("k") == b"hello" * 1000
        assert b.exists("k") and pure.size("k") == 5000
        pure.put("from-pure", b"x" * 70000)            # a pure client writes into others' segments
        buf = bytearray(70000)
        assert a.get_into("from-pure", buf) == 70000 and buf == b"x" * 70000
        assert b.get_batch(["k", "missing"])[0] == b"hello" * 1000
        with pytest.raises(kvstore.ObjectExistsError):
            b.put("k", b"again")
        b.upsert("k", b"new")
        assert a.get("k") == b"new"
        a.remove("k", force=True)
        assert not pure.exists("k")
        assert a.stats()["segment_size"] == 16 << 20 and pure.stats()["segment_size"] == 0
        assert a.stats()["capacity"] == 32 << 20        # the cluster's: two segments
    finally:
        for s in (a, b, pure):
            s.close()


def test_put_is_visible_to_another_client_as_soon_as_it_returns(master):
    a, b = connect(master), connect(master)
    try:
        for i in range(300):   # commits are pipelined; the master applies them before answering b
            a.put(f"k{i}", b"v" * 100)
            assert b.exists(f"k{i}")
        # Requests about every object see the put that just returned, too.
        for i in range(100):
            a.put(f"all{i}", b"v" * 100)
            assert f"all{i}" in b.keys()
            a.put(f"gone{i}", b"v" * 100)
            assert b.remove_all(force=True) >= 1 and not a.exists(f"gone{i}")
    finally:
        a.close()
        b.close()


def test_same_host_clients_move_to_the_masters_local_socket(master, monkeypatch):
    a = connect(master)
    monkeypatch.setenv("KVSTORE_MASTER_LOCAL", "0")   # stay on TCP
    b = connect(master, segment_size=0)
    try:
        assert a.stats()["master_local"] == 1 and b.stats()["master_local"] == 0
        b.put("over-tcp", b"t" * 5000)                  # into a's segment
        a.put("over-local", b"l" * 5000)
        assert a.get("over-tcp") == b"t" * 5000 and b.get("over-local") == b"l" * 5000
        assert a.stats()["objects"] == 2 == b.stats()["objects"]
    finally:
        a.close()
        b.close()
    with kvstore.Store() as embedded:
        assert embedded.stats()["master_local"] == 0


def test_tensors_and_multi_part_writes_across_clients(master):
    a, b = connect(master), connect(master, segment_size=0)
    try:
        t = np.arange(4096, dtype=np.float32).reshape(64, 64)
        a.put_tensor("t", t)
        assert np.array_equal(b.get_tensor("t"), t)
        b.put_parts("p", b"head", memoryview(b"body" * 100))
        assert a.get("p") == b"head" + b"body" * 100
    finally:
        a.close()
        b.close()


def test_replicas_land_in_distinct_segments_and_survive_their_owner(master):
    keeper, reader = connect(master), connect(master, segment_size=0)
    owner = worker(master.url, "w0", "0", "--serve", "--segment", "16MiB")
    try:
        assert wait_for(lambda: reader.stats()["capacity"] == 32 << 20, 10)
        for i in range(20):
            reader.put(f"r{i}", value_of(f"r{i}", 50000), replicas=2)
        assert reader.stats()["bytes_used"] >= 2 * 20 * 50000     # two copies of each
        owner.kill()                                             # one segment dies
        owner.wait()
        assert wait_for(lambda: reader.stats()["capacity"] == 16 << 20, 8)
        for i in range(20):
            assert reader.get(f"r{i}") == value_of(f"r{i}", 50000)
    finally:
        owner.kill()
        owner.wait()
        keeper.close()
        reader.close()


def test_replicas_are_best_effort_when_segments_are_few(master):
    a = connect(master)
    try:
        a.put("k", b"v" * 1000, replicas=16)
        assert a.get("k") == b"v" * 1000
    finally:
        a.close()


# ---- bad input ----

def test_connect_rejects_bad_arguments(master):
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.Store.connect(5)
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.Store.connect(master.url, token=5)
    for url in ("http://127.0.0.1:1", "kvstore://not-an-ip:50051", "kvstore://127.0.0.1:99999", "kvstore://127.0.0.1:x"):
        with pytest.raises(kvstore.InvalidArgumentError):
            kvstore.Store.connect(url)
    with pytest.raises(kvstore.InvalidArgumentError):
        kvstore.Store.connect(master.url, segment_size=-1)
    with pytest.raises(kvstore.InvalidArgumentError):
        kvstore.Store.connect(master.url, segment_size=10)
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.Store.connect(master.url, segment_size=0, prefault="yes")
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.Store.connect(master.url, segment_size=0, pin_memory=1)
    for bad_size in (1.5, None, [1]):
        with pytest.raises(kvstore.ArgumentTypeError):
            kvstore.Store.connect(master.url, segment_size=bad_size)
    with pytest.raises(kvstore.InvalidArgumentError):
        kvstore.Store.connect(master.url, segment_size="lots")
    with pytest.raises(kvstore.InvalidArgumentError, match="NUL"):
        kvstore.Store.connect(master.url + "\0", segment_size=0)
    with pytest.raises(kvstore.InvalidArgumentError, match="NUL"):
        kvstore.Store.connect(master.url, segment_size=0, token="a\0b")


TOKEN = "a-test-token-of-32-characters..."


def test_failed_connects_leave_the_cluster_as_it_was(tmp_path, monkeypatch):
    with Master("--token", TOKEN) as m:
        observer = kvstore.Store.connect(m.url, segment_size="1MiB", token=TOKEN)
        try:
            before = observer.stats()
            for kw in ({"token": "wrong"}, {"token": TOKEN, "segment_size": 10}):
                kw.setdefault("segment_size", "1MiB")
                with pytest.raises(kvstore.StoreError):
                    kvstore.Store.connect(m.url, **kw)
            monkeypatch.setenv("KVSTORE_RUNTIME_DIR", str(tmp_path))   # no token file there
            with pytest.raises(kvstore.InvalidArgumentError, match="no token"):
                kvstore.Store.connect(m.url, segment_size="1MiB")
            after = observer.stats()
            assert (after["capacity"], after["objects"]) == (before["capacity"], before["objects"]) == (1 << 20, 0)
        finally:
            observer.close()


def test_connect_to_nothing_is_a_transfer_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(kvstore.TransferError):
        kvstore.Store.connect(f"kvstore://127.0.0.1:{port}")


def test_token_is_checked(tmp_path, monkeypatch):
    with Master("--token", TOKEN) as m:
        with pytest.raises(kvstore.InvalidArgumentError, match="token"):
            kvstore.Store.connect(m.url, segment_size=0, token="wrong")
        s = kvstore.Store.connect(m.url, segment_size=0, token=TOKEN)
        s.close()
        # Same user, no token given: the master's token file is read.
        s = kvstore.Store.connect(m.url, segment_size=0)
        s.close()
        monkeypatch.setenv("KVSTORE_RUNTIME_DIR", str(tmp_path))
        with pytest.raises(kvstore.InvalidArgumentError, match="no token"):
            kvstore.Store.connect(m.url, segment_size=0)
        monkeypatch.setenv("KVSTORE_MASTER_TOKEN", TOKEN)
        kvstore.Store.connect(m.url, segment_size=0).close()


def test_master_refuses_a_short_token():
    with pytest.raises(RuntimeError, match="at least 16"):
        Master("--token", "short")


@pytest.mark.parametrize("bad", [0, 17, -1, 2**40])
def test_bad_replica_counts_leave_nothing_behind(master, bad):
    a = connect(master)
    try:
        with pytest.raises(kvstore.InvalidArgumentError, match="replica count"):
            a.put("k", b"v", replicas=bad)
        with pytest.raises(kvstore.ArgumentTypeError):
            a.put("k", b"v", replicas="2")
        with pytest.raises(kvstore.ArgumentTypeError):
            a.put("k", b"v", replicas=True)
        assert not a.exists("k") and a.stats()["objects"] == 0
    finally:
        a.close()


def test_embedded_store_takes_replicas_too():
    with kvstore.Store("4MiB") as s:
        s.put("k", b"v", replicas=3)           # one segment: one copy
        assert s.get("k") == b"v"
        with pytest.raises(kvstore.InvalidArgumentError):
            s.put("j", b"v", replicas=0)


def test_closed_connected_store_raises(master):
    a = connect(master)
    a.close()
    with pytest.raises(kvstore.StoreClosedError):
        a.get("k")
    a.close()


# ---- many processes ----

def results_of(procs: list[subprocess.Popen]) -> list[dict]:
    """Waits for worker processes; returns the JSON line each printed."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=90)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def run_workers(m: Master, n: int, seconds: float, **kw) -> list[dict]:
    return results_of([worker(m.url, f"w{i}", str(seconds), "--peers", str(n), **kw) for i in range(n)])


def test_three_client_processes_put_and_get_concurrently(master):
    results = run_workers(master, 3, 2.0)
    for r in results:
        assert r["corrupt"] == 0 and r["transfer_errors"] == 0 and r["put_errors"] == 0
        assert r["puts"] > 50
    assert sum(r["gets"] for r in results) > 50


def test_tcp_between_clients_with_different_host_identities(master):
    # Same machine, different host ids: the clients cannot map each other and use TCP.
    procs = [worker(master.url, f"w{i}", "2", "--peers", "2", env={"KVSTORE_HOST_ID": f"host-{i}"}) for i in range(2)]
    for r in results_of(procs):
        assert r["corrupt"] == 0 and r["transfer_errors"] == 0
        assert r["gets"] > 10 and r["stats"]["network_bytes"] > 0
        if not kvstore.rdma()["in_use"]:   # no RDMA device: TCP carried every byte, nothing staged
            assert r["stats"]["rdma_bytes"] == 0 and r["stats"]["bytes_staged"] == 0


def test_kill_9_of_a_client_mid_workload(master, tmp_path):
    ready = tmp_path / "ready"
    victim = worker(master.url, "w2", "30", "--peers", "3", "--ready", str(ready))
    assert wait_for(ready.exists, 20)
    survivors = [worker(master.url, f"w{i}", "4", "--peers", "3") for i in range(2)]
    time.sleep(1.0)
    observer = connect(master, segment_size=0)
    try:
        victim_keys = [f"w2-{i}" for i in range(20)]
        assert any(observer.exists(k) for k in victim_keys)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        # Its objects go missing within the client TTL (2 s) + 5 s.
        assert wait_for(lambda: not any(observer.exists(k) for k in victim_keys), 7)
        assert time.monotonic() - killed_at < 7
        for r in results_of(survivors):
            assert r["corrupt"] == 0 and r["put_errors"] == 0 and r["puts"] > 20
    finally:
        victim.kill()
        victim.wait()
        for p in survivors:
            p.kill()
            p.wait()
        observer.close()


def test_client_survives_a_master_restart():
    m = Master("--client-ttl", "2")
    a = kvstore.Store.connect(m.url, segment_size="8MiB")
    try:
        a.put("before", b"1" * 1000)
        port = m.port
        m.stop(signal.SIGKILL)
        with pytest.raises(kvstore.TransferError):
            a.get("before")                                 # the master is gone: a clear error, no hang
        m = Master("--client-ttl", "2", "--lease-ttl", "1", port=port)
        ok = wait_for(lambda: _reconnected(a), 10, 0.1)
        assert ok, "the client did not reconnect"
        assert a.get("before") == b"1" * 1000               # re-registered with the new master (issue 17 item 6)
        assert a.stats()["objects_reregistered"] == 1
        # The remounted segment takes new objects once leases of the old mount have surely ended.
        assert wait_for(lambda: _put(a, "after", b"2" * 1000), 5, 0.05)
        assert a.get("after") == b"2" * 1000
        assert a.stats()["master_reconnects"] >= 1
        assert a.stats()["capacity"] == 8 << 20              # remounted
        assert a.stats()["master_local"] == 1                # on the new master's local socket
    finally:
        a.close()
        m.stop()


def _put(s: kvstore.Store, key: str, value: bytes) -> bool:
    try:
        s.put(key, value)
        return True
    except kvstore.NoSpaceError as e:
        assert "remounted" in str(e)
        return False


def _reconnected(s: kvstore.Store) -> bool:
    try:
        s.exists("x")
        return True
    except kvstore.TransferError:
        return False


# ---- the master under hostile input ----

def _frame(kind: int, payload: bytes, rid: int = 1) -> bytes:
    return struct.pack("<IHHII", 0x5453564B, 3, kind, rid, len(payload)) + payload


def test_master_survives_random_and_mutated_messages(master):
    rng = random.Random(1234)
    key = b"k"
    valid = [
        _frame(1, struct.pack("<I", 0) + struct.pack("<I", 4) + b"fuzz"),
        _frame(4, b""),
        _frame(9, struct.pack("<I", 1) + key),
        _frame(8, struct.pack("<I", 1) + key + struct.pack("<I", 1) + b"h"),
        _frame(5, struct.pack("<I", 1) + key + struct.pack("<Q", 100) + bytes([0, 0]) + bytes(16) + bytes([1, 0]) + bytes(4)),
        _frame(13, b""),
        _frame(2, struct.pack("<Q", 1 << 20) + struct.pack("<I", 1) + b"h" + struct.pack("<I", 1) + b"p" + struct.pack("<I", 1) + b"e"),
    ]
    end = time.monotonic() + 3.0
    sent = 0
    while time.monotonic() < end:
        s = socket.create_connection(("127.0.0.1", master.port), timeout=2)
        try:
            for _ in range(rng.randrange(1, 6)):
                choice = rng.random()
                if choice < 0.3:
                    msg = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
                else:
                    msg = bytearray(rng.choice(valid))
                    for _ in range(rng.randrange(0, 4)):
                        msg[rng.randrange(len(msg))] = rng.randrange(256)
                    if rng.random() < 0.2:
                        msg = msg[: rng.randrange(len(msg))]
                s.sendall(bytes(msg))
                sent += 1
        except OSError:
            pass   # the master closed a connection it refused: expected
        finally:
            s.close()
    assert sent > 100
    assert master.proc.poll() is None                  # zero crashes
    c = connect(master)
    try:
        c.put("still", b"works")
        assert c.get("still") == b"works"
    finally:
        c.close()


# ---- two network namespaces: different addresses, TCP only ----

def test_two_hosts_over_veth_use_tcp(netns):
    with Master("--token", TOKEN, host="10.213.0.1") as m:
        env = {"KVSTORE_MASTER_TOKEN": TOKEN}
        here = worker(m.url, "w0", "2", "--peers", "2", env=env)
        there = worker(m.url, "w1", "2", "--peers", "2", env=env, netns=netns)
        for r, local in zip(results_of([here, there]), (1, 0)):
            assert r["corrupt"] == 0 and r["transfer_errors"] == 0
            assert r["gets"] > 10 and r["stats"]["network_bytes"] > 0
            # the master's local socket is reachable from its own network namespace only
            assert r["stats"]["master_local"] == local


# ---- batches as one request per chunk, and waits without the GIL (issue 18) ----

def test_key_batches_on_a_connected_store_span_many_chunks(master):
    s = connect(master)
    try:
        keys = [f"k{i}" for i in range(5000)]
        s.put_batch(keys[::2], [str(i).encode() for i in range(0, 5000, 2)])
        # 5,000 keys: five requests of 1,024, not 5,000 round trips; results stay in order.
        assert s.batch_exists(keys) == [i % 2 == 0 for i in range(5000)]
        got = s.get_batch(keys[:3000])
        assert got == [str(i).encode() if i % 2 == 0 else None for i in range(3000)]
        bad = s.batch_exists(["k0", "", "k1"])                 # a bad key fails alone
        assert bad[0] is True and isinstance(bad[1], kvstore.InvalidArgumentError) and bad[2] is False
        leased = s.batch_remove(keys[:4])                      # just read: leased
        assert isinstance(leased[0], kvstore.LeaseHeldError) and isinstance(leased[1], kvstore.ObjectNotFoundError)
        removed = s.batch_remove(keys, force=True)
        assert sum(r is None for r in removed) == 2500
        assert all(isinstance(r, kvstore.ObjectNotFoundError) for r in removed[1::2])
        assert s.stats()["objects"] == 0 and s.batch_exists(keys[:10]) == [False] * 10
    finally:
        s.close()


def test_a_thread_waiting_on_a_stalled_master_does_not_hold_the_gil(master):
    import threading
    s = connect(master)
    try:
        s.put("k", b"v")
        done = threading.Event()
        out = {}

        def waiter():
            out["exists"] = s.exists("k")      # waits while the master is stopped
            done.set()

        os.kill(master.proc.pid, signal.SIGSTOP)
        try:
            t = threading.Thread(target=waiter)
            t.start()
            time.sleep(0.05)
            # This thread keeps running Python while the other waits on the master.
            spins, end = 0, time.monotonic() + 0.5
            while time.monotonic() < end:
                spins += 1
            assert not done.is_set()
            assert spins > 10000
        finally:
            os.kill(master.proc.pid, signal.SIGCONT)
        t.join(10)
        assert out["exists"] is True
    finally:
        s.close()


def test_a_forced_removal_after_a_read_frees_the_space_at_once(master):
    # The reader's hold ends with its copy (released with its next request), not with its lease.
    s = connect(master, segment_size="4MiB")
    try:
        s.put("a", b"1" * (3 << 20))
        assert s.get("a") == b"1" * (3 << 20)
        s.remove("a", force=True)
        assert s.stats()["bytes_used"] == 0
        s.put("b", b"2" * (3 << 20))                       # the same space, at once
        assert s.get("b") == b"2" * (3 << 20)
        with pytest.raises(kvstore.LeaseHeldError):
            s.remove("b")                                  # the lease still guards a plain remove
    finally:
        s.close()


def test_a_batch_longer_than_the_masters_read_limit_reads_every_object(master):
    # A client may have 65,536 reads in flight at the master; batches end their holds chunk by
    # chunk, so a longer batch still reads everything.
    s = connect(master, segment_size="64MiB")
    try:
        n = 70_000
        keys = [f"k{i}" for i in range(n)]
        s.put_batch(keys, [i.to_bytes(4, "little") for i in range(n)])
        got = s.get_batch(keys)
        assert all(v == i.to_bytes(4, "little") for i, v in enumerate(got))
        bufs = [bytearray(4) for _ in range(n)]
        assert s.batch_get_into(keys, bufs) == [4] * n
        assert all(b == i.to_bytes(4, "little") for i, b in enumerate(bufs))
        assert master.proc.poll() is None
    finally:
        s.close()


def test_a_new_segment_is_mapped_in_the_background_and_close_stops_that(master):
    """Without prefault, a connected client's segment (reserved at connect) gets its page
    tables on a background thread, so the first puts take no fault per page; closing the
    store while that thread runs stops it before the memory goes."""
    s = kvstore.Store.connect(master.url, segment_size=64 << 20)
    try:
        assert wait_for(lambda: s.stats()["segment_populated_bytes"] == 64 << 20, 10)
        s.put("k", b"v" * 5000)
        assert s.get("k") == b"v" * 5000
    finally:
        s.close()
    for _ in range(5):   # closed at once, mid-population
        kvstore.Store.connect(master.url, segment_size=1 << 30).close()
    c = kvstore.Store.connect(master.url, segment_size=0)
    try:
        assert c.stats()["segment_populated_bytes"] == 0
    finally:
        c.close()


def test_local_connections_log_no_failed_system_calls(master, capfd):
    """Socket options that do not apply to a local socket are not attempted (a failed
    best-effort call is logged: TCP_NODELAY on every local accept filled the logs)."""
    a, b = connect(master), connect(master)
    try:
        a.put("k", b"v" * 4096)
        assert b.get("k") == b"v" * 4096      # b maps a's segment through a's local socket
    finally:
        a.close()
        b.close()
    assert not [line for line in master.log if "failed:" in line], master.log
    assert "failed:" not in capfd.readouterr().err
