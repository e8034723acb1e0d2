"""One client process of the multi-process tests.

    cluster_worker.py URL NAME SECONDS [--segment SIZE] [--peers N] [--value-size N]
        [--ready FILE] [--put-only] [--serve]

Connects to the master, then for SECONDS puts objects ``NAME-i`` whose bytes derive from the
key (so any reader can verify them) and reads random objects of workers ``w0..w{peers-1}``,
checking every byte. Prints one JSON line: counts of puts, verified gets, misses, transfer
errors and corrupted reads. ``--serve`` keeps the process (and its segment) alive after
the workload until killed.
"""

import argparse
import hashlib
import json
import random
import sys
import time

import kvstore


def value_of(key: str, size: int) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("name")
    p.add_argument("seconds", type=float)
    p.add_argument("--segment", default="32MiB")
    p.add_argument("--peers", type=int, default=0)
    p.add_argument("--value-size", type=int, default=8192)
    p.add_argument("--ready", default=None)
    p.add_argument("--serve", action="store_true")
    p.add_argument("--replicas", type=int, default=1)
    a = p.parse_args()
    store = kvstore.Store.connect(a.url, segment_size=a.segment)
    if a.ready:
        open(a.ready, "w").write("ready")
    rng = random.Random(a.name)
    counts = {"puts": 0, "gets": 0, "misses": 0, "transfer_errors": 0, "corrupt": 0, "put_errors": 0}
    end = time.monotonic() + a.seconds
    i = 0
    while time.monotonic() < end:
        key = f"{a.name}-{i}"
        try:
            store.put(key, value_of(key, a.value_size), replicas=a.replicas)
            counts["puts"] += 1
        except (kvstore.NoSpaceError, kvstore.TransferError):
            counts["put_errors"] += 1
        i += 1
        if a.peers:
            other = f"w{rng.randrange(a.peers)}-{rng.randrange(max(i, 1))}"
            try:
                got = store.get(other)
            except kvstore.ObjectNotFoundError:
                counts["misses"] += 1
            except kvstore.TransferError:
                counts["transfer_errors"] += 1
            else:
                counts["gets"] += 1
                if got != value_of(other, len(got)):
                    counts["corrupt"] += 1
    counts["written"] = i
    kept = ("network_bytes", "rdma_bytes", "bytes_staged", "master_reconnects", "commit_failures", "master_local")
    counts["stats"] = {k: v for k, v in store.stats().items() if k in kept}
    print(json.dumps(counts), flush=True)
    if a.serve:
        while True:
            time.sleep(1)
    store.close()


if __name__ == "__main__":
    sys.exit(main())
