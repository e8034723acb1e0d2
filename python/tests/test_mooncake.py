"""kvstore.mooncake: Mooncake Store's Python API and its integer conventions (issue 7)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cluster import Master

import kvstore
from kvstore.mooncake import (
    ErrorCode,
    MooncakeDistributedStore,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
    TaskStatus,
    TaskType,
)


@pytest.fixture
def master():
    with Master() as m:
        yield m


def client(m: Master, size: int | str = 16 << 20) -> MooncakeDistributedStore:
    s = MooncakeDistributedStore()
    assert s.setup("localhost", "P2PHANDSHAKE", size, 16 << 20, "tcp", "", f"127.0.0.1:{m.port}") == 0
    return s


def test_setup_positional_and_dict_forms_and_hostname(master):
    a = MooncakeDistributedStore()
    assert a.health_check() == 1 and a.get_hostname() == ""
    assert a.setup("127.0.0.1:17812", "http://127.0.0.1:8080/metadata", "16MB", "1MB", "tcp", "",
                   f"127.0.0.1:{master.port}") == 0
    assert a.get_hostname() == "127.0.0.1:17812" and a.health_check() == 0
    b = MooncakeDistributedStore()
    assert b.setup({"local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE", "global_segment_size": "8MB",
                    "local_buffer_size": 0, "protocol": "tcp", "device_name": "",
                    "master_server_address": f"127.0.0.1:{master.port}"}) == 0
    host, port = b.get_hostname().split(":")
    assert host == "localhost" and 0 < int(port) < 65536          # a free port was picked
    assert a.put("k", b"v") == 0 and b.get("k") == b"v"
    assert a.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", f"127.0.0.1:{master.port}") == ErrorCode.INVALID_PARAMS
    for s in (a, b):
        assert s.close() == 0 and s.close() == 0 and s.health_check() == 1


@pytest.mark.parametrize("args, code", [
    (("localhost", "etcd://127.0.0.1:2379", 0, 0, "tcp"), ErrorCode.INVALID_PARAMS),
    (("localhost", "P2PHANDSHAKE", 0, 0, "nvlink"), ErrorCode.INVALID_PARAMS),
    (("localhost", "P2PHANDSHAKE", "lots", 0, "tcp"), ErrorCode.INVALID_PARAMS),
    ((5, "P2PHANDSHAKE", 0, 0, "tcp"), ErrorCode.INVALID_PARAMS),
])
def test_bad_setup_returns_a_code_and_leaves_it_unset(master, args, code):
    s = MooncakeDistributedStore()
    assert s.setup(*args, "", f"127.0.0.1:{master.port}") == code
    assert s.health_check() == 1 and s.put("k", b"v") == ErrorCode.INVALID_PARAMS and s.get("k") == b""


def test_unreachable_master_and_health_after_it_stops():
    s = MooncakeDistributedStore()
    m = Master()
    port = m.port
    m.stop()
    assert s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", f"127.0.0.1:{port}") == ErrorCode.TRANSFER_FAIL
    with Master() as m:
        s = client(m, 0)
        assert s.health_check() == 0
        m.stop()
        assert s.health_check() == 2
        s.close()


def test_bytes_calls_and_their_quirks(master):
    s = client(master)
    try:
        assert s.put("k", b"hello") == 0
        assert s.put("k", b"other") == 0 and s.get("k") == b"hello"      # put keeps the stored value
        assert s.upsert("k", b"new") == 0 and s.get("k") == b"new"
        assert s.get("missing") == b"" and s.get_size("missing") == ErrorCode.OBJECT_NOT_FOUND
        assert s.get_size("k") == 3 and s.is_exist("k") == 1 and s.is_exist("missing") == 0
        assert s.put_parts("p", b"ab", bytearray(b"cd"), memoryview(b"ef")) == 0 and s.get("p") == b"abcdef"
        assert s.upsert_parts("p", b"x", b"y") == 0 and s.get("p") == b"xy"
        assert s.put_batch(["b1", "b2", "k"], [b"1", b"22", b"zzz"]) == 0 and s.get("k") == b"new"
        assert s.get_batch(["b1", "nope", "b2"]) == [b"1", b"", b"22"]
        assert s.upsert_batch(["b1", "b3"], [b"one", b"three"]) == 0 and s.get_batch(["b1", "b3"]) == [b"one", b"three"]
        assert s.batch_is_exist(["b1", "nope"]) == [1, 0]
        assert s.remove("nope") == ErrorCode.OBJECT_NOT_FOUND
        assert s.remove("b1") == ErrorCode.OBJECT_HAS_LEASE                 # read just now: leased
        assert s.remove("b1", force=True) == 0 and s.is_exist("b1") == 0
        assert s.batch_remove(["b2", "nope"], force=True) == [0, ErrorCode.OBJECT_NOT_FOUND]
        assert s.remove_all(force=True) == 3 and s.batch_is_exist(["k", "p", "b3"]) == [0, 0, 0]
        assert s.put("", b"x") == ErrorCode.INVALID_PARAMS and s.put("e", b"") == ErrorCode.INVALID_PARAMS
        assert s.put(5, b"x") == ErrorCode.INVALID_PARAMS and s.put_batch(["a"], [b"1", b"2"]) == ErrorCode.INVALID_PARAMS
        assert s.put("big", bytes(32 << 20)) == ErrorCode.NO_AVAILABLE_HANDLE and s.is_exist("big") == 0
    finally:
        s.close()


def test_zero_copy_with_integer_addresses(master):
    s = client(master)
    try:
        src = np.arange(4096, dtype=np.uint8)
        dst = np.zeros(4096, dtype=np.uint8)
        a, b = src.ctypes.data, dst.ctypes.data
        assert s.register_buffer(a, src.nbytes) == 0 and s.register_buffer(b, dst.nbytes) == 0
        assert s.register_buffer(a, 0) == ErrorCode.INVALID_PARAMS
        assert s.put_from("z", a, 1000) == 0 and s.put_from("z", a + 1, 10) == 0      # kept
        assert s.get_into("z", b, 4096) == 1000 and np.array_equal(dst[:1000], src[:1000])
        assert s.get_into("z", b, 10) == ErrorCode.INVALID_PARAMS                    # too small
        assert s.get_into("nope", b, 4096) == ErrorCode.OBJECT_NOT_FOUND
        assert s.upsert_from("z", a + 100, 50) == 0 and s.get("z") == src[100:150].tobytes()
        assert s.batch_put_from(["x", "y"], [a, a + 10], [5, 6]) == [0, 0]
        assert s.batch_put_from(["x"], [a, a], [1]) == [ErrorCode.INVALID_PARAMS]
        assert s.batch_upsert_from(["x"], [a + 7], [3]) == [0] and s.get("x") == src[7:10].tobytes()
        assert s.batch_get_into(["x", "y", "nope"], [b, b + 100, b + 200], [64, 64, 64]) == [3, 6, ErrorCode.OBJECT_NOT_FOUND]
        assert dst[100:106].tobytes() == src[10:16].tobytes()
        # header + data from two buffers into one object, and back out into two buffers
        assert s.batch_put_from_multi_buffers(["m"], [[a, a + 2000]], [[16, 100]]) == [0]
        assert s.get("m") == src[:16].tobytes() + src[2000:2100].tobytes()
        dst[:] = 0
        assert s.batch_get_into_multi_buffers(["m"], [[b + 3000, b]], [[16, 100]]) == [116]
        assert dst[3000:3016].tobytes() == src[:16].tobytes() and dst[:100].tobytes() == src[2000:2100].tobytes()
        assert s.unregister_buffer(a) == 0 and s.unregister_buffer(a) == ErrorCode.INVALID_PARAMS
    finally:
        s.close()


def test_replicate_config_fields_and_checks(master):
    c = ReplicateConfig()
    assert (c.replica_num, c.with_hard_pin, c.soft_pin_action, c.soft_pin_ttl_ms, c.preferred_segments, c.preferred_segment) == \
        (1, False, SoftPinAction.PRESERVE, None, [], "")
    assert (c.nof_replica_num, c.dfs_replica_num, c.prefer_alloc_in_same_node, c.group_ids, c.session_ids) == (0, 0, False, None, None)
    c.with_soft_pin = True
    assert c.soft_pin_action == SoftPinAction.ENABLE and c.with_soft_pin
    assert "ENABLE" in repr(c)
    s = client(master)
    try:
        c.with_hard_pin, c.soft_pin_ttl_ms, c.preferred_segment = True, 60_000, "ignored:1"
        assert s.put("pinned", b"x" * 100, c) == 0
        for field, bad in (("replica_num", 0), ("replica_num", "2"), ("with_hard_pin", 1), ("soft_pin_action", 9),
                           ("soft_pin_ttl_ms", -1)):
            d = ReplicateConfig()
            setattr(d, field, bad)
            assert s.put("bad", b"x", d) == ErrorCode.INVALID_PARAMS, field
        assert s.put("bad", b"x", config="replicas") == ErrorCode.INVALID_PARAMS and s.is_exist("bad") == 0
        for field, bad in (("nof_replica_num", -1), ("dfs_replica_num", True), ("group_ids", ["a", "b"]),
                           ("session_ids", "s"), ("group_ids", [1])):
            d = ReplicateConfig()
            setattr(d, field, bad)
            assert s.put("bad", b"x", d) == ErrorCode.INVALID_PARAMS, field
        assert s.is_exist("bad") == 0
        # one group / session id per object written
        d = ReplicateConfig()
        d.group_ids, d.session_ids = ["g1", ""], ["s1", "s2"]
        assert s.put_batch(["g1", "g2"], [b"1", b"2"], d) == 0 and s.get("g2") == b"2"
        assert s.put_batch(["g3"], [b"3"], d) == ErrorCode.INVALID_PARAMS and s.is_exist("g3") == 0
        # a TTL without a soft pin: an upsert refuses it (Mooncake's rule), a put ignores it
        d = ReplicateConfig()
        d.soft_pin_ttl_ms = 1000
        assert s.upsert("ttl", b"x", d) == ErrorCode.INVALID_PARAMS and s.is_exist("ttl") == 0
        assert s.put("ttl", b"x", d) == 0
        d.soft_pin_action = SoftPinAction.ENABLE
        assert s.upsert("ttl", b"y", d) == 0 and s.get("ttl") == b"y"
    finally:
        s.close()


def test_get_buffer_and_batch_get_buffer(master):
    a, b = client(master), client(master, 0)     # b holds nothing: it reads from a's segment
    try:
        value = bytes(range(256)) * 4096            # 1 MiB
        assert a.put("big", value) == 0 and a.put("small", b"abc") == 0
        h = b.get_buffer("big")
        assert h is not None and len(h) == h.size() == len(value) and bool(h) and h.ptr() % 64 == 0
        assert bytes(h) == value and np.frombuffer(h, dtype=np.uint8)[5] == 5
        view = memoryview(h)
        assert not view.readonly and view.nbytes == len(value)
        view[0] = 0xFF                              # the handle's own memory: the object is unchanged
        assert a.get("big") == value
        handles = b.batch_get_buffer(["small", "nope", "big"])
        assert [None if x is None else bytes(x) for x in handles] == [b"abc", None, value]
        # the bytes stay valid after the object is replaced and removed
        assert a.upsert("small", b"xyz") == 0 and a.remove("small", force=True) == 0
        assert bytes(handles[0]) == b"abc" and b.get_buffer("small") is None
        assert b.get_buffer(5) is None and b.batch_get_buffer("notalist") == []
        assert b.batch_get_buffer([]) == []
    finally:
        a.close()
        b.close()
    assert a.get_buffer("big") is None and a.batch_get_buffer(["big"]) == [None]


def test_get_into_ranges(master):
    s = client(master)
    try:
        assert s.put("key1", bytes(range(40))) == 0 and s.put("key2", bytes(range(100, 140))) == 0
        b0, b1 = np.zeros(32, np.uint8), np.zeros(32, np.uint8)
        p0, p1 = b0.ctypes.data, b1.ctypes.data
        assert s.register_buffer(p0, 32) == 0 and s.register_buffer(p1, 32) == 0
        # buffer 0: key1[1:5] -> 0, key1[30:33] -> 20, key2[2:7] -> 8; buffer 1: key2[0:6] -> 4, key1[10:14] -> 16
        r = s.get_into_ranges([p0, p1], [["key1", "key2"], ["key2", "key1"]], [[[0, 20], [8]], [[4], [16]]],
                              [[[1, 30], [2]], [[0], [10]]], [[[4, 3], [5]], [[6], [4]]])
        assert r == [[[4, 3], [5]], [[6], [4]]]
        assert list(b0[:4]) == [1, 2, 3, 4] and list(b0[8:13]) == [102, 103, 104, 105, 106] and list(b0[20:23]) == [30, 31, 32]
        assert list(b1[4:10]) == list(range(100, 106)) and list(b1[16:20]) == [10, 11, 12, 13]
        before = b0.copy()
        bad = ErrorCode.INVALID_PARAMS
        # per fragment: outside the object, outside the registered buffer, a missing object
        assert s.get_into_ranges([p0], [["key1", "nope"]], [[[0, 30], [0]]], [[[38, 0], [0]]], [[[4, 4], [1]]]) == \
            [[[bad, bad], [ErrorCode.OBJECT_NOT_FOUND]]]
        assert s.get_into_ranges([p0], [["key1"]], [[[0, 28]]], [[[0, 0]]], [[[2, 4]]]) == [[[2, 4]]]
        assert (b0[:2] == [0, 1]).all() and (b0[28:32] == [0, 1, 2, 3]).all()
        b0[:] = before
        # shapes that do not match, an unregistered buffer, a bad key, negative numbers
        other = np.zeros(8, np.uint8)
        assert s.get_into_ranges([p0], [["key1"]], [[[0, 1]]], [[[0]]], [[[1]]]) == [[[bad]]]
        assert s.get_into_ranges([p0, p1], [["key1"]], [[[0]]], [[[0]]], [[[1]]]) == [[[bad]], [[bad]]]
        assert s.get_into_ranges([other.ctypes.data], [["key1"]], [[[0]]], [[[0]]], [[[1]]]) == [[[bad]]]
        assert s.get_into_ranges([p0], [[5]], [[[0]]], [[[0]]], [[[1]]]) == [[[bad]]]
        assert s.get_into_ranges([p0], [["key1"]], [[[-1]]], [[[0]]], [[[1]]]) == [[[bad]]]
        assert (b0 == before).all() and not other.any()
        assert s.unregister_buffer(p1) == 0
        assert s.get_into_ranges([p1], [["key1"]], [[[0]]], [[[0]]], [[[1]]]) == [[[bad]]]
    finally:
        s.close()


def test_setup_tenant_ssd_offload_and_port_range(master, tmp_path):
    s = MooncakeDistributedStore()
    assert s.setup("localhost", "P2PHANDSHAKE", 1 << 20, 0, "tcp", "", f"127.0.0.1:{master.port}",
                   enable_ssd_offload=True, ssd_offload_path=str(tmp_path), tenant_id="default") == 0
    host, port = s.get_hostname().split(":")
    assert host == "localhost" and 12300 <= int(port) <= 14300
    assert s.put("k", b"v") == 0 and s.get("k") == b"v"
    s.close()
    for kwargs in ({"tenant_id": "no/slash"}, {"tenant_id": 5}, {"ssd_offload_path": 5}, {"enable_ssd_offload": "maybe"}):
        assert s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", f"127.0.0.1:{master.port}", **kwargs) == \
            ErrorCode.INVALID_PARAMS, kwargs
    # a tenant the master does not know is refused
    assert s.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", f"127.0.0.1:{master.port}", tenant_id="team-a") != 0
    assert s.health_check() == 1


def test_ssd_offload_keeps_evicted_objects_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_SSD_OFFLOAD_SIZE", "256MiB")
    with Master("--lease-ttl", "0.05") as m:   # reads' leases end before the next puts evict
        ssd_offload_round_trip(m, tmp_path)


def ssd_offload_round_trip(master: Master, tmp_path) -> None:
    s = MooncakeDistributedStore()
    assert s.setup("localhost", "P2PHANDSHAKE", 16 << 20, 0, "tcp", "", f"127.0.0.1:{master.port}",
                   enable_ssd_offload=True, ssd_offload_path=str(tmp_path / "ssd")) == 0
    reader = client(master, 0)
    try:
        values = {f"b{i}": bytes([i]) * (1 << 20) for i in range(40)}   # 40 MiB through 16 MiB
        for k, v in values.items():
            assert s.put(k, v) == 0
            assert reader.get(k) == v          # read once: the reuse admission takes it
            s._store.wait_for_disk_copies()
        st = s._store.stats()
        assert st["evicted_objects"] > 10 and st["disk_offloads"] > 10 and st["disk_capacity"] == 256 << 20
        for k, v in values.items():
            assert reader.get(k) == v, k
            assert reader.is_exist(k) == 1
        assert s._store.stats()["disk_hits"] > 10
    finally:
        reader.close()
        s.close()
    assert s.setup("localhost", "P2PHANDSHAKE", 1 << 20, 0, "tcp", "", f"127.0.0.1:{master.port}",
                   enable_ssd_offload=True) == ErrorCode.INVALID_PARAMS    # no directory


def test_two_clients_in_one_process_replicate_across_their_segments(master):
    a, b = client(master), client(master)
    try:
        c = ReplicateConfig()
        c.replica_num = 2
        value = bytes(range(256)) * 64
        assert a.put("r", value, c) == 0
        assert a.close() == 0                 # a's segment leaves with it
        assert b.get("r") == value            # the replica in b's segment remains
        assert a.setup("localhost", "P2PHANDSHAKE", 16 << 20, 0, "tcp", "", f"127.0.0.1:{master.port}") == 0   # re-setup
        assert a.get("r") == value and a.health_check() == 0
    finally:
        a.close()
        b.close()


def test_remove_by_regex_across_clients(master):
    a, b = client(master), client(master)
    try:
        for k in ("req-1/layer-0", "req-1/layer-1", "req-2/layer-0", "other"):
            assert a.put(k, b"v") == 0
        assert b.get("req-1/layer-1") == b"v"                       # leased by this read
        assert b.remove_by_regex(r"^req-1/") == 1                   # the leased one is kept
        assert b.remove_by_regex(r"^req-1/", force=True) == 1
        assert sorted(k for k in ("req-1/layer-0", "req-1/layer-1", "req-2/layer-0", "other") if a.is_exist(k)) == \
            ["other", "req-2/layer-0"]
        assert a.remove_by_regex("layer-0$", force=True) == 1 and a.remove_by_regex("nothing") == 0   # is_exist leased it
        assert a.remove_by_regex("(") == ErrorCode.INVALID_PARAMS and a.remove_by_regex(5) == ErrorCode.INVALID_PARAMS
        assert a.is_exist("other") == 1
    finally:
        a.close()
        b.close()


def test_mooncake_master_flags_start_the_master(tmp_path):
    """Scripts written for mooncake_master start `python -m kvstore master` with its flags."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "master", "--rpc_port", str(port), "--rpc_address", "127.0.0.1",
                             "--default_kv_lease_ttl", "200", "--eviction_high_watermark_ratio", "0.8",
                             "--eviction_ratio", "0.1", "--client_ttl", "3", "--metrics_port", "-1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert f"listening on 127.0.0.1:{port}" in proc.stderr.readline()
        c = MooncakeDistributedStore()
        assert c.setup("localhost", "P2PHANDSHAKE", "4MB", 0, "tcp", "", f"127.0.0.1:{port}") == 0
        assert c.put("k", b"v") == 0 and c.get("k") == b"v"
        assert c.remove("k") == ErrorCode.OBJECT_HAS_LEASE
        import time
        time.sleep(0.3)                                             # the 200 ms lease has ended
        assert c.remove("k") == 0
        c.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tensor_calls(master):
    """Mooncake's tensor calls take torch tensors; any tensor kvstore takes works (numpy here,
    where torch is not installed; reads return torch tensors when it is)."""
    s = client(master)
    try:
        t = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
        assert s.put_tensor("t", t) == 0 and s.put_tensor("t", t * 2) == 0      # kept
        got = s.get_tensor("t")
        assert tuple(got.shape) == (3, 4, 5) and np.array_equal(np.asarray(got), t)
        assert s.upsert_tensor("t", t + 1) == 0 and np.array_equal(np.asarray(s.get_tensor("t")), t + 1)
        assert s.get_tensor("missing") is None
        assert s.put("raw", b"not a tensor") == 0 and s.get_tensor("raw") is None
        assert s.batch_put_tensor(["a", "b"], [t[0], t[1].astype(np.int64)]) == [0, 0]
        a, b, missing = s.batch_get_tensor(["a", "b", "nope"])
        assert np.array_equal(np.asarray(a), t[0]) and np.asarray(b).dtype == np.int64 and missing is None
        assert s.batch_upsert_tensor(["a"], [t[2]]) == [0] and np.array_equal(np.asarray(s.get_tensor("a")), t[2])
        assert s.batch_put_tensor(["c"], ["not a tensor"]) == [ErrorCode.INVALID_PARAMS]
        # get_tensor_into leaves header + data in the buffer; put_tensor_from stores them again
        buf = np.zeros(4096, dtype=np.uint8)
        view = s.get_tensor_into("t", buf.ctypes.data, buf.nbytes)
        assert np.array_equal(np.asarray(view), t + 1)
        size = s.get_size("t")
        assert s.put_tensor_from("copy", buf.ctypes.data, size) == 0
        assert np.array_equal(np.asarray(s.get_tensor("copy")), t + 1)
        assert s.get_tensor_into("t", buf.ctypes.data, 16) is None                 # too small
        assert s.get_tensor_into("raw", buf.ctypes.data, buf.nbytes) is None       # not a tensor
        junk = np.full(64, 7, dtype=np.uint8)
        assert s.put_tensor_from("junk", junk.ctypes.data, 64) == ErrorCode.INVALID_PARAMS and s.is_exist("junk") == 0
    finally:
        s.close()


