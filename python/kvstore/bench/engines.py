"""``bench --against mooncake --engines``: engines' own connector code moving KV bytes through
kvstore and through Mooncake Store 0.3.13 in the same run.

Each engine runs in the engines' environment (``KVSTORE_ENGINES_PYTHON``, which
``./dev.sh bench`` sets up: CPU torch, the engines without their CUDA dependencies, and Mooncake
Store 0.3.13), against a kvstore master and a ``mooncake_master`` started here on loopback,
each with one client holding the only segment (the engine's own process). Cases:

- LMCache 0.5.6, ``mooncakestore://``: ``batched_put`` then ``batched_get`` of 32 chunks of
  4 MiB, with its default chunk metadata (``put_parts`` + ``batch_get_buffer``) and without it
  (``batch_put_from`` + ``batch_get_into``), ``--repeat`` rounds after a warm-up, medians.
- vLLM 0.33.0's ``MooncakeStoreWorker`` (``engine_vllm.py``, in vLLM's own environment,
  ``KVSTORE_VLLM_PYTHON``, with Mooncake Store installed there too): 64 blocks of 16 tokens of 8
  layers (8 KV heads of 128, bf16: 64 KiB a block and layer, 32 MiB in all) saved through its
  save thread (``batch_put_from_multi_buffers``) and loaded into other blocks through its load
  thread (``batch_get_into_multi_buffers``), ``--repeat`` rounds after a warm-up, medians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .against import _free_port, _Server, _wait_port

HERE = Path(__file__).resolve().parent


def _cell(value: float | None, result: Any) -> str:
    """A GB/s figure, or why there is none."""
    return f"{value:.2f}" if value is not None else result if isinstance(result, str) else "-"


def _run(python: str, script: str, args: list[str], env: dict[str, str]) -> dict[str, Any] | str:
    r = subprocess.run([python, str(HERE / script), *args], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        return f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _interpreter(variable: str) -> str | None:
    python = os.environ.get(variable, "")
    return python if python and os.access(python, os.X_OK) else None


def run_engines(repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    python, vllm = _interpreter("KVSTORE_ENGINES_PYTHON"), _interpreter("KVSTORE_VLLM_PYTHON")
    print("\nkvstore bench engines: each engine's own connector, kvstore against Mooncake Store in one run; medians")
    if not python and not vllm:
        print("engines: skipped (no engines environment: set KVSTORE_ENGINES_PYTHON / KVSTORE_VLLM_PYTHON, "
              "or run ./dev.sh bench)")
        return 0
    mooncake_master = Path(python or vllm or "").with_name("mooncake_master")
    servers: list[_Server] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kvstore-path"
        path.mkdir()
        (path / "kvstore").symlink_to(HERE.parent)   # this kvstore, nothing else of this environment
        env = {**os.environ, "PYTHONPATH": str(path), "GLOG_minloglevel": "2"}
        try:
            kv_port = _free_port()
            servers.append(_Server([sys.executable, "-m", "kvstore", "master", "--port", str(kv_port), "--metrics-port", "-1"]))
            if not _wait_port(kv_port):
                print("engines: the kvstore master did not start", file=sys.stderr)
                return 1
            mc_port: int | None = None
            if mooncake_master.exists():
                mc_port = _free_port()
                servers.append(_Server([str(mooncake_master), f"--rpc_port={mc_port}", f"--metrics_port={_free_port()}",
                                        "--enable_http_metadata_server=false"], env={"GLOG_minloglevel": "2"}))
                if not _wait_port(mc_port):
                    mc_port = None
            if mc_port is None:
                print("engines: Mooncake Store is not in the engines environment (or its master did not start): kvstore alone")
            print(f"{'engine path':<44}{'kvstore GB/s':>14}{'Mooncake GB/s':>15}{'ratio':>8}")
            cases: list[tuple[str, str, str, list[str]]] = []
            if python:
                cases += [(python, "engine_lmcache.py", label, [meta, "32", str(repeat)])
                          for meta, label in (("1", "LMCache default (chunk metadata)"), ("0", "LMCache save_chunk_meta=false"))]
            if vllm:
                cases.append((vllm, "engine_vllm.py", "vLLM MooncakeStoreWorker", ["64", str(repeat)]))
            for interpreter, script, label, args in cases:
                results: dict[str, Any] = {}
                for backend, port in (("kvstore", kv_port), ("mooncake", mc_port)):
                    if port is None:
                        continue
                    results[backend] = _run(interpreter, script, [backend, f"127.0.0.1:{port}", *args], env)
                for op in ("put", "get"):
                    k, m = results.get("kvstore"), results.get("mooncake")
                    kv = k[f"{op}_gbps"] if isinstance(k, dict) else None
                    mc = m[f"{op}_gbps"] if isinstance(m, dict) else None
                    exact = all(r.get("exact") for r in results.values() if isinstance(r, dict))
                    print(f"{label + ' ' + op:<44}{_cell(kv, k):>14}{_cell(mc, m):>15}"
                          f"{(kv / mc if kv and mc else float('nan')):>8.2f}{'' if exact else '  WRONG BYTES'}", flush=True)
                    engine = script.removeprefix("engine_").removesuffix(".py")
                    record({"op": "engine", "engine": engine, "path": f"{label} {op}", "kvstore_gbps": kv,
                            "mooncake_gbps": mc, "exact": exact})
                    if not exact:
                        return 1
        finally:
            for s in servers:
                s.stop()
    return 0
