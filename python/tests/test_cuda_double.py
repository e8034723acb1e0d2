"""kvstore's CUDA paths on the CUDA driver test double (doubles/cuda_driver.c, built by
`./dev.sh test` against the real cuda.h): device memory the host cannot touch, contexts with
retain counts, and streams that execute later, so a missing synchronisation shows up as stale
bytes and a device pointer taken for host memory as a crash.

The driver is loaded once per process, so each case runs in a fresh interpreter with
KVSTORE_CUDA_DRIVER naming the double (or a missing file) and FAKECUDA_* choosing its
devices, latency and failure mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fake_gpu
import pytest

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    not fake_gpu.library_path().exists(),
    reason=os.environ.get("KVSTORE_CUDA_DOUBLE_SKIP", f"no CUDA driver test double at {fake_gpu.library_path()} "
                          "(./dev.sh test builds it)"))

PRELUDE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import numpy as np
import kvstore
import fake_gpu as fg
MiB = 1 << 20
"""


def run(body: str, driver: str | None = None, devices: int = 1, latency_us: int = 300, mode: str = "") -> str:
    """Runs `body` after PRELUDE in a fresh interpreter on the double; returns its output and
    fails the test with that output when it exits non-zero (a signal included)."""
    env = dict(os.environ, KVSTORE_CUDA_DOUBLE=str(fake_gpu.library_path()),
               KVSTORE_CUDA_DRIVER=driver or str(fake_gpu.library_path()),
               FAKECUDA_DEVICES=str(devices), FAKECUDA_LATENCY_US=str(latency_us), FAKECUDA_MODE=mode,
               KVSTORE_PIN_MEMORY="0")
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env, capture_output=True,
                       text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"exit {r.returncode} (negative: killed by that signal)\n{out}"
    return out


# ---- ordering against the caller's stream ----

def test_a_put_waits_for_the_side_stream_still_writing_the_tensor():
    # PyTorch's side streams are non-blocking: the legacy default stream does not wait for
    # them. A put must copy after the kernel that the tensor's stream still runs.
    run("""
        side = fg.stream(0, nonblocking=True)
        a = fg.DeviceArray(MiB, stream=side)
        a.write(b"A" * MiB)
        a.fill_async(side, ord("B"), delay_ms=100)
        with kvstore.Store("64MiB") as s:
            s.put_tensor("t", a)
            got = s.get_tensor("t").tobytes()
        assert got == b"B" * MiB, (got[:1], got[-1:])
    """)


def test_a_get_into_runs_after_the_kernels_queued_on_the_targets_stream_and_is_complete_on_return():
    run("""
        side = fg.stream(0, nonblocking=True)
        target = fg.DeviceArray(MiB, stream=side)
        with kvstore.Store("64MiB") as s:
            s.put_tensor("t", np.full(MiB, 7, np.uint8))
            target.fill_async(side, ord("Z"), delay_ms=100)   # still writing the target
            s.get_tensor_into("t", target)
            now = target.read()                               # no wait: complete on return
            fg.drain()
            assert now == bytes([7]) * MiB, now[:1]
            assert target.read() == bytes([7]) * MiB         # the kernel did not land after it
    """)


def test_a_host_to_device_copy_from_pageable_memory_has_landed_when_get_returns():
    # cuMemcpyHtoD from pageable memory returns once the source is staged; the bytes land
    # later. The array interface's stream None means "no synchronisation needed".
    run("""
        target = fg.DeviceArray(4 * MiB, stream=None)
        with kvstore.Store("64MiB") as s:
            s.put_tensor("t", np.full(4 * MiB, 3, np.uint8))
            s.get_tensor_into("t", target)
            assert target.read() == bytes([3]) * (4 * MiB)
            back = s.get_tensor("t", like=None)
            assert back.tobytes() == bytes([3]) * (4 * MiB)
    """, latency_us=50_000)


def test_memory_with_no_known_stream_waits_for_all_of_the_devices_work():
    # Version 2 of the array interface has no stream: kvstore cannot know which stream
    # writes the memory, so it waits for the whole context.
    run("""
        side = fg.stream(0, nonblocking=True)
        a = fg.DeviceArray(MiB)          # no "stream" field
        a.fill_async(side, ord("C"), delay_ms=100)
        with kvstore.Store("64MiB") as s:
            s.put_tensor("t", a)
            assert s.get_tensor("t").tobytes() == b"C" * MiB
    """)


