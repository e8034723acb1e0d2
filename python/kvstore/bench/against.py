"""``python -m kvstore bench --against mooncake,redis``: the same workloads on kvstore and on
each peer that is installed, interleaved in one run, with the memcpy limit.

- kvstore: a master process (``python -m kvstore master``) on loopback; this process joins it
  with a 1 GiB segment (``Store.connect``), the set-up of an engine that offers memory.
- mooncake: Mooncake Store from PyPI (``mooncake-transfer-engine-non-cuda``): its
  ``mooncake_master`` on loopback, this process a client with a 1 GiB segment, protocol tcp,
  metadata P2PHANDSHAKE.
- redis: ``redis-server`` from Debian on a unix socket, no persistence; a minimal RESP client
  (SET / GET / DEL) in this process.

Workloads, every value checked after its gets: 4 KiB puts and gets (ops/s), 1 MiB puts and
gets (GB/s). The memcpy limit does the same memory work: ``numpy.copyto`` of each 1 MiB value
into its own place in a large area (puts), and each 1 MiB copied out into a new ``bytes``
(gets, which return new objects). Each round runs every
system once, in turn; medians over the rounds. Every server is started here and stopped by
process id. With matplotlib installed, ``--chart FILE`` writes a PNG.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._store import Store
from .cluster import THREADS, _busy_core, _threaded

PEERS = ("mooncake", "redis")
# Client processes of the multi-process case (each with THREADS threads).
PROCESSES = (4, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(path_or_port: Any, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if isinstance(path_or_port, int):
                with socket.create_connection(("127.0.0.1", path_or_port), timeout=1):
                    return True
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path_or_port)
                    return True
        except OSError:
            time.sleep(0.05)
    return False


class _Server:
    """A server process, stopped by process id."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class _Redis:
    """SET / GET / DEL over RESP on a unix socket, one request at a time: a lock keeps the
    threaded cases' requests and replies paired (interleaved, they desynchronized the stream:
    wrong bytes, then a read that never ended)."""

    def __init__(self, path: str) -> None:
        import threading
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.lock = threading.Lock()

    def _send(self, *parts: bytes) -> None:
        out = [b"*%d\r\n" % len(parts)]
        for p in parts:
            out.append(b"$%d\r\n" % len(p))
            out.append(p)
            out.append(b"\r\n")
        self.sock.sendall(b"".join(out))

    def _reply(self) -> Any:
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        return rest

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            self._send(b"SET", key.encode(), value)
            self._reply()

    def get(self, key: str) -> bytes | None:
        with self.lock:
            self._send(b"GET", key.encode())
            return self._reply()

    def flush(self) -> None:
        with self.lock:
            self._send(b"FLUSHALL")
            self._reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class _System:
    """One system under comparison, as the workloads use it."""

    name: str
    put: Callable[[str, Any], Any]
    get: Callable[[str], Any]
    clear: Callable[[], Any]
    close: Callable[[], Any]
    exists_batch: Callable[[list[str]], Any] | None = None
    # Python statements that make `get` (a callable of one key) in a worker process, and
    # that close its client.
    client_code: str | None = None
    client_close: str = ""


# A client process of the multi-process case: connects (CLIENT_CODE defines `get`), says
# ready, waits for a line, then reads every key once from THREADS threads and prints the time.
_WORKER = """
import sys, threading, time
keys = [f"s-{i}" for i in range(int(sys.argv[2]))]
threads = int(sys.argv[3])
exec(sys.argv[1])
for k in keys[:10]:
    get(k)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
ws = [threading.Thread(target=lambda part=keys[i::threads]: [get(k) for k in part]) for i in range(threads)]
for w in ws:
    w.start()
for w in ws:
    w.join()
print(time.perf_counter() - t0, flush=True)
sys.stdin.readline()   # then leave cleanly (a client that vanishes may leave its segment behind)
exec(sys.argv[4])
"""


def _processes(s: _System, procs: int, threads: int, keys: list[str]) -> float:
    """Seconds for ``procs`` client processes of ``threads`` threads each to read ``keys``
    ("s-0", "s-1", ...) once each (all start together; the slowest one ends it)."""
    assert s.client_code is not None
    env = {**os.environ, "GLOG_minloglevel": "2"}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, s.client_code, str(len(keys)), str(threads), s.client_close],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
               for _ in range(procs)]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {s.name} client process did not start")
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        t = max(float(w.stdout.readline()) for w in workers)
        for w in workers:
            w.stdin.write("bye\n")
            w.stdin.flush()
        for w in workers:
            w.wait(timeout=30)
        return t
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