def _mooncake_master() -> str | None:
    """mooncake_master of an installed Mooncake Store (mooncake-transfer-engine-non-cuda)."""
    import importlib.util
    import shutil
    import sys
    from pathlib import Path

    if importlib.util.find_spec("mooncake") is None:
        return None
    exe = Path(sys.executable).with_name("mooncake_master")
    return str(exe) if exe.exists() else shutil.which("mooncake_master")


@pytest.mark.skipif(_mooncake_master() is None, reason="Mooncake Store is not installed (pip install mooncake-transfer-engine-non-cuda)")
def test_same_results_as_mooncake_store_itself(master):
    """The same call sequence against Mooncake Store and kvstore.mooncake gives the same
    results, except where docs/mooncake.md says otherwise."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    probe = str(Path(__file__).with_name("mooncake_probe.py"))
    rpc = free_port()
    mc = subprocess.Popen([_mooncake_master(), f"--rpc_port={rpc}", f"--metrics_port={free_port()}",
                           "--enable_http_metadata_server=false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", rpc)) == 0:
                    break
            time.sleep(0.1)
        theirs = subprocess.run([sys.executable, probe, "mooncake", f"127.0.0.1:{rpc}"], capture_output=True, text=True, timeout=120)
        ours = subprocess.run([sys.executable, probe, "kvstore", f"127.0.0.1:{master.port}"], capture_output=True, text=True, timeout=120)
        assert theirs.returncode == 0, theirs.stderr[-2000:]
        assert ours.returncode == 0, ours.stderr[-2000:]
        assert json.loads(ours.stdout.splitlines()[-1]) == json.loads(theirs.stdout.splitlines()[-1])
    finally:
        mc.terminate()
        mc.wait(timeout=20)


def test_clients_in_several_processes(master, tmp_path):
    """A client in another process writes with replicas; this process reads, and writes back."""
    import subprocess
    import sys

    script = tmp_path / "other.py"
    script.write_text(
        "import sys\n"
        "from kvstore.mooncake import MooncakeDistributedStore, ReplicateConfig\n"
        "s = MooncakeDistributedStore()\n"
        "assert s.setup('localhost', 'P2PHANDSHAKE', 16 << 20, 0, 'tcp', '', sys.argv[1]) == 0\n"
        "c = ReplicateConfig(); c.replica_num = 2\n"
        "assert s.put_batch([f'p{i}' for i in range(50)], [bytes([i]) * 3000 for i in range(50)], c) == 0\n"
        "print('written', flush=True)\n"
        "sys.stdin.readline()\n"
        "print(s.get('from-parent').hex(), flush=True)\n"
        "s.close()\n")
    me = client(master)
    other = subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{master.port}"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "written"
        assert me.get_batch([f"p{i}" for i in range(50)]) == [bytes([i]) * 3000 for i in range(50)]
        assert me.put("from-parent", b"\x01\x02") == 0
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "0102"
        assert other.wait(timeout=20) == 0
        assert me.get("p7") == bytes([7]) * 3000       # its replica in this client's segment remains
    finally:
        if other.poll() is None:
            other.kill()
        me.close()


def test_wrong_arguments_return_codes_and_change_nothing(master):
    s = client(master)
    try:
        src = np.arange(64, dtype=np.uint8)
        assert s.put("k", b"v") == 0
        assert s.get_into("k", "address", 10) == ErrorCode.INVALID_PARAMS
        assert s.put_from("n", None, 10) == ErrorCode.INVALID_PARAMS
        assert s.batch_put_from(["a", "b"], [src.ctypes.data], [4, 4]) == [ErrorCode.INVALID_PARAMS] * 2
        assert s.batch_get_into(["k"], [src.ctypes.data], [4, 4]) == [ErrorCode.INVALID_PARAMS]
        assert s.batch_put_from_multi_buffers(["a"], [[src.ctypes.data, src.ctypes.data]], [[4]]) == [ErrorCode.INVALID_PARAMS]
        assert s.batch_get_into_multi_buffers(["k"], [[src.ctypes.data]], [[4], [4]]) == [ErrorCode.INVALID_PARAMS]
        assert s.batch_upsert_from(["k"], [src.ctypes.data], [-1]) == [ErrorCode.INVALID_PARAMS]
        assert s.remove(5) == ErrorCode.INVALID_PARAMS and s.remove("k", force="yes") == ErrorCode.INVALID_PARAMS
        assert s.get(5) == b"" and s.get_size(None) == ErrorCode.INVALID_PARAMS and s.is_exist(b"k") == ErrorCode.INVALID_PARAMS
        assert s.get_batch(None) == [] and s.batch_is_exist([5]) == [ErrorCode.INVALID_PARAMS]
        assert s.put_batch(["a"], None) == ErrorCode.INVALID_PARAMS and s.upsert_batch(None, [b"x"]) == ErrorCode.INVALID_PARAMS
        assert s.remove_all(force=1) == ErrorCode.INVALID_PARAMS
        assert s.unregister_buffer("ptr") == ErrorCode.INVALID_PARAMS
        assert s.put_tensor("t", "not a tensor") == ErrorCode.INVALID_PARAMS and s.get_tensor(5) is None
        assert s.batch_get_tensor(None) == []
        assert s.get_tensor_into("k", "ptr", 10) is None and s.put_tensor_from("t", None, 10) == ErrorCode.INVALID_PARAMS
        # nothing changed
        assert s.get("k") == b"v"
        assert s.batch_is_exist(["a", "b", "n", "t"]) == [0, 0, 0, 0]
    finally:
        s.close()


def test_replica_descriptors(master):
    a, b = client(master), client(master)
    try:
        c = ReplicateConfig()
        c.replica_num = 2
        assert a.put("two", b"x" * 1000, c) == 0 and a.put("one", b"y" * 10) == 0
        found = b.batch_get_replica_desc(["two", "one", "nope"])
        assert set(found) == {"two", "one"}                           # a missing key is left out, as Mooncake does
        assert len(found["two"]) == 2 and len(found["one"]) == 1
        ends = {d.get_memory_descriptor().buffer_descriptor.transport_endpoint_ for d in found["two"]}
        assert len(ends) == 2                          # two distinct segments
        for d in found["two"] + found["one"]:
            assert d.status == ReplicaStatus.COMPLETE and d.is_memory_replica()
            assert not (d.is_disk_replica() or d.is_local_disk_replica() or d.is_nof_replica())
            with pytest.raises(kvstore.InvalidArgumentError):
                d.get_disk_descriptor()
        assert [d.object_size for d in found["two"]] == [1000, 1000]
        assert found["one"][0].get_memory_descriptor().buffer_descriptor.size_ == 10
        assert [d.object_size for d in b.get_replica_desc("one")] == [10]
        assert b.get_replica_desc("nope") == [] and b.get_replica_desc(5) == []
        assert b.batch_get_replica_desc("notalist") == {}
        assert [len(v) for v in b.batch_get_replica_desc(["one", 7]).values()] == [1]   # a bad key is left out
        assert b.remove("one") == ErrorCode.OBJECT_HAS_LEASE      # describing leases the object, as is_exist
    finally:
        a.close()
        b.close()
    assert a.batch_get_replica_desc(["two"]) == {}


def _segments(s: MooncakeDistributedStore, key: str) -> list[str]:
    return [d.get_memory_descriptor().buffer_descriptor.transport_endpoint_ for d in s.get_replica_desc(key)]


def _finished(s: MooncakeDistributedStore, task_id) -> object:
    for _ in range(500):
        response, code = s.query_task(task_id)
        assert code == 0
        if response.status in (TaskStatus.SUCCESS, TaskStatus.FAILED):
            return response
        time.sleep(0.01)
    raise AssertionError("the task did not finish")


def test_copy_and_move_tasks_make_real_replicas(master):
    """create_copy_task / create_move_task / query_task: the replicas really move (the source
    client closes and the bytes are still served), with Mooncake's task states and codes."""
    a, b, w = client(master), client(master), client(master, 0)
    try:
        assert a.put("k", b"v" * 100_000) == 0 and a.put("m", b"w" * 5000) == 0
        c = ReplicateConfig()
        c.replica_num = 2
        assert w.put("probe", b"p", c) == 0
        seg_a = _segments(w, "k")[0]
        seg_b = next(x for x in _segments(w, "probe") if x != seg_a)

        task, code = w.create_copy_task("k", [seg_b])
        assert code == 0 and task != (0, 0)
        done = _finished(w, task)
        assert (done.status, done.type, done.message) == (TaskStatus.SUCCESS, TaskType.REPLICA_COPY, "")
        assert done.id == task and done.last_updated_at_ms_epoch >= done.created_at_ms_epoch
        assert sorted(_segments(w, "k")) == sorted([seg_a, seg_b])

        task, code = w.create_move_task("m", seg_a, seg_b)
        assert code == 0
        assert _finished(w, task).status == TaskStatus.SUCCESS
        assert _segments(w, "m") == [seg_b]

        # Refused at submission, as Mooncake: nothing queued.
        assert w.create_copy_task("missing", [seg_b]) == ((0, 0), ErrorCode.OBJECT_NOT_FOUND)
        assert w.create_move_task("m", seg_a, seg_b) == ((0, 0), ErrorCode.INVALID_PARAMS)   # no replica in a now
        assert w.create_copy_task("k", ["segment1"]) == ((0, 0), ErrorCode.INVALID_PARAMS)
        assert w.create_copy_task("k", []) == ((0, 0), ErrorCode.INVALID_PARAMS)
        assert w.create_copy_task(5, [seg_b]) == ((0, 0), ErrorCode.INVALID_PARAMS)
        assert w.create_copy_task("k", [None]) == ((0, 0), ErrorCode.INVALID_PARAMS)
        assert w.create_copy_task("k", "kvstore-segment-1") == ((0, 0), ErrorCode.INVALID_PARAMS)
        assert w.create_move_task("k", seg_a, 5.5) == ((0, 0), ErrorCode.INVALID_PARAMS)
        assert sorted(_segments(w, "k")) == sorted([seg_a, seg_b])          # nothing changed
        assert w.query_task((1, 2)) == (None, ErrorCode.TASK_NOT_FOUND)
        assert w.query_task("nonsense") == (None, ErrorCode.TASK_NOT_FOUND)

        # Accepted, then failed when it runs: the segment already holds a replica.
        task, code = w.create_copy_task("k", [seg_a])
        assert code == 0
        failed = _finished(w, task)
        assert failed.status == TaskStatus.FAILED and "already holds" in failed.message

        a.close()                                     # a's segment goes: the copies serve
        assert w.get("k") == b"v" * 100_000 and w.get("m") == b"w" * 5000
    finally:
        for s in (w, b, a):
            s.close()
    assert w.query_task(task)[1] == 0                  # closed clients still answer for their tasks


