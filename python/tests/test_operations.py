"""Every operation of kvstore.Store on the embedded store, with its documented semantics."""

import numpy as np
import pytest

import kvstore


def test_put_get_roundtrip_of_every_buffer_kind(store):
    values = {
        "bytes": b"hello world",
        "bytearray": bytearray(b"\x00\x01\x02" * 100),
        "memoryview": memoryview(b"abcdefgh")[2:6],
        "numpy": np.arange(1000, dtype=np.float32),
        "numpy2d": np.arange(64, dtype=np.int64).reshape(8, 8),
    }
    for key, value in values.items():
        store.put(key, value)
    for key, value in values.items():
        assert store.get(key) == bytes(memoryview(value).cast("B"))
        assert store.size(key) == memoryview(value).nbytes
        assert store.exists(key)


def test_put_existing_key_raises_and_keeps_value(store):
    store.put("k", b"first")
    with pytest.raises(kvstore.ObjectExistsError):
        store.put("k", b"second value")
    assert store.get("k") == b"first"
    assert store.stats()["objects"] == 1


def test_upsert_creates_and_replaces(store):
    store.upsert("k", b"one")
    used = store.stats()["bytes_used"]
    store.upsert("k", b"two")  # same size, never read: rewritten in place
    assert store.stats()["bytes_used"] == used
    assert store.get("k") == b"two"  # leases "k"
    store.upsert("k", b"new")  # leased: the new value goes elsewhere (the old one is not rewritten)
    assert store.get("k") == b"new"
    assert store.stats()["bytes_used"] == used  # no reader copies the old bytes: freed at once
    store.upsert("k", b"a longer value")
    assert store.get("k") == b"a longer value"
    s = store.stats()
    assert s["objects"] == 1 and s["object_bytes"] == len(b"a longer value")


def test_get_into_fills_caller_buffer(store):
    store.put("k", b"0123456789")
    buf = bytearray(16)
    assert store.get_into("k", buf) == 10
    assert buf[:10] == b"0123456789" and buf[10:] == bytes(6)
    arr = np.zeros(10, dtype=np.uint8)
    assert store.get_into("k", arr) == 10
    assert arr.tobytes() == b"0123456789"


def test_put_from_and_upsert_from(store):
    src = np.arange(256, dtype=np.uint8)
    store.register_buffer(src)
    store.put_from("k", src)
    store.upsert_from("k", src[::-1].copy())
    assert store.get("k") == bytes(range(255, -1, -1))
    store.unregister_buffer(src)


def test_put_parts_gathers_into_one_object(store):
    header = np.array([1, 2, 3, 4], dtype=np.uint32)
    data = np.arange(10, dtype=np.float64)
    store.put_parts("t", header, data, b"tail")
    assert store.get("t") == header.tobytes() + data.tobytes() + b"tail"
    store.upsert_parts("t", b"x", b"y")
    assert store.get("t") == b"xy"
    with pytest.raises(kvstore.ObjectExistsError):
        store.put_parts("t", b"z")


def test_put_batch_and_get_batch(store):
    keys = [f"k{i}" for i in range(10)]
    values = [bytes([i]) * (i + 1) for i in range(10)]
    assert store.put_batch(keys, values) == [None] * 10
    again = store.put_batch(["k0", "new"], [b"x", b"y"])
    assert isinstance(again[0], kvstore.ObjectExistsError) and again[1] is None
    assert store.get_batch(keys + ["missing"]) == values + [None]
    assert store.upsert_batch(["k0", "k1"], [b"A", b"BB"]) == [None, None]
    assert store.get_batch(["k0", "k1"]) == [b"A", b"BB"]


def test_batch_put_from_and_batch_get_into_with_gather_and_scatter(store):
    keys = ["a", "b", "c"]
    k = [np.full(100, i, np.uint8) for i in range(3)]
    v = [np.full(50, 10 + i, np.uint8) for i in range(3)]
    # each object gathered from two buffers
    assert store.batch_put_from(keys, [[k[i], v[i]] for i in range(3)]) == [None] * 3
    assert store.size("b") == 150
    # read back scattered into two buffers each
    k_out = [np.zeros(100, np.uint8) for _ in range(3)]
    v_out = [np.zeros(50, np.uint8) for _ in range(3)]
    assert store.batch_get_into(keys, [[k_out[i], v_out[i]] for i in range(3)]) == [150] * 3
    for i in range(3):
        assert np.array_equal(k_out[i], k[i]) and np.array_equal(v_out[i], v[i])
    # single buffers work too
    out = [bytearray(150) for _ in range(3)]
    assert store.batch_get_into(keys, out) == [150] * 3
    assert bytes(out[2]) == k[2].tobytes() + v[2].tobytes()
    res = store.batch_upsert_from(["a", "z"], [[b"1", b"2"], [b"3"]])
    assert res == [None, None]
    assert store.get("a") == b"12" and store.get("z") == b"3"
    res = store.batch_get_into(["a", "missing"], [bytearray(8), bytearray(8)])
    assert res[0] == 2 and isinstance(res[1], kvstore.ObjectNotFoundError)