def _kvstore(servers: list[_Server]) -> _System:
    port = _free_port()
    servers.append(_Server([sys.executable, "-m", "kvstore", "master", "--port", str(port), "--metrics-port", "-1"]))
    if not _wait_port(port):
        raise RuntimeError("the kvstore master did not start")
    store = Store.connect(f"kvstore://127.0.0.1:{port}", segment_size=1 << 30, prefault=True)
    code = f"import kvstore; c = kvstore.Store.connect('kvstore://127.0.0.1:{port}', segment_size=0); get = c.get"
    return _System("kvstore", store.put, store.get, lambda: store.remove_all(force=True), store.close, store.batch_exists, code,
                   "c.close()")


def _mooncake(servers: list[_Server]) -> _System | str:
    try:
        os.environ.setdefault("GLOG_minloglevel", "2")
        from mooncake.store import MooncakeDistributedStore  # type: ignore[import-not-found]
    except ImportError:
        return "not installed (pip install mooncake-transfer-engine-non-cuda)"
    master = shutil.which("mooncake_master") or str(Path(sys.executable).with_name("mooncake_master"))
    if not Path(master).exists():
        return "mooncake_master not found"
    port = _free_port()
    servers.append(_Server([master, f"--rpc_port={port}", f"--metrics_port={_free_port()}",
                            "--enable_http_metadata_server=false"], env={"GLOG_minloglevel": "2"}))
    if not _wait_port(port):
        return "mooncake_master did not start"
    store = MooncakeDistributedStore()
    rc = store.setup("localhost", "P2PHANDSHAKE", 1 << 30, 128 << 20, "tcp", "", f"127.0.0.1:{port}")
    if rc != 0:
        return f"setup failed ({rc})"

    def put(key: str, value: Any) -> None:
        rc = store.put(key, value)
        if rc != 0:
            raise RuntimeError(f"mooncake put failed ({rc})")
    code = ("from mooncake.store import MooncakeDistributedStore as M; c = M(); "
            f"assert c.setup('localhost', 'P2PHANDSHAKE', 0, 16 << 20, 'tcp', '', '127.0.0.1:{port}') == 0; get = c.get")
    return _System("mooncake", put, store.get, store.remove_all, store.close, store.batch_is_exist, code, "c.close()")


def _redis(servers: list[_Server], tmp: str) -> _System | str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "redis-server not installed (apt-get install redis-server)"
    path = os.path.join(tmp, "redis.sock")
    servers.append(_Server([exe, "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no",
                            "--maxmemory", "2gb", "--daemonize", "no"]))
    if not _wait_port(path):
        return "redis-server did not start"
    client = _Redis(path)

    return _System("redis", client.set, client.get, client.flush, client.close)