def test_allocated_segments_are_real_and_unmount_with_a_grace_period(master):
    """allocate_and_mount_segment adds a real segment (objects land there and are served from
    it); unmount_and_free_segment with a grace period drains it first: no new object, still
    readable, then gone."""
    a, w = client(master, "1MB"), client(master, 0)
    try:
        got = a.allocate_and_mount_segment(8 << 20, "tcp", "")
        assert got["ret"] == 0 and got["allocated_size"] >= 8 << 20 and len(got["segment_ids"]) == 1
        name = got["segment_ids"][0]
        assert name.startswith("kvstore-segment-")
        big = b"b" * (2 << 20)                           # does not fit a's own 1 MB segment
        assert w.put("big", big) == 0
        assert _segments(w, "big") == [name] and w.get("big") == big
        assert a.unmount_and_free_segment([name], grace_period_seconds=1) == 0
        assert w.put("big2", big) == ErrorCode.NO_AVAILABLE_HANDLE   # drained: nowhere to go ("big" is leased)
        assert w.get("big") == big                          # still readable during the grace period
        deadline = time.monotonic() + 10
        while w.get("big") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.get("big") == b""                          # unmounted: its only replica is gone
        # Bad calls change nothing.
        assert a.unmount_and_free_segment([name]) == ErrorCode.INTERNAL_ERROR          # already gone (-1, as Mooncake)
        assert a.unmount_and_free_segment("kvstore-segment-1") == ErrorCode.INVALID_PARAMS
        got = a.allocate_and_mount_segment(8 << 20)
        assert a.unmount_and_free_segment(got["segment_ids"], grace_period_seconds=-1) == ErrorCode.INVALID_PARAMS
        assert a.unmount_and_free_segment(got["segment_ids"], grace_period_seconds="1") == ErrorCode.INVALID_PARAMS
        assert a.unmount_and_free_segment(got["segment_ids"], grace_period_seconds=0) == 0
        for bad in ((0,), (-5,), ("lots",), (1 << 20, "udp"), (1 << 20, "tcp", 7)):
            assert a.allocate_and_mount_segment(*bad) == {"ret": ErrorCode.INVALID_PARAMS, "segment_ids": [], "allocated_size": 0}
        assert a.allocate_and_mount_segment(1 << 20)["ret"] == 0   # left mounted: close() unmounts it
    finally:
        for s in (w, a):
            s.close()
    assert a.allocate_and_mount_segment(1 << 20)["ret"] == ErrorCode.INVALID_PARAMS   # closed


