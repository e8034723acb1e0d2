"""``python -m kvstore bench --ops kv``: prefill→decode block pulls (issue 6).

A master, and a "prefill" layout of ``--kv-shape`` (LAYERS x BLOCKS x BLOCK_SIZE, KEY and
VALUE per layer; default 32 x 1024 x 16 KiB, 1 GiB) published by a peer; this process
publishes a "decode" layout of the same shape and pulls ``--kv-pull`` blocks (default 512) of
every layer and kind:

- scattered: random source and destination ids (no runs to coalesce), timed with the
  per-block executor and the aggregated one alternately; ratio = per-block time /
  aggregated time.
- contiguous: consecutive ids on both sides (one run per buffer), timed alternately with
  ``numpy.copyto`` of the same bytes between this process's own buffers; ratio = store /
  copyto.

Routes: ``local`` (the prefill layout held by a second client in this process: memcpy),
``shm`` (a peer process on this host: process_vm_readv), ``tcp`` (a peer process with another
host identity: its segment server over loopback). Every pulled byte is checked.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._store import Store
from .common import _close_all, _Process

_PEER = ("import sys, numpy as np, kvstore\n"
         "from kvstore.bench.kv import _arrays, _descriptors\n"
         "url, layers, blocks, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])\n"
         "s = kvstore.Store.connect(url, segment_size=0)\n"
         "a = _arrays(layers, blocks, size, True)\n"
         "s.register_kv_layout('bench-prefill', _descriptors(a, size))\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"
         "s.close()\n")


def _arrays(layers: int, blocks: int, size: int, fill: bool) -> list[np.ndarray]:
    """(blocks, size) uint8 per (layer, kind); filled: block b of buffer i is all `_mark(i, b)`."""
    out = []
    for i in range(2 * layers):
        a = np.empty((blocks, size), dtype=np.uint8)
        if fill:
            a[:] = _mark(i, np.arange(blocks))[:, None]
        else:
            a.fill(0)
        out.append(a)
    return out


def _mark(i: int, blocks: Any) -> Any:
    return (i * 31 + blocks * 7 + 1) % 251


def _descriptors(arrays: list[np.ndarray], size: int) -> list[dict[str, Any]]:
    return [{"layer": i // 2, "kind": ("key", "value")[i % 2], "address": a.ctypes.data, "length": a.nbytes,
             "bytes_per_block": size} for i, a in enumerate(arrays)]


def _check(mine: list[np.ndarray], src: np.ndarray, dst: np.ndarray) -> bool:
    for i, a in enumerate(mine):
        if not (a[dst] == _mark(i, src)[:, None]).all():
            print(f"kv bench: buffer {i} holds wrong bytes after a pull", file=sys.stderr)
            return False
    return True


def _alternate(a: Callable[[], None], b: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Median times of `a` and `b`, run alternately after one warm-up each."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        ta.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    return statistics.median(ta), statistics.median(tb)


def run_kv(layers: int, blocks: int, size: int, pull: int, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    if not 0 < pull <= blocks // 2:
        print("kv bench: --kv-pull must be from 1 to half the blocks", file=sys.stderr)
        return 2
    master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "-1"],
                      r"listening on 127\.0\.0\.1:(\d+)")
    url = f"kvstore://127.0.0.1:{master.match.group(1)}"
    procs = [master]
    stores: list[Store] = []
    moved = 2 * layers * pull * size
    print(f"\nkvstore bench kv: {layers} layers x 2 kinds x {blocks} blocks x {size} B, pulling {pull} blocks "
          f"({moved / 2**20:.0f} MiB); {repeat} alternating pairs; medians")
    header = f"{'route':<7}{'blocks':<12}{'executor':<12}{'transfers':>10}{'GB/s':>8}{'baseline':>22}{'GB/s':>8}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    try:
        me = Store.connect(url, segment_size=0)
        stores.append(me)
        mine = _arrays(layers, blocks, size, False)
        me.register_kv_layout("bench-decode", _descriptors(mine, size))
        rng = np.random.default_rng(0)
        s_rand, d_rand = rng.permutation(blocks)[:pull], rng.permutation(blocks)[:pull]
        s_seq, d_seq = np.arange(pull), np.arange(blocks - pull, blocks)

        def pull_with(src: np.ndarray, dst: np.ndarray, executor: str) -> Callable[[], None]:
            s, d = src.tolist(), dst.tolist()
            return lambda: me.pull_kv_blocks("bench-prefill", s, d, executor=executor)

        def row(route: str, shape: str, executor: str, transfers: int, t: float, base: str, bt: float, ratio: float) -> None:
            print(f"{route:<7}{shape:<12}{executor:<12}{transfers:>10}{moved / t / 1e9:>8.2f}{base:>22}"
                  f"{moved / bt / 1e9:>8.2f}{ratio:>7.2f}",
                  flush=True)
            record({"op": f"kv_{route}_{shape}_{executor}", "size": size, "count": 2 * layers * pull, "seconds": t,
                    "gb_per_s": moved / t / 1e9, "baseline": base, "baseline_gb_per_s": moved / bt / 1e9, "ratio": ratio})

        def copyto() -> None:   # the same bytes between this process's own buffers
            for a in mine:
                np.copyto(a[blocks - pull:], a[:pull])

        for route in ("local", "shm", "tcp"):
            holder: Any
            if route == "local":
                holder = Store.connect(url, segment_size=0)
                stores.append(holder)
                held = _arrays(layers, blocks, size, True)
                holder.register_kv_layout("bench-prefill", _descriptors(held, size))
            else:
                env = {"KVSTORE_HOST_ID": "bench-kv-remote"} if route == "tcp" else None
                holder = _Process([sys.executable, "-c", _PEER, url, str(layers), str(blocks), str(size)], "ready",
                                  env=env, stream="stdout")
                procs.append(holder)
            per_block, aggregated = pull_with(s_rand, d_rand, "per_block"), pull_with(s_rand, d_rand, "aggregated")
            n_per, n_agg = per_block(), aggregated()
            tp, ta = _alternate(per_block, aggregated, repeat)
            if not _check(mine, s_rand, d_rand):
                return 1
            row(route, "scattered", "per_block", n_per, tp, "", tp, 1.0)
            row(route, "scattered", "aggregated", n_agg, ta, "per-block path", tp, tp / ta)
            contiguous = pull_with(s_seq, d_seq, "aggregated")
            n_seq = contiguous()
            ts, tc = _alternate(contiguous, copyto, repeat)
            contiguous()
            if not _check(mine, s_seq, d_seq):
                return 1
            row(route, "contiguous", "aggregated", n_seq, ts, "numpy.copyto", tc, tc / ts)
            if route == "local":
                holder.close()
                stores.remove(holder)
                del held
            else:
                holder.stop()
                procs.remove(holder)
        print("ratios: scattered aggregated = per-block time / aggregated time; contiguous = copyto time / store time")
        return 0
    finally:
        _close_all(stores, procs)
