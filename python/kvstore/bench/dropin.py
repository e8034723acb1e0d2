"""``bench --ops dropin``: what the Mooncake drop-in (kvstore.mooncake) costs against kvstore's
own API on the same calls, timed alternately in one run.

A master process on this host; two clients in this process, each holding a 1 GiB segment: a
``kvstore.Store`` and a ``MooncakeDistributedStore`` set up against the same master. Cases:
``batch_put_from`` and ``batch_get_into`` of 256 x 4 KiB, ``put_from`` and ``get_into`` of
1 MiB (each put round writes fresh keys into the caller's own segment; both clients read the
same objects, so only the API differs). Medians of
``--repeat`` alternating rounds, per call (a round times 64 reads or 16 puts of each API); the
cost is the drop-in's time over the native one, minus one."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._store import Store
from ..mooncake import MooncakeDistributedStore
from .common import _Process


def _median_pair(repeat: int, inner: int, native: Callable[[int], None], dropin: Callable[[int], None]) -> tuple[float, float]:
    """Medians of ``repeat`` alternating rounds (after one to warm up) of ``inner`` calls each,
    per call: one call of tens of microseconds is too short to time alone. Each API goes
    first in every other round."""
    def timed(call: Callable[[int], None], r: int) -> float:
        t = time.perf_counter()
        for j in range(inner):
            call(r * inner + j)
        return (time.perf_counter() - t) / inner

    a, b = [], []
    for r in range(repeat + 1):   # round 0 warms up
        # Each API goes first in every other round: the second finds caches the first left.
        if r % 2:
            y, x = timed(dropin, r), timed(native, r)
        else:
            x, y = timed(native, r), timed(dropin, r)
        if r:
            a.append(x)
            b.append(y)
    return statistics.median(a), statistics.median(b)


# Calls per timed round: reads repeat the same call; puts write fresh keys each call.
INNER_READS = 64
INNER_PUTS = 16


def run_dropin(repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    print(f"\nkvstore bench dropin: kvstore.mooncake against kvstore's own API, same calls, {repeat} alternating rounds; medians")
    master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "-1"],
                      r"listening on 127\.0\.0\.1:(\d+)")
    try:
        addr = f"127.0.0.1:{master.match.group(1)}"
        native = Store.connect(f"kvstore://{addr}", segment_size=1 << 30, prefault=True)
        mc = MooncakeDistributedStore()
        if mc.setup("localhost", "P2PHANDSHAKE", 1 << 30, 0, "tcp", "", addr) != 0:
            print("dropin: setup failed", file=sys.stderr)
            return 1
        try:
            n, small, big = 256, 4096, 1 << 20
            src = np.random.default_rng(2).integers(0, 256, n * small + big, dtype=np.uint8)
            dst = np.zeros_like(src)
            base, out = src.ctypes.data, dst.ctypes.data
            mc.register_buffer(base, src.nbytes)
            mc.register_buffer(out, dst.nbytes)
            native.register_buffer(src)
            native.register_buffer(dst)
            views = [src[i * small:(i + 1) * small] for i in range(n)]
            outs = [dst[i * small:(i + 1) * small] for i in range(n)]
            ptrs, optrs, sizes = [base + i * small for i in range(n)], [out + i * small for i in range(n)], [small] * n
            bigsrc, bigdst = src[n * small:], dst[n * small:]

            def keys(tag: str, r: int) -> list[str]:
                return [f"{tag}-{r}-{i}" for i in range(n)]

            def clear() -> None:
                native.remove_all(force=True)

            cases = [
                ("batch_put_from 256 x 4 KiB", lambda r: native.batch_put_from(keys("n", r), views),
                 lambda r: mc.batch_put_from(keys("m", r), ptrs, sizes), n * small),
                ("batch_get_into 256 x 4 KiB", lambda r: native.batch_get_into(keys("n", 0), outs),
                 lambda r: mc.batch_get_into(keys("n", 0), optrs, sizes), n * small),
                ("put_from 1 MiB", lambda r: native.put_from(f"nb-{r}", bigsrc),
                 lambda r: mc.put_from(f"mb-{r}", bigsrc.ctypes.data, big), big),
                ("get_into 1 MiB", lambda r: native.get_into("nb-0", bigdst),
                 lambda r: mc.get_into("nb-0", bigdst.ctypes.data, big), big),
            ]
            print(f"{'call':<30}{'kvstore':>12}{'drop-in':>12}{'cost':>9}")
            for name, a, b, nbytes in cases:
                if name.startswith("batch_put") or name.startswith("put_from"):
                    clear()
                    t_native, t_dropin = _median_pair(repeat, INNER_PUTS, a, b)
                    # leave the first call's objects for the reads
                    calls = range(1, (repeat + 1) * INNER_PUTS)
                    native.batch_remove([k for r in calls for k in (keys("n", r) + keys("m", r)
                                         if name.startswith("batch") else [f"nb-{r}", f"mb-{r}"])], force=True)
                else:
                    t_native, t_dropin = _median_pair(repeat, INNER_READS, a, b)
                cost = t_dropin / t_native - 1
                unit = "us" if t_native < 1e-3 else "ms"
                scale = 1e6 if unit == "us" else 1e3
                print(f"{name:<30}{t_native * scale:>9.1f} {unit}{t_dropin * scale:>9.1f} {unit}{cost:>+9.1%}", flush=True)
                record({"op": "dropin", "call": name, "native_seconds": t_native, "dropin_seconds": t_dropin, "cost": cost,
                        "bytes": nbytes})
            if not np.array_equal(dst[:n * small], src[:n * small]) or not np.array_equal(bigdst, bigsrc):
                print("dropin: wrong bytes read back", file=sys.stderr)
                return 1
        finally:
            mc.close()
            native.close()
    finally:
        master.stop()
    return 0
