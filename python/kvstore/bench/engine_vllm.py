"""vLLM 0.33.0's own ``MooncakeStoreWorker`` outside an engine, for ``bench --against mooncake
--engines`` and for ``python/tests/engines/vllm_check.py``. Runs in vLLM's environment
(``.venv-vllm``: CPU torch, vLLM with ``--no-deps`` and its pinned import chain):

    python engine_vllm.py {kvstore|mooncake} MASTER_ADDRESS BLOCKS REPEAT

``build_worker`` makes the worker the way an engine's model runner does: vLLM's ``VllmConfig``
(a Llama ``config.json`` of the given shape, blocks of 16 tokens), a one-rank gloo process
group, a ``KVCacheConfig`` with one full-attention group, CPU KV caches registered with
``register_kv_caches``. The benchmark then saves ``BLOCKS`` blocks of every layer through the
worker's save thread (``wait_for_save``) and loads them into other blocks through its load
thread (``start_load_kv``), each timed until the thread has handled the request, ``REPEAT``
rounds with fresh block hashes after a warm-up; medians and whether every byte came back, as
one JSON line. With "kvstore" the worker's ``mooncake.store`` is kvstore.mooncake; with
"mooncake", Mooncake Store itself."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

BLOCK = 16   # tokens per block
_CONFIG_SCOPES: list[Any] = []


def build_worker(master: str, *, offload: bool, layers: int, kv_heads: int, head_size: int, dtype: str,
                 blocks: int) -> tuple[Any, dict[str, Any], int]:
    """The worker, its KV caches by layer name (uint8, ``blocks`` x page bytes; block 0 is
    vLLM's null block, never stored) and the page size."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")   # a CUDA build of vLLM on CPU torch
    import torch

    if not torch.cuda.is_available():
        class _HostEvent:
            """``wait_for_save`` records a CUDA event to order the save after the step's
            kernels; CPU torch has none, and host KV written by Python needs no ordering."""

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
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": kv_heads * head_size * 2,
                   "intermediate_size": 512, "num_attention_heads": kv_heads * 2, "num_key_value_heads": kv_heads,
                   "num_hidden_layers": layers, "vocab_size": 1000, "max_position_embeddings": 4096,
                   "rms_norm_eps": 1e-6, "torch_dtype": dtype, "head_dim": head_size}, f)
    config = os.path.join(tmp, "mooncake.json")
    with open(config, "w") as f:
        json.dump({"metadata_server": "P2PHANDSHAKE", "master_server_address": master, "protocol": "tcp",
                   "device_name": "", "global_segment_size": max(64 << 20, 4 * blocks * layers * 2 * BLOCK * kv_heads * head_size * 4),
                   "local_buffer_size": 64 << 20, "enable_offload": offload}, f)
    os.environ["MOONCAKE_CONFIG_PATH"] = config

    from vllm.config import (
        CacheConfig,
        KVTransferConfig,
        ModelConfig,
        ParallelConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    cache_config = CacheConfig(block_size=BLOCK)
    cache_config.num_gpu_blocks = blocks
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=model, skip_tokenizer_init=True, dtype=dtype),
        cache_config=cache_config, parallel_config=ParallelConfig(),
        kv_transfer_config=KVTransferConfig(kv_connector="MooncakeStoreConnector", kv_role="kv_both",
                                            kv_connector_extra_config={}))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=kv_heads, head_size=head_size, dtype=getattr(torch, dtype))
    page = spec.page_size_bytes
    kv_cache_config = KVCacheConfig(
        num_blocks=blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * blocks, layers=[n], layer_stride=0, block_stride=page) for n in names],
        kv_cache_groups=[KVCacheGroupSpec(layer_names=names, kv_cache_spec=spec)])
    # vLLM's current config for the worker's whole life, as in an engine (kept referenced: a
    # dropped context manager would restore the previous config when collected).
    _CONFIG_SCOPES.append(set_current_vllm_config(vllm_config))
    _CONFIG_SCOPES[-1].__enter__()
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"file://{os.path.join(tmp, 'rendezvous')}")
    ensure_model_parallel_initialized(1, 1)
    from vllm.distributed.kv_transfer.kv_connector.v1.mooncake.store.worker import MooncakeStoreWorker

    worker = MooncakeStoreWorker(vllm_config, kv_cache_config)
    caches = {n: torch.zeros((blocks, page), dtype=torch.uint8) for n in names}
    worker.register_kv_caches(caches)
    return worker, caches, page


