"""Helpers shared by the KV-transfer tests and their peer process."""

from __future__ import annotations

import numpy as np


def layout_arrays(layers: int, blocks: int, bpb: int, seed: int, kinds: int = 2) -> list[np.ndarray]:
    """One (blocks, bpb) uint8 array per (layer, kind), layer-major, random from `seed`."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (blocks, bpb), dtype=np.uint8) for _ in range(layers * kinds)]


def descriptors(arrays: list[np.ndarray], bpb: int, kinds: tuple[str, ...] = ("key", "value")) -> list[dict]:
    return [{"layer": i // len(kinds), "kind": kinds[i % len(kinds)], "address": a.ctypes.data, "length": a.nbytes,
             "bytes_per_block": bpb} for i, a in enumerate(arrays)]
