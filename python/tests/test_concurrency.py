"""Many Python threads on one store: no torn reads, exact accounting afterwards."""

import random
import struct
import threading
import time
import zlib

import numpy as np

import kvstore

SIZES = (64, 1000, 4096, 70_000, 300_000)  # below and above the GIL-release threshold


def make_value(tag: int, size: int) -> bytes:
    """A value fully determined by (tag, size): header then a tag-seeded pattern."""
    body = np.random.default_rng(tag).integers(0, 256, size - 16, dtype=np.uint8).tobytes()
    return struct.pack("<QQ", tag, size) + body


def is_complete(data) -> bool:
    data = bytes(data)
    if len(data) < 16:
        return False
    tag, size = struct.unpack_from("<QQ", data)
    return size == len(data) and data == make_value(tag, size)


def test_concurrent_put_get_upsert_remove_on_overlapping_keys():
    keys = [f"key-{i}" for i in range(16)]
    errors: list[str] = []
    with kvstore.Store("64MiB", lease_ttl=0.2) as store:

        def worker(wid: int) -> None:
            rng = random.Random(wid)
            out = bytearray(max(SIZES))
            for step in range(400):
                key = rng.choice(keys)
                tag = wid * 100_000 + step
                op = rng.random()
                try:
                    if op < 0.2:
                        store.put(key, make_value(tag, rng.choice(SIZES)))
                    elif op < 0.45:
                        store.upsert(key, make_value(tag, rng.choice(SIZES)))
                    elif op < 0.55:
                        store.remove(key)
                    elif op < 0.75:
                        if not is_complete(store.get(key)):
                            errors.append(f"torn get of {key}")
                    elif op < 0.9:
                        n = store.get_into(key, out)
                        if not is_complete(memoryview(out)[:n]):
                            errors.append(f"torn get_into of {key}")
                    else:
                        for v in store.get_batch(keys[:4]):
                            if v is not None and not is_complete(v):
                                errors.append("torn get_batch")
                except (kvstore.ObjectNotFoundError, kvstore.ObjectExistsError, kvstore.LeaseHeldError):
                    pass
                except Exception as e:  # anything else is a bug
                    errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        time.sleep(0.3)  # every lease ends: replaced versions are freed

        present = [k for k in keys if store.exists(k)]
        values = [store.get(k) for k in present]
        assert all(is_complete(v) for v in values)
        s = store.stats()
        assert s["objects"] == len(present)
        assert s["object_bytes"] == sum(len(v) for v in values)
        assert s["bytes_used"] == sum((len(v) + 63) // 64 * 64 for v in values)
        assert s["active_readers"] == 0
        assert store.remove_all() == 0  # the checks above leased them all
        assert store.remove_all(force=True) == len(present)
        s = store.stats()
        assert s["bytes_used"] == 0 and s["objects"] == 0 and s["free_blocks"] == 1


def test_concurrent_batches_of_distinct_keys():
    with kvstore.Store("64MiB") as store:
        def worker(wid: int) -> None:
            keys = [f"w{wid}-{i}" for i in range(64)]
            vals = [np.full(8192, wid, np.uint8) for _ in keys]
            assert store.batch_put_from(keys, vals) == [None] * 64
            outs = [np.empty(8192, np.uint8) for _ in keys]
            assert store.batch_get_into(keys, outs) == [8192] * 64
            assert all((o == wid).all() for o in outs)
            assert all(isinstance(r, kvstore.LeaseHeldError) for r in store.batch_remove(keys))
            assert store.batch_remove(keys, force=True) == [None] * 64

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = store.stats()
        assert s["objects"] == 0 and s["bytes_used"] == 0


def test_close_while_other_threads_work():
    store = kvstore.Store("16MiB")
    unexpected: list[BaseException] = []
    started = threading.Barrier(5)

    def worker(wid: int) -> None:
        started.wait()
        v = bytes(100_000)
        try:
            for i in range(100_000):
                store.upsert(f"{wid}-{i % 10}", v)
                store.get(f"{wid}-{i % 10}")
        except kvstore.StoreClosedError:
            return
        except BaseException as e:
            unexpected.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    started.wait()
    store.close()
    for t in threads:
        t.join()
    assert unexpected == []
    assert store.closed


def checked_value(ident: int, size: int) -> bytes:
    """8-byte id, 4-byte CRC32 of the payload, then the payload (derived from the id)."""
    payload = random.Random(ident).randbytes(size - 12)
    return struct.pack("<QI", ident, zlib.crc32(payload)) + payload


def test_readers_see_whole_objects_while_writers_fill_far_past_capacity():
    capacity = 8 << 20
    readers, writers = 8, 2
    per_writer = 6 * capacity // writers  # 6x the capacity in all
    written = [0] * writers
    done = threading.Event()
    errors: list[str] = []
    counts = {"hits": 0, "misses": 0, "no_space_retries": 0}
    # Leases short enough that 8 busy readers cannot lease the whole store and starve writers.
    with kvstore.Store(capacity, lease_ttl=0.002) as store:

        def writer(w: int) -> None:
            rng = random.Random(1000 + w)
            total = 0
            while total < per_writer:
                i = written[w]
                v = checked_value(w << 32 | i, rng.randrange(16 << 10, 96 << 10))
                while True:
                    try:
                        store.put(f"w{w}-{i}", v)
                        break
                    except kvstore.NoSpaceError:
                        counts["no_space_retries"] += 1
                        time.sleep(0.001)
                total += len(v)
                written[w] = i + 1

        def reader(r: int) -> None:
            rng = random.Random(r)
            out = bytearray(96 << 10)
            while not done.is_set():
                w = rng.randrange(writers)
                if written[w] == 0:
                    continue
                i = rng.randrange(written[w])
                try:
                    n = store.get_into(f"w{w}-{i}", out)
                except kvstore.ObjectNotFoundError:
                    counts["misses"] += 1
                    continue
                except Exception as e:  # noqa: BLE001 - any other error fails the test
                    errors.append(repr(e))
                    continue
                counts["hits"] += 1
                ident, crc = struct.unpack_from("<QI", out)
                if ident != (w << 32 | i) or zlib.crc32(memoryview(out)[12:n]) != crc:
                    errors.append(f"w{w}-{i}: wrong or torn bytes (id {ident:#x})")

        rs = [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
        ws = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        for t in rs + ws:
            t.start()
        for t in ws:
            t.join()
        done.set()
        for t in rs:
            t.join()
        assert errors == []
        st = store.stats()
        assert counts["hits"] > 0 and st["evicted_objects"] > 0
        assert st["objects"] + st["evicted_objects"] == sum(written)
        assert st["bytes_used"] <= capacity and st["active_readers"] == 0
