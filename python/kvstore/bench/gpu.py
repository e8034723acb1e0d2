"""``python -m kvstore bench --ops gpu``: GPU↔store transfers against torch's pinned copy.

For each size: a store with pinning on and one with pinning off; GPU→store is
``upsert_tensor`` of a CUDA tensor (rewritten in place after the first), store→GPU is
``get_tensor_into`` a CUDA tensor. The baseline in the same pair is torch's own copy between
the CUDA tensor and a pinned CPU tensor of the same size (``copy_`` + synchronize). The ratio
is baseline time / store time: 1.0 means the store reaches torch's pinned bandwidth.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

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
    return 0
