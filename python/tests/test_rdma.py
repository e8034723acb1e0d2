"""RDMA discovery and the TCP fallback, as far as a machine without an RDMA device allows.

libibverbs is loaded at run time: ``import kvstore`` works without it, ``kvstore.rdma()`` says
what was found and why RDMA is or is not used, and connected stores fall back to TCP. The
queue-pair and one-sided READ/WRITE data path needs a device and is not exercised here.
"""

import json
import os
import subprocess
import sys

import pytest

import kvstore
from kvstore import _native


def _rdma_in_subprocess(**env) -> dict:
    code = "import json, kvstore; print(json.dumps(kvstore.rdma()))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_discovery_matches_the_machine():
    r = kvstore.rdma()
    assert set(r) == {"library", "in_use", "reason", "devices"}
    sys_devices = sorted(os.listdir("/sys/class/infiniband")) if os.path.isdir("/sys/class/infiniband") else []
    assert sorted(d["name"] for d in r["devices"]) == sys_devices
    for d in r["devices"]:
        assert set(d) == {"name", "port", "active", "link_layer", "mtu"}
        assert d["link_layer"] in ("infiniband", "ethernet", "unknown")
    if not r["in_use"]:
        assert r["reason"], "discovery says why RDMA is not used"
    if not sys_devices:
        assert not r["in_use"]


def test_a_missing_library_means_no_rdma_and_import_still_works():
    r = _rdma_in_subprocess(KVSTORE_IBVERBS_LIBRARY="/nonexistent/libibverbs.so.1")
    assert r["library"] is False and r["in_use"] is False and r["devices"] == []
    assert "/nonexistent/libibverbs.so.1" in r["reason"]


def test_rdma_can_be_turned_off():
    r = _rdma_in_subprocess(KVSTORE_RDMA="0")
    assert r["library"] is False and r["in_use"] is False
    assert "KVSTORE_RDMA" in r["reason"]


def test_embedded_store_reports_no_rdma_use():
    with kvstore.Store(1 << 20) as s:
        st = s.stats()
        assert st["rdma_bytes"] == 0 and st["rdma_devices"] == 0


def test_rdma_takes_no_arguments():
    with pytest.raises(TypeError):
        kvstore.rdma(1)
    with pytest.raises(TypeError):
        _native.rdma_info("x")
    assert kvstore.rdma() == kvstore.rdma()   # discovery is once per process: same answer