def run_against(peers: list[str], repeat: int, small_ops: int, big_count: int,
                record: Callable[[dict[str, Any]], None], chart: str | None) -> int:
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        print(f"--against takes {', '.join(PEERS)}, not {', '.join(unknown)}", file=sys.stderr)
        return 2
    servers: list[_Server] = []
    systems: list[_System] = []
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as tmp:
        try:
            systems.append(_kvstore(servers))
            for p in peers:
                s = _mooncake(servers) if p == "mooncake" else _redis(servers, tmp)
                if isinstance(s, str):
                    print(f"{p}: skipped, {s}")
                else:
                    systems.append(s)
            small = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
            big = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
            huge = np.random.default_rng(3).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
            keys_huge = [f"h-{i}" for i in range(16)]
            n_small = max(100, min(small_ops, 20_000))
            keys_small = [f"s-{i}" for i in range(n_small)]
            keys_big = [f"b-{i}" for i in range(big_count)]
            keys_exists = [f"e-{i}" for i in range(10_000)]
            times: dict[tuple[str, str], list[float]] = {}

            def timed(name: str, case: str, fn: Callable[[], None]) -> None:
                t0 = time.perf_counter()
                fn()
                times.setdefault((name, case), []).append(time.perf_counter() - t0)

            # The memcpy limit does the same memory work as the stores: puts copy each value into
            # its own 1 MiB of a large area; gets copy each 1 MiB out into a new bytes object.
            src = np.frombuffer(big, dtype=np.uint8)
            area = np.zeros((big_count, len(big)), dtype=np.uint8)
            for r in range(repeat + 1):   # round 0 warms up
                for s in systems:
                    s.clear()
                    timed(s.name, "put 4 KiB", lambda: [s.put(k, small) for k in keys_small])
                    timed(s.name, "get 4 KiB", lambda: [s.get(k) for k in keys_small])
                    if any(s.get(k) != small for k in keys_small[:: max(1, n_small // 100)]):
                        print(f"{s.name} returned wrong bytes", file=sys.stderr)
                        return 1
                    s.clear()
                    timed(s.name, "put 1 MiB", lambda: [s.put(k, big) for k in keys_big])
                    timed(s.name, "get 1 MiB", lambda: [s.get(k) for k in keys_big])
                    if s.get(keys_big[-1]) != big:
                        print(f"{s.name} returned wrong bytes", file=sys.stderr)
                        return 1
                    # The read -> forced remove -> put cycle with 16 MiB values (the put after the
                    # previous round's reads and removal; round 0 warms up).
                    s.clear()
                    timed(s.name, "cycle put 16 MiB", lambda: [s.put(k, huge) for k in keys_huge])
                    if any(s.get(k) != huge for k in keys_huge):
                        print(f"{s.name} returned wrong bytes", file=sys.stderr)
                        return 1
                    # Real conditions: threads of one client, another process on a core, batches.
                    s.clear()
                    for k in keys_small:
                        s.put(k, small)
                    timed(s.name, f"get 4 KiB x{THREADS} thr", lambda: _threaded(THREADS, keys_small, s.get))
                    if s.exists_batch is not None:
                        present = keys_exists[::2]
                        for k in present:
                            s.put(k, b"x")
                        timed(s.name, "batch_exists", lambda: s.exists_batch(keys_exists))
                    if s.client_code is not None:
                        for procs in PROCESSES:
                            t = _processes(s, procs, THREADS, keys_small)
                            times.setdefault((s.name, f"get 4 KiB {procs}p x{THREADS}"), []).append(t / procs)
                    s.clear()
                    with _busy_core():
                        timed(s.name, "put 4 KiB busy", lambda: [s.put(k, small) for k in keys_small])
                        timed(s.name, "get 4 KiB busy", lambda: [s.get(k) for k in keys_small])
                timed("memcpy", "put 1 MiB", lambda: [np.copyto(area[i], src) for i in range(big_count)])
                timed("memcpy", "get 1 MiB", lambda: [area[i].tobytes() for i in range(big_count)])
                if r == 0:
                    times.clear()
            names = [s.name for s in systems] + ["memcpy"]
            print(f"\nkvstore bench --against: {repeat} interleaved rounds, medians; one client on loopback "
                  f"(x{THREADS} thr: {THREADS} Python threads; busy: another process spins on a core; batch_exists: keys/s of 10,000; "
                  f"Np: N more client processes of {THREADS} threads, all reading the keys at once, aggregate ops/s)")
            header = f"{'case':<18}" + "".join(f"{n:>16}" for n in names)
            print(header)
            print("-" * len(header))
            rows = []
            for case, count, unit in (("put 4 KiB", n_small, "ops"), ("get 4 KiB", n_small, "ops"),
                                      ("put 1 MiB", big_count, "GB"), ("get 1 MiB", big_count, "GB"),
                                      ("cycle put 16 MiB", len(keys_huge), "GB16"),
                                      (f"get 4 KiB x{THREADS} thr", n_small, "ops"), ("batch_exists", len(keys_exists), "ops"),
                                      ("put 4 KiB busy", n_small, "ops"), ("get 4 KiB busy", n_small, "ops"),
                                      *((f"get 4 KiB {p}p x{THREADS}", n_small, "ops") for p in PROCESSES)):
                cells = []
                for n in names:
                    if (n, case) not in times:
                        cells.append(f"{'-':>16}")
                        continue
                    t = statistics.median(times[(n, case)])
                    value = count / t if unit == "ops" else count * (len(huge) if unit == "GB16" else len(big)) / t / 1e9
                    cells.append(f"{value:>12,.0f} op/s" if unit == "ops" else f"{value:>11.2f} GB/s")
                    record({"op": f"against_{n}_{case.replace(' ', '_')}", "system": n, "case": case,
                            "seconds": t, "value": value, "unit": "ops/s" if unit == "ops" else "GB/s"})
                    rows.append((case, n, value))
                print(f"{case:<18}" + "".join(cells))
            if chart:
                _chart(rows, chart)
            return 0
        finally:
            for s in systems:
                s.close()
            for srv in reversed(servers):
                srv.stop()


def _chart(rows: list[tuple[str, str, float]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no chart written)")
        return
    cases = list(dict.fromkeys(c for c, _, _ in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.5))
    for ax, case in zip(axes, cases):
        pts = [(n, v) for c, n, v in rows if c == case]
        ax.bar([n for n, _ in pts], [v for _, v in pts])
        ax.set_title(case)
        ax.set_ylabel("ops/s" if "4 KiB" in case else "GB/s")
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart written to {path}")
