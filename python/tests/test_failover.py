"""Standby masters and failover on etcd (issue 17, item 7): masters elected through etcd's
leases, clients that find the leader there and move to a new one with their objects, a
frozen leader that stops serving before anyone else can lead, and clients that refuse a
master of another term. A three-member etcd cluster runs on loopback ports."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from cluster import Master, wait_for

import kvstore
from kvstore.bench.etcd import ElectedMaster, Etcd, etcd_binary, token_file

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (./dev.sh installs etcd-server)")


@pytest.fixture(scope="module")
def etcd():
    with Etcd(members=3) as e:
        yield e


@pytest.fixture
def token(tmp_path):
    path = token_file(str(tmp_path))
    with open(path) as f:
        return path, f.read().strip()


def _leader(etcd: Etcd, cluster: str) -> tuple[str, int] | None:
    key = base64.b64encode(f"/kvstore/{cluster}/leader".encode()).decode()
    r = etcd.call("/v3/kv/range", {"key": key})
    if not r.get("kvs"):
        return None
    kv = r["kvs"][0]
    return base64.b64decode(kv["value"]).decode(), int(kv["create_revision"])


def _lead(etcd: Etcd, cluster: str, masters: list[ElectedMaster], after: int = 0) -> ElectedMaster:
    """The master that leads in a term later than ``after``, once it serves."""
    def named() -> ElectedMaster | None:
        found = _leader(etcd, cluster)
        if found is None or found[1] <= after:
            return None
        m = next((m for m in masters if found[0].endswith(f":{m.port}")), None)
        return m if m is not None and m.proc.poll() is None and m.serving() and m.terms()[-1:] == [found[1]] else None

    assert wait_for(lambda: named() is not None, 15), "no leader"
    return named()


def _url(etcd: Etcd, cluster: str) -> str:
    return f"kvstore+etcd://{etcd.endpoints.replace('http://', '')}/{cluster}"


def _try_put(s: kvstore.Store, key: str, value: bytes) -> bool:
    try:
        s.put(key, value)
        return True
    except kvstore.TransferError:
        return False
    except kvstore.NoSpaceError:   # while the remounted segments are held for old leases
        return False


def test_a_standby_takes_over_and_every_object_survives(etcd, token):
    path, secret = token
    masters = [ElectedMaster(etcd, "fo1", path, "--lease-ttl", "1", "--client-ttl", "5") for _ in range(2)]
    url = _url(etcd, "fo1")
    stores: list[kvstore.Store] = []
    try:
        first = _lead(etcd, "fo1", masters)
        a = kvstore.Store.connect(url, segment_size=16 << 20, token=secret)
        b = kvstore.Store.connect(url, segment_size=16 << 20, token=secret)
        w = kvstore.Store.connect(url, segment_size=0, token=secret)
        stores += [w, b, a]
        want = {}
        for i in range(200):
            want[f"k{i}"] = os.urandom(500 + 13 * i)
            w.put(f"k{i}", want[f"k{i}"], replicas=2, checksum=i % 2 == 0)
        assert w.exists("k199")
        time.sleep(0.2)                                   # the owners have read their notices
        term = a.stats()["master_term"]
        assert term == _leader(etcd, "fo1")[1]
        first.stop(signal.SIGKILL)
        second = _lead(etcd, "fo1", masters, after=term)
        assert second is not first
        assert wait_for(lambda: a.stats()["master_failovers"] == 1 and b.stats()["master_failovers"] == 1, 10)
        for s in (w, a, b):
            for k, v in want.items():
                assert s.get(k) == v, k
        assert a.stats()["objects_reregistered"] + b.stats()["objects_reregistered"] == 2 * len(want)
        assert wait_for(lambda: _try_put(w, "after", b"n" * 3000), 10)
        fresh = kvstore.Store.connect(url, segment_size=0, token=secret)
        stores.append(fresh)
        assert fresh.get("after") == b"n" * 3000 and fresh.stats()["master_term"] == second.terms()[-1]
    finally:
        for s in stores:
            s.close()
        for m in masters:
            m.stop()


def test_a_new_leader_takes_new_objects_at_once_without_waiting_out_the_old_leases(etcd, token):
    """The killed leader granted no lease past its leadership, which ended before the new
    leader's term began: segments remounted from its term take new objects at once, even with
    a 30 s lease TTL (before, they took none for a lease TTL: NoSpaceError)."""
    path, secret = token
    masters = [ElectedMaster(etcd, "fo-hold", path, "--lease-ttl", "30", "--client-ttl", "5") for _ in range(2)]
    url = _url(etcd, "fo-hold")
    stores: list[kvstore.Store] = []
    stop = threading.Event()
    try:
        first = _lead(etcd, "fo-hold", masters)
        a = kvstore.Store.connect(url, segment_size=32 << 20, token=secret)
        w = kvstore.Store.connect(url, segment_size=0, token=secret)
        stores += [w, a]
        count = 5000
        a.put_batch([f"k{i}" for i in range(count)], [bytes([i % 251]) * 1024 for i in range(count)])
        assert a.get("k7") == b"\x07" * 1024    # a lease of the old leader on k7's bytes
        time.sleep(0.2)                          # the owner has read its notices
        term = a.stats()["master_term"]

        # A writer that puts all along: none of its puts may land on an object the owner
        # has not reported yet (between the remount and the last report).
        def hammer() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                if _try_put(w, f"h{n}", b"h" * 8192):
                    with contextlib.suppress(kvstore.StoreError):
                        w.remove(f"h{n}")
        writer = threading.Thread(target=hammer)
        writer.start()
        first.stop(signal.SIGKILL)
        _lead(etcd, "fo-hold", masters, after=term)
        assert wait_for(lambda: a.stats()["master_failovers"] == 1, 10)
        # Its own objects, and perhaps a few of the writer's that were not removed yet.
        assert wait_for(lambda: a.stats()["objects_reregistered"] >= count, 10), a.stats()["objects_reregistered"]
        stop.set()
        writer.join()
        assert all(a.get(f"k{i}") == bytes([i % 251]) * 1024 for i in range(count))
        a.put("after", b"n" * (1 << 20))         # the only segment is the remounted one
        assert a.get("after") == b"n" * (1 << 20)
    finally:
        stop.set()
        for s in stores:
            s.close()
        for m in masters:
            m.stop()


PAUSED_CLIENT = r"""
import json, sys, kvstore
s = kvstore.Store.connect(sys.argv[1], segment_size=0, token=sys.argv[2])
out = {}
try:
    if sys.argv[3] == "get":
        out["value"] = s.get("k").hex()
    else:
        s.put("w", b"x" * 1000)
        out["stored"] = True
