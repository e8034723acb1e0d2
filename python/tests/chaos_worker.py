"""One process of the chaos test (test_chaos.py).

    chaos_worker.py holder URL NAME         a client holding a 48 MiB segment, idle
    chaos_worker.py writer URL NAME KEYS    upserts NAME-k0..NAME-k{KEYS-1} again and again
    chaos_worker.py reader URL WRITERS KEYS reads random keys of writers w0..w{WRITERS-1}

Every value describes itself: a 32-byte header (the key's SHA-256 prefix, a generation, the
payload's length and CRC-32) then a random payload, so a reader knows a wrong byte when it
sees one. A writer prints one JSON line per acknowledged put ({"key", "gen", "t"}) and one
per failed put ({"key", "gen", "failed": true}); a reader counts verified reads, misses,
errors by type and wrong reads. SIGTERM ends the loop; the process then prints a JSON
summary line and exits 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import sys
import time
import zlib

import kvstore

HEADER = struct.Struct("<16sQII")
stop = False


def _on_term(*_: object) -> None:
    global stop
    stop = True


def make(key: str, gen: int, size: int) -> bytes:
    payload = os.urandom(size)
    return HEADER.pack(hashlib.sha256(key.encode()).digest()[:16], gen, size, zlib.crc32(payload)) + payload


def check(key: str, value: bytes) -> int | None:
    """The value's generation, or None when any byte is wrong for this key."""
    if len(value) < HEADER.size:
        return None
    digest, gen, size, crc = HEADER.unpack_from(value)
    payload = value[HEADER.size:]
    if digest != hashlib.sha256(key.encode()).digest()[:16] or len(payload) != size or zlib.crc32(payload) != crc:
        return None
    return gen


def describe(key: str, value: bytes, writers: int, keys: int) -> dict[str, object]:
    """What a wrong value holds instead: whose header, which generation, whether its payload is intact."""
    d: dict[str, object] = {"key": key, "length": len(value)}
    if len(value) >= HEADER.size:
        digest, gen, size, crc = HEADER.unpack_from(value)
        owners = [f"w{w}-k{k}" for w in range(writers) for k in range(keys)
                  if hashlib.sha256(f"w{w}-k{k}".encode()).digest()[:16] == digest]
        d.update(header_of=owners[0] if owners else None, gen=gen, size=size,
                 payload_intact=len(value) - HEADER.size == size and zlib.crc32(value[HEADER.size:]) == crc)
    return d


def connect(url: str, segment: int) -> kvstore.Store:
    end = time.monotonic() + 20
    while True:
        try:
            return kvstore.Store.connect(url, segment_size=segment)
        except kvstore.TransferError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_term)
    role, url = sys.argv[1], sys.argv[2]
    summary: dict[str, object] = {"role": role}
    if role == "holder":
        s = connect(url, 48 << 20)
        print("ready", flush=True)
        while not stop:
            time.sleep(0.05)
        s.close()
    elif role == "writer":
        name, keys = sys.argv[3], int(sys.argv[4])
        s = connect(url, 0)
        print("ready", flush=True)
        rng = random.Random(name)
        gen = 0
        counts = {"acked": 0, "failed": 0}
        while not stop:
            key = f"{name}-k{rng.randrange(keys)}"
            gen += 1
            try:
                s.upsert(key, make(key, gen, rng.randrange(1, 96 << 10)), replicas=2, checksum=rng.random() < 0.5)
                counts["acked"] += 1
                print(json.dumps({"key": key, "gen": gen, "t": time.time()}), flush=True)
            except kvstore.StoreError as e:
                counts["failed"] += 1
                print(json.dumps({"key": key, "gen": gen, "failed": True, "error": type(e).__name__}), flush=True)
                time.sleep(0.01)
        summary.update(counts)
        s.close()
    else:
        writers, keys = int(sys.argv[3]), int(sys.argv[4])
        s = connect(url, 0)
        print("ready", flush=True)
        rng = random.Random(os.getpid())
        counts: dict[str, int] = {"verified": 0, "misses": 0, "wrong": 0}
        while not stop:
            batch = [f"w{rng.randrange(writers)}-k{rng.randrange(keys)}" for _ in range(1 + rng.randrange(4))]
            try:
                values = [s.get(batch[0])] if len(batch) == 1 else s.get_batch(batch)
            except kvstore.ObjectNotFoundError:
                counts["misses"] += 1
                continue
            except kvstore.StoreError as e:
                counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
                time.sleep(0.01)
                continue
            for key, v in zip(batch, values):
                if v is None:
                    counts["misses"] += 1
                elif isinstance(v, Exception):
                    counts[type(v).__name__] = counts.get(type(v).__name__, 0) + 1
                elif check(key, v) is None:
                    counts["wrong"] += 1
                    if counts["wrong"] <= 5:
                        print(json.dumps({"wrong": describe(key, v, writers, keys), "batch": len(batch), "t": time.time()}), flush=True)
                else:
                    counts["verified"] += 1
        summary.update(counts)
        s.close()
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
