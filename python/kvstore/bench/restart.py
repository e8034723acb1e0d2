"""``bench --ops restart``: how long a restarted master takes to have every object back. Four
holder processes each own a segment; this process writes N objects into them (spread by the
master, one replica each), then the master is killed (SIGKILL) and started again on its port.
Timed: from the new master's first log line (it accepts connections) to the moment a fresh
client finds every object (``batch_exists`` over all keys, polled every 5 ms). Every value is then read back and compared."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from .._store import Store
from .common import _close_all, _fill, _holders, _Process


def _master(port: int) -> _Process:
    return _Process([sys.executable, "-m", "kvstore", "master", "--port", str(port), "--metrics-port", "-1", "--lease-ttl", "1"],
                    r"listening on 127\.0\.0\.1:(\d+)")


def run_restart(count: int, size: int, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    print(f"\nkvstore bench restart: {count:,} objects of {size} B in 4 holders; master killed and restarted; {repeat} runs; medians")
    seconds: list[float] = []
    for run in range(repeat):
        procs: list[_Process] = []
        stores: list[Store] = []
        try:
            master = _master(0)
            procs.append(master)
            port = int(master.match.group(1))
            url = f"kvstore://127.0.0.1:{port}"
            segment = (count * ((size + 63) // 64 * 64) // 4) * 2 + (64 << 20)
            procs += _holders(url, 4, segment)
            writer = Store.connect(url, segment_size=0)
            stores.append(writer)
            keys = [f"r{run}-{i}" for i in range(count)]
            values = [os.urandom(size) for _ in range(64)]
            if not _fill(writer, keys, values, "restart"):
                return 1
            time.sleep(0.5)   # the holders have read their notices
            master.proc.kill()
            master.proc.wait()
            procs.remove(master)
            master = _master(port)
            procs.append(master)
            t0 = time.perf_counter()   # the new master accepts connections
            reader = Store.connect(url, segment_size=0)
            stores.append(reader)
            while True:
                found = sum(reader.batch_exists(keys))
                if found == count:
                    break
                if time.perf_counter() - t0 > 60:
                    print(f"restart: only {found:,} of {count:,} objects came back", file=sys.stderr)
                    return 1
                time.sleep(0.005)
            t = time.perf_counter() - t0
            seconds.append(t)
            for i in range(0, count, max(1, count // 500)):
                if reader.get(keys[i]) != values[i % 64]:
                    print(f"restart: {keys[i]} came back with other bytes", file=sys.stderr)
                    return 1
            print(f"  run {run + 1}: every object readable {t * 1000:.0f} ms after the new master started", flush=True)
        finally:
            _close_all(stores, procs)
    med = statistics.median(seconds)
    record({"op": "restart_all_readable", "count": count, "size": size, "seconds": med})
    print(f"restart: median {med * 1000:.0f} ms from the new master's start to all {count:,} objects readable")
    return 0
