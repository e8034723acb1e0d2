"""The engines' own Mooncake connector code running against kvstore.mooncake (issue 19): each
check script runs with its engine's interpreter (.venv-engines for LMCache, .venv-vllm for vLLM:
CPU torch, the engine installed with --no-deps plus the pinned import chain of
python/tests/engines/requirements*.txt, all set up by `./dev.sh test`), moves real KV bytes
through a kvstore master and compares them.

Skipped, with the reason, only when `./dev.sh test` could not install the engine (the package
registry was unreachable: KVSTORE_ENGINES_SKIP, KVSTORE_VLLM_SKIP) or when it was never installed
(pytest run by hand without `./dev.sh test`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cluster import Master

import kvstore

ROOT = Path(__file__).resolve().parents[2]
ENGINES = Path(__file__).resolve().parent / "engines"


def engine_python(name: str = "ENGINES", venv: str = ".venv-engines") -> str:
    reason = os.environ.get(f"KVSTORE_{name}_SKIP")
    if reason:
        pytest.skip(f"engine connector not installed: {reason}")
    python = os.environ.get(f"KVSTORE_{name}_PYTHON") or str(ROOT / venv / "bin" / "python")
    if not os.access(python, os.X_OK):
        pytest.skip(f"no engine interpreter at {python}: `./dev.sh test` installs it")
    return python


def run_check(script: str, *args: str, tmp_path: Path, python: str | None = None) -> dict:
    """Runs engines/<script> with an engine's interpreter, this kvstore on its path; its JSON."""
    python = python or engine_python()
    path = tmp_path / "kvstore-path"
    path.mkdir()
    (path / "kvstore").symlink_to(Path(kvstore.__file__).parent)   # the kvstore under test, nothing else
    env = {**os.environ, "PYTHONPATH": str(path)}
    r = subprocess.run([python, str(ENGINES / script), *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("save_chunk_meta", ["1", "0"], ids=["default-chunk-meta", "no-chunk-meta"])
def test_lmcache_mooncakestore_connector(tmp_path, save_chunk_meta):
    # LMCache 0.5.6's default (save_chunk_meta) reads with batch_get_buffer; without it,
    # batch_get_into into its own allocator's memory. 7 chunks written, the 8th never.
    with Master() as m:
        out = run_check("lmcache_check.py", f"127.0.0.1:{m.port}", save_chunk_meta, tmp_path=tmp_path)
    assert out["save_chunk_meta"] is (save_chunk_meta == "1")
    assert out["chunk_bytes"] == 4096
    assert out["exists"] == [True] * 7 + [False]
    assert out["prefix_hits"] == 7
    assert out["found"] == [True] * 7 + [False]
    assert out["equal"] == [True] * 7 + [False]     # byte for byte
    assert out["shapes_kept"]


@pytest.mark.parametrize("offload", ["0", "1"], ids=["embedded", "enable-offload"])
def test_vllm_mooncake_store_worker(tmp_path, offload):
    # vLLM 0.33.0's MooncakeStoreWorker with its own save and load threads: blocks 1-4 of a
    # prefill saved, the prefix looked up by its block hashes, the hit loaded into blocks 5-8.
    python = engine_python("VLLM", ".venv-vllm")
    with Master() as m:
        out = run_check("vllm_check.py", f"127.0.0.1:{m.port}", offload, tmp_path=tmp_path, python=python)
    assert out["store"] == "kvstore.mooncake"
    assert out["offload"] is (offload == "1")
    assert out["hit_tokens"] == 48                    # 3 of 4 blocks: a full hit keeps its last token
    assert out["finished"] and out["load_errors"] == []
    assert out["equal"] == [True] * 6                 # 3 blocks x 2 layers, byte for byte
    assert out["untouched_beyond_hit"]
    assert {"batch_is_exist", "batch_put_from_multi_buffers", "batch_get_into_multi_buffers"} <= set(out["calls"])
