"""``python -m kvstore bench``: throughput of the embedded store next to numpy.copyto.

Each case is timed ``--repeat`` times after one untimed warm-up and the median is reported.
Every store case has a numpy.copyto baseline that moves the same bytes between the same
number of distinct buffers in the same run, so the ratio (store GB/s / copyto GB/s) is the
fraction of the memcpy limit reached:

- put, put_from: one source buffer copied into ``n`` distinct objects; baseline: copyto of
  one source into ``n`` distinct destination arrays. ``put`` passes a ``bytes`` value (the
  common case); ``put_from`` passes a registered numpy array.
- get_into: ``n`` objects copied into one destination; baseline: ``n`` distinct sources into
  one destination.
- get: like get_into, but each call also allocates the ``bytes`` it returns.
- batch_put_from / batch_get_into: one call moving COUNT objects of SIZE between the store and
  the rows of a 2-D array; baseline: one copyto of the whole array (the memcpy limit for the
  same bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import numpy as np

from ._sizes import parse_size
from ._store import Store

_ALL_OPS = ("put", "get", "put_from", "get_into", "batch")


def _fmt_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _median_time(fn: Callable[[], None], setup: Callable[[], None], repeat: int) -> float:
    setup()
    fn()  # warm-up: faults pages in, fills caches and allocator state
    times = []
    for _ in range(repeat):
        setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _count_for(size: int, budget: int, small_ops: int) -> int:
    return max(2, min(small_ops, budget // size))


def run_bench(args: argparse.Namespace) -> int:
    sizes = [parse_size(s.strip(), name="size") for s in args.sizes.split(",") if s.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in _ALL_OPS]
    if unknown or args.repeat < 1 or any(s <= 0 for s in sizes):
        print(f"bad arguments: ops must be among {', '.join(_ALL_OPS)}; sizes and --repeat positive", file=sys.stderr)
        return 2
    budget = parse_size(args.budget, name="budget")
    batch_count_s, _, batch_size_s = args.batch.partition("x")
    batch_count, batch_size = int(batch_count_s), parse_size(batch_size_s, name="batch size")

    results: list[dict[str, object]] = []
    header = f"{'operation':<16}{'size':>10}{'count':>8}{'ops/s':>14}{'GB/s':>9}{'copyto GB/s':>13}{'ratio':>8}"
    print(f"kvstore bench: median of {args.repeat} after a warm-up; ratio = store / numpy.copyto (same run)")
    print(header)
    print("-" * len(header))

    def report(op: str, size: int, count: int, t: float, base_t: float) -> None:
        moved = size * count
        row = {
            "op": op, "size": size, "count": count, "seconds": t,
            "ops_per_s": count / t, "gb_per_s": moved / t / 1e9,
            "copyto_gb_per_s": moved / base_t / 1e9, "ratio": base_t / t,
        }
        results.append(row)
        ops_s = row["ops_per_s"] if not op.startswith("batch") else 1 / t
        print(f"{op:<16}{_fmt_size(size):>10}{count:>8}{ops_s:>14,.0f}{row['gb_per_s']:>9.2f}"
              f"{row['copyto_gb_per_s']:>13.2f}{row['ratio']:>8.2f}", flush=True)

    for size in sizes:
        single = [o for o in ops if o != "batch"]
        if not single:
            break
        n = _count_for(size, budget, args.small_ops)
        keys = [f"bench-{size}-{i}" for i in range(n)]
        src = np.full(size, 7, dtype=np.uint8)
        src_bytes = src.tobytes()
        dst = np.empty(size, dtype=np.uint8)
        dst.fill(0)
        pool = np.ones((n, size), dtype=np.uint8)  # baseline's n distinct buffers, pages faulted
        rows = list(pool)

        def copy_scatter() -> None:
            for row in rows:
                np.copyto(row, src)

        def copy_gather() -> None:
            for row in rows:
                np.copyto(dst, row)

        base_put = _median_time(copy_scatter, lambda: None, args.repeat)
        base_get = _median_time(copy_gather, lambda: None, args.repeat)
        del rows, pool

        segment = n * ((size + 63) // 64 * 64) + (1 << 20)
        with Store(segment, prefault=True) as store:
            store.register_buffer(src)

            def fill() -> None:
                store.remove_all()
                for k in keys:
                    store.put(k, src)

            for op in single:
                if op in ("put", "put_from"):
                    fn = store.put if op == "put" else store.put_from
                    value: object = src_bytes if op == "put" else src

                    def run_put(fn: Callable[[str, object], None] = fn, value: object = value) -> None:
                        for k in keys:
                            fn(k, value)

                    t = _median_time(run_put, store.remove_all, args.repeat)
                    report(op, size, n, t, base_put)
                elif op == "get":
                    get = store.get

                    def run_get() -> None:
                        for k in keys:
                            get(k)

                    fill()
                    t = _median_time(run_get, lambda: None, args.repeat)
                    report(op, size, n, t, base_get)
                elif op == "get_into":
                    get_into = store.get_into

                    def run_get_into() -> None:
                        for k in keys:
                            get_into(k, dst)

                    fill()
                    t = _median_time(run_get_into, lambda: None, args.repeat)
                    if not np.array_equal(dst, src):
                        print("get_into returned wrong bytes", file=sys.stderr)
                        return 1
                    report(op, size, n, t, base_get)

    if "batch" in ops:
        src2 = np.full((batch_count, batch_size), 3, dtype=np.uint8)
        dst2 = np.zeros((batch_count, batch_size), dtype=np.uint8)
        keys = [f"batch-{i}" for i in range(batch_count)]
        srcs, dsts = list(src2), list(dst2)
        base = _median_time(lambda: np.copyto(dst2, src2), lambda: None, args.repeat)
        segment = batch_count * ((batch_size + 63) // 64 * 64) + (1 << 20)
        with Store(segment, prefault=True) as store:
            def run_batch_put() -> None:
                store.batch_put_from(keys, srcs)

            t = _median_time(run_batch_put, store.remove_all, args.repeat)
            report("batch_put_from", batch_size, batch_count, t, base)

            def run_batch_get() -> None:
                store.batch_get_into(keys, dsts)

            dst2.fill(0)
            t = _median_time(run_batch_get, lambda: None, args.repeat)
            if not np.array_equal(dst2, src2):
                print("batch_get_into returned wrong bytes", file=sys.stderr)
                return 1
            report("batch_get_into", batch_size, batch_count, t, base)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