def test_mount_segment_stores_objects_in_the_callers_shared_memory_file(master, tmp_path):
    """mount_segment maps the caller's tmpfs file as a segment: an object put there is in the
    file's bytes; unmount_segment leaves the file. Other files are refused."""
    import os
    a, w = client(master, "1MB"), client(master, 0)
    shm = f"/dev/shm/kvstore-test-{os.getpid()}"
    fd = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 8 << 20)
        got = a.mount_segment(shm, 8 << 20, 0, "tcp", "")
        assert got["ret"] == 0 and got["segment_ids"][0].startswith("kvstore-segment-")
        marker = b"in-the-callers-file!" * 100_000                 # 2 MB: only the mounted file has room
        assert w.put("m", marker) == 0
        assert _segments(w, "m") == got["segment_ids"]
        with open(shm, "rb") as f:
            assert marker in f.read()                               # the bytes went to the caller's memory
        assert a.unmount_and_free_segment(got["segment_ids"]) == ErrorCode.INTERNAL_ERROR   # not allocated here
        assert a.unmount_segment(got["segment_ids"]) == 0
        assert os.path.exists(shm) and w.get("m") == b""
        # Refused: offset, a file larger than it holds, a disk file, a file others may write, a link.
        assert a.mount_segment(shm, 8 << 20, 4096)["ret"] == ErrorCode.INVALID_PARAMS
        # A file that cannot be mounted is -1, as Mooncake answers for a missing one.
        assert a.mount_segment(shm, 16 << 20)["ret"] == ErrorCode.INTERNAL_ERROR
        disk = tmp_path / "segment"
        disk.write_bytes(bytes(1 << 20))
        assert a.mount_segment(str(disk), 1 << 20)["ret"] == ErrorCode.INTERNAL_ERROR
        os.chmod(shm, 0o622)
        assert a.mount_segment(shm, 1 << 20)["ret"] == ErrorCode.INTERNAL_ERROR
        os.chmod(shm, 0o600)
        link = f"{shm}-link"
        os.symlink(shm, link)
        try:
            assert a.mount_segment(link, 1 << 20)["ret"] == ErrorCode.INTERNAL_ERROR
        finally:
            os.unlink(link)
        assert a.mount_segment("/dev/shm/kvstore-no-such-file", 1 << 20)["ret"] == ErrorCode.INTERNAL_ERROR
        assert a.mount_segment(5, 1 << 20)["ret"] == ErrorCode.INVALID_PARAMS
        assert a.mount_segment(shm, "lots")["ret"] == ErrorCode.INVALID_PARAMS
        for bad in ((0,), ("lots",), (1 << 20, 0, "udp"), (1 << 20, 0, "tcp", 7)):   # bad arguments, not a bad file
            assert a.mount_segment(shm, *bad)["ret"] == ErrorCode.INVALID_PARAMS
        assert a.unmount_segment([]) == ErrorCode.INVALID_PARAMS and a.unmount_segment(["x", "x"]) == ErrorCode.INVALID_PARAMS
    finally:
        os.close(fd)
        os.unlink(shm)
        for s in (w, a):
            s.close()


