"""Each put copies the caller's bytes exactly once and stages nothing; gets copy once."""

import numpy as np

import kvstore

MAX_SLICE = 16 * 1024 * 1024 - 16


def delta(store, before):
    after = store.stats()
    return {k: after[k] - before[k] for k in ("bytes_copied", "bytes_staged", "copy_ops")}


def test_put_copies_once_without_staging(store):
    for n in (1, 4096, 1 << 20, 20 << 20):
        value = np.ones(n, np.uint8)
        before = store.stats()
        store.put(f"k{n}", value)
        d = delta(store, before)
        assert d["bytes_copied"] == n
        assert d["bytes_staged"] == 0
        assert d["copy_ops"] == -(-n // MAX_SLICE)


def test_put_parts_copies_each_part_once(store):
    parts = [np.ones(1000, np.uint8), np.ones(3000, np.uint8), b"x" * 96]
    before = store.stats()
    store.put_parts("p", *parts)
    d = delta(store, before)
    assert d == {"bytes_copied": 4096, "bytes_staged": 0, "copy_ops": 3}


def test_batch_put_from_gathers_without_staging(store):
    keys = [f"b{i}" for i in range(16)]
    bufs = [[np.ones(4096, np.uint8), np.ones(4096, np.uint8)] for _ in keys]
    before = store.stats()
    assert store.batch_put_from(keys, bufs) == [None] * 16
    d = delta(store, before)
    assert d == {"bytes_copied": 16 * 8192, "bytes_staged": 0, "copy_ops": 32}


def test_get_into_copies_once(store):
    store.put("k", np.ones(1 << 20, np.uint8))
    out = np.empty(1 << 20, np.uint8)
    before = store.stats()
    store.get_into("k", out)
    assert delta(store, before) == {"bytes_copied": 1 << 20, "bytes_staged": 0, "copy_ops": 1}


def test_failed_put_copies_nothing(store):
    store.put("k", b"abc")
    before = store.stats()
    try:
        store.put("k", b"def")
    except kvstore.ObjectExistsError:
        pass
    assert delta(store, before)["bytes_copied"] == 0