def test_exists_size_remove(store):
    store.put("a", b"123")
    assert store.exists("a") and not store.exists("b")
    assert store.batch_exists(["a", "b"]) == [True, False]
    assert store.size("a") == 3
    with pytest.raises(kvstore.ObjectNotFoundError):
        store.size("b")
    with pytest.raises(kvstore.LeaseHeldError, match="leased"):  # exists() and size() leased it
        store.remove("a")
    assert store.get("a") == b"123"
    store.remove("a", force=True)
    assert not store.exists("a")
    with pytest.raises(kvstore.ObjectNotFoundError):
        store.remove("a")
    with pytest.raises(KeyError):  # ObjectNotFoundError is also a KeyError
        store.get("a")
    store.put("a", b"x")
    store.remove("a", force=True)
    assert store.stats()["bytes_used"] == 0


def test_batch_remove_and_remove_all(store):
    store.put_batch(["a", "b", "c"], [b"1", b"2", b"3"])
    res = store.batch_remove(["a", "nope"])
    assert res[0] is None and isinstance(res[1], kvstore.ObjectNotFoundError)
    assert store.remove_all() == 2
    s = store.stats()
    assert s["objects"] == 0 and s["bytes_used"] == 0 and s["free_blocks"] == 1
    assert store.remove_all() == 0


def test_register_and_unregister_buffer(store):
    a = bytearray(4096)
    store.register_buffer(a, location="cpu")
    assert store.stats()["registered_buffers"] == 1
    assert store.stats()["registered_bytes"] == 4096
    with pytest.raises(kvstore.InvalidArgumentError):
        store.register_buffer(memoryview(a)[100:200])  # overlaps
    store.unregister_buffer(a)
    assert store.stats()["registered_buffers"] == 0
    with pytest.raises(kvstore.InvalidArgumentError):
        store.unregister_buffer(a)
    store.register_buffer(a, location="cpu:0")
    store.unregister_buffer(a)


def test_stats_has_documented_keys(store):
    s = store.stats()
    for key in ("objects", "bytes_used", "capacity", "bytes_copied", "bytes_staged"):
        assert isinstance(s[key], int)
    assert s["capacity"] == 64 << 20


def test_store_sizes_and_context_manager():
    with kvstore.Store(segment_size="2MiB") as s:
        assert s.stats()["capacity"] == 2 << 20
        s.put("a", b"x")
    assert s.closed
    assert kvstore.Store(1 << 20, prefault=True).stats()["capacity"] == 1 << 20
    assert kvstore.Store().stats()["capacity"] == kvstore.DEFAULT_SEGMENT_SIZE


def test_parse_size():
    assert kvstore.parse_size(123) == 123
    assert kvstore.parse_size("1GiB") == 1 << 30
    assert kvstore.parse_size("16MB") == 16 << 20
    assert kvstore.parse_size("1.5 KiB") == 1536
    assert kvstore.parse_size("4096") == 4096
    for bad in ("", "1XB", "-1", "GiB", "1 2"):
        with pytest.raises(kvstore.InvalidArgumentError):
            kvstore.parse_size(bad)
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.parse_size(None)
    with pytest.raises(kvstore.InvalidArgumentError):
        kvstore.parse_size(-5)


def test_large_values_are_sliced_and_intact():
    n = (16 << 20) * 2 + 12345
    with kvstore.Store("96MiB") as s:
        src = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
        s.put("big", src)
        assert s.stats()["copy_ops"] >= 3  # slices of at most 16 MiB - 16 bytes
        out = np.empty(n, np.uint8)
        assert s.get_into("big", out) == n
        assert np.array_equal(out, src)
        assert s.get("big") == src.tobytes()


def test_keys_lists_every_visible_object():
    with kvstore.Store("4MiB") as s:
        assert s.keys() == []
        for k in ("a", "é/1", "req-7/layer-3"):
            s.put(k, b"x")
        s.remove("a")
        assert s.keys() == ["req-7/layer-3", "é/1"]                 # byte order of the UTF-8
        assert s.keys("^req-") == ["req-7/layer-3"] and s.keys("layer-[0-9]$") == ["req-7/layer-3"]
        with pytest.raises(TypeError):
            s.keys(5)
        with pytest.raises(kvstore.InvalidArgumentError, match="bad pattern"):
            s.keys("(")
    s.close()
    with pytest.raises(kvstore.StoreClosedError):
        s.keys()


def test_keys_come_in_pages_that_cover_every_key_once():
    # Keys of 1000 bytes: about a thousand fill a 1 MiB page, so 3000 take several pages.
    with kvstore.Store("64MiB") as s:
        want = sorted(f"{i:05d}-".ljust(1000, "k") for i in range(3000))
        assert all(r is None for r in s.put_batch(want, [b"v"] * len(want)))
        pages, after = 0, None
        seen = []
        while True:
            page, more = s._keys_page(after)
            pages += 1
            assert sum(4 + len(k) for k in page) <= 1 << 20
            seen += page
            if not more:
                break
            after = page[-1]
        assert pages >= 3 and seen == want
        assert s.keys() == want and list(s.scan_keys("^0000")) == want[:10]
