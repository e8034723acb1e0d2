"""The tensor API: every dtype and rank, the stored format, batches, DLPack and
__cuda_array_interface__ inputs, and every bad input (the store is unchanged after each)."""

import struct
import threading

import numpy as np
import pytest
from dlpack_producer import DLPackTensor

import kvstore

NUMPY_DTYPES = {
    "float32": 0, "float64": 1, "int8": 2, "uint8": 3, "int16": 4, "uint16": 5, "int32": 6,
    "uint32": 7, "int64": 8, "uint64": 9, "bool": 10, "float16": 11,
}
SHAPES = [(), (3,), (2, 3), (2, 1, 3), (1, 2, 1, 2), (2, 1, 2, 1, 2), (1,) * 5 + (3,),
          (2,) + (1,) * 5 + (2,), (1, 2) * 4]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) if shape else 1
    raw = rng.integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8)
    a = raw.view(dtype).reshape(shape)
    if dtype == "bool":
        a = (raw % 2).astype(bool).reshape(shape)
    return a


def header_fields(blob: bytes) -> dict:
    """Decodes the 304-byte header independently (struct), per the field table in Sources/KVCore/TensorHeader.swift."""
    magic, version, hsize, dtype, ndim, layout, flags, offset, nbytes = struct.unpack_from("<IHHiiIIQQ", blob, 0)
    glob = struct.unpack_from("<8q", blob, 40)
    local = struct.unpack_from("<8q", blob, 104)
    axes = struct.unpack_from("<I", blob, 168)[0]
    return dict(magic=magic, version=version, hsize=hsize, dtype=dtype, ndim=ndim, layout=layout,
                flags=flags, offset=offset, nbytes=nbytes, glob=glob, local=local, axes=axes)


def snapshot(store):
    s = store.stats()
    return {k: s[k] for k in ("objects", "bytes_used", "registered_buffers")}


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_every_numpy_dtype_and_rank_round_trips(store, dtype, shape):
    a = sample(dtype, shape)
    store.put_tensor("t", a)
    out = store.get_tensor("t")
    assert out.dtype == a.dtype and out.shape == a.shape
    assert np.array_equal(out, a)
    into = np.zeros_like(a)
    assert store.get_tensor_into("t", into) is into
    assert np.array_equal(into, a)


def test_stored_bytes_are_the_mooncake_format(store):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    store.put_tensor("t", a)
    blob = store.get("t")
    h = header_fields(blob)
    assert h == dict(magic=0x4D4F4F4E, version=1, hsize=304, dtype=4, ndim=3, layout=0, flags=0, offset=304,
                     nbytes=48, glob=(2, 3, 4, -1, -1, -1, -1, -1), local=(2, 3, 4, -1, -1, -1, -1, -1), axes=0)
    assert blob[304:] == a.tobytes()
    assert blob[172:304] == bytes(132)


def test_header_and_data_are_two_parts_of_one_write_without_staging(store):
    a = np.ones((256, 1024), dtype=np.float32)
    before = store.stats()
    store.put_tensor("t", a)
    after = store.stats()
    assert after["bytes_copied"] - before["bytes_copied"] == 304 + a.nbytes
    assert after["copy_ops"] - before["copy_ops"] == 2   # header, data: each copied once, in place
    assert after["bytes_staged"] == 0
    before = after
    store.get_tensor("t")
    after = store.stats()
    assert after["bytes_copied"] - before["bytes_copied"] == 304 + a.nbytes
    assert after["bytes_staged"] == 0


@pytest.mark.parametrize("code,bits,name,raw", [(4, 16, "bfloat16", np.uint16), (10, 8, "float8_e4m3fn", np.uint8),
                                                (12, 8, "float8_e5m2", np.uint8)])
