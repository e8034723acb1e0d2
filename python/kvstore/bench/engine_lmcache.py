"""One LMCache run for ``bench --against mooncake --engines``, executed by the engines'
interpreter (CPU torch and LMCache 0.5.6, see python/tests/engines/requirements.txt):

    python engine_lmcache.py {kvstore|mooncake} MASTER_ADDRESS SAVE_CHUNK_META(0|1) CHUNKS REPEAT

LMCache's own ``mooncakestore://`` connector (its adapter, ``MooncakestoreConnector``, its CPU
allocator) moves ``CHUNKS`` KV chunks of 4 MiB (8 layers, K and V, 256 tokens, 4 heads of 128,
bf16) with ``batched_put`` and reads them back with ``batched_get``, ``REPEAT`` times (each
round with fresh keys). With "kvstore" the connector's ``mooncake.store`` is kvstore.mooncake;
with "mooncake", Mooncake Store itself. Prints one JSON line: median put and get GB/s, and
whether every byte came back."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

backend, master, save_meta, chunks, repeat = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
if backend == "kvstore":
    from kvstore.mooncake import install_as_mooncake

    install_as_mooncake()

import torch  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import ConnectorContext  # noqa: E402
from lmcache.v1.storage_backend.connector.mooncakestore_adapter import MooncakestoreConnectorAdapter  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

CHUNK = 256
config = LMCacheEngineConfig.from_defaults(
    chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=(2 * chunks * 4 + 64) / 1024,
    remote_url=f"mooncakestore://{master}/",
    extra_config={"local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE",
                  "global_segment_size": str(max(1 << 30, 3 * chunks * (4 << 20))), "local_buffer_size": str(512 << 20),
                  # Mooncake's dict setup reads "master_server_addr" (LMCache forwards mooncake_-prefixed keys)
                  "protocol": "tcp", "mooncake_master_server_addr": master, "save_chunk_meta": save_meta,
                  "transfer_timeout": 60})
metadata = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=torch.bfloat16, kv_shape=(8, 2, CHUNK, 4, 128), chunk_size=CHUNK)
backend_cpu = LocalCPUBackend(config, metadata)
loop = asyncio.new_event_loop()
connector = MooncakestoreConnectorAdapter().create_connector(
    ConnectorContext(url=config.remote_url, loop=loop, local_cpu_backend=backend_cpu, config=config, metadata=metadata))
objs = []
for _ in range(chunks):
    o = backend_cpu.allocate(connector.meta_shapes, connector.meta_dtypes, connector.meta_fmt)
    o.raw_tensor.view(torch.uint8).copy_(torch.randint(0, 256, (o.get_size(),), dtype=torch.uint8))
    objs.append(o)
size = objs[0].get_size()
puts, gets, exact = [], [], True
for r in range(repeat + 1):   # the first round warms up and is not counted
    keys = [CacheEngineKey("bench", 1, 0, (r << 20) + i, torch.bfloat16) for i in range(chunks)]
    t = time.perf_counter()
    loop.run_until_complete(connector.batched_put(keys, objs))
    put_s = time.perf_counter() - t
    t = time.perf_counter()
    got = loop.run_until_complete(connector.batched_get(keys))
    get_s = time.perf_counter() - t
    exact = exact and all(g is not None and torch.equal(g.raw_tensor.view(torch.uint8), o.raw_tensor.view(torch.uint8))
                          for g, o in zip(got, objs))
    for g in got:
        if g is not None:
            g.ref_count_down()
    if r:
        puts.append(put_s)
        gets.append(get_s)
gb = chunks * size / 1e9
print(json.dumps({"backend": backend, "save_chunk_meta": save_meta, "chunk_bytes": size, "chunks": chunks,
                  "put_gbps": gb / statistics.median(puts), "get_gbps": gb / statistics.median(gets), "exact": exact}),
      flush=True)
for o in objs:
    o.ref_count_down()
loop.run_until_complete(connector.close())