def test_init_all_is_setup_with_mooncakes_defaults():
    """init_all joins the master at 127.0.0.1:50051 with a segment of the size given."""
    import socket
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 50051))
        except OSError:
            pytest.skip("port 50051 (init_all's fixed master address) is in use on this machine")
    with Master(port=50051):
        s = MooncakeDistributedStore()
        try:
            assert s.init_all("tcp", "", 4 << 20) == 0
            assert s.put("k", b"v") == 0 and s.get("k") == b"v"
            assert s.init_all("tcp", "") == ErrorCode.INVALID_PARAMS        # already set up
        finally:
            s.close()
        assert MooncakeDistributedStore().init_all("udp", "") == ErrorCode.INVALID_PARAMS


def test_tp_wrappers_and_unified_parallel_io(master):
    from kvstore.mooncake import ParallelAxis, ReadTarget, TensorParallelism
    s = client(master, 64 << 20)
    try:
        full = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
        assert s.put_tensor_with_tp("w", full, tp_rank=0, tp_size=4, split_dim=1) == 0
        assert all(s.is_exist(f"w_tp_{r}") == 1 for r in range(4))          # Mooncake's shard names
        assert np.array_equal(s.get_tensor_with_tp("w", 1, 4, 1), full[:, 3:6])
        assert np.array_equal(s.get_tensor_with_tp("w", 1, 2, 1), full[:, 6:])   # resharded on read
        assert np.array_equal(s.get_tensor_with_tp("w", 0, 2, 0), full[:4])
        assert [t.shape for t in s.batch_get_tensor_with_tp(["w", "w"], 3, 4)] == [(8, 3), (8, 3)]
        assert s.batch_get_tensor_with_tp(["nope"], 0, 2) == [None]
        tp2 = TensorParallelism([ParallelAxis("tp", 1, 2, 0)])
        assert np.array_equal(s.get_tensor_with_parallelism("w", ReadTarget("shard", tp2)), full[4:])
        assert np.array_equal(s.get_tensor_with_parallelism("w", ReadTarget("full")), full)
        assert s.get_tensor_with_parallelism("w") is None                    # nothing stored whole at "w"
        # into a buffer: header then data, as get_tensor_into leaves a tensor
        buf = np.zeros(4096, np.uint8)
        got = s.get_tensor_with_parallelism_into("w", buf.ctypes.data, buf.nbytes, ReadTarget("shard", tp2))
        assert np.array_equal(got, full[4:])
        assert s.put_tensor_from("copy", buf.ctypes.data, 304 + full[4:].nbytes) == 0
        assert np.array_equal(s.get_tensor("copy"), full[4:])
        assert s.get_tensor_with_parallelism_into("w", buf.ctypes.data, 100, ReadTarget("full")) is None   # too small
        # writer_partition: a full tensor in, one shard stored; parallelism with DP and TP: full tensor in
        assert s.put_tensor_with_parallelism("x", full, writer_partition=(2, 3, 0)) == 0
        stored = TensorParallelism([ParallelAxis("tp", 2, 3, 0)])
        assert np.array_equal(s.get_tensor_with_parallelism("x", ReadTarget("as_stored", stored)), full[6:])
        dp_tp = [TensorParallelism([ParallelAxis("dp", 0, 1), ParallelAxis("tp", r, 2, 1)]) for r in range(2)]
        assert s.batch_put_tensor_with_parallelism(["y", "y"], [full, full], dp_tp) == [0, 0]
        assert np.array_equal(s.get_tensor_with_parallelism("y", ReadTarget("full")), full)
        assert s.put_tensor_with_parallelism("z", full) == 0 and np.array_equal(s.get_tensor_with_parallelism("z"), full)
        assert np.array_equal(s.get_tensor_with_parallelism("z", ReadTarget("full")), full)   # stored whole
        # from addresses: [header][data] of a full tensor, split on write
        assert s.put_tensor_with_tp_from("v", buf.ctypes.data, 304 + full[4:].nbytes, 0, 2, 1) == 0
        assert np.array_equal(s.get_tensor_with_tp("v", 1, 2, 1), full[4:, 6:])
        # bad arguments: codes, nothing written
        bad = ErrorCode.INVALID_PARAMS
        assert s.put_tensor_with_parallelism("b", full, tp2, writer_partition=(0, 2, 0)) == bad
        assert s.put_tensor_with_parallelism("b", full, writer_partition=(0, 2, 9)) == bad
        assert s.put_tensor_with_parallelism("b", full, TensorParallelism([ParallelAxis("xp", 0, 2)])) == bad
        assert s.put_tensor_with_tp("b", full, tp_size=0) == bad and s.put_tensor_with_tp("b", full, 0, 2, -1) == bad
        assert s.get_tensor_with_parallelism("w", ReadTarget("shard")) is None
        assert s.get_tensor_with_parallelism("w", ReadTarget("sideways")) is None
        assert s.is_exist("b") == 0 and s.is_exist("b_tp_0") == 0
    finally:
        s.close()