def test_dlpack_producers_are_asked_to_order_their_work_before_the_legacy_stream():
    run("""
        a = fg.DeviceArray(MiB)
        d = fg.DLPackDeviceArray(a)
        a.fill_async(fg.LEGACY, ord("D"), delay_ms=100)   # what a producer honouring stream=1 does
        with kvstore.Store("64MiB") as s:
            s.put_tensor("t", d)
            assert d.requested_streams == [1], d.requested_streams
            assert s.get_tensor("t").tobytes() == b"D" * MiB
    """)


def test_a_dlpack_producer_on_a_side_stream_is_waited_for_through_its_event():
    # What torch does for __dlpack__(stream=1): an event on its own (non-blocking) stream,
    # waited for by the legacy stream, where kvstore then copies. Also a get into it.
    run("""
        side = fg.stream(0, nonblocking=True)
        a = fg.DeviceArray(MiB)
        a.fill_async(side, ord("E"), delay_ms=100)
        d = fg.DLPackDeviceArray(a, producer_stream=side)
        with kvstore.Store("64MiB") as s:
            s.put_tensor("t", d)
            assert s.get_tensor("t").tobytes() == b"E" * MiB
            s.put_tensor("u", np.full(MiB, 5, np.uint8))
            a.fill_async(side, ord("F"), delay_ms=100)       # still writing the target
            s.get_tensor_into("u", d)
            fg.drain()
            assert a.read() == bytes([5]) * MiB              # the copy came after the kernel
    """)


def test_a_batch_of_tensors_on_two_streams_is_ordered_after_each():
    run("""
        s1, s2 = fg.stream(0), fg.stream(0)
        arrays = [fg.DeviceArray(MiB, stream=s1), fg.DeviceArray(MiB, stream=s2)]
        arrays[0].fill_async(s1, ord("1"), delay_ms=80)
        arrays[1].fill_async(s2, ord("2"), delay_ms=120)
        with kvstore.Store("64MiB") as s:
            assert s.batch_put_tensor(["a", "b"], arrays) == [None, None]
            assert s.get_tensor("a").tobytes() == b"1" * MiB
            assert s.get_tensor("b").tobytes() == b"2" * MiB
    """)


# ---- device memory is never taken for host memory ----

GUARDED_CALLS = """
    a = fg.DeviceArray(4096, stream=None)
    with kvstore.Store("64MiB") as s:
        for call in (lambda: s.put_tensor("t", a),
                     lambda: (s.put_tensor("h", np.zeros(4096, np.uint8)), s.get_tensor_into("h", a))):
            try:
                call()
            except kvstore.StoreError as e:
                print(type(e).__name__, e)
            else:
                raise AssertionError("device memory was accepted")
        assert not s.exists("t")            # nothing stored by the failed put
        assert s.exists("h")
"""


def test_without_a_driver_device_memory_is_refused_not_memcpyd():
    out = run(GUARDED_CALLS, driver="/nonexistent/libcuda.so.1")
    assert "no CUDA driver library" in out, out


def test_a_failing_pointer_query_is_not_an_answer_of_host_memory():
    out = run(GUARDED_CALLS, mode="pointer_query_fails")
    assert "asking the CUDA driver" in out, out


def test_a_gpu_whose_context_cannot_be_retained_fails_the_copy_cleanly():
    # Exclusive-process mode held by another process: every retain is refused. The GPU is
    # still listed (probing retains nothing); the copy fails with the driver's reason.
    out = run("""
    assert kvstore.devices() == ["cpu:0", "cuda:0"], kvstore.devices()
    """ + GUARDED_CALLS, mode="retain_refused")
    assert "cuDevicePrimaryCtxRetain" in out, out


def test_a_device_declared_by_the_framework_is_not_asked_again():
    # A DLPack tensor says cuda:0; with the pointer query failing the copy still works,
    # because the declared device is used as is.
    run("""
        a = fg.DeviceArray(MiB)
        a.write(b"E" * MiB)
        with kvstore.Store("64MiB") as s:
            s.put_tensor("t", fg.DLPackDeviceArray(a))
            assert s.get_tensor("t").tobytes() == b"E" * MiB
    """, mode="pointer_query_fails")


# ---- contexts ----

def test_contexts_are_retained_on_first_use_only_on_the_device_used_and_released_at_close():
    run("""
        assert kvstore.devices() == ["cpu:0", "cuda:0", "cuda:1"]
        s = kvstore.Store("64MiB", pin_memory=False)
        assert (fg.retained(0), fg.retained(1)) == (0, 0)
        a = fg.DeviceArray(MiB, device=1, stream=None)
        s.put_tensor("t", a)
        s.get_tensor_into("t", a)
        assert (fg.retained(0), fg.retained(1)) == (0, 1)
        t = kvstore.Store("64MiB", pin_memory=False)
        t.put_tensor("t", a)
        assert fg.retained(1) == 1          # one retain per process and device
        s.close()
        assert fg.retained(1) == 1          # t still uses it
        t.close()
        assert (fg.retained(0), fg.retained(1)) == (0, 0)
    """, devices=2)


