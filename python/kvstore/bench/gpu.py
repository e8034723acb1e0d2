"""``python -m kvstore bench --ops gpu``: GPU↔store transfers against torch's pinned copy.

For each size: a store with pinning on and one with pinning off; GPU→store is
``upsert_tensor`` of a CUDA tensor (rewritten in place after the first), store→GPU is
``get_tensor_into`` a CUDA tensor. The baseline in the same pair is torch's own copy between
the CUDA tensor and a pinned CPU tensor of the same size (``copy_`` + synchronize). The ratio
is baseline time / store time: 1.0 means the store reaches torch's pinned bandwidth.

Then KV blocks on the GPU: a layout of 8 layers x 2048 blocks x 16 KiB (key and value) on
cuda:0, 512 blocks of every layer and kind pulled between scattered ids of the same layout
(no runs to coalesce: one copy per block), with the aggregated executor (one
cuMemcpyBatchAsync per group) against the per-block one, alternately; the ratio is per-block
time / aggregated time (issue 21's target: >= 3). Every pulled block is checked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .. import devices
from .._store import Store


def run_gpu(sizes: list[int], repeat: int, report: Callable[..., None]) -> int:
    from .common import _paired

    try:
        import torch
    except ImportError:
        print("gpu: skipped, torch is not installed", file=sys.stderr)
        return 0
    if not torch.cuda.is_available() or not any(d.startswith("cuda") for d in devices()):
        print(f"gpu: skipped, no CUDA device (kvstore.devices() = {devices()})", file=sys.stderr)
        return 0
    for size in sizes:
        n = size // 4
        gpu_src = torch.randn(n, device="cuda:0")
        gpu_dst = torch.empty(n, device="cuda:0")
        pinned = torch.empty(n, pin_memory=True)

        def to_host() -> None:
            pinned.copy_(gpu_src)
            torch.cuda.synchronize()

        def to_gpu() -> None:
            gpu_dst.copy_(pinned)
            torch.cuda.synchronize()

        for pin in (True, False):
            with Store(2 * size + (1 << 22), prefault=True, pin_memory=pin) as store:
                tag = "pinned" if store.stats()["page_locked_bytes"] else "pageable"
                store.upsert_tensor("g", gpu_src)

                def put() -> None:
                    store.upsert_tensor("g", gpu_src)

                def get() -> None:
                    store.get_tensor_into("g", gpu_dst)

                report(f"gpu_put_{tag}", size, 1, _paired(put, lambda: None, to_host, repeat))
                report(f"gpu_get_{tag}", size, 1, _paired(get, lambda: None, to_gpu, repeat))
                if not torch.equal(gpu_dst, gpu_src):
                    print("gpu: store→GPU returned wrong values", file=sys.stderr)
                    return 1
    return _kv_executors(torch, repeat, report)


def _kv_executors(torch: Any, repeat: int, report: Callable[..., None], layers: int = 8, blocks: int = 2048,
                  size: int = 16 << 10, pull: int = 512, device: str = "cuda:0") -> int:
    from .common import _paired

    bufs = [torch.randint(0, 256, (blocks, size), dtype=torch.uint8, device=device) for _ in range(2 * layers)]
    ds = [{"layer": i // 2, "kind": ("key", "value")[i % 2], "address": b.data_ptr(), "length": b.numel(),
           "bytes_per_block": size, "location": device} for i, b in enumerate(bufs)]
    g = torch.Generator().manual_seed(7)
    ids = torch.randperm(blocks, generator=g)
    src, dst = ids[:pull].tolist(), ids[pull:2 * pull].tolist()
    with Store(1 << 26, pin_memory=False) as store:
        store.register_kv_layout("bench-gpu", ds)

        def pull_with(executor: str) -> Callable[[], None]:
            return lambda: store.pull_kv_blocks("bench-gpu", src, dst, executor=executor)

        timing = _paired(pull_with("aggregated"), lambda: None, pull_with("per_block"), repeat)
        for b in bufs:
            if not torch.equal(b[dst], b[src]):
                print("gpu: a KV block pull moved wrong bytes", file=sys.stderr)
                return 1
        report("gpu_kv_aggregated", size, 2 * layers * pull, timing)
    return 0
