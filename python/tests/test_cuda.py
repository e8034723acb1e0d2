"""CUDA tensors through the store. Marked `cuda`; skipped unless torch is installed and
kvstore's registry finds a CUDA device (the GPU machine: see README, "What was exercised")."""

import os
import subprocess
import sys

import numpy as np
import pytest

import kvstore

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or "cuda:0" not in kvstore.devices(),
                       reason="needs a CUDA device"),
]


def test_registry_sees_every_gpu():
    assert [d for d in kvstore.devices() if d.startswith("cuda")] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
                         + [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d])
def test_put_cuda_tensor_and_get_into_cuda_tensor(store, dtype):
    src = torch.randint(0, 100, (64, 33), device="cuda:0").to(dtype)
    store.put_tensor("t", src)
    assert store.stats()["bytes_staged"] == 0
    dst = torch.empty_like(src)
    assert store.get_tensor_into("t", dst) is dst
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))
    back = store.get_tensor("t", like=src)
    assert back.device == src.device and back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), src.view(torch.uint8))
    host = store.get_tensor("t")   # numpy by default
    assert host.shape == (64, 33)


def test_batch_mixing_cpu_and_cuda_tensors(store):
    tensors = [torch.arange(1000, dtype=torch.int32, device="cuda:0" if i % 2 else "cpu") + i for i in range(8)]
    assert store.batch_put_tensor([f"k{i}" for i in range(8)], tensors) == [None] * 8
    out = store.batch_get_tensor([f"k{i}" for i in range(8)], device="cuda:0")
    for i, t in enumerate(out):
        assert t.device.type == "cuda" and torch.equal(t.cpu(), tensors[i].cpu())


def test_registered_cuda_buffer_is_found_by_address(store):
    buf = torch.zeros(1 << 16, dtype=torch.uint8, device="cuda:0")
    store.register_buffer(buf)  # location captured: cuda:0
    with pytest.raises(kvstore.InvalidArgumentError):
        store.register_buffer(torch.zeros(16, device="cuda:0"), location="cpu")
    store.put_tensor("r", buf)
    store.get_tensor_into("r", buf)
    store.unregister_buffer(buf)


def test_segment_is_pinned_by_default_on_its_first_gpu_copy_and_budget_falls_back():
    with kvstore.Store("64MiB") as s:
        assert s.stats()["page_locked_bytes"] == 0
        s.put_tensor("x", torch.ones(1000, device="cuda:0"))
        assert s.stats()["page_locked_bytes"] == 64 << 20
    code = ("import kvstore; s = kvstore.Store('64MiB'); "
            "import torch; t = torch.ones(1000, device='cuda:0'); s.put_tensor('x', t); "
            "assert torch.equal(s.get_tensor('x', like=t), t); st = s.stats(); "
            "print(st['page_locked_bytes'], st['page_lock_fallbacks']); s.close()")
    env = dict(os.environ, KVSTORE_PIN_MEMORY_MAX_BYTES=str(1 << 20))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "1"]
    env = dict(os.environ, MC_STORE_PIN_MEMORY="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "0"]


def test_cupy_array_through_cuda_array_interface(store):
    cupy = pytest.importorskip("cupy")
    a = cupy.arange(100, dtype=cupy.float32)
    store.put_tensor("c", a)
    b = cupy.zeros(100, dtype=cupy.float32)
    store.get_tensor_into("c", b)
    assert bool((a == b).all())
    assert np.array_equal(store.get_tensor("c"), np.arange(100, dtype=np.float32))


@pytest.mark.parametrize("executor", ["per_block", "aggregated"])
def test_kv_blocks_between_gpu_and_host_buffers_of_one_process(executor):
    """A layout with K on the GPU and V on the host: pulls within it move GPU blocks by the
    device (per block, or one cuMemcpyBatchAsync per direction) and host blocks by memcpy."""
    layers, blocks, bpb = 2, 64, 4096
    k = [torch.randint(0, 255, (blocks, bpb), dtype=torch.uint8, device="cuda:0") for _ in range(layers)]
    v = [np.random.default_rng(i).integers(0, 255, (blocks, bpb), dtype=np.uint8) for i in range(layers)]
    ds = []
    for layer in range(layers):
        ds.append({"layer": layer, "kind": "key", "address": k[layer].data_ptr(), "length": blocks * bpb,
                   "bytes_per_block": bpb, "location": "cuda:0"})
        ds.append({"layer": layer, "kind": "value", "address": v[layer].ctypes.data, "length": blocks * bpb,
                   "bytes_per_block": bpb})
    with kvstore.Store("16MiB") as s:
        s.register_kv_layout("self", ds)
        k0 = [t.clone() for t in k]
        v0 = [a.copy() for a in v]
        src, dst = [1, 2, 3, 9, 20], [40, 41, 42, 50, 60]
        try:
            s.pull_kv_blocks("self", src, dst, executor=executor)
        except kvstore.UnsupportedError as e:
            pytest.skip(f"this driver has no batched copy: {e}")
        torch.cuda.synchronize()
        for layer in range(layers):
            assert torch.equal(k[layer][dst], k0[layer][src])
            assert np.array_equal(v[layer][dst], v0[layer][src])