def test_a_segment_is_pinned_on_its_first_gpu_copy_and_holds_one_context_until_close():
    # Pinning commits and locks memory: it happens chunk by chunk as GPU copies first touch
    # the segment, not at creation (nor for host copies).
    run("""
        import os
        os.environ["KVSTORE_PIN_MEMORY"] = "1"
        s = kvstore.Store("16MiB", pin_memory=True)
        s.put("h", b"x" * 4096)
        assert s.stats()["page_locked_bytes"] == 0 and fg.retained(0) == 0, s.stats()
        a = fg.DeviceArray(MiB, stream=None)
        a.write(b"P" * MiB)
        s.put_tensor("t", a)
        assert s.stats()["page_locked_bytes"] == 16 * MiB, s.stats()   # one chunk: the whole segment
        assert fg.retained(0) == 1
        assert s.get_tensor("t").tobytes() == b"P" * MiB
        s.close()
        assert fg.retained(0) == 0
    """)


# ---- two devices ----

def test_a_segment_used_only_by_the_second_gpu_is_pinned_through_it():
    run("""
        import os
        os.environ["KVSTORE_PIN_MEMORY"] = "1"
        with kvstore.Store("16MiB", pin_memory=True) as s:
            a = fg.DeviceArray(MiB, device=1, stream=None)
            s.put_tensor("t", a)
            s.get_tensor_into("t", a)
            assert s.stats()["page_locked_bytes"] == 16 * MiB, s.stats()
            assert (fg.retained(0), fg.retained(1)) == (0, 1)   # GPU 0 never touched
        assert (fg.retained(0), fg.retained(1)) == (0, 0)
    """, devices=2)


def test_array_interface_memory_on_the_second_gpu_is_found_there():
    # The array interface does not name the GPU: the driver does (it used to be cuda:0).
    run("""
        a = fg.DeviceArray(MiB, device=1, stream=None)
        a.write(b"F" * MiB)
        b = fg.DeviceArray(MiB, device=1, stream=None)
        with kvstore.Store("64MiB") as s:
            s.register_buffer(b)
            s.put_tensor("t", a)
            s.get_tensor_into("t", b)
            assert b.read() == b"F" * MiB
            s.unregister_buffer(b)
    """, devices=2)


# ---- KV layouts ----

KV_SETUP = """
    BLOCKS, BPB = 16, 4096
    bufs = [fg.DeviceArray(BLOCKS * BPB) for _ in range(2)]
    for i, b in enumerate(bufs):
        b.write(bytes(range(256)) * (BLOCKS * BPB // 256))
    ds = [{"layer": 0, "kind": k, "address": b.ptr, "length": b.nbytes, "bytes_per_block": BPB,
           "location": "cuda:0"} for k, b in zip(("key", "value"), bufs)]
"""


def test_a_kv_layout_that_labels_gpu_memory_cpu_is_refused():
    run(KV_SETUP + """
    with kvstore.Store("16MiB") as s:
        bad = [dict(d, location="cpu") for d in ds]
        try:
            s.register_kv_layout("n", bad)
        except kvstore.InvalidArgumentError as e:
            assert "cuda:0 memory, not cpu:0" in str(e), e
        else:
            raise AssertionError("a GPU buffer labelled cpu was accepted")
    """)


@pytest.mark.parametrize("executor", ["per_block", "aggregated"])
def test_kv_block_copies_on_a_gpu_wait_for_pending_work_and_are_complete_on_return(executor):
    # KV caches carry no stream: the copies wait for all of the device's queued work (here
    # a non-blocking stream still writing the source blocks) and have landed on return.
    run(KV_SETUP + f"""
    side = fg.stream(0, nonblocking=True)
    for b in bufs:
        b.fill_async(side, 0xAB, delay_ms=60)
    with kvstore.Store("16MiB") as s:
        s.register_kv_layout("n", ds)
        s.pull_kv_blocks("n", [0, 1, 2], [10, 11, 12], executor={executor!r})
        for b in bufs:
            got = b.read()
            assert got[10 * BPB:13 * BPB] == bytes([0xAB]) * (3 * BPB), got[10 * BPB:10 * BPB + 4]
    """, latency_us=20_000)
