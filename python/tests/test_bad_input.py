"""Bad input: a clear, typed error, the store exactly as it was, and no leaked reference."""

import sys

import numpy as np
import pytest

import kvstore


def snapshot(store):
    s = store.stats()
    keys = ("objects", "object_bytes", "bytes_used", "active_readers", "registered_buffers", "puts")
    return {k: s[k] for k in keys}


@pytest.fixture
def seeded(store):
    store.put("existing", b"value")
    return store


def check_unchanged(store, before, value=None, refs=None):
    assert snapshot(store) == before
    assert store.get("existing") == b"value"
    if value is not None:
        assert sys.getrefcount(value) == refs + 1  # + this function's own reference
        if isinstance(value, bytearray):
            value.append(0)  # would raise BufferError if an export had leaked
            value.pop()


@pytest.mark.parametrize(
    "key, exc",
    [
        ("", kvstore.InvalidArgumentError),
        ("k" * (kvstore.MAX_KEY_BYTES + 1), kvstore.InvalidArgumentError),
        ("é" * (kvstore.MAX_KEY_BYTES // 2 + 1), kvstore.InvalidArgumentError),  # limit is in UTF-8 bytes
        (b"bytes-key", kvstore.ArgumentTypeError),
        (42, kvstore.ArgumentTypeError),
        (None, kvstore.ArgumentTypeError),
        ("\ud800", kvstore.InvalidArgumentError),
    ],
)
def test_bad_keys(seeded, key, exc):
    value = bytearray(b"payload")
    before, refs = snapshot(seeded), sys.getrefcount(value)
    for call in (
        lambda: seeded.put(key, value),
        lambda: seeded.upsert(key, value),
        lambda: seeded.put_parts(key, value),
        lambda: seeded.get(key),
        lambda: seeded.get_into(key, value),
        lambda: seeded.exists(key),
        lambda: seeded.size(key),
        lambda: seeded.remove(key),
    ):
        with pytest.raises(exc, match=r"\w"):
            call()
    check_unchanged(seeded, before, value, refs)


def test_longest_key_is_accepted(store):
    key = "k" * kvstore.MAX_KEY_BYTES
    store.put(key, b"x")
    assert store.get(key) == b"x"


def test_type_errors_are_also_type_error(store):
    with pytest.raises(TypeError):
        store.put(1, b"x")
    with pytest.raises(TypeError):
        store.put("k", None)
    with pytest.raises(TypeError):
        store.put("k", "a str is not bytes")


@pytest.mark.parametrize(
    "value, exc",
    [
        (None, kvstore.ArgumentTypeError),
        ("text", kvstore.ArgumentTypeError),
        (12, kvstore.ArgumentTypeError),
        (b"", kvstore.InvalidArgumentError),
        (np.zeros(0, np.uint8), kvstore.InvalidArgumentError),
        (np.arange(20, dtype=np.uint8)[::2], kvstore.InvalidArgumentError),
        (np.zeros((4, 4), np.uint8).T, kvstore.InvalidArgumentError),
    ],
)
def test_bad_values(seeded, value, exc):
    before = snapshot(seeded)
    for call in (
        lambda: seeded.put("new", value),
        lambda: seeded.upsert("existing", value),
        lambda: seeded.put_from("new", value),
        lambda: seeded.put_parts("new", value, value),
    ):
        with pytest.raises(exc):
            call()
    check_unchanged(seeded, before)
    assert not seeded.exists("new")


def test_value_larger_than_segment():
    with kvstore.Store("1MiB") as s:
        s.put("existing", b"value")
        before = snapshot(s)
        big = bytearray((1 << 20) + 1)
        refs = sys.getrefcount(big)
        with pytest.raises(kvstore.NoSpaceError, match="larger than the segment"):
            s.put("big", big)
        with pytest.raises(MemoryError):
            s.upsert("existing", big)
        check_unchanged(s, before, big, refs)
        assert not s.exists("big")


def test_full_store_raises_no_space_and_recovers():
    # Nothing evictable: every object is hard-pinned.
    with kvstore.Store("1MiB") as s:
        s.put("existing", b"value", hard_pin=True)
        for i in range(15):
            s.put(f"f{i}", bytes(64 << 10), hard_pin=True)
        before = snapshot(s)
        with pytest.raises(kvstore.NoSpaceError, match="nothing left to evict"):
            s.put("one-too-many", bytes(128 << 10))
        check_unchanged(s, before)
        s.remove("f0")
        s.remove("f1")
        s.put("one-too-many", bytes(128 << 10))


def test_read_only_and_too_small_targets(seeded):
    before = snapshot(seeded)
    with pytest.raises(kvstore.InvalidArgumentError, match="read-only"):
        seeded.get_into("existing", b"immutable bytes")
    ro = np.zeros(10, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(kvstore.InvalidArgumentError, match="read-only"):
        seeded.get_into("existing", ro)
    small = bytearray(4)
    refs = sys.getrefcount(small)
    with pytest.raises(kvstore.InvalidArgumentError, match="too small"):
        seeded.get_into("existing", small)
    assert small == bytearray(4)
    with pytest.raises(kvstore.InvalidArgumentError):
        seeded.get_into("existing", np.zeros(20, np.uint8)[::2])
    res = seeded.batch_get_into(["existing"], [bytearray(2)])
    assert isinstance(res[0], kvstore.InvalidArgumentError)
    check_unchanged(seeded, before, small, refs)


def test_batch_lists_of_different_lengths(seeded):
    before = snapshot(seeded)
    for call in (
        lambda: seeded.put_batch(["a", "b"], [b"1"]),
        lambda: seeded.upsert_batch(["a"], [b"1", b"2"]),
        lambda: seeded.batch_put_from(["a", "b"], [b"1"]),
        lambda: seeded.batch_upsert_from([], [[b"1"]]),
        lambda: seeded.batch_get_into(["existing"], []),
    ):
        with pytest.raises(kvstore.InvalidArgumentError, match="different lengths"):
            call()
    check_unchanged(seeded, before)
    assert not seeded.exists("a")


def test_batch_arguments_must_be_sequences(seeded):
    with pytest.raises(kvstore.ArgumentTypeError):
        seeded.put_batch("ab", [b"1", b"2"])
    with pytest.raises(kvstore.ArgumentTypeError):
        seeded.get_batch(None)
    with pytest.raises(kvstore.ArgumentTypeError):
        seeded.batch_exists({"a": 1})


def test_batch_reports_bad_entries_per_key(seeded):
    before_objects = seeded.stats()["objects"]
    res = seeded.put_batch(["ok", 5, "", "existing", "none"], [b"1", b"2", b"3", b"4", None])
    assert res[0] is None
    assert isinstance(res[1], kvstore.ArgumentTypeError)
    assert isinstance(res[2], kvstore.InvalidArgumentError)
    assert isinstance(res[3], kvstore.ObjectExistsError)
    assert isinstance(res[4], kvstore.ArgumentTypeError)
    assert seeded.stats()["objects"] == before_objects + 1
    got = seeded.get_batch(["ok", 5, "missing"])
    assert got[0] == b"1" and isinstance(got[1], kvstore.ArgumentTypeError) and got[2] is None
    assert seeded.batch_exists(["ok", 7])[0] is True


def test_bad_registrations(store):
    a = bytearray(100)
    with pytest.raises(kvstore.InvalidArgumentError, match="no device"):
        store.register_buffer(a, location="cuda:0")
    with pytest.raises(kvstore.InvalidArgumentError):
        store.register_buffer(a, location="gpu")
    with pytest.raises(kvstore.InvalidArgumentError):
        store.register_buffer(bytearray())
    with pytest.raises(kvstore.ArgumentTypeError):
        store.register_buffer(None)
    with pytest.raises(kvstore.InvalidArgumentError):
        store.register_buffer(np.zeros(10)[::2])
    with pytest.raises(kvstore.InvalidArgumentError):
        store.unregister_buffer(a)
    assert store.stats()["registered_buffers"] == 0
    a.append(1)  # no buffer export left behind


def test_registered_buffer_is_pinned_until_unregistered(store):
    a = bytearray(100)
    store.register_buffer(a)
    with pytest.raises(BufferError):
        a.append(1)  # the registration keeps the memory in place
    store.unregister_buffer(a)
    a.append(1)


def test_bad_store_arguments():
    for bad in (0, -1, "0", "lots", 10, "63"):
        with pytest.raises(kvstore.InvalidArgumentError):
            kvstore.Store(bad)
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.Store(None)
    with pytest.raises(kvstore.NoSpaceError):
        kvstore.Store("1000TiB")


def test_wrong_argument_counts(store):
    with pytest.raises(TypeError):
        store.put("k")
    with pytest.raises(TypeError):
        store.get_into("k")
    with pytest.raises(TypeError):
        store.put_batch(["k"])


def test_every_call_after_close_raises(store):
    store.put("k", b"v")
    buf = bytearray(1)
    store.register_buffer(buf)
    store.close()
    store.close()  # idempotent
    assert store.closed
    buf.append(1)  # close released the registration
    calls = [
        lambda: store.put("a", b"1"),
        lambda: store.upsert("a", b"1"),
        lambda: store.put_from("a", b"1"),
        lambda: store.upsert_from("a", b"1"),
        lambda: store.put_parts("a", b"1"),
        lambda: store.upsert_parts("a", b"1"),
        lambda: store.put_batch(["a"], [b"1"]),
        lambda: store.upsert_batch(["a"], [b"1"]),
        lambda: store.batch_put_from(["a"], [b"1"]),
        lambda: store.batch_upsert_from(["a"], [[b"1"]]),
        lambda: store.get("k"),
        lambda: store.get_into("k", bytearray(1)),
        lambda: store.get_batch(["k"]),
        lambda: store.batch_get_into(["k"], [bytearray(1)]),
        lambda: store.exists("k"),
        lambda: store.batch_exists(["k"]),
        lambda: store.size("k"),
        lambda: store.remove("k"),
        lambda: store.batch_remove(["k"]),
        lambda: store.remove_all(),
        lambda: store.register_buffer(bytearray(1)),
        lambda: store.unregister_buffer(buf),
        lambda: store.stats(),
    ]
    for call in calls:
        with pytest.raises(kvstore.StoreClosedError):
            call()


def test_error_hierarchy():
    assert issubclass(kvstore.ObjectNotFoundError, KeyError)
    assert issubclass(kvstore.NoSpaceError, MemoryError)
    assert issubclass(kvstore.InvalidArgumentError, ValueError)
    assert issubclass(kvstore.ArgumentTypeError, TypeError)
    for cls in (kvstore.ObjectNotFoundError, kvstore.ObjectExistsError, kvstore.NoSpaceError,
                kvstore.LeaseHeldError, kvstore.InvalidArgumentError, kvstore.TransferError,
                kvstore.StoreClosedError, kvstore.UnsupportedError):
        assert issubclass(cls, kvstore.StoreError)
    assert str(kvstore.ObjectNotFoundError("object 'x' not found")) == "object 'x' not found"


@pytest.mark.parametrize("target", [None, "text", 5, 1.5])
def test_targets_of_the_wrong_type(seeded, target):
    before = snapshot(seeded)
    with pytest.raises(kvstore.ArgumentTypeError, match="target buffer must be"):
        seeded.get_into("existing", target)
    res = seeded.batch_get_into(["existing"], [target])
    assert isinstance(res[0], kvstore.ArgumentTypeError)
    check_unchanged(seeded, before)


def test_parts_calls_need_at_least_one_byte(seeded):
    before = snapshot(seeded)
    with pytest.raises(kvstore.InvalidArgumentError, match="empty"):
        seeded.put_parts("new")
    with pytest.raises(kvstore.InvalidArgumentError, match="empty"):
        seeded.upsert_parts("existing")
    res = seeded.batch_put_from(["new"], [[]])
    assert isinstance(res[0], kvstore.InvalidArgumentError)
    check_unchanged(seeded, before)
    assert not seeded.exists("new")


def test_bad_member_of_a_gather_or_scatter_list_fails_that_key_only(seeded):
    good = bytearray(b"kept")
    refs = sys.getrefcount(good)
    res = seeded.batch_put_from(["g1", "g2"], [[good, None], [b"fine"]])
    assert isinstance(res[0], kvstore.ArgumentTypeError) and res[1] is None
    assert not seeded.exists("g1") and seeded.get("g2") == b"fine"
    assert sys.getrefcount(good) == refs
    good.append(0)  # the good member's export was released with the failed key

    before = snapshot(seeded)
    first, second = bytearray(3), bytearray(10)
    res = seeded.batch_get_into(["existing", "g2"], [[first, b"read-only"], [second]])
    assert isinstance(res[0], kvstore.InvalidArgumentError) and res[1] == 4
    assert first == bytearray(3) and bytes(second[:4]) == b"fine"
    assert snapshot(seeded) == before


def test_batch_remove_and_exists_report_bad_keys_per_key(seeded):
    before_objects = seeded.stats()["objects"]
    res = seeded.batch_remove(["", 3, "missing"])
    assert isinstance(res[0], kvstore.InvalidArgumentError)
    assert isinstance(res[1], kvstore.ArgumentTypeError)
    assert isinstance(res[2], kvstore.ObjectNotFoundError)
    res = seeded.batch_exists(["", "existing"])
    assert isinstance(res[0], kvstore.InvalidArgumentError) and res[1] is True
    assert seeded.stats()["objects"] == before_objects


@pytest.mark.parametrize(
    "location, exc",
    [
        (5, kvstore.ArgumentTypeError),
        (b"cpu", kvstore.ArgumentTypeError),
        ("", kvstore.InvalidArgumentError),
        ("cpu:1", kvstore.InvalidArgumentError),
        ("cuda", kvstore.InvalidArgumentError),
        ("\ud800", kvstore.InvalidArgumentError),
    ],
)
def test_bad_locations(store, location, exc):
    a = bytearray(64)
    with pytest.raises(exc):
        store.register_buffer(a, location=location)
    assert store.stats()["registered_buffers"] == 0
    a.append(1)  # no export left behind


def test_bad_unregistrations(store):
    a = bytearray(64)
    store.register_buffer(a)
    with pytest.raises(kvstore.InvalidArgumentError, match="no buffer is registered"):
        store.unregister_buffer(12345)
    with pytest.raises(kvstore.InvalidArgumentError):
        store.unregister_buffer(memoryview(a)[8:])  # only the start address unregisters
    with pytest.raises(kvstore.ArgumentTypeError):
        store.unregister_buffer(None)
    assert store.stats()["registered_buffers"] == 1
    store.unregister_buffer(a)


@pytest.mark.parametrize("size", [True, 1.5, [1], b"1GiB"])
def test_segment_sizes_of_the_wrong_type(size):
    with pytest.raises(kvstore.ArgumentTypeError):
        kvstore.Store(size)


def test_location_none_means_the_buffers_own_device(store):
    a = bytearray(64)
    store.register_buffer(a, location=None)
    assert store.stats()["registered_buffers"] == 1
    store.unregister_buffer(a)
