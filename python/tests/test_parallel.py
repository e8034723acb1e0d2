"""kvstore.parallel: tensors stored as parallel shards and read back in any layout (issue 19,
unified parallel tensor IO), checked against numpy slicing."""

from __future__ import annotations

import numpy as np
import pytest
from cluster import Master

import kvstore
from kvstore import parallel as P

RNG = np.random.default_rng(19)


@pytest.fixture
def store():
    with kvstore.Store("256MiB") as s:
        yield s


def tp(rank: int, size: int, dim: int | None) -> P.Axis:
    return P.Axis("tp", rank, size, dim)


def test_split_ranges_follow_numpy_array_split():
    for n in (0, 1, 7, 10, 64):
        for size in (1, 2, 3, 4, 7):
            starts = [P.split_range(n, size, r) for r in range(size)]
            pieces = np.array_split(np.arange(n), size)
            assert [(int(p[0]), int(p[-1]) + 1) if len(p) else (a, a) for p, (a, _) in zip(pieces, starts)] == starts


@pytest.mark.parametrize("shape, write_dim", [((6, 10, 7), 1), ((9, 5), 0), ((4, 3, 2, 5), 3), ((11,), 0)])
def test_any_layout_reads_back_as_numpy_slices(store, shape, write_dim):
    full = RNG.standard_normal(shape).astype(np.float32)
    for r in range(4):   # uneven splits included (array_split)
        P.put_tensor(store, "w", full, [tp(r, 4, write_dim)], full_input=True)
    assert np.array_equal(P.get_tensor(store, "w"), full)
    for dim in range(len(shape)):
        for size in (1, 2, 3):
            for r in range(size):
                got = P.get_tensor(store, "w", [tp(r, size, dim)])
                assert np.array_equal(got, np.array_split(full, size, axis=dim)[r]), (dim, size, r)
    same = P.get_tensor(store, "w", [tp(2, 4, write_dim)])
    assert np.array_equal(same, np.array_split(full, 4, axis=write_dim)[2])
    assert sorted(store.keys()) == ["w" + P.LAYOUT_SUFFIX] + [f"w_tp_{r}" for r in range(4)]   # Mooncake's shard names


def test_shard_input_with_two_axes_and_replicas(store):
    full = RNG.integers(0, 1 << 30, (8, 12), dtype=np.int64)
    for dp in range(2):
        for r in range(3):
            shard = np.ascontiguousarray(np.array_split(full, 3, axis=1)[r])
            P.put_tensor(store, "m", shard, [P.Axis("dp", dp, 2), tp(r, 3, 1)], full_input=False)
    assert np.array_equal(P.get_tensor(store, "m"), full)
    assert np.array_equal(P.get_tensor(store, "m", [tp(1, 2, 0)]), full[4:])
    # the DP replica read is the one the target names
    store.remove("m_dp_0_tp_1", force=True)
    assert np.array_equal(P.get_tensor(store, "m", [P.Axis("dp", 1, 2)]), full)
    with pytest.raises(kvstore.ObjectNotFoundError):
        P.get_tensor(store, "m", [P.Axis("dp", 0, 2)])
    # a shard's full shape is its own times the splits: (3, 5) as TP rank 0 of 2 on dim 1 is half of (3, 10)
    P.put_tensor(store, "half", np.ones((3, 5)), [tp(0, 2, 1)], full_input=False)
    assert P.get_tensor(store, "half", [tp(0, 2, 1)]).shape == (3, 5)


def test_reads_into_a_target_and_refuse_a_wrong_one(store):
    full = RNG.standard_normal((16, 8)).astype(np.float16)
    for r in range(2):
        P.put_tensor(store, "h", full, [tp(r, 2, 0)], full_input=True)
    into = np.zeros((16, 4), np.float16)
    assert P.get_tensor(store, "h", [tp(1, 2, 1)], into=into) is into and np.array_equal(into, full[:, 4:])
    for bad in (np.zeros((16, 5), np.float16), np.zeros((16, 4), np.float32), np.zeros((16, 4), np.float16)[:, ::1].T.copy()):
        with pytest.raises(kvstore.InvalidArgumentError):
            P.get_tensor(store, "h", [tp(1, 2, 1)], into=bad)


