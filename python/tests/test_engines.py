"""The engines' own Mooncake connector code running against kvstore.mooncake (issue 19): each
check script runs with the engines' interpreter (.venv-engines: CPU torch, the engine installed
with --no-deps plus the pinned import chain of python/tests/engines/requirements.txt, all set up
by `./dev.sh test`), moves real KV bytes through a kvstore master and compares them.

Skipped, with the reason, only when `./dev.sh test` could not install the engines (the package
registry was unreachable: KVSTORE_ENGINES_SKIP) or when they were never installed (pytest run
by hand without `./dev.sh test`)."""

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


def engines_python() -> str:
    reason = os.environ.get("KVSTORE_ENGINES_SKIP")
    if reason:
        pytest.skip(f"engine connectors not installed: {reason}")
    python = os.environ.get("KVSTORE_ENGINES_PYTHON") or str(ROOT / ".venv-engines" / "bin" / "python")
    if not os.access(python, os.X_OK):
        pytest.skip(f"no engine interpreter at {python}: `./dev.sh test` installs it")
    return python


def run_check(script: str, *args: str, tmp_path: Path) -> dict:
    """Runs engines/<script> with the engines' interpreter, this kvstore on its path; its JSON."""
    path = tmp_path / "kvstore-path"
    path.mkdir()
    (path / "kvstore").symlink_to(Path(kvstore.__file__).parent)   # the kvstore under test, nothing else
    env = {**os.environ, "PYTHONPATH": str(path)}
    r = subprocess.run([engines_python(), str(ENGINES / script), *args], capture_output=True, text=True, env=env,
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
