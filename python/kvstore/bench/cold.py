"""``bench --ops cold``: the first pass into a fresh segment against the same puts once it is warm.

A connected client (a master process on this host) mounts a new segment of ``--cold-segment``
bytes without ``prefault``, as an engine does; the first puts come ``--cold-wait`` seconds later
(an engine connects long before its first request). Timed: ``put_from`` of 16 MiB objects filling
three quarters of the segment (the cold pass), then, after ``remove_all(force=True)``, the same
puts into the same space (warm). Also printed: how long ``connect`` took and how much of the
segment the background thread had mapped by the first put. Medians of ``--repeat`` fresh
clients."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._store import Store
from .common import _Process


def run_cold(segment: int, wait: float, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    size = 16 << 20
    count = max(1, segment * 3 // 4 // size)
    print(f"\nkvstore bench cold: put_from of {count} x 16 MiB into a fresh {segment >> 20} MiB segment {wait:g} s after "
          f"connect, then again warm; {repeat} fresh clients; medians")
    src = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "-1"],
                      r"listening on 127\.0\.0\.1:(\d+)")
    url = f"kvstore://127.0.0.1:{master.match.group(1)}"
    cold, warm, connect, mapped = [], [], [], []
    try:
        for run in range(repeat):
            t = time.perf_counter()
            s = Store.connect(url, segment_size=segment)
            connect.append(time.perf_counter() - t)
            try:
                time.sleep(wait)
                mapped.append(s.stats()["segment_populated_bytes"] / segment)
                keys = [f"cold-{run}-{i}" for i in range(count)]
                t = time.perf_counter()
                for k in keys:
                    s.put_from(k, src)
                cold.append(time.perf_counter() - t)
                s.remove_all(force=True)
                t = time.perf_counter()
                for k in keys:
                    s.put_from(k, src)
                warm.append(time.perf_counter() - t)
                out = np.empty_like(src)
                s.get_into(keys[-1], out)
                if not np.array_equal(out, src):
                    print("cold: wrong bytes read back", file=sys.stderr)
                    return 1
            finally:
                s.close()
    finally:
        master.stop()
    gb = count * size / 1e9
    c, w = gb / statistics.median(cold), gb / statistics.median(warm)
    print(f"connect {statistics.median(connect) * 1000:.0f} ms, {statistics.median(mapped):.0%} of the segment mapped "
          f"in the background by the first put; cold pass {c:.2f} GB/s, warm {w:.2f} GB/s: cold = {c / w:.0%} of warm")
    record({"op": "cold_first_pass", "segment": segment, "wait": wait, "cold_gbps": c, "warm_gbps": w,
            "connect_seconds": statistics.median(connect), "mapped_fraction": statistics.median(mapped)})
    return 0