def test_bf16_and_fp8_round_trip_as_raw_element_types(store, code, bits, name, raw):
    bits_ = sample(np.dtype(raw).name, (4, 5), seed=code)
    store.put_tensor("t", DLPackTensor(bits_, code, bits, (4, 5)))
    h = header_fields(store.get("t"))
    assert h["dtype"] == {12: 14, 10: 13, 4: 12}[code]
    out = store.get_tensor("t")
    assert out.dtype == raw and out.shape == (4, 5)
    assert np.array_equal(out, bits_)
    into = np.zeros((4, 5), dtype=raw)
    store.get_tensor_into("t", into)
    assert np.array_equal(into, bits_)


@pytest.mark.parametrize("versioned", [True, False])
def test_a_read_only_dlpack_tensor_is_a_source_but_never_a_target(store, versioned):
    # DLPack 1.0's versioned capsule carries a read-only flag; a legacy capsule has none.
    a = sample("uint16", (4, 5), seed=3)
    src = DLPackTensor(a, 1, 16, (4, 5), read_only=True, versioned=versioned)
    store.put_tensor("t", src)
    assert np.array_equal(store.get_tensor("t"), a)
    store.put_tensor("u", np.full((4, 5), 9, np.uint16))
    if versioned:
        with pytest.raises(kvstore.InvalidArgumentError, match="read-only"):
            store.get_tensor_into("u", src)
        assert np.array_equal(a, sample("uint16", (4, 5), seed=3))   # not written
    else:
        store.get_tensor_into("u", src)   # nothing says it is read-only
        assert (a == 9).all()


def test_dlpack_input_of_every_numpy_dtype(store):
    for i, dtype in enumerate(NUMPY_DTYPES):
        a = sample(dtype, (3, 2), seed=i)

        class Wrapper:  # only DLPack: the path torch and cupy objects take when not special-cased
            def __dlpack__(self, stream=None):
                return a.__dlpack__()

            def __dlpack_device__(self):
                return a.__dlpack_device__()

        store.put_tensor(f"d{i}", Wrapper())
        assert np.array_equal(store.get_tensor(f"d{i}"), a)


def test_cuda_array_interface_memory_is_device_memory_even_without_a_driver(store):
    # __cuda_array_interface__ describes CUDA memory: without a CUDA driver it is refused,
    # never copied as host memory (a real device pointer would crash memcpy). The parsing and
    # the copies run on the CUDA driver test double (test_cuda_double.py).
    if "cuda:0" in kvstore.devices():
        pytest.skip("a CUDA driver is present")
    a = np.arange(10, dtype=np.float64)

    class CAI:
        __cuda_array_interface__ = {"shape": (2, 5), "typestr": "<f8", "data": (a.ctypes.data, False),
                                    "strides": None, "version": 3}

    with pytest.raises(kvstore.InvalidArgumentError, match="no device 'cuda:0'"):
        store.put_tensor("c", CAI())
    assert not store.exists("c")


def test_batches_with_hits_misses_and_bad_items(store):
    tensors = [sample("float32", (i + 1, 3), seed=i) for i in range(5)]
    r = store.batch_put_tensor([f"k{i}" for i in range(5)], tensors)
    assert r == [None] * 5
    r = store.batch_put_tensor(["k0", "new", 7, "cplx"], [tensors[0], tensors[1], tensors[2], np.ones(2, np.complex64)])
    assert isinstance(r[0], kvstore.ObjectExistsError) and r[1] is None
    assert isinstance(r[2], kvstore.ArgumentTypeError) and isinstance(r[3], kvstore.InvalidArgumentError)
    store.put("not-a-tensor", b"hello")
    out = store.batch_get_tensor(["k0", "missing", "k4", "not-a-tensor", "new"])
    assert np.array_equal(out[0], tensors[0]) and out[1] is None and np.array_equal(out[2], tensors[4])
    assert isinstance(out[3], kvstore.InvalidArgumentError)
    assert np.array_equal(out[4], tensors[1])
    # Upserts replace, also with a different shape and dtype.
    store.upsert_tensor("k0", np.arange(7, dtype=np.int64))
    assert np.array_equal(store.get_tensor("k0"), np.arange(7))
    r = store.batch_upsert_tensor(["k1", "k9"], [np.zeros(2, np.uint8), np.ones((2, 2), np.int32)])
    assert r == [None, None]
    assert store.get_tensor("k9").tolist() == [[1, 1], [1, 1]]
    with pytest.raises(kvstore.InvalidArgumentError):
        store.batch_put_tensor(["a", "b"], [tensors[0]])
    with pytest.raises(kvstore.ArgumentTypeError):
        store.batch_get_tensor("k0")


