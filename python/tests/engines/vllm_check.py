"""vLLM 0.33.0's own MooncakeStoreWorker against kvstore.mooncake, run by the vLLM interpreter
(.venv-vllm: CPU torch, vLLM with --no-deps plus the pinned import chain of
requirements-vllm.txt):

    python vllm_check.py MASTER_ADDRESS ENABLE_OFFLOAD(0|1)

The worker is built as an engine's model runner builds it (`kvstore.bench.engine_vllm`: vLLM's
VllmConfig for a two-layer Llama with 2 KV heads of 64, blocks of 16 tokens, a one-rank gloo
group, 10 blocks of CPU KV cache per layer) with its save and load threads. It saves blocks 1-4
of a prefill (block 0 is vLLM's null block), looks the prefix up by its block hashes, and loads
the hit into blocks 5-8; every loaded block is compared byte for byte with the one saved.
Prints one JSON line."""

from __future__ import annotations

import hashlib
import json
import sys
import time

from kvstore.bench.engine_vllm import BLOCK, build_worker, requests
from kvstore.mooncake import install_as_mooncake

master, offload = sys.argv[1], sys.argv[2] == "1"
install_as_mooncake()
import torch  # noqa: E402

worker, caches, page = build_worker(master, offload=offload, layers=2, kv_heads=2, head_size=64, dtype="float32",
                                    blocks=10)
store_type = type(worker.store).__module__
calls: set[str] = set()
for name in ("batch_is_exist", "batch_put_from_multi_buffers", "batch_get_into_multi_buffers", "batch_get_replica_desc"):
    def counted(fn, name=name):
        def call(*args, **kwargs):
            calls.add(name)
            return fn(*args, **kwargs)
        return call
    setattr(worker.store, name, counted(getattr(worker.store, name)))
generator = torch.Generator().manual_seed(7)
for c in caches.values():
    c[1:5] = torch.randint(0, 256, (4, page), dtype=torch.uint8, generator=generator)
tokens = 4 * BLOCK
hashes = [hashlib.sha256(bytes([i])).digest() for i in range(4)]

save, _ = requests(tokens, hashes, [1, 2, 3, 4], [5, 6, 7, 8], 0, 1)
worker.wait_for_save(save)
deadline = time.monotonic() + 60
hit = 0
while time.monotonic() < deadline:
    hit = worker.lookup(tokens, hashes).hit_length
    if hit >= tokens - BLOCK:   # a full hit is cut below the request's end (its last token is recomputed)
        break
    time.sleep(0.02)

_, load = requests(tokens, hashes, [1, 2, 3, 4], [5, 6, 7, 8], hit, 2)
if hit:
    worker.start_load_kv(load)
finished: set[str] = set()
while hit and time.monotonic() < deadline and "decode-2" not in finished:
    finished |= worker.get_finished(set(), load)[1]
    time.sleep(0.01)
loaded = hit // BLOCK
equal = [bool(torch.equal(c[5 + b], c[1 + b])) for c in caches.values() for b in range(loaded)]
untouched = all(not c[5 + loaded:9].any() for c in caches.values())
result = {"store": store_type, "offload": offload, "hit_tokens": hit, "tokens": tokens, "finished": "decode-2" in finished,
          "load_errors": sorted(worker.get_block_ids_with_load_errors()), "equal": equal,
          "untouched_beyond_hit": untouched, "calls": sorted(calls)}
worker.close()
print(json.dumps(result), flush=True)
