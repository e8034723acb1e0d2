"""``python -m kvstore bench --ops evict``: put throughput of a full, evicting store against the
same workload in a half-full one, timed side by side.

Two stores of ``--evict-segment`` bytes (prefaulted) run the same rounds of ``--evict-count``
puts of ``--evict-size`` values under new keys:

- "50% fill": the store holds half its capacity; each round ends (untimed) by removing what it
  wrote, so every round starts at 50% and none evicts.
- "300% fill": three times the capacity has been written before timing starts, so the store
  sits at its high watermark and every round evicts about as much as it writes (reported as
  evictions per put).

Rounds alternate between the stores (after one warm-up round each); throughput columns are
medians, and the ratio is the median of per-pair ratios (300% throughput / 50% throughput).

``--ops evict-cluster`` runs the same rounds in two clusters (a master and one holder process
with a prefaulted segment of ``--evict-segment`` bytes each), this process a pure client of
both: there, space an evicted object frees is handed out again only once the holder
confirmed hearing that it went, and the master's counters of writes that waited for that
(``writes_waited_for_space``) are printed with the figures.
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from .._store import Store
from .common import _close_all, _holder, _Process


def _cluster(segment: int) -> tuple[_Process, _Process, Store, str]:
    """A master (with its metrics endpoint), a holder of ``segment`` bytes, a pure client of
    them, and the metrics port."""
    master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "0"],
                      r"listening on 127\.0\.0\.1:(\d+), metrics on 127\.0\.0\.1:(\d+)")
    url = f"kvstore://127.0.0.1:{master.match.group(1)}"
    holder = _holder(url, segment, prefault=True)
    return master, holder, Store.connect(url, segment_size=0), master.match.group(2)


def _metric(port: str, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"kvstore_{name} "):
                return int(float(line.split()[1]))
    return -1


def run_evict(segment: int, size: int, count: int, repeat: int,
              record: Callable[[dict[str, Any]], None], cluster: bool = False) -> int:
    if size <= 0 or count < 1 or count * size > 0.35 * segment:
        print("bad arguments: --evict-count x --evict-size must be positive and at most 35% of --evict-segment "
              "(the half-full store must not reach its watermark)", file=sys.stderr)
        return 2
    value = bytes(range(256)) * (size // 256) + bytes(size % 256)
    procs: list[_Process] = []
    metrics: list[str] = []
    stores: list[Store] = []
    try:
        if cluster:
            for _ in range(2):
                m, h, store, port = _cluster(segment)
                procs += [m, h]
                stores.append(store)
                metrics.append(port)
        else:
            stores = [Store(segment, prefault=True), Store(segment, prefault=True)]
    except BaseException:
        _close_all(stores, procs)
        raise
    half, full = stores
    try:
        per_segment = segment // size
        for i in range(per_segment // 2):
            half.put(f"base-{i}", value)
        for i in range(3 * per_segment):
            full.put(f"fill-{i}", value)
        fill_half = half.stats()["bytes_used"] / segment
        serial = [0]

        values = [value] * count

        def round_on(store: Store, batch: bool = False) -> float:
            keys = [f"r{serial[0]}-{i}" for i in range(count)]
            serial[0] += 1
            put = store.put
            t0 = time.perf_counter()
            if batch:   # one call: a refused object must not be timed as a fast one
                failed = next((f for f in store.batch_put_from(keys, values) if f is not None), None)
                if failed is not None:
                    raise failed
            else:
                for k in keys:
                    put(k, value)
            t = time.perf_counter() - t0
            if store is half:
                half.batch_remove(keys, force=True)
            return t

        round_on(half)
        round_on(full)
        evicted0 = full.stats()["evicted_objects"]
        half_t, full_t, ratios = [], [], []
        for rep in range(repeat):
            order = (half, full) if rep % 2 == 0 else (full, half)
            times = {id(s): round_on(s) for s in order}
            half_t.append(times[id(half)])
            full_t.append(times[id(full)])
            ratios.append(half_t[-1] / full_t[-1])
        evictions_per_put = (full.stats()["evicted_objects"] - evicted0) / (repeat * count)
        st = full.stats()
        batch_rows: list[tuple[str, list[float], float, float | None]] = []
        if cluster:   # the same rounds as one batch_put_from each (a batch needs room whole)
            bh, bf, br = [], [], []
            evicted1 = full.stats()["evicted_objects"]
            for rep in range(repeat):
                order = (half, full) if rep % 2 == 0 else (full, half)
                times = {id(s): round_on(s, batch=True) for s in order}
                bh.append(times[id(half)])
                bf.append(times[id(full)])
                br.append(bh[-1] / bf[-1])
            batch_epp = (full.stats()["evicted_objects"] - evicted1) / (repeat * count)
            batch_rows = [(f"{fill_half:.0%} batch", bh, 0.0, None), ("300% batch", bf, batch_epp, statistics.median(br))]
        waited = [_metric(port, "writes_waited_for_space") for port in metrics]
    finally:
        _close_all(stores, procs)

    where = "clusters (a master and a holder process each; this process a pure client)" if cluster else "stores"
    print(f"kvstore bench evict{'-cluster' if cluster else ''}: {count} puts of {size} B per round into two "
          f"{segment >> 20} MiB {where}, {repeat} alternating rounds after a warm-up; medians")
    header = f"{'store':<12}{'ops/s':>12}{'GB/s':>8}{'evictions/put':>15}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, times, epp, ratio in ((f"{fill_half:.0%} fill", half_t, 0.0, None),
                                    ("300% fill", full_t, evictions_per_put, statistics.median(ratios)), *batch_rows):
        t = statistics.median(times)
        row = {"op": "put_evict_cluster" if cluster else "put_evict", "fill": name, "size": size, "count": count, "seconds": t,
               "ops_per_s": count / t, "gb_per_s": count * size / t / 1e9, "evictions_per_put": epp,
               "ratio_to_half_fill": ratio}
        record(row)
        r = f"{ratio:>8.2f}" if ratio is not None else f"{'':>8}"
        print(f"{name:<12}{count / t:>12,.0f}{count * size / t / 1e9:>8.2f}{epp:>15.2f}{r}", flush=True)
    print(f"(300% store: {st['objects']} objects, {st['bytes_used'] / segment:.0%} used, "
          f"{st['evicted_objects']} evicted in all)")
    if cluster:
        print(f"(writes the masters held back until a holder confirmed freed space: {waited[0]} at 50% fill, "
              f"{waited[1]} at 300% fill)")
    return 0
