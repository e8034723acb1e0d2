"""Hostile clients against a real master and real clients over loopback (issue 16): each
attack fails with a clear error, the master stays up with bounded memory, and honest
clients' data stays byte-exact."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import wire
from cluster import Master, wait_for

import kvstore

RSS_BOUND = 64 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture
def master():
    with Master("--client-ttl", "5") as m:
        yield m


@pytest.fixture
def honest(master):
    """An honest client holding 64 objects whose bytes every test checks at the end."""
    s = kvstore.Store.connect(master.url, segment_size="32MiB")
    values = {f"honest/{i}": os.urandom(4096 + i) for i in range(64)}
    for k, v in values.items():
        s.put(k, v)
    yield s
    try:
        for k, v in values.items():
            assert s.get(k) == v
        assert master.proc.poll() is None, "the master died"
    finally:
        s.close()


def authenticated(m: Master) -> wire.Raw:
    r = wire.Raw.tcp(m.port)
    assert r.authenticate(wire.read_token(m.port)) == 102
    return r


def test_a_tcp_client_cannot_announce_an_endpoint_on_another_address(master, honest):
    """Where other clients connect and send bytes comes from the connection: a TCP client's
    segment or KV endpoint must be on the address the master sees it connect from."""
    r = authenticated(master)
    kind, body = r.call(wire.MOUNT, struct.pack("<Q", 1 << 20) + wire.lp(b"h") + wire.lp(b"") + wire.lp(b"127.0.0.2:6379") + b"\0")
    assert kind == wire.ERROR and "127.0.0.1" in wire.error_message(body), kind
    kind, body = r.call(wire.STATS)
    d = struct.pack("<I", 1) + struct.pack("<IBQQQ", 0, 0, 1 << 20, 4096, 4096) + wire.lp(b"cpu")
    kind, body = r.call(17, wire.lp(b"elsewhere") + d + wire.lp(b"h") + struct.pack("<Q", 0) + wire.lp(b"10.9.9.9:80"))
    assert kind == wire.ERROR and "is not on this client's address" in wire.error_message(body)
    kind, body = r.call(wire.MOUNT, struct.pack("<Q", 1 << 20) + wire.lp(b"h") + wire.lp(b"") + wire.lp(b"127.0.0.1:1") + b"\0")
    assert kind == 103, wire.error_message(body) if kind == wire.ERROR else kind
    r.close()


def test_mounts_whose_sizes_overflow_are_refused(master, honest):
    r = authenticated(master)
    refused = 0
    for _ in range(2000):
        kind, body = r.call(wire.MOUNT, struct.pack("<Q", 1 << 48) + wire.lp(b"h") + wire.lp(b"/p") + wire.lp(b"127.0.0.1:1") + b"\0")
        if kind == wire.ERROR:
            refused += 1
            assert "quota" in wire.error_message(body) or "limit" in wire.error_message(body)
    assert refused >= 2000 - 64                       # the per-client segment quota
    assert r.call(wire.LEAVE)[0] == wire.OK           # (a lost connection would keep them for a resume)
    r.close()
    assert honest.stats()["capacity"] == 32 << 20     # the raw client's mounts left with it
    assert master.proc.poll() is None


def test_half_sent_hellos_and_idle_connections_cost_nothing_and_time_out(master, honest):
    before = rss(master.proc.pid)
    conns = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", master.port))
        if i % 2:   # a hello header announcing 64 MiB, then nothing
            s.sendall(struct.pack("<IHHII", wire.MAGIC, wire.VERSION, wire.HELLO, 1, 64 << 20) + b"x" * 1000)
        conns.append(s)
    time.sleep(0.5)
    assert rss(master.proc.pid) - before < RSS_BOUND
    honest.put("during", b"d")                        # honest clients are served meanwhile
    # Announced sizes past the pre-authentication limit close at once; idle ones within the deadline.
    closed = 0
    deadline = time.monotonic() + 8
    for s in conns:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if s.recv(1) == b"":
                closed += 1
        except (TimeoutError, ConnectionResetError):
            closed += isinstance(s, socket.socket)
        s.close()
    assert closed == len(conns)
    assert "did not authenticate" in "".join(master.log)


def test_requests_before_authentication_are_never_decoded(master, honest):
    for kind, payload in ((wire.HEARTBEAT, b""), (wire.STATS, b""), (wire.LIST_KEYS, b"\0"),
                          (wire.MOUNT, struct.pack("<Q", 1 << 20) + wire.lp(b"h") * 3)):
        r = wire.Raw.tcp(master.port)
        r.s.sendall(wire.frame(kind, payload) * 1000)
        assert r.closed_by_peer()
    # A flood of pre-hello heartbeats is cut off at the first frame.
    before = rss(master.proc.pid)
    r = wire.Raw.tcp(master.port)
    try:
        r.s.sendall(wire.frame(wire.HEARTBEAT) * (1 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert r.closed_by_peer()
    assert rss(master.proc.pid) - before < RSS_BOUND


def test_a_wrong_proof_is_refused_and_ends_the_connection(master, honest):
    r = wire.Raw.tcp(master.port)
    assert r.authenticate(b"not the token, but long enough") == wire.ERROR
    assert r.closed_by_peer()
    with pytest.raises(kvstore.InvalidArgumentError, match="token"):
        kvstore.Store.connect(master.url, segment_size=0, token="not the token, but long enough")


def test_connections_past_max_clients_are_refused_cleanly():
    with Master("--max-clients", "16") as m:
        honest = kvstore.Store.connect(m.url, segment_size="4MiB")
        honest.put("k", b"v" * 100)
        held = [socket.create_connection(("127.0.0.1", m.port)) for _ in range(40)]
        refused = 0
        for s in held:
            s.settimeout(0.3)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            if data[:4] == struct.pack("<I", wire.MAGIC) and b"--max-clients" in data:
                refused += 1
        assert refused >= 40 - 16          # the honest client holds one (its local socket)
        assert honest.get("k") == b"v" * 100
        for s in held:
            s.close()
        wait_for(lambda: _connects(m), 5)
        assert _connects(m)
        honest.close()
        assert "--max-clients" in m.stop()


def _connects(m: Master) -> bool:
    try:
        kvstore.Store.connect(m.url, segment_size=0).close()
        return True
    except kvstore.StoreError:
        return False


def test_a_client_that_never_reads_cannot_grow_the_master(master, honest):
    r = authenticated(master)
    before = rss(master.proc.pid)
    # 16 MB of stats requests (each answered with ~500 bytes), never reading an answer.
    r.s.settimeout(5)
    sent = 0
    try:
        chunk = wire.frame(wire.STATS) * 4096
        while sent < (16 << 20):
            r.s.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass   # the master stopped reading: backpressure
    time.sleep(0.5)
    assert rss(master.proc.pid) - before < RSS_BOUND
    honest.put("after-greedy", b"g" * 1000)
    assert honest.get("after-greedy") == b"g" * 1000
    r.close()


def test_keys_past_the_frame_limit_never_depart_the_client(master, honest):
    # 70,000 keys of 1000 bytes: 70 MB of keys, more than one 64 MiB frame.
    n = 70_000
    keys = [f"{i:08d}/".ljust(1000, "k") for i in range(n)]
    for i in range(0, n, 2000):
        assert all(x is None for x in honest.put_batch(keys[i:i + 2000], [b"v"] * 2000))
    got = honest.keys("^[0-9]")
    assert got == keys
    assert honest.stats()["master_reconnects"] == 0
    assert honest.batch_exists(keys[:10] + keys[-10:]) == [True] * 20
    assert all(x is None for x in honest.batch_remove(keys, force=True))


def _nobody_python() -> list[str]:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as user nobody")
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c"]


def test_another_local_user_is_refused(master, honest):
    names = wire.local_socket_names(master.proc.pid)
    assert names, "the master's local socket is listed in /proc/net/unix"
    token_dir = os.path.dirname(wire.read_token.__code__.co_filename)
    script = textwrap.dedent(f"""
        import sys, os, struct, socket
        sys.path.insert(0, {token_dir!r})
        import wire
        out = []
        # 1. the token file is out of reach
        try:
            wire.read_token({master.port})
            out.append("token-readable")
        except OSError:
            out.append("token-unreadable")
        # 2. the local socket: refused by the kernel's peer credentials
        r = wire.Raw.local({names[0]!r})
        try:
            kind, body = r.read()
            out.append("local-refused:" + wire.error_message(body) if kind == wire.ERROR else "local-answered")
        except ConnectionError:
            out.append("local-closed")
        # 3. TCP: no proof without the token
        r = wire.Raw.tcp({master.port})
        out.append("tcp-" + str(r.authenticate(b"a guess at the token, 32 bytes..")))
        out.append("closed" if r.closed_by_peer() else "open")
        print(" ".join(out))
    """)
    p = subprocess.run(_nobody_python() + [script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    assert words[0] == "token-unreadable"
    assert words[1].startswith("local-refused") and "uid 65534" in p.stdout
    assert words[-2:] == [f"tcp-{wire.ERROR}", "closed"]
    assert honest.stats()["objects"] >= 64


def _unshare_available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


def test_a_small_dev_shm_gives_no_space_never_sigbus(master):
    if not _unshare_available():
        pytest.skip("needs root and unshare (a private mount namespace)")
    script = textwrap.dedent(f"""
        import kvstore
        try:
            kvstore.Store.connect({master.url!r}, segment_size="64MiB")
            print("connected")
        except kvstore.NoSpaceError as e:
            print("nospace:", e)
        s = kvstore.Store.connect({master.url!r}, segment_size="8MiB")
        for i in range(32):
            s.upsert("k%d" % (i % 6), bytes([i]) * (1 << 20))
        assert s.get("k5") == bytes([29]) * (1 << 20)
        s.close()
        print("filled")
    """)
    cmd = ["unshare", "-m", "sh", "-c",
           'mount --make-rprivate / && mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "$0" -c "$1"', sys.executable, script]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr                 # no SIGBUS
    assert "nospace:" in p.stdout and "shm-size" in p.stdout and "free" in p.stdout, p.stdout
    assert "filled" in p.stdout


def _segment_endpoint(m: Master, key: str) -> tuple[str, int]:
    """Where the holder of `key` serves its segment, found as any cluster member would."""
    r = authenticated(m)
    kind, body = r.call(wire.GET, wire.lp(key.encode()) + wire.lp(b"elsewhere"))
    assert kind == 105, wire.error_message(body) if kind == wire.ERROR else kind
    (seg,) = struct.unpack_from("<I", body, 12)
    kind, body = r.call(wire.SEGMENT_INFO, struct.pack("<I", seg))
    assert kind == 109
    at = 4 + 8
    fields = []
    for _ in range(3):
        (n,) = struct.unpack_from("<I", body, at)
        fields.append(body[at + 4:at + 4 + n].decode())
        at += 4 + n
    host, port = fields[2].rsplit(":", 1)
    r.close()
    return host, int(port)


def _segment_of(m: Master, key: str) -> tuple[str, int, int, bytes]:
    """The segment server of `key`'s holder, its segment id, and the data plane's key."""
    host, port = _segment_endpoint(m, key)
    r = authenticated(m)
    kind, body = r.call(wire.GET, wire.lp(key.encode()) + wire.lp(b"elsewhere"))
    (seg,) = struct.unpack_from("<I", body, 12)
    r.close()
    return host, port, seg, wire.data_key(wire.read_token(m.port))


def test_segment_server_refuses_strangers_and_caps_connections(master, honest):
    host, port = _segment_endpoint(master, "honest/0")
    # No proof, no service: a read before the handshake closes the connection unanswered.
    r = wire.Raw.tcp(port, host)
    r.send(wire.D_READ, struct.pack("<IQQ", 1, 0, 4096))
    assert r.closed_by_peer()
    r = wire.Raw.tcp(port, host)
    assert r.authenticate(b"a guess at the token, 32 bytes..", data_plane=True) == wire.D_ERROR
    # Hundreds of idle strangers: at most 256 are kept, none gets a thread (the poller runs
    # the handshake), the rest are closed at once.
    threads_before = len(os.listdir("/proc/self/task"))
    conns = [socket.create_connection((host, port)) for _ in range(400)]
    time.sleep(0.5)
    assert len(os.listdir("/proc/self/task")) - threads_before <= 2
    refused = 0
    for c in conns:
        c.settimeout(0.01)
        try:
            refused += c.recv(1) == b""
        except (TimeoutError, ConnectionError):
            pass
        c.close()
    assert refused >= 400 - 256
    # A member with the token is served.
    r = wire.Raw.tcp(port, host)
    assert r.authenticate(wire.data_key(wire.read_token(master.port)), data_plane=True) == wire.D_OK


SLOW_HOLDER = """
import sys, kvstore
s = kvstore.Store.connect({url!r}, segment_size="8MiB")
s.put("slow/0", b"s" * 65536)
print("ready", flush=True)
sys.stdin.read()
s.close()
"""


def test_segment_server_keeps_no_thread_per_idle_peer_and_cuts_off_slow_ones(master, honest):
    """Idle connections, authenticated or not, hold no thread of the serving process; a peer
    that trickles a write or reads a transfer too slowly is cut off at the request's deadline
    (idle timeout + bytes at 16 MiB/s) while others are served; idle peers are closed."""
    env = {**os.environ, "KVSTORE_SEGMENT_IDLE_TIMEOUT": "1"}
    holder = subprocess.Popen([sys.executable, "-c", SLOW_HOLDER.format(url=master.url)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        host, port, seg, token = _segment_of(master, "slow/0")

        def threads() -> int:
            return len(os.listdir(f"/proc/{holder.pid}/task"))

        def served() -> bool:
            d = wire.Raw.tcp(port, host)
            try:
                assert d.authenticate(token, data_plane=True) == wire.D_OK
                kind, _ = d.call(wire.D_READ, struct.pack("<IQQ", seg, 0, 4096))
                return kind == wire.D_OK and len(d.recv_exactly(4096)) == 4096
            finally:
                d.close()

        assert served()
        time.sleep(0.2)
        base = threads()
        # 100 authenticated peers and 100 half-sent hellos, all idle: no thread for any.
        peers = []
        for _ in range(100):
            d = wire.Raw.tcp(port, host)
            assert d.authenticate(token, data_plane=True) == wire.D_OK
            peers.append(d)
        half = []
        for _ in range(100):
            h = socket.create_connection((host, port))
            h.sendall(wire.frame(wire.D_HELLO, bytes(32))[:7])
            half.append(h)
        time.sleep(0.3)
        assert threads() - base <= 2, (base, threads())

        # A writer trickling a 64 KiB write (512 bytes every 0.2 s, each well within the 1 s
        # per-recv timeout, no deadline of its own) is cut off near 1 s + 64 KiB / 16 MiB/s.
        t = wire.Raw.tcp(port, host)
        assert t.authenticate(token, data_plane=True) == wire.D_OK
        t.send(wire.D_WRITE, struct.pack("<IQQQ", seg, (8 << 20) - 65536, 65536, 0))
        start = time.monotonic()
        sent = 0
        try:
            while time.monotonic() - start < 10 and sent < 65536:
                t.s.sendall(b"t" * 512)
                sent += 512
                if time.monotonic() - start > 0.4 and time.monotonic() - start < 0.7:
                    assert served()      # others are served meanwhile
                time.sleep(0.2)
        except OSError:
            pass
        assert t.closed_by_peer(timeout=5)
        cut = time.monotonic() - start
        assert sent < 65536 and 0.9 < cut < 4, (sent, cut)

        # A reader taking an 8 MiB read at 4 KiB every 0.2 s (a small receive window) is cut
        # off too: drained at full speed afterwards, the stream ends short of 8 MiB.
        rs = socket.socket()
        rs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rs.settimeout(5)
        rs.connect((host, port))
        t = wire.Raw(rs)
        assert t.authenticate(token, data_plane=True) == wire.D_OK
        t.send(wire.D_READ, struct.pack("<IQQ", seg, 0, 8 << 20))
        got = 0
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            got += len(t.s.recv(4096))
            time.sleep(0.2)
        try:
            while b := t.s.recv(1 << 20):
                got += len(b)
        except OSError:
            pass
        assert got < (8 << 20), got
        t.close()

        # Idle peers are closed after the idle timeout, strangers after the 5 s handshake deadline.
        assert all(p.closed_by_peer(timeout=3) for p in peers[:5])
        for h in half[:5]:
            h.settimeout(7)
            assert h.recv(1) == b""
        for c in peers + [*map(wire.Raw, half)]:
            c.close()
        assert served()
        assert threads() - base <= 3
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_segment_server_survives_random_and_mutated_frames(master, honest):
    import random
    host, port = _segment_endpoint(master, "honest/1")
    token = wire.data_key(wire.read_token(master.port))
    rng = random.Random(99)
    valid = [wire.frame(wire.D_READ, struct.pack("<IQQ", 1, 0, 64)), wire.frame(wire.D_KV_READ, struct.pack("<I", 1) + bytes(16)),
             wire.frame(wire.D_WRITE, struct.pack("<IQQQ", 1, 0, 8, 10**9)) + b"x" * 8, wire.frame(203, bytes(40))]
    end = time.monotonic() + 2.0
    sent = 0
    while time.monotonic() < end:
        r = wire.Raw.tcp(port, host, timeout=2)
        try:
            if rng.random() < 0.5:
                r.authenticate(token, data_plane=True)
            for _ in range(rng.randrange(1, 5)):
                msg = bytearray(rng.choice(valid)) if rng.random() < 0.7 else bytearray(rng.randbytes(rng.randrange(1, 64)))
                for _ in range(rng.randrange(0, 4)):
                    msg[rng.randrange(len(msg))] = rng.randrange(256)
                r.s.sendall(bytes(msg))
                sent += 1
        except OSError:
            pass
        finally:
            r.close()
    assert sent > 50
    # The server still serves: a reader on another "host" goes through it over TCP.
    env = {**os.environ, "KVSTORE_HOST_ID": "another-host"}
    code = f"import kvstore; s = kvstore.Store.connect({master.url!r}, segment_size=0); print(len(s.get('honest/1'))); s.close()"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == str(4096 + 1), p.stderr


def test_segment_server_refuses_bytes_past_a_writes_deadline(master, honest):
    """A write frame says how long its write has left (the writer's deadline). Bytes that arrive
    after it are refused, never stored; a forged huge figure is capped, not overflowed."""
    host, port, seg, token = _segment_of(master, "honest/2")
    d = wire.Raw.tcp(port, host)
    assert d.authenticate(token, data_plane=True) == wire.D_OK
    # 1 ns left: refused even though the bytes came with the frame (the honest objects stay)
    d.send(wire.D_WRITE, struct.pack("<IQQQ", seg, 0, 4096, 1))
    d.s.sendall(b"\xee" * 4096)                     # the bytes follow the frame raw
    kind, body = d.read()
    assert kind == wire.D_ERROR and "deadline" in wire.error_message(body)
    assert d.closed_by_peer()
    # 2^64-1 ns left: capped at a day; the write (past every honest object) is served
    d = wire.Raw.tcp(port, host)
    assert d.authenticate(token, data_plane=True) == wire.D_OK
    d.send(wire.D_WRITE, struct.pack("<IQQQ", seg, (32 << 20) - 8, 8, 2**64 - 1))
    d.s.sendall(b"z" * 8)
    kind, body = d.read()
    assert kind == wire.D_OK, wire.error_message(body)
    d.close()


def _host_identity() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/net')}"


ATTACKER = """
import os, struct, sys
sys.path.insert(0, {tests!r})
import wire
r = wire.Raw.local({name!r})
assert r.authenticate(wire.read_token({port})) == 102
# A segment whose "share path" is the victim's file, served at a port where nothing listens.
mount = struct.pack("<Q", 1 << 20) + wire.lp({host!r}.encode()) + wire.lp({path!r}.encode()) + wire.lp(b"127.0.0.1:1") + b"\\0"
# Its capacity must come with a shared-memory file of that size (not a claim, not another file).
kind, body = r.call(wire.MOUNT, mount)
assert kind == wire.ERROR and "descriptor" in wire.error_message(body), kind
with open({path!r}, "rb") as f:
    kind, body = r.call_with_fd(wire.MOUNT, mount, f.fileno())
assert kind == wire.ERROR and "not a shared-memory file" in wire.error_message(body), kind
small = os.memfd_create("small")
os.ftruncate(small, 4096)
kind, body = r.call_with_fd(wire.MOUNT, mount, small)
assert kind == wire.ERROR and "fewer than" in wire.error_message(body), kind
real = os.memfd_create("segment")
os.ftruncate(real, 1 << 20)
kind, body = r.call_with_fd(wire.MOUNT, mount, real)
assert kind == 103, kind
# A layout over the victim's private memory, claiming the victim's pid and host.
d = struct.pack("<I", 2) + struct.pack("<IBQQQ", 0, 0, {address}, 4096, 4096) + wire.lp(b"cpu") \\
    + struct.pack("<IBQQQ", 0, 1, {address} + 4096, 4096, 4096) + wire.lp(b"cpu")
kind, body = r.call(17, wire.lp(b"evil") + d + wire.lp({host!r}.encode()) + struct.pack("<Q", {pid}) + wire.lp(b""))
assert kind == wire.OK, (kind, body)
print("ready", flush=True)
sys.stdin.read()
"""


def test_claimed_paths_pids_and_addresses_are_never_acted_on(master, honest, tmp_path):
    """The confused deputy: what a client claims in a mount or a layout (a file to map, a
    pid and addresses to copy from or into) never makes another client touch its own files
    or private memory."""
    import numpy as np
    victim_file = tmp_path / "victim.bin"
    victim_file.write_bytes(b"F" * (1 << 20))
    secret = np.full(8192, ord("S"), np.uint8)            # private, never published
    cache = np.zeros(8192, np.uint8)
    honest.register_kv_layout("victim", [
        {"layer": 0, "kind": "key", "address": cache.ctypes.data, "length": 4096, "bytes_per_block": 4096},
        {"layer": 0, "kind": "value", "address": cache.ctypes.data + 4096, "length": 4096, "bytes_per_block": 4096}])
    names = wire.local_socket_names(master.proc.pid)
    script = ATTACKER.format(tests=os.path.dirname(wire.__file__), name=names[0], port=master.port, host=_host_identity(),
                             path=str(victim_file), address=secret.ctypes.data, pid=os.getpid())
    attacker = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout.readline().strip() == "ready", attacker.stderr.read()
        # Writes that place a replica in the attacker's segment: the victim's file is never opened.
        for i in range(8):
            try:
                honest.put(f"two/{i}", bytes([i]) * 4096, replicas=2)
            except kvstore.StoreError:
                pass   # the attacker's segment cannot be reached: an error, not a write elsewhere
        assert victim_file.read_bytes() == b"F" * (1 << 20)
        # Pulls and pushes against the layout over the victim's private memory.
        for move in (honest.pull_kv_blocks, honest.push_kv_blocks):
            cache[:] = 7
            try:
                move("evil", [0], [0])
            except kvstore.StoreError:
                pass
            assert (secret == ord("S")).all(), "the victim's private memory was written"
            assert not (cache == ord("S")).any(), "the victim's private memory was copied into its cache"
    finally:
        attacker.stdin.close()
        attacker.wait(timeout=10)
        honest.unregister_kv_layout()


def test_dead_peers_memory_is_freed():
    """A reader drops the mappings of segments whose owners died, so their shared memory
    goes back to the system (it used to stay mapped until the reader closed)."""
    def shm_used() -> int:
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    with Master("--client-ttl", "2") as m:
        reader = kvstore.Store.connect(m.url, segment_size=0)
        base = shm_used()
        holders = []
        code = ("import kvstore, sys; s = kvstore.Store.connect(sys.argv[1], segment_size='64MiB'); "
                "s.put(sys.argv[2], b'h' * 100000); print('ready', flush=True); sys.stdin.read()")
        try:
            for i in range(3):
                p = subprocess.Popen([sys.executable, "-c", code, m.url, f"held/{i}"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
                assert p.stdout.readline().strip() == "ready"
                holders.append(p)
            for i in range(3):
                assert reader.get(f"held/{i}") == b"h" * 100000    # maps each holder's segment
            assert reader.stats()["peers"] == 3, reader.stats()
            assert shm_used() - base >= 3 * (64 << 20)           # reserved up front
            for p in holders:
                p.kill()
                p.wait()
            assert wait_for(lambda: reader.stats()["peers"] == 0, 10), reader.stats()
            assert reader.stats()["peers_pruned"] == 3
            assert wait_for(lambda: shm_used() - base < 16 << 20, 5), (shm_used() - base)
            with pytest.raises(kvstore.ObjectNotFoundError):
                reader.get("held/0")
        finally:
            for p in holders:
                p.kill()
            reader.close()


def test_a_stalled_kv_write_does_not_block_unregistering(master, honest):
    import numpy as np
    cache = np.zeros(2 * 65536, np.uint8)
    honest.register_kv_layout("stalled", [
        {"layer": 0, "kind": "key", "address": cache.ctypes.data, "length": 65536, "bytes_per_block": 4096},
        {"layer": 0, "kind": "value", "address": cache.ctypes.data + 65536, "length": 65536, "bytes_per_block": 4096}])
    host, port = _segment_endpoint(master, "honest/2")
    r = wire.Raw.tcp(port, host)
    assert r.authenticate(wire.data_key(wire.read_token(master.port)), data_plane=True) == wire.D_OK
    # A kvWrite of 64 KiB that sends 100 bytes, then nothing.
    r.send(205, struct.pack("<I", 1) + struct.pack("<QQ", cache.ctypes.data, 65536))
    r.s.sendall(b"w" * 100)
    time.sleep(0.3)
    started = time.monotonic()
    honest.unregister_kv_layout()
    assert time.monotonic() - started < 1.0
    assert r.closed_by_peer(timeout=2)


def test_tenants_see_and_remove_only_their_own_keys(tmp_path):
    files = {}
    for name in ("acme", "beta"):
        f = tmp_path / f"{name}.token"
        f.write_text(f"{name}-token-of-some-length\n")
        f.chmod(0o600)
        files[name] = f
    with Master("--tenant", f"acme:{files['acme']}", "--tenant", f"beta:{files['beta']}") as m:
        host = m.url.removeprefix("kvstore://")
        admin = kvstore.Store.connect(m.url, segment_size="16MiB")
        acme = kvstore.Store.connect(f"kvstore://acme@{host}", segment_size="8MiB", token="acme-token-of-some-length")
        beta = kvstore.Store.connect(f"kvstore://beta@{host}", segment_size=0, token="beta-token-of-some-length")
        try:
            with pytest.raises(kvstore.InvalidArgumentError, match="tenant 'acme'"):
                kvstore.Store.connect(f"kvstore://acme@{host}", segment_size=0, token="beta-token-of-some-length")
            before = admin.stats()
            for url in (f"kvstore://nobody@{host}", f"kvstore://@{host}", f"kvstore://a/b@{host}", f"kvstore://sp ace@{host}",
                        f"kvstore://{'t' * 65}@{host}"):
                with pytest.raises(kvstore.InvalidArgumentError):
                    kvstore.Store.connect(url, segment_size="1MiB", token="beta-token-of-some-length")
            after = admin.stats()
            assert (after["capacity"], after["objects"]) == (before["capacity"], before["objects"])
            acme.put("k", b"acme's")
            beta.put("k", b"beta's")            # same name, another object
            beta.put("b-only", b"b" * 10000)   # lives in a segment of another member
            assert acme.get("k") == b"acme's" and beta.get("k") == b"beta's"
            assert not acme.exists("b-only") and acme.keys() == ["k"]
            assert beta.keys() == ["b-only", "k"]
            assert sorted(admin.keys()) == ["acme/k", "beta/b-only", "beta/k"]
            assert not acme.exists("beta/k")                       # no way out of the namespace
            # The batch calls stay inside too: one request for many keys names only the tenant's.
            assert acme.batch_exists(["k", "b-only", "beta/k"]) == [True, False, False]
            assert acme.get_batch(["k", "b-only"]) == [b"acme's", None]
            outcome = acme.batch_remove(["b-only", "beta/k"], force=True)
            assert all(isinstance(e, kvstore.ObjectNotFoundError) for e in outcome)
            assert beta.get("b-only") == b"b" * 10000
            assert beta.remove_all(force=True) == 2                 # only beta's
            assert acme.get("k") == b"acme's" and admin.keys() == ["acme/k"]
            assert admin.remove_all(force=True) == 1                # the cluster's token reaches everything
        finally:
            for s in (beta, acme, admin):
                s.close()


def test_a_local_client_flooding_descriptors_cannot_exhaust_the_masters(master, honest):
    """A descriptor rides along only with a mount: the master keeps at most one per
    connection (a newer one closes the older), none after its first requests, and none once
    the connection ends."""
    names = wire.local_socket_names(master.proc.pid)
    r = wire.Raw.local(names[0])
    assert r.authenticate(wire.read_token(master.port)) == 102

    def master_fds() -> int:
        return len(os.listdir(f"/proc/{master.proc.pid}/fd"))

    before = master_fds()
    f = os.memfd_create("flood")
    for _ in range(200):                        # heartbeats, each with the descriptor attached
        kind, _ = r.call_with_fd(wire.HEARTBEAT, b"", f)
        assert kind == wire.OK
    assert master_fds() - before <= 1
    r.close()
    os.close(f)
    assert wait_for(lambda: master_fds() <= before, 5)
