"""The store as a cache: leases, eviction, pins, TTLs and their statistics (docs/cache.md).
Time-dependent rules are unit-tested in Swift with a hand-driven clock; here a few short TTLs
check that the same rules arrive through Python."""

import math
import time

import numpy as np
import pytest

import kvstore

KIB = 1024
#: A TTL that a busy CI machine cannot overrun between two consecutive statements.
SHORT = 0.5


def value(i: int, size: int = 64 * KIB) -> bytes:
    return (i.to_bytes(8, "little") * (size // 8 + 1))[:size]


def fill(store, count: int, size: int = 64 * KIB, prefix: str = "k", **options) -> list[str]:
    keys = [f"{prefix}{i}" for i in range(count)]
    for i, k in enumerate(keys):
        store.put(k, value(i, size), **options)
    return keys


# ---- leases ----


@pytest.mark.parametrize("read", ["get", "get_into", "exists", "size", "get_batch", "batch_get_into",
                                  "batch_exists", "get_tensor"])
def test_every_read_call_leases_the_object(store, read):
    store.put_tensor("k", np.arange(4, dtype=np.int32))
    {
        "get": lambda: store.get("k"),
        "get_into": lambda: store.get_into("k", bytearray(4096)),
        "exists": lambda: store.exists("k"),
        "size": lambda: store.size("k"),
        "get_batch": lambda: store.get_batch(["k"]),
        "batch_get_into": lambda: store.batch_get_into(["k"], [bytearray(4096)]),
        "batch_exists": lambda: store.batch_exists(["k"]),
        "get_tensor": lambda: store.get_tensor("k"),
    }[read]()
    assert store.stats()["leases_active"] == 1
    with pytest.raises(kvstore.LeaseHeldError, match="force=True"):
        store.remove("k")
    assert isinstance(store.batch_remove(["k"])[0], kvstore.LeaseHeldError)
    assert store.remove_all() == 0
    assert store.exists("k")
    store.remove("k", force=True)
    assert not store.exists("k")
    assert store.stats()["leases_active"] == 0 and store.stats()["bytes_used"] == 0


def test_writes_do_not_lease(store):
    store.put("k", b"v")
    store.upsert("k", b"w")
    assert store.stats()["leases_active"] == 0
    store.remove("k")


def test_lease_ends_after_lease_ttl():
    with kvstore.Store("1MiB", lease_ttl=SHORT) as s:
        s.put("k", b"v")
        s.get("k")
        with pytest.raises(kvstore.LeaseHeldError):
            s.remove("k")
        time.sleep(SHORT + 0.1)
        assert s.stats()["leases_active"] == 0
        s.remove("k")


def test_zero_lease_ttl_turns_leases_off():
    with kvstore.Store("1MiB", lease_ttl=0) as s:
        s.put("k", b"v")
        assert s.get("k") == b"v"
        assert s.stats()["leases_active"] == 0
        s.remove("k")


def test_upsert_of_a_leased_object_writes_elsewhere_and_frees_the_old_bytes_at_once():
    with kvstore.Store("1MiB", lease_ttl=SHORT) as s:
        s.put("k", value(1, 4096))
        assert s.get("k") == value(1, 4096)  # leased
        s.upsert("k", value(2, 4096))         # neither waits nor fails, nor rewrites in place
        assert s.get("k") == value(2, 4096)   # readers see the new value at once
        # No reader is copying the old bytes: they are freed now, not when the lease ends.
        assert s.stats()["bytes_used"] == 4096


# ---- eviction ----


def test_filling_to_three_times_capacity_succeeds_and_evicts_oldest_first():
    with kvstore.Store("4MiB") as s:
        keys = fill(s, 3 * 64)  # 12 MiB of 64 KiB objects
        st = s.stats()
        assert st["objects"] + st["evicted_objects"] == len(keys)
        assert st["evicted_bytes"] == st["evicted_objects"] * 64 * KIB
        assert st["bytes_used"] <= 0.9 * st["capacity"]
        present = [k for k in keys if s.exists(k)]
        assert present == keys[-len(present):], "the most recent objects stay"
        assert not s.exists(keys[0])
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get(keys[0])
        for i, k in enumerate(keys):
            if k in present:
                assert s.get(k) == value(i)


def test_reading_an_object_keeps_it_from_eviction():
    with kvstore.Store("1MiB", lease_ttl=0) as s:
        keys = fill(s, 12)
        for _ in range(10):  # reads move it to the recent end
            s.get(keys[0])
            fill(s, 1, prefix=f"x{_}-")
        assert s.exists(keys[0])
        assert not s.exists(keys[1])


def test_eviction_watermark_and_ratio_are_per_store():
    with kvstore.Store("1MiB", eviction_high_watermark=0.5, eviction_ratio=0.25) as s:
        fill(s, 8)   # exactly 50%
        assert s.stats()["evicted_objects"] == 0
        fill(s, 1, prefix="over")
        assert s.stats()["evicted_objects"] == 4  # one round: 256 KiB
        assert s.stats()["bytes_used"] == 5 * 64 * KIB


def test_hard_pinned_objects_are_never_evicted():
    with kvstore.Store("1MiB") as s:
        pinned = fill(s, 4, prefix="pin", hard_pin=True)
        assert s.stats()["hard_pinned_bytes"] == 4 * 64 * KIB
        fill(s, 50)
        assert all(s.exists(k) for k in pinned)
        s.remove(pinned[0], force=True)  # pins do not stop removal (exists() above leased it)
        assert s.stats()["hard_pinned_bytes"] == 3 * 64 * KIB


def test_no_space_only_when_nothing_is_evictable():
    with kvstore.Store("1MiB") as s:
        fill(s, 14, prefix="pin", hard_pin=True)
        for k in ("k0", "k1"):  # the segment is full, and these two are leased
            s.put(k, value(0))
            assert s.exists(k)
        before = s.stats()
        with pytest.raises(kvstore.NoSpaceError, match="nothing left to evict"):
            s.put("more", value(0))
        after = s.stats()
        assert {k: after[k] for k in ("objects", "bytes_used", "evicted_objects")} == \
            {k: before[k] for k in ("objects", "bytes_used", "evicted_objects")}


def test_soft_pinned_objects_go_after_all_others_and_become_ordinary():
    with kvstore.Store("1MiB", lease_ttl=0) as s:  # exists() below must not lease
        s.put("soft", value(0), soft_pin=True)
        s.put("short", value(1), soft_pin=True, soft_pin_ttl=SHORT)
        assert s.stats()["soft_pinned_bytes"] == 2 * 64 * KIB
        fill(s, 30)
        assert s.exists("soft") and s.exists("short")
        time.sleep(SHORT + 0.1)
        fill(s, 30, prefix="again")
        assert s.exists("soft") and not s.exists("short")
        assert s.stats()["soft_pinned_bytes"] == 64 * KIB


def test_ttl_expires_the_object():
    with kvstore.Store("1MiB") as s:
        s.put("k", b"v", ttl=SHORT)
        s.put("keep", b"v", ttl=60)
        assert s.get("k") == b"v"
        time.sleep(SHORT + 0.1)
        assert not s.exists("k")
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get("k")
        assert s.exists("keep")
        assert s.stats()["expired_objects"] == 1


WRITES = {
    "put": lambda s, k, **o: s.put(k, b"abc", **o),
    "upsert": lambda s, k, **o: s.upsert(k, b"abc", **o),
    "put_from": lambda s, k, **o: s.put_from(k, bytearray(b"abc"), **o),
    "upsert_from": lambda s, k, **o: s.upsert_from(k, bytearray(b"abc"), **o),
    "put_parts": lambda s, k, **o: s.put_parts(k, b"a", b"bc", **o),
    "upsert_parts": lambda s, k, **o: s.upsert_parts(k, b"a", b"bc", **o),
    "put_batch": lambda s, k, **o: _one(s.put_batch([k], [b"abc"], **o)),
    "upsert_batch": lambda s, k, **o: _one(s.upsert_batch([k], [b"abc"], **o)),
    "batch_put_from": lambda s, k, **o: _one(s.batch_put_from([k], [bytearray(b"abc")], **o)),
    "batch_upsert_from": lambda s, k, **o: _one(s.batch_upsert_from([k], [[b"a", b"bc"]], **o)),
    "put_tensor": lambda s, k, **o: s.put_tensor(k, np.ones(3, np.uint8), **o),
    "upsert_tensor": lambda s, k, **o: s.upsert_tensor(k, np.ones(3, np.uint8), **o),
    "batch_put_tensor": lambda s, k, **o: _one(s.batch_put_tensor([k], [np.ones(3, np.uint8)], **o)),
    "batch_upsert_tensor": lambda s, k, **o: _one(s.batch_upsert_tensor([k], [np.ones(3, np.uint8)], **o)),
}


def _one(results):
    assert len(results) == 1
    if results[0] is not None:
        raise results[0]


@pytest.mark.parametrize("write", sorted(WRITES))
def test_every_write_takes_the_options(store, write):
    WRITES[write](store, "hard", hard_pin=True)
    WRITES[write](store, "soft", soft_pin=True, soft_pin_ttl=30)
    WRITES[write](store, "ttl", ttl=30.5)
    st = store.stats()
    assert st["hard_pinned_bytes"] == st["soft_pinned_bytes"] == store.size("hard")
    WRITES[write](store, "none")
    assert store.stats()["objects"] == 4


# ---- bad options and settings ----


BAD_OPTIONS = [
    ({"ttl": -1}, kvstore.InvalidArgumentError, "negative"),
    ({"ttl": 0}, kvstore.InvalidArgumentError, "greater than 0"),
    ({"ttl": math.nan}, kvstore.InvalidArgumentError, "finite"),
    ({"ttl": math.inf}, kvstore.InvalidArgumentError, "finite"),
    ({"ttl": 1e9}, kvstore.InvalidArgumentError, "365 days"),
    ({"ttl": "5"}, kvstore.ArgumentTypeError, "ttl must be a number"),
    ({"ttl": True}, kvstore.ArgumentTypeError, "ttl must be a number"),
    ({"soft_pin": True, "soft_pin_ttl": -5}, kvstore.InvalidArgumentError, "soft-pin TTL must not be negative"),
    ({"soft_pin": True, "soft_pin_ttl": 1e12}, kvstore.InvalidArgumentError, "365 days"),
    ({"soft_pin_ttl": 5}, kvstore.InvalidArgumentError, "not soft-pinned"),
    ({"hard_pin": True, "soft_pin": True}, kvstore.InvalidArgumentError, "hard-pinned or soft-pinned, not both"),
    ({"hard_pin": 1}, kvstore.ArgumentTypeError, "hard_pin must be True or False"),
    ({"soft_pin": "yes"}, kvstore.ArgumentTypeError, "soft_pin must be True or False"),
    ({"hardpin": True}, kvstore.ArgumentTypeError, "unknown option 'hardpin'"),
    ({"lease_ttl": 1}, kvstore.ArgumentTypeError, "unknown option"),
]


@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("options, exc, match", BAD_OPTIONS, ids=[str(o[0]) for o in BAD_OPTIONS])
def test_bad_options_are_refused_and_change_nothing(store, write, options, exc, match):
    store.put("existing", b"value")
    before = store.stats()
    with pytest.raises(exc, match=match):
        WRITES[write](store, "new", **options)
    after = store.stats()
    for k in ("objects", "bytes_used", "puts", "hard_pinned_bytes", "soft_pinned_bytes", "evicted_objects"):
        assert after[k] == before[k], k
    assert not store.exists("new")


def test_hard_pinning_more_than_capacity_is_refused():
    with kvstore.Store("1MiB") as s:
        fill(s, 15, prefix="pin", hard_pin=True)
        with pytest.raises(kvstore.NoSpaceError, match="hard-pinning"):
            s.put("big", value(0, 128 * KIB), hard_pin=True)
        with pytest.raises(kvstore.NoSpaceError, match="larger than the segment"):
            s.put("huge", bytes(2 << 20), hard_pin=True)
        assert s.stats()["hard_pinned_bytes"] == 15 * 64 * KIB
        s.put("ordinary", value(0, 32 * KIB))  # evicts nothing pinned: there is room


@pytest.mark.parametrize("settings, exc, match", [
    ({"lease_ttl": -1}, kvstore.InvalidArgumentError, "lease TTL must not be negative"),
    ({"lease_ttl": math.nan}, kvstore.InvalidArgumentError, "lease TTL must be a finite"),
    ({"lease_ttl": 1e9}, kvstore.InvalidArgumentError, "365 days"),
    ({"lease_ttl": "5s"}, kvstore.ArgumentTypeError, "lease_ttl must be a number"),
    ({"soft_pin_ttl": 0}, kvstore.InvalidArgumentError, "soft-pin TTL must be greater than 0"),
    ({"soft_pin_ttl": None}, kvstore.ArgumentTypeError, "soft_pin_ttl must be a number"),
    ({"eviction_high_watermark": 0}, kvstore.InvalidArgumentError, r"eviction high watermark must be a fraction in \(0, 1\]"),
    ({"eviction_high_watermark": 1.5}, kvstore.InvalidArgumentError, "eviction high watermark"),
    ({"eviction_ratio": 0}, kvstore.InvalidArgumentError, "eviction ratio"),
    ({"eviction_ratio": math.inf}, kvstore.InvalidArgumentError, "eviction ratio"),
    ({"eviction_ratio": [0.1]}, kvstore.ArgumentTypeError, "eviction_ratio must be a number"),
    ({"prefault": 1}, kvstore.ArgumentTypeError, "prefault must be True or False"),
    ({"pin_memory": "yes"}, kvstore.ArgumentTypeError, "pin_memory must be True or False"),
    ({"lease_ttl": True}, kvstore.ArgumentTypeError, "lease_ttl must be a number"),
    ({"eviction_high_watermark": "0.9"}, kvstore.ArgumentTypeError, "eviction_high_watermark must be a number"),
])
def test_bad_store_settings_are_refused(settings, exc, match):
    with pytest.raises(exc, match=match):
        kvstore.Store("1MiB", **settings)


@pytest.mark.parametrize("force", ["yes", 1, None, 0.0])
def test_force_must_be_a_bool_and_a_bad_one_removes_nothing(store, force):
    store.put("k", b"v")
    assert store.exists("k")  # leased: only a real force=True could remove it
    before = store.stats()
    for call in (lambda: store.remove("k", force=force), lambda: store.batch_remove(["k"], force=force),
                 lambda: store.remove_all(force=force)):
        with pytest.raises(kvstore.ArgumentTypeError, match="force must be True or False"):
            call()
    after = store.stats()
    assert (after["objects"], after["removes"], after["leases_active"]) == \
        (before["objects"], before["removes"], before["leases_active"])
    assert store.get("k") == b"v"


def test_unknown_store_setting_is_a_type_error():
    with pytest.raises(TypeError, match="lease"):
        kvstore.Store("1MiB", lease=5)


def test_stats_report_the_cache():
    with kvstore.Store("1MiB") as s:
        fill(s, 20)
        s.get("k19")
        with pytest.raises(kvstore.ObjectNotFoundError):
            s.get("k0")
        st = s.stats()
        for name in ("puts", "gets", "hits", "misses", "evicted_objects", "evicted_bytes", "expired_objects",
                     "leases_active", "bytes_used", "hard_pinned_bytes", "soft_pinned_bytes", "capacity"):
            assert isinstance(st[name], int), name
        assert (st["puts"], st["gets"], st["hits"], st["misses"]) == (20, 2, 1, 1)
        assert st["leases_active"] == 1 and st["capacity"] == 1 << 20