def test_publishing_metadata_and_tensor_addresses(master):
    s = client(master)
    try:
        t = np.arange(12, dtype=np.int32).reshape(3, 4)
        c = ReplicateConfig()
        c.with_hard_pin = True
        assert s.pub_tensor("p", t, c) == 0 and s.batch_pub_tensor(["q"], [t], c) == [0]
        assert s.upsert_pub_tensor("p", t * 2, c) == 0 and np.array_equal(s.get_tensor("p"), t * 2)
        assert s.batch_upsert_pub_tensor(["q"], [t * 3]) == [0] and np.array_equal(s.get_tensor("q"), t * 3)
        buf = np.zeros(1024, np.uint8)
        assert s.get_tensor_into("p", buf.ctypes.data, buf.nbytes) is not None
        n = 304 + t.nbytes
        assert s.batch_put_tensor_from(["r", "bad"], [buf.ctypes.data, buf.ctypes.data + 1], [n, n]) == \
            [0, ErrorCode.INVALID_PARAMS]
        assert np.array_equal(s.get_tensor("r"), t * 2) and s.is_exist("bad") == 0
        assert s.upsert_tensor_from("r", buf.ctypes.data, n) == 0
        assert s.batch_upsert_tensor_from(["r"], [buf.ctypes.data], [n]) == [0]
        out = np.zeros(2048, np.uint8)
        got = s.batch_get_tensor_into(["r", "nope"], [out.ctypes.data, out.ctypes.data + 1024], [1024, 1024])
        assert np.array_equal(got[0], t * 2) and got[1] is None
        meta, data = np.frombuffer(b"META", np.uint8).copy(), np.arange(10, dtype=np.uint8)
        assert s.put_from_with_metadata("md", data.ctypes.data, meta.ctypes.data, 10, 4) == 0
        assert s.get("md") == b"META" + bytes(range(10))
    finally:
        s.close()


