"""LMCache's own `mooncakestore://` connector (MooncakestoreConnector) moving real KV chunks
through kvstore: run by test_engines.py with the engines' interpreter (.venv-engines, CPU torch,
LMCache installed without its CUDA dependencies). Prints one JSON line of findings.

    python lmcache_check.py MASTER_ADDRESS save_chunk_meta(0|1)
"""

import asyncio
import json
import sys

import torch

from kvstore.mooncake import install_as_mooncake

install_as_mooncake()   # the connector does `from mooncake.store import MooncakeDistributedStore`

from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import ConnectorContext  # noqa: E402
from lmcache.v1.storage_backend.connector.mooncakestore_adapter import MooncakestoreConnectorAdapter  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

master, save_meta = sys.argv[1], sys.argv[2] == "1"
config = LMCacheEngineConfig.from_defaults(
    chunk_size=16, local_cpu=True, max_local_cpu_size=0.05, remote_url=f"mooncakestore://{master}/",
    extra_config={"local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE",
                  "global_segment_size": str(64 << 20), "local_buffer_size": "0", "protocol": "tcp",
                  "master_server_address": master, "save_chunk_meta": save_meta})
# 2 layers, K and V, 16 tokens a chunk, 4 KV heads of 8 (bf16): 4 KiB a chunk.
metadata = LMCacheMetadata(model_name="kvstore-test", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(2, 2, 16, 4, 8), chunk_size=16)
backend = LocalCPUBackend(config, metadata)
loop = asyncio.new_event_loop()
adapter = MooncakestoreConnectorAdapter()
assert adapter.can_parse(config.remote_url)
connector = adapter.create_connector(ConnectorContext(url=config.remote_url, loop=loop, local_cpu_backend=backend,
                                                      config=config, metadata=metadata))
out = {"save_chunk_meta": connector.save_chunk_meta}

torch.manual_seed(7)
keys, chunks = [], []
for i in range(8):
    chunk = backend.allocate(connector.meta_shapes, connector.meta_dtypes, connector.meta_fmt)
    chunk.raw_tensor.view(torch.uint8).copy_(torch.randint(0, 256, (chunk.get_size(),), dtype=torch.uint8))
    keys.append(CacheEngineKey("kvstore-test", 1, 0, 0x5EED00 + i, torch.bfloat16))
    chunks.append(chunk)
loop.run_until_complete(connector.batched_put(keys[:6], chunks[:6]))
loop.run_until_complete(connector.put(keys[6], chunks[6]))   # one through the single put
out["chunk_bytes"] = chunks[0].get_size()
out["exists"] = [bool(connector.exists_sync(k)) for k in keys]
out["prefix_hits"] = loop.run_until_complete(connector.batched_async_contains("lookup-1", keys))
got = loop.run_until_complete(connector.batched_get(keys))
out["found"] = [g is not None for g in got]
out["equal"] = [g is not None and torch.equal(g.raw_tensor.view(torch.uint8), c.raw_tensor.view(torch.uint8))
                for g, c in zip(got, chunks)]
out["shapes_kept"] = all(g.get_shapes() == c.get_shapes() for g, c in zip(got, chunks) if g is not None)
for g in got:
    if g is not None:
        g.ref_count_down()
for c in chunks:
    c.ref_count_down()
loop.run_until_complete(connector.close())
print(json.dumps(out), flush=True)
