"""``python -m kvstore demo``: an LLM-serving-shaped workload on the embedded store.

Prefill: for each simulated request and layer, the K and V tensors of every KV block are
written as one object per block, gathered from two buffers with ``batch_put_from`` (no
concatenation). Decode: requests are read back in another order with ``batch_get_into``,
scattering each object into separate K and V cache pages, and every byte is compared with
what prefill wrote.

With ``--disk DIR`` the store gets a disk tier in DIR and a segment of a quarter of the data:
most blocks are evicted from DRAM during prefill, copied to disk first, and decode reads them
back from there (every byte still compared). Prefill waits for the disk copier after each
layer, as an engine's prefill compute (far slower than its puts) would let it.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ._sizes import parse_size
from ._store import Store


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.tty = sys.stderr.isatty()
        self.next_mark = 0

    def step(self, n: int = 1) -> None:
        self.done += n
        pct = 100 * self.done // self.total
        if self.tty:
            print(f"\r  {self.label}: {self.done}/{self.total} ({pct}%)", end="", file=sys.stderr, flush=True)
        elif pct >= self.next_mark:
            print(f"  {self.label}: {self.done}/{self.total} ({pct}%)", file=sys.stderr, flush=True)
            self.next_mark = pct + 25

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _kv(seed: int, req: int, layer: int, blocks: int, half: int) -> np.ndarray:
    """The K and V bytes of one request's layer: shape (blocks, 2, half), deterministic."""
    rng = np.random.default_rng((seed, req, layer))
    return rng.integers(0, 256, size=(blocks, 2, half), dtype=np.uint8)


def run_demo(args: argparse.Namespace) -> int:
    for name in ("requests", "layers", "blocks", "block_tokens", "kv_heads", "head_dim"):
        if getattr(args, name) <= 0:
            print(f"--{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    half = args.block_tokens * args.kv_heads * args.head_dim * 2  # bf16 K (or V) bytes per block
    n_objects = args.requests * args.layers * args.blocks
    total = n_objects * 2 * half
    disk = getattr(args, "disk", None)
    default_segment = int(total * 1.25) + (1 << 20) if not disk else total // 4 + (1 << 20)
    segment = parse_size(args.segment_size, name="segment_size") if args.segment_size else default_segment
    tier: dict[str, object] = {}
    if disk:
        tier = {"disk_path": disk, "disk_size": parse_size(args.disk_size, name="disk_size") if args.disk_size else 4 * total + (64 << 20),
                "disk_admission": "all", "lease_ttl": 0}

    print(f"kvstore demo: embedded store, segment {_fmt_bytes(segment)}"
          + (f", disk tier in {disk} ({_fmt_bytes(int(tier['disk_size']))}, admission 'all')" if disk else ""))
    print(f"model: {args.layers} layers; KV block = {args.block_tokens} tokens x {args.kv_heads} heads x "
          f"{args.head_dim} dim x bf16 = {_fmt_bytes(half)} each for K and V")
    print(f"workload: {args.requests} requests x {args.blocks} blocks -> {n_objects} objects, {_fmt_bytes(total)}")

    errors = 0
    t = time.perf_counter()
    with Store(segment, prefault=True, **tier) as store:  # type: ignore[arg-type]
        print(f"store ready in {time.perf_counter() - t:.3f} s (segment memory committed up front)")
        # Prefill: one object per (request, layer, block), gathered from the K and V buffers.
        progress = _Progress("prefill", args.requests)
        put_time = 0.0
        for req in range(args.requests):
            for layer in range(args.layers):
                kv = _kv(args.seed, req, layer, args.blocks, half)
                keys = [f"req-{req:05d}/layer-{layer:03d}/block-{b:04d}" for b in range(args.blocks)]
                parts = [[kv[b, 0], kv[b, 1]] for b in range(args.blocks)]
                t = time.perf_counter()
                results = store.batch_put_from(keys, parts)
                put_time += time.perf_counter() - t
                for key, r in zip(keys, results):
                    if r is not None:
                        errors += 1
                        print(f"  put {key} failed: {r!r}", file=sys.stderr)
                if disk:
                    store.wait_for_disk_copies()
            progress.step()
        progress.finish()
        stats = store.stats()
        print(f"prefill: {n_objects} objects, {_fmt_bytes(total)} in {put_time:.3f} s "
              f"({total / put_time / 1e9:.2f} GB/s); bytes copied {stats['bytes_copied']}, staged {stats['bytes_staged']}")

        # Decode: requests arrive in another order; each layer's blocks are read straight into
        # separate K and V cache pages and compared with what prefill wrote.
        order = np.random.default_rng(args.seed + 1).permutation(args.requests)
        k_cache = np.empty((args.blocks, half), dtype=np.uint8)
        v_cache = np.empty((args.blocks, half), dtype=np.uint8)
        progress = _Progress("decode", args.requests)
        get_time = 0.0
        for req in order:
            for layer in range(args.layers):
                keys = [f"req-{req:05d}/layer-{layer:03d}/block-{b:04d}" for b in range(args.blocks)]
                targets = [[k_cache[b], v_cache[b]] for b in range(args.blocks)]
                t = time.perf_counter()
                results = store.batch_get_into(keys, targets)
                get_time += time.perf_counter() - t
                for key, r in zip(keys, results):
                    if not isinstance(r, int) or r != 2 * half:
                        errors += 1
                        print(f"  get {key} failed: {r!r}", file=sys.stderr)
                want = _kv(args.seed, int(req), layer, args.blocks, half)
                bad = int(np.count_nonzero(want[:, 0] != k_cache) + np.count_nonzero(want[:, 1] != v_cache))
                if bad:
                    errors += 1
                    print(f"  request {req} layer {layer}: {bad} bytes differ", file=sys.stderr)
            progress.step()
        progress.finish()
        print(f"decode: {n_objects} objects, {_fmt_bytes(total)} read and verified in {get_time:.3f} s "
              f"({total / get_time / 1e9:.2f} GB/s)")
        stats = store.stats()
        if disk:
            print(f"disk tier: {stats['disk_offloads']} objects copied to disk ({_fmt_bytes(stats['disk_offloaded_bytes'])}), "
                  f"{stats['disk_hits']} read back from disk, {stats['evicted_objects']} evicted from DRAM, "
                  f"{stats['disk_objects']} on disk now")
    print(f"summary: objects={stats['objects']} bytes={stats['object_bytes']} "
          f"prefill={total / put_time / 1e9:.2f} GB/s decode={total / get_time / 1e9:.2f} GB/s "
          f"staged={stats['bytes_staged']} errors={errors}")
    return 0 if errors == 0 else 1
