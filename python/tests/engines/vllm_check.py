"""vLLM 0.33.0's own MooncakeStoreWorker against kvstore.mooncake, run by the vLLM interpreter
(.venv-vllm: CPU torch, vLLM with --no-deps plus the pinned import chain of
requirements-vllm.txt):

    python vllm_check.py MASTER_ADDRESS ENABLE_OFFLOAD(0|1)

A tiny Llama config (2 layers, 2 KV heads of 64, blocks of 16 tokens, 10 blocks of CPU KV cache
per layer) builds vLLM's own VllmConfig, a one-rank gloo process group and the worker with its
save and load threads. The worker saves blocks 1-4 of a prefill (block 0 is vLLM's null block),
looks the prefix up by its block hashes, and loads the hit into blocks 5-8; every loaded block
is compared byte for byte with the one saved. Prints one JSON line."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time

master, offload = sys.argv[1], sys.argv[2] == "1"
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")   # a CUDA build of vLLM on CPU torch

from kvstore.mooncake import install_as_mooncake  # noqa: E402

install_as_mooncake()

import torch  # noqa: E402

if not torch.cuda.is_available():
    class _HostEvent:
        """wait_for_save records a CUDA event to order the save after the step's kernels; CPU
        torch has none, and host KV written by Python needs no ordering."""

        def record(self, *args: object) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def query(self) -> bool:
            return True

    torch.cuda.Event = _HostEvent  # type: ignore[misc,assignment]

tmp = tempfile.mkdtemp()
model = os.path.join(tmp, "model")
os.mkdir(model)
with open(os.path.join(model, "config.json"), "w") as f:
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
               "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "vocab_size": 1000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
               "head_dim": 64}, f)
config = os.path.join(tmp, "mooncake.json")
with open(config, "w") as f:
    json.dump({"metadata_server": "P2PHANDSHAKE", "master_server_address": master, "protocol": "tcp",
               "device_name": "", "global_segment_size": 64 << 20, "local_buffer_size": 64 << 20,
               "enable_offload": offload}, f)
os.environ["MOONCAKE_CONFIG_PATH"] = config

from vllm.config import (  # noqa: E402
    CacheConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)

BLOCK, BLOCKS = 16, 10
cache_config = CacheConfig(block_size=BLOCK)
cache_config.num_gpu_blocks = BLOCKS
vllm_config = VllmConfig(
    model_config=ModelConfig(model=model, skip_tokenizer_init=True, dtype="float32"),
    cache_config=cache_config, parallel_config=ParallelConfig(),
    kv_transfer_config=KVTransferConfig(kv_connector="MooncakeStoreConnector", kv_role="kv_both",
                                        kv_connector_extra_config={}))
layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
page = spec.page_size_bytes
kv_cache_config = KVCacheConfig(
    num_blocks=BLOCKS,
    kv_cache_tensors=[KVCacheTensor(size=page * BLOCKS, layers=[name], layer_stride=0, block_stride=page)
                      for name in layers],
    kv_cache_groups=[KVCacheGroupSpec(layer_names=layers, kv_cache_spec=spec)])

with set_current_vllm_config(vllm_config):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"file://{os.path.join(tmp, 'rendezvous')}")
    ensure_model_parallel_initialized(1, 1)
    from vllm.distributed.kv_transfer.kv_connector.v1.mooncake.store.data import (
        LoadSpec,
        MooncakeStoreConnectorMetadata,
        ReqMeta,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.mooncake.store.worker import MooncakeStoreWorker

    worker = MooncakeStoreWorker(vllm_config, kv_cache_config)
    store_type = type(worker.store).__module__
    calls: set[str] = set()
    for name in ("batch_is_exist", "batch_put_from_multi_buffers", "batch_get_into_multi_buffers",
                 "batch_get_replica_desc"):
        def counted(fn, name=name):
            def call(*args, **kwargs):
                calls.add(name)
                return fn(*args, **kwargs)
            return call
        setattr(worker.store, name, counted(getattr(worker.store, name)))

    caches = {name: torch.zeros((BLOCKS, page), dtype=torch.uint8) for name in layers}
    worker.register_kv_caches(caches)
    generator = torch.Generator().manual_seed(7)
    for name in layers:
        caches[name][1:5] = torch.randint(0, 256, (4, page), dtype=torch.uint8, generator=generator)
    tokens = 4 * BLOCK
    hashes = [hashlib.sha256(bytes([i])).digest() for i in range(4)]

    save = MooncakeStoreConnectorMetadata({"prefill"}, set())
    save.add_request(ReqMeta(req_id="prefill", token_len_chunk=tokens, block_ids=([1, 2, 3, 4],),
                             block_hashes=hashes, can_save=True, store_job_id=1, token_ids=list(range(tokens)),
                             num_prompt_tokens=tokens, prefill_end_tokens=tokens))
    worker.wait_for_save(save)
    deadline = time.monotonic() + 60
    hit = 0
    while time.monotonic() < deadline:
        hit = worker.lookup(tokens, hashes).hit_length
        if hit >= tokens - BLOCK:   # a full hit is cut below the request's end (its last token is recomputed)
            break
        time.sleep(0.02)

    load = MooncakeStoreConnectorMetadata({"decode"}, set())
    load.add_request(ReqMeta(req_id="decode", token_len_chunk=tokens, block_ids=([5, 6, 7, 8],), block_hashes=hashes,
                             load_spec=LoadSpec(vllm_cached_tokens=0, kvpool_cached_tokens=hit, can_load=True),
                             token_ids=list(range(tokens)), num_prompt_tokens=tokens, prefill_end_tokens=tokens))
    if hit:
        worker.start_load_kv(load)
    finished: set[str] = set()
    while hit and time.monotonic() < deadline and "decode" not in finished:
        finished |= worker.get_finished(set(), load)[1]
        time.sleep(0.01)
    loaded = hit // BLOCK
    equal = [bool(torch.equal(caches[name][5 + b], caches[name][1 + b])) for name in layers for b in range(loaded)]
    untouched = all(not caches[name][5 + loaded:9].any() for name in layers)
    result = {"store": store_type, "offload": offload, "hit_tokens": hit, "tokens": tokens, "finished": "decode" in finished,
              "load_errors": sorted(worker.get_block_ids_with_load_errors()), "equal": equal,
              "untouched_beyond_hit": untouched, "calls": sorted(calls)}
    worker.close()
print(json.dumps(result), flush=True)
