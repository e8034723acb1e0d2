"""``python -m kvstore bench --ops cluster``: the multi-process data paths (issue 5).

A master server process (``python -m kvstore master`` on a free loopback port) and a holder
process that mounts a prefaulted segment; this process joins as a pure client
(``segment_size=0``), so every object it writes or reads lives in the holder's segment:

- shm: same host identity, so the holder's segment is mapped here and each transfer is one
  memcpy. ``put_from``/``get_into`` of ``--cluster-size`` objects (default 16 MiB) and
  ``batch_put_from``/``batch_get_into`` of ``--batch`` (256 x 64 KiB), each timed alternately
  with ``numpy.copyto`` of the same bytes (ratio = store / copyto, median of pairs).
- tcp: a second holder with another host identity (``KVSTORE_HOST_ID``), so this client
  reaches it over TCP on loopback. ``put_from``/``get_into`` of the same objects, against
  ``iperf3`` (one stream, loopback, 3 s) measured in the same run (ratio = store / iperf3).
- auth: a new client, from ``Store.connect`` to its first successful 4 KiB put (the token
  handshake, the move to the local socket, receiving and mapping the holder's segment), in
  connects/s (the time is 1 / that); clients one at a time, 0.1 s apart.
- ops: 4 KiB ``put`` and ``get`` through the network master (one round trip each), in ops/s,
  single thread, over the master's local socket as a client on its host uses it; ops_tcp: the
  same from a client kept on loopback TCP (``KVSTORE_MASTER_LOCAL=0``). The ratio column
  compares with 18,000 ops/s, the top of the 10-18k ops/s Mooncake Store reaches on these
  machines (Mooncake itself is not run here).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._store import Store
from .common import _close_all, _fmt_size, _gather, _holder, _paired, _Process, _put_all, _same, _scatter

MOONCAKE_OPS_PER_S = 18_000


def _iperf3_gbps() -> float | None:
    """Loopback TCP throughput of one iperf3 stream, in GB/s; None without iperf3."""
    if not shutil.which("iperf3"):
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port), "-B", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "3", "-J"], capture_output=True, text=True)
            if r.returncode == 0:
                end = json.loads(r.stdout).get("end", {})
                if "sum_received" in end:
                    return end["sum_received"]["bits_per_second"] / 8 / 1e9
            time.sleep(0.1)
        return None
    finally:
        server.kill()
        server.wait()


CASES = ("shm", "tcp", "ops")


THREADS = 4


def _threaded(threads: int, keys: list[str], op: Callable[[str], Any]) -> None:
    """Runs ``op`` over ``keys`` split between ``threads`` Python threads of this process."""
    import threading
    workers = [threading.Thread(target=lambda part=keys[i::threads]: [op(k) for k in part]) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


class _busy_core:
    """A child process spinning on one core for the ``with`` block."""

    def __enter__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)   # let it take its core

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def run_cluster(size: int, budget: int, batch_count: int, batch_size: int, repeat: int, small_ops: int,
                record: Callable[[dict[str, Any]], None], cases: tuple[str, ...] = CASES) -> int:
    n = max(2, budget // size)
    holder_bytes = 3 * max(n * size, batch_count * batch_size) + (64 << 20)
    master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "-1"],
                      r"listening on 127\.0\.0\.1:(\d+)")
    url = f"kvstore://127.0.0.1:{master.match.group(1)}"
    procs = [master]
    stores: list[Store] = []
    try:
        shm_holder = _holder(url, holder_bytes, prefault=True)
        procs.append(shm_holder)
        client = Store.connect(url, segment_size=0)
        stores.append(client)

        header = f"{'path':<8}{'operation':<16}{'size':>10}{'count':>7}{'ops/s':>12}{'GB/s':>8}{'baseline GB/s':>15}{'ratio':>7}"
        print(f"\nkvstore bench cluster: master + holder processes, this process a pure client; {repeat} pairs; medians")
        print(header)
        print("-" * len(header))

        def report(path: str, op: str, sz: int, count: int, t: float, base_gbps: float | None, ratio: float | None,
                   baseline: str) -> None:
            row = {"op": f"cluster_{path}_{op}", "size": sz, "count": count, "seconds": t, "ops_per_s": count / t,
                   "gb_per_s": sz * count / t / 1e9, "baseline": baseline, "baseline_gb_per_s": base_gbps, "ratio": ratio}
            record(row)
            bs = f"{base_gbps:.2f}" if base_gbps is not None else "-"
            rs = f"{ratio:.2f}" if ratio is not None else "-"
            print(f"{path:<8}{op:<16}{_fmt_size(sz):>10}{count:>7}{count / t:>12,.0f}{row['gb_per_s']:>8.2f}{bs:>15}{rs:>7}", flush=True)

        src = np.full(size, 7, dtype=np.uint8)
        dst = np.zeros(size, dtype=np.uint8)
        pool = np.ones((n, size), dtype=np.uint8)
        rows = list(pool)
        keys = [f"c-{i}" for i in range(n)]

        def scatter() -> None:
            _scatter(rows, src)

        def gather() -> None:
            _gather(rows, dst)

        def puts() -> None:
            for k in keys:
                client.put_from(k, src)

        def gets() -> None:
            for k in keys:
                client.get_into(k, dst)

        def clear() -> None:
            client.remove_all(force=True)

        def gets_verified() -> bool:
            dst.fill(0)
            gets()
            return _same("cluster get_into", dst, src)

        def timed(fn: Callable[[], None], setup: Callable[[], None] = lambda: None) -> float:
            """Median of ``repeat`` timed runs after a warm-up; ``setup`` runs untimed before each."""
            setup()
            fn()
            times = []
            for _ in range(repeat):
                setup()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        if "shm" in cases:
            # shm: one memcpy into the holder's mapped segment. The first write maps it; its page
            # tables fill in the background (about 0.3 s per GiB here), as they would long before
            # an engine's steady traffic: wait for that, untimed (`auth` times the first write).
            client.put_from("map-the-holder", src)
            client.remove("map-the-holder", force=True)
            time.sleep(1.0 + holder_bytes / (1 << 30))
            t, bt, ratio = _paired(puts, clear, scatter, repeat)
            report("shm", "put_from", size, n, t, size * n / bt / 1e9, ratio, "copyto")
            t, bt, ratio = _paired(gets, lambda: None, gather, repeat)
            if not gets_verified():
                return 1
            report("shm", "get_into", size, n, t, size * n / bt / 1e9, ratio, "copyto")
            clear()

            bsrc = np.full((batch_count, batch_size), 3, dtype=np.uint8)
            bdst = np.zeros((batch_count, batch_size), dtype=np.uint8)
            bkeys = [f"b-{i}" for i in range(batch_count)]
            srows, drows = list(bsrc), list(bdst)
            whole = np.empty_like(bsrc)
            t, bt, ratio = _paired(lambda: _put_all(client, bkeys, srows), clear,
                                   lambda: np.copyto(whole, bsrc), repeat * 5)
            report("shm", "batch_put_from", batch_size, batch_count, t, bsrc.nbytes / bt / 1e9, ratio, "copyto")
            t, bt, ratio = _paired(lambda: client.batch_get_into(bkeys, drows), lambda: None,
                                   lambda: np.copyto(whole, bsrc), repeat * 5)
            if not _same("cluster batch_get_into", bdst, bsrc):
                return 1
            report("shm", "batch_get_into", batch_size, batch_count, t, bsrc.nbytes / bt / 1e9, ratio, "copyto")
            clear()

        if "tcp" in cases:
            # tcp: the second holder has another host identity
            tcp_holder = _holder(url, holder_bytes, prefault=True, env={"KVSTORE_HOST_ID": "bench-remote-host"})
            procs.append(tcp_holder)
            shm_holder.stop()   # its segment leaves: every write now goes to the remote one
            procs.remove(shm_holder)
            iperf = _iperf3_gbps()

            net0 = client.stats()["network_bytes"]
            t = timed(puts, clear)
            report("tcp", "put_from", size, n, t, iperf, (size * n / t / 1e9) / iperf if iperf else None, "iperf3")
            t = timed(gets)
            if not gets_verified():
                return 1
            if client.stats()["network_bytes"] == net0:
                print("cluster tcp case did not use TCP", file=sys.stderr)
                return 1
            report("tcp", "get_into", size, n, t, iperf, (size * n / t / 1e9) / iperf if iperf else None, "iperf3")
            if iperf is None:
                print("(iperf3 is not installed: no TCP baseline; ./dev.sh setup installs it)")
            clear()
            tcp_holder.stop()
            procs.remove(tcp_holder)

        if shm_holder in procs:   # the tcp case was skipped
            shm_holder.stop()
            procs.remove(shm_holder)
        if "ops" not in cases:
            return 0
        # ops: 4 KiB through the master (a local holder again, so the data path is one memcpy)
        ops_holder = _holder(url, 256 << 20, prefault=True)
        procs.append(ops_holder)
        small = bytes(4096)
        m = max(100, min(20_000, small_ops))
        # A client on the master's host uses its local socket; one with KVSTORE_MASTER_LOCAL=0
        # shows the same operations over loopback TCP.
        os.environ["KVSTORE_MASTER_LOCAL"] = "0"
        try:
            tcp_client = Store.connect(url, segment_size=0)
        finally:
            del os.environ["KVSTORE_MASTER_LOCAL"]
        stores.append(tcp_client)
        if client.stats()["master_local"] != 1 or tcp_client.stats()["master_local"] != 0:
            print("cluster ops: the clients' control connections are not local and TCP as meant", file=sys.stderr)
            return 1
        # auth: connect to first put, one new client at a time
        times = []
        for i in range(max(5, repeat * 3)):
            t0 = time.perf_counter()
            c = Store.connect(url, segment_size=0)
            c.put(f"auth-{i}", small)
            times.append(time.perf_counter() - t0)
            c.close()
            time.sleep(0.1)   # untimed: the last client's background work (page tables) ends
        t = statistics.median(times)
        report("auth", "connect+put", 4096, 1, t, None, None, "-")
        for path, c in (("ops", client), ("ops_tcp", tcp_client)):
            skeys = [f"{path}-{i}" for i in range(m)]
            put, get = c.put, c.get

            def small_puts() -> None:
                for k in skeys:
                    put(k, small)

            def small_gets() -> None:
                for k in skeys:
                    get(k)

            t = timed(small_puts, clear)
            report(path, "put", 4096, m, t, None, (m / t) / MOONCAKE_OPS_PER_S, "mooncake 18k/s")
            t = timed(small_gets)
            report(path, "get", 4096, m, t, None, (m / t) / MOONCAKE_OPS_PER_S, "mooncake 18k/s")
            # Many Python threads on one client: each waits on the master without the GIL.
            t = timed(lambda: _threaded(THREADS, skeys, get))
            report(path, f"get {THREADS} threads", 4096, m, t, None, None, "-")
            # Another process keeps one core busy (an inference host's cores rarely idle).
            with _busy_core():
                t = timed(small_puts, clear)
                report(path, "put, core busy", 4096, m, t, None, None, "-")
                t = timed(small_gets)
                report(path, "get, core busy", 4096, m, t, None, None, "-")
            # batch_exists of 10,000 keys, half present: keys per second.
            bkeys = [f"{path}-b{i}" for i in range(10_000)]
            c.put_batch(bkeys[::2], [b"x"] * 5_000)
            t = timed(lambda: c.batch_exists(bkeys))
            report(path, "batch_exists", 0, len(bkeys), t, None, None, "-")
            c.batch_remove(bkeys, force=True)
        print("ratios: shm = store / numpy.copyto; tcp = store / iperf3 (one stream, same run); "
              f"ops = ops/s / {MOONCAKE_OPS_PER_S:,} (Mooncake Store's best on these machines)")
        return 0
    finally:
        _close_all(stores, procs)

