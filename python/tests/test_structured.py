"""kvstore.structured: structured objects (named members + metadata), read whole, by member, or
as slices of array members (issue 19, Mooncake's structured_object_store)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cluster import Master

import kvstore
from kvstore.structured import BundleRef, BundleTransfer, BundleTransferPolicy, StructuredObjectPayload


@pytest.fixture
def transfer():
    with kvstore.Store("64MiB") as s:
        yield BundleTransfer(s, key_prefix="demo/structured")


def payload():
    return StructuredObjectPayload(metadata={"step": 7, "layout": "rollout"},
                                   buffers={"tokens": np.arange(24, dtype=np.int32).reshape(6, 4),
                                            "mask": np.ones((6, 4), dtype=np.int8), "prompt_ids": b"sample-ids"})


def test_whole_members_and_slices(transfer):
    ref = transfer.put_structured_object(payload())
    assert ref.key.startswith("demo/structured/")
    result = transfer.materialize(transfer.read_spec(ref))
    assert result.metadata == {"step": 7, "layout": "rollout"}
    assert np.array_equal(result.objects["tokens"], np.arange(24, dtype=np.int32).reshape(6, 4))
    assert result.objects["prompt_ids"] == b"sample-ids" and result.objects["mask"].dtype == np.int8
    tokens = np.arange(24, dtype=np.int32).reshape(6, 4)
    spec = transfer.read_spec(ref).select_members(["tokens"]).slice_member("tokens", axis=0, start=2, end=5)
    assert list(transfer.materialize(spec).objects) == ["tokens"]
    assert np.array_equal(transfer.materialize(spec).objects["tokens"], tokens[2:5])
    cols = transfer.read_spec(ref).select_members(["tokens"]).slice_member("tokens", axis=1, start=1, end=3)
    assert np.array_equal(transfer.materialize(cols).objects["tokens"], tokens[:, 1:3])
    dst = np.zeros((3, 4), dtype=np.int32)
    assert transfer.materialize_into(spec, {"tokens": dst}).objects["tokens"] is dst and np.array_equal(dst, tokens[2:5])


def test_bad_reads_and_writes_are_refused(transfer):
    ref = transfer.put_structured_object(payload())
    spec = transfer.read_spec(ref)
    for bad in (lambda: spec.select_members(["nope"]), lambda: spec.slice_member("prompt_ids", 0, 0, 1),
                lambda: spec.slice_member("tokens", 2, 0, 1), lambda: spec.slice_member("tokens", 0, 4, 9),
                lambda: transfer.materialize_into(spec.select_members(["tokens"]), {"tokens": np.zeros((6, 4), np.int64)}),
                lambda: transfer.put_structured_object(StructuredObjectPayload({"a/b": b"x"})),
                lambda: transfer.put_structured_object(StructuredObjectPayload({"x": b"1"}, metadata=object())),
                lambda: transfer.put_structured_object(StructuredObjectPayload({"x": [1, 2]}), BundleTransferPolicy("zero_copy"))):
        with pytest.raises(kvstore.InvalidArgumentError):
            bad()
    # a member replaced by another tensor: the read refuses it
    transfer.store.upsert_tensor(f"{ref.key}/m/tokens", np.zeros((6, 4), np.float32))
    with pytest.raises(kvstore.InvalidArgumentError, match="manifest"):
        transfer.materialize(transfer.read_spec(ref))
    # manifests that lie: a member name that reaches another key, an unknown kind or dtype, a
    # huge shape, a bytes member whose object differs from its size, an oversized manifest
    good = transfer.store.get(f"{ref.key}/manifest")
    for forged in ({"version": 1, "members": {"../x": {"kind": "bytes", "size": 1}}},
                   {"version": 1, "members": {"a": {"kind": "pickle"}}},
                   {"version": 1, "members": {"a": {"kind": "array", "dtype": 99, "shape": [1]}}},
                   {"version": 1, "members": {"a": {"kind": "array", "dtype": 0, "shape": [1 << 40, 1 << 20]}}},
                   {"version": 1, "members": {}}, {"version": 2, "members": {"a": {"kind": "bytes", "size": 1}}}, [1]):
        transfer.store.upsert(f"{ref.key}/manifest", json.dumps(forged).encode())
        with pytest.raises(kvstore.InvalidArgumentError, match="manifest"):
            transfer.read_spec(ref)
    transfer.store.upsert(f"{ref.key}/manifest", b" " * (2 << 20))
    with pytest.raises(kvstore.InvalidArgumentError, match="manifest"):
        transfer.read_spec(ref)
    lie = json.loads(good)
    lie["members"]["prompt_ids"]["size"] = 3
    transfer.store.upsert(f"{ref.key}/manifest", json.dumps(lie).encode())
    with pytest.raises(kvstore.InvalidArgumentError, match="prompt_ids"):
        transfer.materialize(transfer.read_spec(ref).select_members(["prompt_ids"]))
    with pytest.raises(kvstore.InvalidArgumentError):
        transfer.read_spec("not a ref")
    transfer.store.upsert(f"{ref.key}/manifest", good)
    transfer.remove_bundle(ref)
    with pytest.raises(kvstore.ObjectNotFoundError):
        transfer.read_spec(ref)
    assert transfer.store.keys() == []
    with pytest.raises(kvstore.ObjectNotFoundError):
        transfer.read_spec(BundleRef("never"))


def test_bundles_and_the_mooncake_helper():
    from kvstore.mooncake import MooncakeBundleTransfer, MooncakeDistributedStore
    with Master() as m:
        s = MooncakeDistributedStore()
        helper = MooncakeBundleTransfer(s, key_prefix="b")
        with pytest.raises(kvstore.StoreClosedError):
            helper.read_spec(BundleRef("b/x"))
        assert s.setup("localhost", "P2PHANDSHAKE", 16 << 20, 0, "tcp", "", f"127.0.0.1:{m.port}") == 0
        try:
            ref = helper.put_bundle({"a": b"alpha", "w": np.eye(3, dtype=np.float16)}, manifest={"n": 2})
            got = helper.materialize(helper.read_spec(ref))
            assert got.metadata == {"n": 2} and got.objects["a"] == b"alpha" and np.array_equal(got.objects["w"], np.eye(3))
        finally:
            s.close()