def test_empty_tensors(store):
    store.put_tensor("e", np.zeros((0, 4), np.float32))
    out = store.get_tensor("e")
    assert out.shape == (0, 4) and out.dtype == np.float32
    assert store.size("e") == 304


def test_concurrent_tensor_readers_and_writers():
    with kvstore.Store("32MiB") as s:
        keys = [f"k{i}" for i in range(8)]
        for k in keys:
            s.put_tensor(k, np.zeros(4096, np.int64))
        errors = []

        def writer(w):
            for n in range(300):
                s.upsert_tensor(keys[(w + n) % 8], np.full(4096 + (n % 3), w * 1000 + n, np.int64))

        def reader():
            for n in range(600):
                t = s.get_tensor(keys[n % 8])
                if not (t == t[0]).all():
                    errors.append(("torn", t[0]))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)] + \
                  [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


# ---- bad input: a clear typed error, and the store exactly as it was ----

def test_nine_dimensions_refused(store):
    before = snapshot(store)
    with pytest.raises(kvstore.InvalidArgumentError, match="at most 8 dimensions"):
        store.put_tensor("t", np.zeros((1,) * 9))
    with pytest.raises(kvstore.InvalidArgumentError, match="at most 8 dimensions"):
        store.put_tensor("t", DLPackTensor(np.zeros(1, np.float32), 2, 32, (1,) * 9))
    assert snapshot(store) == before


@pytest.mark.parametrize("value", [np.ones(3, np.complex64), np.ones(3, np.complex128),
                                   np.array([object(), 1], dtype=object), np.array(["a", "b"]),
                                   np.zeros(2, dtype="datetime64[s]")], ids=["c64", "c128", "object", "str", "datetime"])
def test_unsupported_dtypes_refused(store, value):
    before = snapshot(store)
    with pytest.raises(kvstore.InvalidArgumentError, match="cannot store"):
        store.put_tensor("t", value)
    assert snapshot(store) == before


def test_dlpack_complex_vector_lanes_and_strides_refused(store):
    raw = np.zeros(64, np.uint8)
    with pytest.raises(kvstore.InvalidArgumentError, match="cannot store"):
        store.put_tensor("t", DLPackTensor(raw, 5, 64, (4,)))          # complex64
    with pytest.raises(kvstore.InvalidArgumentError, match="cannot store"):
        store.put_tensor("t", DLPackTensor(raw, 2, 32, (4,), lanes=4))  # float32x4
    with pytest.raises(kvstore.InvalidArgumentError, match="not C-contiguous"):
        store.put_tensor("t", DLPackTensor(raw, 2, 32, (2, 2), strides=(1, 2)))
    with pytest.raises(kvstore.UnsupportedError):
        store.put_tensor("t", DLPackTensor(raw, 2, 32, (4,), device=(8, 0)))  # Metal
    assert not store.exists("t")


def test_non_contiguous_and_big_endian_refused(store):
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    with pytest.raises(kvstore.InvalidArgumentError, match="not C-contiguous"):
        store.put_tensor("t", a[:, ::2])
    with pytest.raises(kvstore.InvalidArgumentError, match="not C-contiguous"):
        store.put_tensor("t", a.T)
    with pytest.raises(kvstore.InvalidArgumentError, match="big-endian"):
        store.put_tensor("t", a.astype(">f4"))
    store.put_tensor("t", np.ascontiguousarray(a[:, ::2]))   # the documented explicit copy
    assert store.get_tensor("t").tolist() == a[:, ::2].tolist()


def test_non_tensor_inputs_refused(store):
    for bad in (b"bytes", 3, "str", None, [1, 2]):
        with pytest.raises(kvstore.ArgumentTypeError):
            store.put_tensor("t", bad)
    with pytest.raises(kvstore.ArgumentTypeError):
        store.put_tensor(5, np.ones(2))
    assert not store.exists("t")


def test_get_tensor_of_an_object_that_is_not_a_tensor(store):
    store.put("short", b"hello")
    store.put("long", bytes(1000))
    for key in ("short", "long"):
        with pytest.raises(kvstore.InvalidArgumentError, match="not a tensor"):
            store.get_tensor(key)
        target = np.full(3, 7.0)
        with pytest.raises(kvstore.InvalidArgumentError, match="not a tensor"):
            store.get_tensor_into(key, target)
        assert target.tolist() == [7.0] * 3
    with pytest.raises(kvstore.ObjectNotFoundError):
        store.get_tensor("missing")


def corrupt(field_offset: int, fmt: str, value) -> bytes:
    a = np.arange(6, dtype=np.float32)
    blob = bytearray(kvstore._native.tensor_header(0, (6,)) + a.tobytes())
    struct.pack_into(fmt, blob, field_offset, value)
    return bytes(blob)


@pytest.mark.parametrize("offset,fmt,value,message", [
    (0, "<I", 0x12345678, "not a tensor"), (4, "<H", 2, "version"), (6, "<H", 300, "header size"),
    (8, "<i", 99, "dtype"), (8, "<i", 1, "data bytes"), (12, "<i", 9, "ndim"), (16, "<I", 7, "layout"),
    (32, "<Q", 1 << 40, "data bytes"), (104, "<q", -3, "dimension"), (112, "<q", 5, "unused dimension"),
    (168, "<I", 9, "axes"),
], ids=["magic", "version", "hsize", "dtype", "dtype-size", "ndim", "layout", "nbytes", "negative", "unused", "axes"])
def test_corrupt_headers_are_refused(store, offset, fmt, value, message):
    store.put("bad", corrupt(offset, fmt, value))
    with pytest.raises(kvstore.InvalidArgumentError, match=message):
        store.get_tensor("bad")
    target = np.zeros(6, np.float32)
    with pytest.raises(kvstore.InvalidArgumentError):
        store.get_tensor_into("bad", target)
    assert not target.any()


def test_truncated_tensor_refused(store):
    blob = kvstore._native.tensor_header(0, (6,)) + bytes(20)   # 4 bytes short
    store.put("trunc", blob)
    with pytest.raises(kvstore.InvalidArgumentError, match="corrupt tensor"):
        store.get_tensor("trunc")


def test_get_tensor_into_mismatches_write_nothing(store):
    store.put_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    for target in (np.zeros((3, 2), np.float32), np.zeros((2, 3), np.float64), np.zeros(6, np.float32)):
        with pytest.raises(kvstore.InvalidArgumentError, match="target is"):
            store.get_tensor_into("t", target)
        assert not target.any()
    ro = np.zeros((2, 3), np.float32)
    ro.setflags(write=False)
    with pytest.raises(kvstore.InvalidArgumentError, match="read-only"):
        store.get_tensor_into("t", ro)
    with pytest.raises(kvstore.ArgumentTypeError):
        store.get_tensor_into("t", bytearray(400))
    with pytest.raises(kvstore.InvalidArgumentError, match="not C-contiguous"):
        store.get_tensor_into("t", np.zeros((2, 6), np.float32)[:, ::2])


def test_missing_device_and_bad_like(store):
    store.put_tensor("t", np.ones(3))
    with pytest.raises(kvstore.InvalidArgumentError, match="no device 'cuda:7'"):
        store.get_tensor("t", device="cuda:7")
    with pytest.raises(kvstore.ArgumentTypeError):
        store.get_tensor("t", device=0)
    with pytest.raises(kvstore.ArgumentTypeError):
        store.get_tensor("t", like=[1.0])
    assert np.array_equal(store.get_tensor("t", device="cpu"), np.ones(3))
    assert np.array_equal(store.get_tensor("t", like=np.zeros(1)), np.ones(3))
    a = np.zeros(16)
    with pytest.raises(kvstore.InvalidArgumentError, match="no device 'cuda:9'"):
        store.register_buffer(a, location="cuda:9")
    with pytest.raises(kvstore.InvalidArgumentError, match="no device 'gpu:0'"):
        store.register_buffer(a, location="gpu")
    with pytest.raises(kvstore.InvalidArgumentError):
        store.register_buffer(DLPackTensor(a, 2, 64, (16,)), location="cuda:0")
    assert store.stats()["registered_buffers"] == 0


def test_register_a_dlpack_tensor_and_transfer_through_it(store):
    a = np.arange(32, dtype=np.float32)
    t = DLPackTensor(a, 2, 32, (32,))
    store.register_buffer(t)
    assert store.stats()["registered_buffers"] == 1
    store.put_tensor("r", t)
    assert np.array_equal(store.get_tensor("r"), a)
    store.unregister_buffer(t)
    assert store.stats()["registered_buffers"] == 0


def test_closed_store_refuses_tensor_calls():
    s = kvstore.Store("1MiB")
    s.close()
    for call in (lambda: s.put_tensor("t", np.ones(2)), lambda: s.get_tensor("t"),
                 lambda: s.get_tensor_into("t", np.ones(2)), lambda: s.batch_put_tensor(["t"], [np.ones(2)]),
                 lambda: s.batch_get_tensor(["t"]), lambda: s.upsert_tensor("t", b"x")):
        with pytest.raises(kvstore.StoreClosedError):
            call()


def test_devices_lists_the_host_first():
    d = kvstore.devices()
    assert d[0] == "cpu:0"
    assert kvstore.devices(refresh=True)[0] == "cpu:0"


# ---- bad values of every other argument the tensor and device calls take ----

@pytest.mark.parametrize("key,exc", [(5, kvstore.ArgumentTypeError), (b"k", kvstore.ArgumentTypeError),
                                     ("", kvstore.InvalidArgumentError),
                                     ("k" * (kvstore.MAX_KEY_BYTES + 1), kvstore.InvalidArgumentError)])
def test_bad_keys_of_every_tensor_call(store, key, exc):
    store.put_tensor("ok", np.ones(3))
    before = snapshot(store)
    for call in (lambda: store.put_tensor(key, np.ones(2)), lambda: store.upsert_tensor(key, np.ones(2)),
                 lambda: store.get_tensor(key), lambda: store.get_tensor_into(key, np.ones(3))):
        with pytest.raises(exc):
            call()
    for batch in (store.batch_put_tensor([key, "new"], [np.ones(2), np.ones(2)]),
                  store.batch_upsert_tensor([key], [np.ones(2)]), store.batch_get_tensor([key, "ok"])):
        assert isinstance(batch[0], exc)
    assert store.exists("new")
    store.remove("new", force=True)
    assert snapshot(store) == before


def test_batch_tensor_lists_of_the_wrong_type(store):
    for keys, tensors in (("a", [np.ones(2)]), (["a"], np.ones((1, 2))), ({"a"}, [np.ones(2)])):
        with pytest.raises(kvstore.ArgumentTypeError):
            store.batch_put_tensor(keys, tensors)
    assert store.stats()["objects"] == 0
    assert store.batch_put_tensor(("a",), (np.ones(2),)) == [None]   # tuples are lists too


@pytest.mark.parametrize("device", ["", "cuda", "cuda:x", "fake:0", "cpu:1"])
def test_bad_device_strings(store, device):
    store.put_tensor("t", np.ones(2))
    with pytest.raises(kvstore.InvalidArgumentError):
        store.get_tensor("t", device=device)
    assert isinstance(store.batch_get_tensor(["t"], device="cpu")[0], np.ndarray)
    with pytest.raises(kvstore.InvalidArgumentError):
        store.batch_get_tensor(["t"], device=device)
    assert store.stats()["active_readers"] == 0


def test_register_tensor_bad_values(store):
    a = np.arange(16, dtype=np.float32)
    t = DLPackTensor(a, 2, 32, (16,))
    with pytest.raises(kvstore.ArgumentTypeError):
        store.register_buffer(t, location=5)
    with pytest.raises(kvstore.ArgumentTypeError):
        store.register_buffer(object())
    with pytest.raises(kvstore.InvalidArgumentError, match="empty"):
        store.register_buffer(DLPackTensor(a, 2, 32, (0,)))
    with pytest.raises(kvstore.InvalidArgumentError):
        store.unregister_buffer(t)   # never registered
    store.register_buffer(t)
    with pytest.raises(kvstore.InvalidArgumentError, match="overlaps"):
        store.register_buffer(DLPackTensor(a, 2, 32, (16,)))
    assert store.stats()["registered_buffers"] == 1
    store.unregister_buffer(t)
    assert store.stats()["registered_buffers"] == 0


@pytest.mark.parametrize("name", ["KVSTORE_PIN_MEMORY", "MC_STORE_PIN_MEMORY"])
def test_bad_pinning_environment_is_refused_at_creation(monkeypatch, name):
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(kvstore.InvalidArgumentError, match=name):
        kvstore.Store("1MiB")


@pytest.mark.parametrize("name", ["KVSTORE_PIN_MEMORY_MAX_BYTES", "MC_STORE_PIN_MEMORY_MAX_BYTES"])
@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "1GiB"])
def test_bad_pinning_budget_is_refused_at_creation(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(kvstore.InvalidArgumentError, match=name):
        kvstore.Store("1MiB")


def test_good_pinning_environment_is_accepted(monkeypatch):
    monkeypatch.setenv("KVSTORE_PIN_MEMORY", "0")
    monkeypatch.setenv("MC_STORE_PIN_MEMORY_MAX_BYTES", "4096")
    with kvstore.Store("1MiB", pin_memory=False) as s:
        assert s.stats()["page_locked_bytes"] == 0 and s.stats()["page_lock_fallbacks"] == 0


def test_raw_parts_bad_values(store):
    a = np.ones(64, np.uint8)
    before = snapshot(store)
    for parts in ([(0, 10)], [(a.ctypes.data, -1)], [("x", 1)], [(a.ctypes.data,)], (b"x",)):
        with pytest.raises((kvstore.InvalidArgumentError, kvstore.ArgumentTypeError)):
            store._put_raw("r", parts, False)
    r = store._batch_put_raw(["r1", "r2"], [[(0, 10)], [b"hdr", (a.ctypes.data, 64)]], False)
    assert isinstance(r[0], kvstore.InvalidArgumentError) and r[1] is None
    assert store.get("r2") == b"hdr" + a.tobytes()
    store.remove("r2", force=True)
    assert snapshot(store) == before


def test_read_object_bad_values_release_the_hold(store):
    store.put("k", bytes(400))
    with pytest.raises(kvstore.InvalidArgumentError):
        store._read_object("k", -1, lambda p, n: (None, None))
    with pytest.raises(kvstore.ArgumentTypeError):
        store._read_object("k", 8, lambda p, n: "not a pair")
    with pytest.raises(ZeroDivisionError):
        store._read_object("k", 8, lambda p, n: 1 / 0)
    with pytest.raises(kvstore.InvalidArgumentError, match="no destination"):
        store._read_object("k", 8, lambda p, n: (None, None))
    with pytest.raises(kvstore.InvalidArgumentError, match="too small"):
        store._read_object("k", 8, lambda p, n: (None, bytearray(10)))
    assert store.stats()["active_readers"] == 0
    assert store._read_object("k", 1000, lambda p, n: (len(p), None)) == 400


def test_tensor_codec_functions_bad_values():
    native = kvstore._native
    with pytest.raises(kvstore.InvalidArgumentError):
        native.tensor_header(99, (1,))
    with pytest.raises(kvstore.InvalidArgumentError):
        native.tensor_header(0, (-1,))
    with pytest.raises(kvstore.InvalidArgumentError, match="at most 8"):
        native.tensor_header(0, (1,) * 9)
    with pytest.raises(kvstore.ArgumentTypeError):
        native.tensor_header(0, [1])
    with pytest.raises(TypeError):
        native.tensor_header("f32", (1,))
    with pytest.raises(kvstore.InvalidArgumentError, match="not a tensor"):
        native.decode_tensor_header(b"short")
    with pytest.raises(kvstore.ArgumentTypeError):
        native.decode_tensor_header(5)
    with pytest.raises(kvstore.ArgumentTypeError):
        native.dlpack_info(5)
    assert native.decode_tensor_header(native.tensor_header(12, (2, 3))) == (12, (2, 3), 12)


@pytest.mark.parametrize("part,error", [
    (lambda a: (a, 16, 9, 0, None), kvstore.InvalidArgumentError),          # no such kind
    (lambda a: (a, 16, 1, -5, None), kvstore.InvalidArgumentError),         # no such device
    (lambda a: (a, 16, 1, 1 << 70, None), kvstore.InvalidArgumentError),    # device out of range
    (lambda a: (a, 16, "cuda", 0, None), kvstore.ArgumentTypeError),
    (lambda a: (a, 16, 0, 0, "stream"), kvstore.ArgumentTypeError),
    (lambda a: (a, 16, 0, 0, -1), kvstore.InvalidArgumentError),            # not a stream handle
    (lambda a: (a, 16, 0, 0, 1 << 64), kvstore.InvalidArgumentError),
])
def test_declared_raw_parts_with_wrong_values_are_refused_and_store_nothing(store, part, error):
    buf = np.arange(16, dtype=np.uint8)
    with pytest.raises(error):
        store._put_raw("k", [b"h", part(buf.ctypes.data)], False)
    assert not store.exists("k")
    store._put_raw("k", [b"h", (buf.ctypes.data, 16, 0, 0, None)], False)   # the same part, declared right
    assert store.get("k") == b"h" + buf.tobytes()


@pytest.mark.parametrize("stream,error", [("1", kvstore.ArgumentTypeError), (True, kvstore.ArgumentTypeError),
                                          (-3, kvstore.InvalidArgumentError), (1 << 64, kvstore.InvalidArgumentError)])
def test_an_array_interface_stream_of_a_wrong_type_or_value_is_refused(store, stream, error):
    a = np.arange(10, dtype=np.float64)

    class CAI:
        __cuda_array_interface__ = {"shape": (10,), "typestr": "<f8", "data": (a.ctypes.data, False), "version": 3,
                                    "stream": stream}

    with pytest.raises(error, match="stream"):
        store.put_tensor("c", CAI())
    assert not store.exists("c")


def test_a_dlpack_capsule_of_an_unknown_major_version_is_refused(store):
    a = sample("uint16", (4, 5), seed=1)
    t = DLPackTensor(a, 1, 16, (4, 5))
    t._versioned.major = 2
    with pytest.raises(kvstore.UnsupportedError, match="DLPack version 2"):
        store.put_tensor("t", t)
    assert not store.exists("t")
