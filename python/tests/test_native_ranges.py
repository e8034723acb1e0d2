"""The extension's ranged, piecewise and address calls (the Mooncake drop-in and kvstore.parallel
sit on them): every wrong argument raises a typed error and leaves the store as it was."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore
from kvstore import _native


@pytest.fixture
def store():
    with kvstore.Store("16MiB") as s:
        s.put("a", bytes(range(200)))
        yield s


def unchanged(s: kvstore.Store) -> None:
    assert s.keys() == ["a"] and s.get("a") == bytes(range(200))
    st = s.stats()
    assert st["active_readers"] == 0 and st["objects"] == 1


def test_read_ranges_bad_arguments(store):
    buf = np.zeros(64, np.uint8)
    p = buf.ctypes.data
    for args, error in ((("a", [[(p, 0, 1)]]), kvstore.ArgumentTypeError),            # keys not a list
                        ((["a"], [[(p, 0, 1)], [(p, 0, 1)]]), kvstore.InvalidArgumentError),   # lengths differ
                        ((["a"], [[(p, 0)]]), kvstore.ArgumentTypeError),              # not a triple
                        ((["a"], [[(p, -1, 4)]]), kvstore.InvalidArgumentError),       # negative
                        ((["a"], [[(p, 0, 2**64)]]), kvstore.InvalidArgumentError),    # past 64 bits
                        ((["a"], [np.zeros((1, 3), np.int32)]), kvstore.InvalidArgumentError),   # packed, not int64
                        ((["a"], [np.array([[p, 0, -4]], np.int64)]), kvstore.InvalidArgumentError),
                        ((["a"], [5]), kvstore.ArgumentTypeError)):
        with pytest.raises(error):
            store._read_ranges(*args)
        unchanged(store)
    assert not buf.any()
    # per key and per range: a bad key fails alone, a range outside its object fails alone
    got = store._read_ranges([7, "a", "nope"], [[(p, 0, 1)], [(p, 0, 4), (p, 199, 2)], [(p, 0, 1)]])
    assert isinstance(got[0][0], kvstore.ArgumentTypeError) and got[1][0] == 4
    assert isinstance(got[1][1], kvstore.InvalidArgumentError) and isinstance(got[2][0], kvstore.ObjectNotFoundError)
    unchanged(store)


def test_writes_in_pieces_bad_arguments(store):
    src = np.arange(64, dtype=np.uint8)
    p = src.ctypes.data
    for args in ((["b"], [-1], False), (["b"], ["8"], False), (["b", "c"], [8], False)):
        with pytest.raises((kvstore.InvalidArgumentError, kvstore.ArgumentTypeError)):
            store._write_begin(*args)
        unchanged(store)
    got = store._write_begin(["a", "zero", 5], [8, 0, 8], False)
    assert isinstance(got[0], kvstore.ObjectExistsError) and isinstance(got[1], kvstore.InvalidArgumentError)
    assert isinstance(got[2], kvstore.ArgumentTypeError)
    (w,) = store._write_begin(["b"], [8], False)
    for args in (([w], [[(p, 0, 1)], [(p, 0, 1)]]), (["x"], [[(p, 0, 1)]]), ([w], [[(p, 0, -1)]])):
        with pytest.raises(kvstore.InvalidArgumentError):
            store._write_ranges(*args)
    (out,) = store._write_ranges([w], [[(p, 4, 8)]])               # past the object's end: that range alone
    assert isinstance(out[0], kvstore.InvalidArgumentError)
    assert store._write_ranges([w + 999], [[(p, 0, 1)]])[0][0].__class__ is kvstore.InvalidArgumentError
    with pytest.raises(kvstore.InvalidArgumentError):
        store._write_end(["x"])
    assert store._write_end([w], True) == [None] and isinstance(store._write_end([w])[0], kvstore.InvalidArgumentError)
    unchanged(store)


def test_address_calls_bad_arguments(store):
    buf = np.zeros(256, np.uint8)
    for args, error in ((("a", "0", 4), kvstore.ArgumentTypeError), (("a", buf.ctypes.data, -1), kvstore.InvalidArgumentError),
                        ((5, buf.ctypes.data, 4), kvstore.ArgumentTypeError),
                        (("a", buf.ctypes.data, 4), kvstore.InvalidArgumentError)):   # smaller than the object
        with pytest.raises(error):
            store._get_into_addr(*args)
    with pytest.raises(kvstore.InvalidArgumentError):
        store._batch_flat(["a"], [buf.ctypes.data], [256], 3)
    with pytest.raises(kvstore.InvalidArgumentError):
        store._batch_flat(["a"], [buf.ctypes.data], [256, 1], 0)
    assert isinstance(store._batch_flat(["a"], ["x"], [256], 0)[0], kvstore.ArgumentTypeError)
    with pytest.raises(kvstore.ArgumentTypeError):
        store._get_batch_new(["a"], 5)
    assert isinstance(store._get_batch_new(["a"], lambda n: bytearray(n - 1))[0], kvstore.InvalidArgumentError)
    with pytest.raises(kvstore.InvalidArgumentError):
        _native.Buffer(-1)
    with pytest.raises(TypeError):
        _native.Buffer("8")
    assert not buf.any()
    unchanged(store)