def test_batch_sessions_read_and_write_in_pieces(master):
    a, b = client(master), client(master, 0)
    try:
        layers, per = 3, 4096
        src = np.random.default_rng(3).integers(0, 256, (2, layers, per), dtype=np.uint8)   # 2 objects x 3 layers
        keys = ["page-0", "page-1"]
        assert a.batch_put_session_start(keys, [layers * per] * 2) == [0, 0]
        assert b.batch_is_exist(keys) == [0, 0]                       # nothing visible while writing
        for layer in range(layers):                                    # a layer at a time, as a layer-wise save
            ptrs = [[int(src[i, layer].ctypes.data)] for i in range(2)]
            assert a.batch_put_from_multi_buffer_ranges(keys, ptrs, [[per]] * 2, [[layer * per]] * 2) == [per, per]
        assert b.batch_is_exist(keys) == [0, 0]
        assert a.batch_put_session_end(keys) == [0, 0]
        assert [b.get(k) for k in keys] == [src[0].tobytes(), src[1].tobytes()]
        # a put session for an existing key, a duplicate, an unknown session, a revoked one
        assert a.batch_put_session_start(["page-0"], [10]) == [ErrorCode.OBJECT_ALREADY_EXISTS]
        assert a.batch_put_session_start(["x", "x"], [10, 10]) == [ErrorCode.INVALID_PARAMS] * 2
        assert a.batch_put_session_end(["never"]) == [ErrorCode.INVALID_PARAMS]
        assert a.batch_put_session_start(["gone"], [8]) == [0]
        assert a.batch_put_from_multi_buffer_ranges(["gone"], [[src.ctypes.data]], [[16]], [[0]]) == [ErrorCode.INVALID_PARAMS]
        assert a.batch_put_session_revoke(["gone"]) == [0] and a.is_exist("gone") == 0
        assert a.batch_put_session_start(["gone"], [8]) == [0] and a.batch_put_session_end(["gone"]) == [0]
        assert len(a.get("gone")) == 8                                  # bytes never written are unspecified
        # reads in sessions: ranges of each page into the reader's buffer, layer by layer, in reverse
        out = np.zeros((2, layers, per), np.uint8)
        assert b.register_buffer(out.ctypes.data, out.nbytes) == 0
        assert b.batch_get_session_start(keys + ["nope"]) == [0, 0, ErrorCode.OBJECT_NOT_FOUND]
        assert a.remove("page-0") == ErrorCode.OBJECT_HAS_LEASE       # a session leases its objects
        for layer in reversed(range(layers)):
            ptrs = [[int(out[i, layer].ctypes.data)] for i in range(2)]
            assert b.batch_get_into_multi_buffer_ranges(keys, ptrs, [[per]] * 2, [[layer * per]] * 2) == [per, per]
        assert np.array_equal(out, src)
        assert b.batch_get_into_multi_buffer_ranges(keys, [[out.ctypes.data]] * 2, [[per + 1]] * 2, [[layers * per - per]] * 2) == \
            [ErrorCode.INVALID_PARAMS] * 2                              # past the object's end
        assert b.batch_get_into_multi_buffer_ranges(keys, [[out.ctypes.data]], [[per]], [[0]]) == [ErrorCode.INVALID_PARAMS] * 2
        assert b.batch_get_session_end(keys) == 0
    finally:
        a.close()
        b.close()


def test_dummy_clients_join_through_a_full_client(master):
    full = client(master, 32 << 20)
    dummy, stray = MooncakeDistributedStore(), MooncakeDistributedStore()
    try:
        assert dummy.setup_dummy(256 << 20, 64 << 20, full.get_hostname()) == 0
        assert dummy.get_hostname() == full.get_hostname() and dummy.health_check() == 0
        assert dummy.put("from-dummy", b"d" * 5000) == 0 and full.get("from-dummy") == b"d" * 5000
        assert full.put("from-full", b"f" * 100) == 0 and dummy.get("from-full") == b"f" * 100
        assert dummy._store.stats()["segment_size"] == 0            # a dummy owns no segment
        # memory for the zero-copy calls, registered with the store
        a = dummy.alloc_from_mem_pool(4096)
        assert a != 0 and dummy.get_into("from-full", a, 4096) == 100
        assert dummy.alloc_from_mem_pool(0) == 0 and stray.alloc_from_mem_pool(10) == 0   # not set up
        # nothing answers at another port; bad arguments
        assert stray.setup_dummy(1 << 20, 1 << 20, "localhost:1") == ErrorCode.TRANSFER_FAIL
        assert stray.setup_dummy(1 << 20, 1 << 20, "no-port") == ErrorCode.INVALID_PARAMS
        assert stray.setup_dummy("lots", 1 << 20, full.get_hostname()) == ErrorCode.INVALID_PARAMS
        assert dummy.setup_dummy(1 << 20, 1 << 20, full.get_hostname()) == ErrorCode.INVALID_PARAMS   # already set up
        port = full.get_hostname()
        full.close()
        assert stray.setup_dummy(1 << 20, 1 << 20, port) == ErrorCode.TRANSFER_FAIL   # the full client is gone
    finally:
        for s in (dummy, stray, full):
            s.close()


