"""Python reads the C ABI's constants from the extension (``_native.ABI``) instead of repeating
them; these tests check that every table built from them agrees (Swift and the header are
checked by Tests/KVCoreTests/ABIAgreementTests.swift)."""

import struct

import kvstore
from kvstore import _errors, _kv, _native


def test_every_error_code_has_exactly_one_class():
    codes = {v for k, v in _native.ABI.items() if k.startswith("E_")}
    assert set(_errors._BY_CODE) == codes
    assert len(codes) == len([k for k in _native.ABI if k.startswith("E_")])
    for cls in _errors._BY_CODE.values():
        assert issubclass(cls, kvstore.StoreError)


def test_errors_raised_by_the_core_carry_the_code_of_their_class():
    with kvstore.Store("4MiB") as s:
        try:
            s.get("missing")
        except kvstore.StoreError as e:
            assert type(e) is kvstore.ObjectNotFoundError and e.code == _native.ABI["E_OBJECT_NOT_FOUND"]
        s.put("k", b"v")
        try:
            s.put("k", b"v")
        except kvstore.StoreError as e:
            assert type(e) is kvstore.ObjectExistsError and e.code == _native.ABI["E_OBJECT_EXISTS"]
    try:
        s.get("k")
    except kvstore.StoreError as e:
        assert type(e) is kvstore.StoreClosedError and e.code == _native.ABI["E_STORE_CLOSED"]


def test_the_descriptor_record_is_the_headers():
    assert _kv._RECORD.size == _native.ABI["BLOCK_BUFFER_SIZE"] == 72
    packed = _kv._RECORD.pack(3, _native.ABI["KIND_VALUE"], 4096, 8192, 4096, b"cuda:1")
    assert struct.unpack_from("<q", packed, _native.ABI["BLOCK_BUFFER_LAYER"])[0] == 3
    assert struct.unpack_from("<i", packed, _native.ABI["BLOCK_BUFFER_KIND"])[0] == _native.ABI["KIND_VALUE"]
    assert struct.unpack_from("<Q", packed, _native.ABI["BLOCK_BUFFER_LENGTH"])[0] == 8192
    at = _native.ABI["BLOCK_BUFFER_LOCATION"]
    assert packed[at:at + 7] == b"cuda:1\0"
    assert _kv.move_flags(True, "aggregated") == _native.ABI["BLOCKS_PUSH"] | _native.ABI["BLOCKS_AGGREGATED"]


def test_the_dtype_tables_come_from_the_core_and_agree_with_numpy():
    import numpy as np

    from kvstore import _tensor
    codes = [code for _, code, _ in _native.DTYPES]
    assert codes == list(range(len(codes))) and len(codes) >= 15       # the ABI's table has no gaps
    assert len({name for name, _, _ in _native.DTYPES}) == len(codes)
    for name, code, size in _native.DTYPES:
        assert _tensor.DTYPE_CODES[name] == code and _tensor.ITEM_SIZES[code] == size
        header = _native.tensor_header(code, (3, 2))
        assert _native.decode_tensor_header(header) == (code, (3, 2), 6 * size)
        if code in _tensor.RAW_CODES:                                    # numpy has no such type
            raw = np.dtype(_tensor.DTYPE_NAMES[_tensor.RAW_CODES[code]])
            assert raw.kind == "u" and raw.itemsize == size
            continue
        t = np.dtype(name)
        assert t.itemsize == size
        assert _tensor._TYPESTR[t.str[1:]] == code                      # the array interface's typestr
    assert set(_tensor._TYPESTR.values()) | set(_tensor.RAW_CODES) == set(codes)