except kvstore.TransferError as e:
    out["error"] = str(e)
out["reads_expired"] = s.stats()["reads_expired"]
s.close()
print(json.dumps(out), flush=True)
"""


def _paused(url: str, secret: str, op: str, hook: str, micros: int) -> dict:
    """What a client process that `op`s ("get" k or "put" w) with the test hook `hook`
    (KVSTORE_TEST_READ_PAUSE_US or KVSTORE_TEST_WRITE_PAUSE_US) set to `micros` reports."""
    env = {**os.environ, hook: str(micros)}
    done = subprocess.run([sys.executable, "-c", PAUSED_CLIENT, url, secret, op], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_elected_leaders_leases_end_with_its_leadership(etcd, token):
    """With an etcd lease of 1 s the leader cannot promise a reader 30 s: a reader paused
    1.5 s between its lease and its copy throws the copy away (as it would past any lease)."""
    path, secret = token
    masters = [ElectedMaster(etcd, "fo-lease", path, "--lease-ttl", "30")]
    url = _url(etcd, "fo-lease")
    try:
        _lead(etcd, "fo-lease", masters)
        with kvstore.Store.connect(url, segment_size=1 << 20, token=secret) as a:
            a.put("k", b"v" * 100)
            out = _paused(url, secret, "get", "KVSTORE_TEST_READ_PAUSE_US", 1_500_000)
            assert "value" not in out and "lease" in out["error"], out
            assert out["reads_expired"] >= 1
            # Without the pause the same read succeeds.
            out = _paused(url, secret, "get", "KVSTORE_TEST_READ_PAUSE_US", 0)
            assert out == {"value": (b"v" * 100).hex(), "reads_expired": 0}
    finally:
        for m in masters:
            m.stop()


def test_an_elected_leaders_writes_begin_no_copy_past_its_leadership(etcd, token):
    """A writer paused 1.5 s between its ticket and its copy, under a leader whose etcd lease
    is 1 s, begins no copy (a later leader may have given the space away) and stores nothing,
    although the write timeout (300 s) is far off."""
    path, secret = token
    masters = [ElectedMaster(etcd, "fo-write", path)]
    url = _url(etcd, "fo-write")
    try:
        _lead(etcd, "fo-write", masters)
        with kvstore.Store.connect(url, segment_size=1 << 20, token=secret) as a:
            out = _paused(url, secret, "put", "KVSTORE_TEST_WRITE_PAUSE_US", 1_500_000)
            assert "leadership" in out.get("error", ""), out
            assert not a.exists("w") and a.stats()["bytes_used"] == 0
            assert _paused(url, secret, "put", "KVSTORE_TEST_WRITE_PAUSE_US", 100_000)["stored"]
            assert a.get("w") == b"x" * 1000
    finally:
        for m in masters:
            m.stop()


def test_a_leader_that_resigns_hands_over_at_once(etcd, token):
    path, secret = token
    masters = [ElectedMaster(etcd, "fo2", path, ttl=5) for _ in range(2)]
    try:
        first = _lead(etcd, "fo2", masters)
        t = time.monotonic()
        log = first.stop(signal.SIGTERM)
        assert "resigned as leader" in log
        second = _lead(etcd, "fo2", masters, after=first.terms()[-1])
        assert second is not first
        assert time.monotonic() - t < 4, "the standby waited for the lease TTL (5 s) instead of the revoke"
    finally:
        for m in masters:
            m.stop()


def test_a_frozen_leader_stops_serving_before_another_leads(etcd, token):
    """Fencing: a leader frozen past its lease comes back knowing its term may be over: it
    answers nothing that waited meanwhile, closes every connection and stands by."""
    path, secret = token
    masters = [ElectedMaster(etcd, "fo3", path) for _ in range(2)]
    pinned = None
    try:
        first = _lead(etcd, "fo3", masters)
        # A client pinned to this master's address (a plain URL): it cannot follow the election.
        pinned = kvstore.Store.connect(f"kvstore://127.0.0.1:{first.port}", segment_size=4 << 20, token=secret)
        pinned.put("before", b"b" * 100)
        first.proc.send_signal(signal.SIGSTOP)
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(_outcome(pinned, "during", b"d" * 100)))
        t.start()                                          # its request waits in the frozen master's socket
        second = _lead(etcd, "fo3", masters, after=first.terms()[-1])
        assert second is not first
        follower = kvstore.Store.connect(_url(etcd, "fo3"), segment_size=4 << 20, token=secret)
        try:
            assert wait_for(lambda: _try_put(follower, "during", b"N" * 100), 10)
            first.proc.send_signal(signal.SIGCONT)
            t.join(30)
            assert result and result[0] != "ok", "a master past its term answered a put"
            assert wait_for(lambda: any("stopped serving: the leadership may have passed" in line for line in first.log), 10)
            assert follower.get("during") == b"N" * 100
            assert wait_for(lambda: any("standby for cluster 'fo3'" in line for line in first.log[-3:]), 10)
        finally:
            follower.close()
    finally:
        if pinned is not None:
            pinned.close()
        for m in masters:
            m.stop()


def _outcome(s: kvstore.Store, key: str, value: bytes) -> str:
    try:
        s.put(key, value)
        return "ok"
    except kvstore.StoreError as e:
        return type(e).__name__


def test_a_client_refuses_a_master_that_etcd_does_not_name(etcd, token):
    """etcd names an address; the master listening there is of another term (here: not
    elected at all): identity comes from the welcome, so the client refuses it."""
    path, secret = token
    with Master("--token-file", path) as plain:
        key = base64.b64encode(b"/kvstore/fo4/leader").decode()
        etcd.call("/v3/kv/put", {"key": key, "value": base64.b64encode(f"127.0.0.1:{plain.port}".encode()).decode()})
        try:
            with pytest.raises(kvstore.TransferError, match="not the leader etcd names"):
                kvstore.Store.connect(_url(etcd, "fo4"), segment_size=0, token=secret)
        finally:
            etcd.call("/v3/kv/deleterange", {"key": key})


class _LyingEtcd(http.server.BaseHTTPRequestHandler):
    answer = b""

    def do_POST(self) -> None:   # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.answer)))
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *a: object) -> None:
        pass


@pytest.mark.parametrize("answer", [
    b"not json",
    b'{"kvs":[{"key":"eA==","create_revision":"7","mod_revision":"7","value":"' + base64.b64encode(b"no-port") + b'"}]}',
    b'{"kvs":[{"key":"eA==","create_revision":"-3","mod_revision":"7","value":"eA=="}]}',
    b'{"kvs":[{"key":"!!!","create_revision":"7","mod_revision":"7"}]}',
    b'{"kvs":"x"}',
    b"[" * 100 + b"]" * 100,
    b'{"kvs":[]}',
])
def test_a_lying_etcd_gets_a_clear_error(answer):
    _LyingEtcd.answer = answer
    server = http.server.HTTPServer(("127.0.0.1", 0), _LyingEtcd)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(kvstore.TransferError):
            kvstore.Store.connect(f"kvstore+etcd://127.0.0.1:{server.server_port}/x", segment_size=0, token="t" * 32)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("url, error", [
    ("kvstore+etcd://127.0.0.1:2379/bad name", kvstore.InvalidArgumentError),
    ("kvstore+etcd://127.0.0.1:2379/" + "x" * 65, kvstore.InvalidArgumentError),
    ("kvstore+etcd://https://127.0.0.1:2379/c", kvstore.InvalidArgumentError),
    ("kvstore+etcd://not-an-ip:2379/c", kvstore.InvalidArgumentError),
    ("kvstore+etcd://127.0.0.1:1/c", kvstore.TransferError),   # nothing listens there
])
def test_bad_etcd_urls(url, error):
    t = time.monotonic()
    with pytest.raises(error):
        kvstore.Store.connect(url, segment_size=0, token="t" * 32)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("args, message", [
    (["--etcd", "http://127.0.0.1:2379"], "must all prove one token"),
    (["--cluster", "c"], "need --etcd"),
    (["--etcd", "http://127.0.0.1:2379", "--cluster", "a/b", "--token", "x" * 32], "must be 1-64"),
    (["--etcd", "https://127.0.0.1:2379", "--token", "x" * 32], "https is not supported"),
    (["--etcd", "http://127.0.0.1:2379", "--etcd-ttl", "0", "--token", "x" * 32], "1 to 300"),
    (["--etcd", "http://127.0.0.1:2379", "--port", "0", "--token", "x" * 32], "fixed --port"),
    (["--etcd", "http://127.0.0.1:2379", "--host", "0.0.0.0", "--token", "x" * 32], "--advertise"),
])
def test_bad_election_flags(args, message):
    r = subprocess.run([sys.executable, "-m", "kvstore", "master", "--metrics-port", "-1", *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_the_mooncake_drop_in_follows_the_leader_named_by_etcd(etcd, token, monkeypatch):
    from kvstore.mooncake import MooncakeDistributedStore
    path, secret = token
    monkeypatch.setenv("KVSTORE_MASTER_TOKEN", secret)
    monkeypatch.setenv("MC_STORE_CLUSTER_ID", "fo5")
    masters = [ElectedMaster(etcd, "fo5", path)]
    try:
        _lead(etcd, "fo5", masters)
        s = MooncakeDistributedStore()
        endpoints = etcd.endpoints.replace("http://", "").replace(",", ";")
        assert s.setup("localhost", "P2PHANDSHAKE", 4 << 20, 0, "tcp", "", f"etcd://{endpoints}") == 0
        try:
            assert s.put("m", b"mooncake") == 0
            assert s.get("m") == b"mooncake"
        finally:
            s.close()
    finally:
        for m in masters:
            m.stop()


@pytest.mark.parametrize("address", ["etcd://", "etcd://;", "etcd://not-an-ip:2379", "etcd://127.0.0.1:1"])
def test_the_mooncake_drop_in_refuses_a_bad_etcd_address(address, monkeypatch):
    from kvstore.mooncake import MooncakeDistributedStore
    monkeypatch.setenv("KVSTORE_MASTER_TOKEN", "t" * 32)
    s = MooncakeDistributedStore()
    assert s.setup("localhost", "P2PHANDSHAKE", 4 << 20, 0, "tcp", "", address) != 0
    assert s.setup("localhost", "P2PHANDSHAKE", 4 << 20, 0, "tcp", "", address) != 0   # still nothing set up


def test_an_elected_master_publishes_its_term(etcd, token):
    import urllib.request

    from kvstore.bench.etcd import free_port
    path, _ = token
    port = free_port()
    m = ElectedMaster(etcd, "fo6", path, "--metrics-port", str(port))
    try:
        _lead(etcd, "fo6", [m])
        term = _leader(etcd, "fo6")[1]
        assert m.terms() == [term]
        assert any("etcd lease TTL 1 s" in line for line in m.log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert f"kvstore_term {term}\n" in r.read().decode()
    finally:
        m.stop()


def test_an_etcd_member_dies_and_the_cluster_carries_on(token):
    """One of three etcd members is killed (the first endpoint, which every client tries
    first): masters and clients move to the others; then the leader is killed too and a
    standby takes over through the two members left."""
    path, secret = token
    with Etcd(members=3) as etcd:
        masters = [ElectedMaster(etcd, "fo7", path, ttl=2) for _ in range(2)]
        store = None
        try:
            first = _lead(etcd, "fo7", masters)
            store = kvstore.Store.connect(_url(etcd, "fo7"), segment_size=8 << 20, token=secret)
            want = {f"e{i}": os.urandom(700 + i) for i in range(50)}
            for k, v in want.items():
                store.put(k, v)
            etcd.procs[0].kill()                               # the first endpoint's member dies
            etcd.procs[0].wait()
            assert wait_for(lambda: _try_put(store, "after-member", b"m" * 100), 20)
            for k, v in want.items():
                assert store.get(k) == v, k
            leader = next(m for m in masters if m.proc.poll() is None and m.serving())
            term = leader.terms()[-1]
            leader.proc.kill()                                 # and then the leader
            assert wait_for(lambda: any(m.proc.poll() is None and m.serving() and m.terms()[-1] > term for m in masters), 20)
            assert wait_for(lambda: _try_put(store, "after-leader", b"l" * 100), 20)
            for k, v in want.items():
                assert store.get(k) == v, k
            assert store.get("after-member") == b"m" * 100
            assert first in masters
        finally:
            if store is not None:
                store.close()
            for m in masters:
                m.stop()