def test_layouts_that_disagree_and_tampered_shards_are_refused(store):
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    P.put_tensor(store, "t", full, [tp(0, 2, 1)], full_input=True)
    with pytest.raises(kvstore.InvalidArgumentError, match="another layout"):
        P.put_tensor(store, "t", full, [tp(1, 3, 1)], full_input=True)
    with pytest.raises(kvstore.ObjectNotFoundError):   # rank 1 was never written
        P.get_tensor(store, "t")
    P.put_tensor(store, "t", full, [tp(1, 2, 1)], full_input=True)
    assert np.array_equal(P.get_tensor(store, "t"), full)
    # a shard object replaced by another tensor: the read refuses it rather than mix it in
    store.upsert_tensor("t_tp_1", np.zeros((4, 2), np.float32))
    with pytest.raises(kvstore.InvalidArgumentError, match="t_tp_1"):
        P.get_tensor(store, "t")
    store.upsert_tensor("t_tp_1", np.zeros((4, 3), np.float64))
    with pytest.raises(kvstore.InvalidArgumentError, match="t_tp_1"):
        P.get_tensor(store, "t")
    # layouts that lie: malformed, a negative or huge shape, a split past the dimensions, too
    # many shards to plan, an object far larger than any layout (never read past the limit)
    axis = b'{"kind":"tp","size":%d,"split_dim":0,"expert_id":null,"stage_id":null}'
    for raw in (b'{"version":1,"shape":[1099511627776,1024],"dtype":0,"axes":[' + axis % 2 + b"]}",
                b'{"version":1,"shape":[65536,65536],"dtype":0,"axes":[' + axis % 65536 + b',{"kind":"dp","size":65536,'
                b'"split_dim":1,"expert_id":null,"stage_id":null}]}', b"\x00" * (64 << 20),
                b"{", b'{"version":1,"shape":[-1],"dtype":0,"axes":[{"kind":"tp","size":2,"split_dim":0,'
                b'"expert_id":null,"stage_id":null}]}', b'{"version":1,"shape":[4],"dtype":0,"axes":[{"kind":"tp",'
                b'"size":2,"split_dim":5,"expert_id":null,"stage_id":null}]}', b"x" * 5000):
        store.upsert("bad" + P.LAYOUT_SUFFIX, raw)
        with pytest.raises(kvstore.InvalidArgumentError, match="layout"):
            P.get_tensor(store, "bad")
    with pytest.raises(kvstore.ObjectNotFoundError):
        P.get_tensor(store, "never")
    keys = sorted(store.keys())
    with pytest.raises(kvstore.InvalidArgumentError):
        P.get_tensor(store, "t", kind="tensorflow")
    assert sorted(store.keys()) == keys   # nothing changed


@pytest.mark.parametrize("axes", [[P.Axis("xp", 0, 2)], [tp(2, 2, 0)], [tp(0, 0, 0)], [tp(0, 2, 7)], [],
                                  [tp(0, 2, 0), tp(1, 2, 1)], ["tp"], [tp(0, 65536, 0), P.Axis("ep", 0, 2, 1)],
                                  [P.Axis("tp", True, 2, 0)], [P.Axis("tp", 0, 2, -1)]])
def test_bad_axes_are_refused_and_nothing_is_written(store, axes):
    with pytest.raises(kvstore.InvalidArgumentError):
        P.put_tensor(store, "x", np.zeros((4, 4)), axes, full_input=True)
    assert store.keys() == []


def test_shards_in_other_clients_segments(tmp_path):
    # Writers are two clients of one master, each holding its own shards; a third client with
    # no segment reads them all (mapped shared memory) into another layout.
    with Master() as m:
        a, b = (kvstore.Store.connect(m.url, segment_size=64 << 20) for _ in range(2))
        reader = kvstore.Store.connect(m.url, segment_size=0)
        try:
            full = RNG.standard_normal((512, 1024)).astype(np.float32)
            for r, writer in enumerate((a, a, b, b)):
                P.put_tensor(writer, "layer", full, [tp(r, 4, 1)], full_input=True)
            for r in range(2):
                assert np.array_equal(P.get_tensor(reader, "layer", [tp(r, 2, 1)]), full[:, r * 512:(r + 1) * 512])
            assert np.array_equal(P.get_tensor(reader, "layer", [tp(1, 2, 0)]), full[256:])
        finally:
            for s in (a, b, reader):
                s.close()


def test_put_shards_writes_every_shard_of_one_layout(store):
    full = RNG.standard_normal((6, 8)).astype(np.float32)
    assert P.put_shards(store, "all", full, [[tp(r, 4, 1)] for r in range(4)]) == [None] * 4
    assert np.array_equal(P.get_tensor(store, "all"), full)
    assert np.array_equal(P.get_tensor(store, "all", [tp(0, 2, 0)]), full[:3])
    again = P.put_shards(store, "all", full, [[tp(r, 4, 1)] for r in range(4)])      # already there
    assert all(isinstance(e, kvstore.ObjectExistsError) for e in again)
    keys = sorted(store.keys())
    for bad in ([], [[tp(0, 2, 0)], [tp(1, 4, 0)]], [[tp(0, 2, 9)]]):
        with pytest.raises(kvstore.InvalidArgumentError):
            P.put_shards(store, "other", full, bad)
    assert sorted(store.keys()) == keys