def test_buffer_pool_leases_registered_scratch_memory(master):
    import threading

    from kvstore.mooncake import BufferPool
    s = client(master)
    try:
        assert s.put("v", bytes(range(200))) == 0
        pool = BufferPool(s, max_regions=2, max_bytes=1 << 20)
        with pool.buffer(4096) as lease:
            assert lease.size == 4096 and lease.ptr % 64 == 0
            assert s.get_into("v", lease.ptr, lease.size) == 200 and bytes(lease.buffer[:200]) == bytes(range(200))
            held = np.frombuffer(lease.buffer, dtype=np.uint8)        # a view that outlives the lease
        assert bytes(held[:200]) == bytes(range(200))                   # still valid: it keeps the memory
        again = pool.acquire(4096)
        assert again.ptr != int(held.ctypes.data)                       # and no other lease gets it
        again.release()
        del held
        a, b = pool.acquire(100), pool.acquire(100)
        with pytest.raises(kvstore.NoSpaceError):
            pool.acquire(100, block=False)                              # max_regions
        with pytest.raises(kvstore.NoSpaceError):
            pool.acquire(100, timeout=0.05)
        threading.Timer(0.1, a.release).start()
        c = pool.acquire(100, timeout=5)                                # waits for a release
        with pytest.raises(kvstore.NoSpaceError):
            pool.acquire(2 << 20)                                       # past max_bytes
        with pytest.raises(kvstore.InvalidArgumentError):
            pool.close()                                                # leases still active
        b.release()
        c.release()
        with pytest.raises(kvstore.InvalidArgumentError):
            _ = c.buffer
        pool.close()
        with pytest.raises(kvstore.StoreClosedError):
            pool.acquire(10)
    finally:
        s.close()


def test_the_async_wrapper_runs_calls_in_worker_threads(master):
    import asyncio

    from kvstore.mooncake import MooncakeDistributedStoreAsync
    s = MooncakeDistributedStoreAsync()
    assert s.setup("localhost", "P2PHANDSHAKE", 16 << 20, 0, "tcp", "", f"127.0.0.1:{master.port}") == 0

    async def main() -> list:
        puts = await asyncio.gather(*(s.async_put(f"a{i}", bytes([i]) * 100) for i in range(8)))
        got = await asyncio.gather(*(s.async_get(f"a{i}") for i in range(8)))
        return [puts, got, await s.async_batch_is_exist(["a0", "nope"])]
    try:
        puts, got, exist = asyncio.run(main())
        assert puts == [0] * 8 and got == [bytes([i]) * 100 for i in range(8)] and exist == [1, 0]
        with pytest.raises(AttributeError):
            _ = s.async_nothing
        with pytest.raises(AttributeError):
            _ = s.nothing
    finally:
        s.close()


def test_new_calls_refuse_bad_arguments_and_change_nothing(master):
    from kvstore.mooncake import BufferPool, MooncakeHostMemAllocator, bind_to_numa_node
    s = client(master)
    try:
        assert s.put("kept", b"k" * 64) == 0
        buf = np.zeros(64, np.uint8)
        p = buf.ctypes.data
        assert s.register_buffer(p, 64) == 0
        bad = ErrorCode.INVALID_PARAMS
        # put sessions: sizes of the wrong type or sign, lists that differ, keys not a list
        assert s.batch_put_session_start(["n1"], [-1]) == [bad]
        assert s.batch_put_session_start(["n1"], ["8"]) == [bad]
        assert s.batch_put_session_start(["n1", "n2"], [8]) == [bad, bad]
        assert s.batch_put_session_start("n1", [8]) == []
        assert s.batch_put_from_multi_buffer_ranges(["n1"], [[p]], [[8]], [[0]]) == [bad]   # no session open
        assert s.batch_put_session_start(["n1"], [16]) == [0]
        for ptrs, sizes, offsets in (([[p]], [[8, 8]], [[0]]), ([[p]], [[-8]], [[0]]), ([[p]], [[8]], [["0"]]),
                                     ([p], [8], [0]), ([[p]], [[8]], [[16]])):
            assert s.batch_put_from_multi_buffer_ranges(["n1"], ptrs, sizes, offsets) == [bad], (ptrs, sizes, offsets)
        assert s.batch_put_session_revoke(["n1"]) == [0] and s.is_exist("n1") == 0
        # get sessions and ranges: the same checks on the read side
        assert s.batch_get_session_start(["nope"]) == [ErrorCode.OBJECT_NOT_FOUND]
        for ptrs, sizes, offsets in (([[p]], [[8, 8]], [[0]]), ([[p]], [[-8]], [[0]]), ([[p]], [[8]], [[60]])):
            assert s.batch_get_into_multi_buffer_ranges(["kept"], ptrs, sizes, offsets) == [bad]
        assert s.batch_get_session_end("notalist") == 0
        # allocators, the pool and NUMA binding
        alloc = MooncakeHostMemAllocator()
        assert alloc.alloc(0) == 0 and alloc.alloc(-1) == 0 and alloc.alloc(True) == 0 and alloc.free(12345) == bad
        pool = BufferPool(s)
        for size in (0, -1, True, "8", 1 << 40):
            with pytest.raises((kvstore.InvalidArgumentError, kvstore.NoSpaceError)):
                pool.acquire(size)
        pool.close()
        with pytest.raises(kvstore.ArgumentTypeError):
            BufferPool("store")
        assert bind_to_numa_node(-1) == bad and bind_to_numa_node(10_000) == bad and bind_to_numa_node("0") == bad
        assert not buf.any()
        assert s.get("kept") == b"k" * 64 and s.batch_is_exist(["n1", "n2", "nope"]) == [0, 0, 0]
        assert s._store.stats()["objects"] == 1
    finally:
        s.close()


def test_another_user_learns_nothing_from_a_full_client(master):
    """A full client tells dummy clients its master only when they run as its user."""
    import os
    import shutil
    import subprocess
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as user nobody")
    full = client(master)
    try:
        port = full.get_hostname().rpartition(":")[2]
        probe = ("import socket; c = socket.socket(socket.AF_UNIX); c.settimeout(5); "
                 f"c.connect(b'\\0kvstore-mooncake-{port}'); print(repr(c.recv(4096)))")
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", probe],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "b''", (r.stdout, r.stderr)   # closed, nothing said
        same = MooncakeDistributedStore()
        assert same.setup_dummy(1 << 20, 1 << 20, full.get_hostname()) == 0          # the same user is answered
        same.close()
    finally:
        full.close()