def requests(tokens: int, hashes: list[bytes], save_blocks: list[int], load_blocks: list[int], hit: int,
             job: int) -> tuple[Any, Any]:
    """The scheduler's metadata for one request saved from ``save_blocks`` and one loading
    ``hit`` tokens of the same prefix into ``load_blocks``."""
    from vllm.distributed.kv_transfer.kv_connector.v1.mooncake.store.data import (
        LoadSpec,
        MooncakeStoreConnectorMetadata,
        ReqMeta,
    )

    ids = list(range(tokens))
    save = MooncakeStoreConnectorMetadata({f"prefill-{job}"}, set())
    save.add_request(ReqMeta(req_id=f"prefill-{job}", token_len_chunk=tokens, block_ids=(save_blocks,),
                             block_hashes=hashes, can_save=True, store_job_id=job, token_ids=ids,
                             num_prompt_tokens=tokens, prefill_end_tokens=tokens))
    load = MooncakeStoreConnectorMetadata({f"decode-{job}"}, set())
    load.add_request(ReqMeta(req_id=f"decode-{job}", token_len_chunk=tokens, block_ids=(load_blocks,),
                             block_hashes=hashes, token_ids=ids, num_prompt_tokens=tokens, prefill_end_tokens=tokens,
                             load_spec=LoadSpec(vllm_cached_tokens=0, kvpool_cached_tokens=hit, can_load=True)))
    return save, load


def main() -> None:
    backend, master, n, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if backend == "kvstore":
        from kvstore.mooncake import install_as_mooncake

        install_as_mooncake()
    import torch

    worker, caches, page = build_worker(master, offload=False, layers=8, kv_heads=8, head_size=128, dtype="bfloat16",
                                        blocks=2 * n + 1)
    generator = torch.Generator().manual_seed(3)
    for c in caches.values():
        c[1:n + 1] = torch.randint(0, 256, (n, page), dtype=torch.uint8, generator=generator)
    save_blocks, load_blocks = list(range(1, n + 1)), list(range(n + 1, 2 * n + 1))
    saves, loads, exact = [], [], True
    for r in range(repeat + 1):   # the first round warms up and is not counted
        hashes = [hashlib.sha256(f"{r}-{i}".encode()).digest() for i in range(n)]
        save, load = requests(n * BLOCK, hashes, save_blocks, load_blocks, n * BLOCK, r + 1)
        for c in caches.values():
            c[n + 1:].zero_()
        t = time.perf_counter()
        worker.wait_for_save(save)
        worker.kv_send_thread.request_queue.join()   # the save thread handled the request
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        worker.start_load_kv(load)
        worker.recv_request_queue.join()             # a load thread handled it
        loads.append(time.perf_counter() - t)
        exact = exact and all(torch.equal(c[n + 1:], c[1:n + 1]) for c in caches.values())
    nbytes = n * len(caches) * page
    print(json.dumps({"backend": backend, "blocks": n, "bytes": nbytes, "put_gbps": nbytes / statistics.median(saves[1:]) / 1e9,
                      "get_gbps": nbytes / statistics.median(loads[1:]) / 1e9, "exact": exact,
                      "load_errors": sorted(worker.get_block_ids_with_load_errors())}), flush=True)
    worker.close()


if __name__ == "__main__":
    main()
