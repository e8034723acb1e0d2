"""One side of the RDMA tests (test_rdma_double.py), run as its own process on the verbs test
double: the double and kvstore's RDMA discovery are per process.

    rdma_peer.py hold URL COUNT SIZE     connects with a segment, puts COUNT objects of SIZE
                                         bytes (bytes derived from the key), prints "ready",
                                         then serves until stdin closes
    rdma_peer.py read URL COUNT SIZE [--pause S] [--fork]
                                         connects, reads every object (get and get_into),
                                         checks every byte; with --pause, reads once, waits S
                                         seconds and reads again; prints a JSON summary
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import kvstore


def value_of(key: str, size: int) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["hold", "read"])
    p.add_argument("url")
    p.add_argument("count", type=int)
    p.add_argument("size", type=int)
    p.add_argument("--segment", default="4MiB", help="hold: the segment size (within this machine's ulimit -l)")
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--fork", action="store_true")
    p.add_argument("--write", action="store_true", help="read: also put objects into the holder's segment")
    a = p.parse_args()
    if a.role == "hold":
        with kvstore.Store.connect(a.url, segment_size=a.segment) as s:
            for i in range(a.count):
                s.put(f"o{i}", value_of(f"o{i}", a.size))
            print("ready", flush=True)
            sys.stdin.read()
        return
    out: dict = {"wrong": 0, "errors": [], "rounds": 0}
    with kvstore.Store.connect(a.url, segment_size=0) as s:
        def round_() -> None:
            buf = bytearray(a.size)
            for i in range(a.count):
                key = f"o{i}"
                try:
                    if s.get(key) != value_of(key, a.size):
                        out["wrong"] += 1
                    s.get_into(key, buf)
                    if bytes(buf) != value_of(key, a.size):
                        out["wrong"] += 1
                except kvstore.StoreError as e:
                    out["errors"].append(f"{type(e).__name__}: {e}")
            if a.write:
                for i in range(a.count):
                    key = f"w{out['rounds']}-{i}"
                    try:
                        s.put(key, value_of(key, a.size))
                        if s.get(key) != value_of(key, a.size):
                            out["wrong"] += 1
                    except kvstore.StoreError as e:
                        out["errors"].append(f"{type(e).__name__}: {e}")
            out["rounds"] += 1
        round_()
        if a.fork:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            round_()
        if a.pause:
            time.sleep(a.pause)
            round_()
        st = s.stats()
        out["rdma_bytes"] = st["rdma_bytes"]
        out["network_bytes"] = st.get("network_bytes", 0)
        out["rdma"] = kvstore.rdma()
        library = os.environ.get("KVSTORE_IBVERBS_LIBRARY")
        if library:   # the verbs test double kvstore loaded: the same library instance
            import ctypes
            out["queue_pairs_created"] = ctypes.CDLL(library).fakeverbs_created_qps()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
