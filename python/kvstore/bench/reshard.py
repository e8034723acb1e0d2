"""``bench --ops reshard``: a tensor stored as TP=4 shards read back as TP=2 shards (and whole)
against ``get_into`` of the same bytes from one plain object, in one run.

A 256 MiB float32 tensor (4096 x 16384) is written as four TP shards split along dimension 1
(``kvstore.parallel.put_tensor`` with the full tensor as input: each writer cuts its shard out
while copying). Then, alternately, ``--repeat`` times: the TP=2 shard of rank 1 (128 MiB,
gathered from two stored shards as 8,192 row pieces of 16 KiB) read into a preallocated array,
and ``get_into`` of a plain 128 MiB object into the same array; likewise the full tensor
against a plain 256 MiB object. Medians. Cases: an embedded store, and a connected reader
without a segment reading the shards a writer client holds (shared memory)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import parallel
from .._store import Store
from .common import _Process

ROWS, COLS = 4096, 16384


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _case(name: str, writer: Store, reader: Store, full: np.ndarray, repeat: int,
          record: Callable[[dict[str, Any]], None]) -> int:
    for r in range(4):
        parallel.put_tensor(writer, "bench-w", full, [parallel.Axis("tp", r, 4, 1)], full_input=True)
    half = np.ascontiguousarray(full[:, COLS // 2:])
    writer.put("bench-half", half)
    writer.put("bench-full", full)
    dst_half = np.zeros_like(half)
    dst_full = np.zeros_like(full)
    want = [parallel.Axis("tp", 1, 2, 1)]
    parallel.get_tensor(reader, "bench-w", want, into=dst_half)   # warm-up, and checked
    parallel.get_tensor(reader, "bench-w", into=dst_full)
    if not (np.array_equal(dst_half, half) and np.array_equal(dst_full, full)):
        print("reshard: wrong bytes", file=sys.stderr)
        return 1
    for label, read, plain, dst in (("TP=4 -> TP=2 shard", lambda d: parallel.get_tensor(reader, "bench-w", want, into=d),
                                     "bench-half", dst_half),
                                    ("TP=4 -> full", lambda d: parallel.get_tensor(reader, "bench-w", into=d),
                                     "bench-full", dst_full)):
        ts, base = [], []
        for _ in range(repeat):
            ts.append(_time(lambda: read(dst)))
            base.append(_time(lambda: reader.get_into(plain, dst)))
        gb = dst.nbytes / 1e9
        t, b = statistics.median(ts), statistics.median(base)
        print(f"{name:<10}{label:<22}{dst.nbytes >> 20:>6} MiB{gb / t:>10.2f} GB/s   get_into {gb / b:>6.2f} GB/s"
              f"   ratio {b / t:>5.2f}", flush=True)
        record({"op": "reshard", "case": name, "read": label, "bytes": dst.nbytes, "gb_per_s": gb / t,
                "get_into_gb_per_s": gb / b, "ratio": b / t})
    for k in [f"bench-w_tp_{r}" for r in range(4)] + ["bench-w" + parallel.LAYOUT_SUFFIX, "bench-half", "bench-full"]:
        writer.remove(k, force=True)
    return 0


def run_reshard(repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    print(f"\nkvstore bench reshard: a {ROWS}x{COLS} float32 tensor (256 MiB) stored as TP=4 shards (split on dim 1), "
          f"read as a TP=2 shard and whole, against get_into of the same bytes; {repeat} alternating pairs; medians")
    full = np.random.default_rng(4).standard_normal((ROWS, COLS), dtype=np.float32)
    with Store("1GiB") as s:
        rc = _case("embedded", s, s, full, repeat, record)
        if rc:
            return rc
    master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "-1"],
                      r"listening on 127\.0\.0\.1:(\d+)")
    try:
        url = f"kvstore://127.0.0.1:{master.match.group(1)}"
        with Store.connect(url, segment_size=1 << 30, prefault=True) as writer, Store.connect(url, segment_size=0) as reader:
            return _case("connected", writer, reader, full, repeat, record)
    finally:
        master.stop()
