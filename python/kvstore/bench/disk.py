"""``bench --ops disk``: the disk tier of the embedded store (docs/disk-tier.md), with ``fio``
measured in the same run on the same file system (``--disk-dir``, default /var/tmp).

- read-back: objects of 1 MiB and 16 MiB, and batches of 256 x 64 KiB, several times the
  segment, all copied to disk first; then read in a cycle (``get_into`` / ``batch_get_into``),
  so every read finds its object on disk only. Next to ``fio`` sequential and random reads
  of a file in the same directory, direct I/O, at the object's size as block size (batches:
  64 KiB blocks on 4 jobs, as a batch reads on 4 threads), one second of each after every
  store pass (a virtual disk's speed drifts). Ratio = median of the per-pass ratios store /
  fio random.
- puts while offloading: 64 KiB ``put_from`` rounds into a store at 300% fill with a disk
  tier (admission ``all``: every eviction candidate is written) and one without, alternating,
  medians; ratio = with / without.
- hit rate: a working set 4x the segment, random reads of 64 KiB objects; a miss is "rebuilt"
  (put again), as an engine recomputes a block. With the default admission (``reuse``) and
  without a disk tier, the same segment.
- cluster: the same read-back through a master process (``python -m kvstore master``): a
  client whose segment and disk tier hold the objects reads them itself (its own files), and
  a pure client reads them from it (the owner's segment server over loopback TCP: the disk
  read, the checks and the network); then the hit rate of the same working set, read by the
  pure client, against a cluster whose client has no disk tier.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._store import Store
from .common import _close_all, _fmt_size, _Process


def _fio(directory: str, rw: str, bs: int, jobs: int = 1, size: int = 512 << 20, seconds: float = 3.0) -> float | None:
    """GB/s of fio ``rw`` (read or randread) with block size ``bs``, direct I/O, ``jobs`` jobs."""
    if not shutil.which("fio"):
        return None
    path = os.path.join(directory, "fio.dat")
    if not os.path.exists(path) or os.path.getsize(path) < size:
        subprocess.run(["fio", "--name=w", f"--filename={path}", f"--size={size}", "--rw=write", "--bs=4M", "--direct=1",
                        "--ioengine=psync", "--output-format=terse"], check=True, capture_output=True)
    out = subprocess.run(["fio", "--name=r", f"--filename={path}", f"--size={size}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
                          "--ioengine=psync", f"--numjobs={jobs}", "--group_reporting", f"--runtime={seconds}", "--time_based",
                          "--output-format=json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["jobs"][0]["read"]["bw_bytes"]) / 1e9


def _filled(directory: str, segment: int, size: int, count: int, admission: str = "all") -> tuple[Store, list[str], np.ndarray]:
    store = Store(segment, prefault=True, lease_ttl=0, disk_path=directory, disk_size=4 * size * count + (64 << 20),
                  disk_admission=admission)
    keys = [f"d-{size}-{i}" for i in range(count)]
    src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    for i, k in enumerate(keys):
        store.put_from(k, src)
        if (i + 1) * size % (segment // 8) == 0:
            store.wait_for_disk_copies()   # keep the puts within what the disk takes: none evicted uncopied
    store.wait_for_disk_copies()
    return store, keys, src


def _read_all(store: Store, keys: list[str], dst: np.ndarray, dsts: np.ndarray) -> None:
    """Reads every key once: ``get_into`` into ``dst``, or ``batch_get_into`` of ``len(dsts)``
    keys at a time when there is more than one row."""
    if len(dsts) == 1:
        for k in keys:
            store.get_into(k, dst)
    else:
        for i in range(0, len(keys), len(dsts)):
            store.batch_get_into(keys[i:i + len(dsts)], list(dsts))


def run_disk(directory: str | None, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    base = tempfile.mkdtemp(prefix="kvstore-disk-bench-", dir=directory or "/var/tmp")
    try:
        print(f"\nkvstore bench disk: in {base}; fio in the same directory, direct I/O; medians of {repeat}")
        rc = _readback(base, repeat, record)
        if rc == 0:
            rc = _puts(base, repeat, record)
        if rc == 0:
            rc = _hit_rate(base, record)
        if rc == 0:
            rc = _cluster(base, repeat, record)
        return rc
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _readback(base: str, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    header = f"{'read-back':<22}{'size':>9}{'count':>7}{'store GB/s':>12}{'fio seq':>9}{'fio rand':>10}{'ratio':>8}{'from disk':>11}"
    print(header)
    print("-" * len(header))
    cases = [("get_into", 1 << 20, 384, 64 << 20, 1), ("get_into", 16 << 20, 24, 64 << 20, 1),
             ("batch_get_into", 64 << 10, 2048, 32 << 20, 256)]
    for op, size, count, segment, batch in cases:
        d = os.path.join(base, f"tier-{size}")
        store, keys, src = _filled(d, segment, size, count)
        try:
            dst = np.empty(size, dtype=np.uint8)
            dsts = np.empty((batch, size), dtype=np.uint8)
            dst.fill(0)
            dsts.fill(0)

            def one_pass() -> None:
                _read_all(store, keys, dst, dsts)

            jobs = 4 if batch > 1 else 1
            one_pass()   # every object's first read (the last ones written are still in DRAM)
            times: list[float] = []
            seqs: list[float] = []
            rands: list[float] = []
            ratios: list[float] = []
            hits0 = store.stats()["disk_hits"]
            for _ in range(repeat):   # store and fio alternate: a virtual disk's speed drifts
                t0 = time.perf_counter()
                one_pass()
                times.append(time.perf_counter() - t0)
                seq = _fio(base, "read", size, jobs, seconds=1.0)
                rand = _fio(base, "randread", size, jobs, seconds=1.0)
                if seq is not None and rand is not None:
                    seqs.append(seq)
                    rands.append(rand)
                    ratios.append(size * count / times[-1] / 1e9 / rand)
            from_disk = (store.stats()["disk_hits"] - hits0) / (repeat * count)
            store.get_into(keys[0], dst)
            if not np.array_equal(dst, src):
                print(f"{op}: wrong bytes read back", flush=True)
                return 1
        finally:
            store.close()
            shutil.rmtree(d, ignore_errors=True)
        gbps = size * count / statistics.median(times) / 1e9
        seq = statistics.median(seqs) if seqs else None
        rand = statistics.median(rands) if rands else None
        ratio = statistics.median(ratios) if ratios else None
        record({"op": f"disk_{op}", "size": size, "count": count, "batch": batch, "gb_per_s": gbps, "fio_seq_gb_per_s": seq,
                "fio_rand_gb_per_s": rand, "ratio": ratio, "from_disk": from_disk})
        what = f"{op}" + (f" x{batch}" if batch > 1 else "")
        print(f"{what:<22}{_fmt_size(size):>9}{count:>7}{gbps:>12.2f}{seq or 0:>9.2f}{rand or 0:>10.2f}"
              f"{ratio or 0:>8.2f}{from_disk * 100:>10.0f}%", flush=True)
    return 0


def _puts(base: str, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    size, segment, per_round = 64 << 10, 64 << 20, 1024
    src = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    d = os.path.join(base, "tier-puts")
    tiered = Store(segment, prefault=True, disk_path=d, disk_size="4GiB", disk_admission="all")
    plain = Store(segment, prefault=True)
    try:
        counter = {"t": 0, "p": 0}

        def put_round(store: Store, tag: str) -> float:
            t0 = time.perf_counter()
            for _ in range(per_round):
                store.put_from(f"{tag}-{counter[tag]}", src)
                counter[tag] += 1
            return per_round / (time.perf_counter() - t0)

        for _ in range(3 * segment // (size * per_round)):   # to 300% fill
            put_round(tiered, "t")
            put_round(plain, "p")
        with_t, without_t, ratios = [], [], []
        for _ in range(3 * repeat):
            a = put_round(tiered, "t")
            b = put_round(plain, "p")
            with_t.append(a)
            without_t.append(b)
            ratios.append(a / b)
        offloads = tiered.stats()["disk_offloads"]
    finally:
        tiered.close()
        plain.close()
        shutil.rmtree(d, ignore_errors=True)
    row = {"op": "disk_puts_while_offloading", "size": size, "count": per_round, "puts_per_s_with_tier": statistics.median(with_t),
           "puts_per_s_without": statistics.median(without_t), "ratio": statistics.median(ratios), "offloads": offloads}
    record(row)
    print(f"\nputs at 300% fill, {_fmt_size(size)}: with disk tier {row['puts_per_s_with_tier']:,.0f}/s, "
          f"without {row['puts_per_s_without']:,.0f}/s, ratio {row['ratio']:.2f} ({offloads} objects offloaded meanwhile)", flush=True)
    return 0


def _hit_loop(reader: Store, tier: Store | None, keys: list[str], order: np.ndarray, warm: int, src: np.ndarray,
              dst: np.ndarray) -> tuple[int, float]:
    """Reads keys[i] for i in `order` with `reader`, putting a missing one again; returns the
    hits after the first `warm` reads and the seconds spent reading. Every 256 reads `tier`'s
    copier (when given) catches up, as an engine's compute between reads lets it."""
    hits = 0
    t_read = 0.0
    for n, i in enumerate(order):
        k = keys[i]
        t0 = time.perf_counter()
        try:
            reader.get_into(k, dst)
            hit = True
        except KeyError:
            hit = False
        t_read += time.perf_counter() - t0
        if not hit:
            reader.put_from(k, src)
        if n >= warm:
            hits += hit
        if n % 256 == 0 and tier is not None:
            tier.wait_for_disk_copies()
    return hits, t_read


def _hit_rate(base: str, record: Callable[[dict[str, Any]], None]) -> int:
    size, segment = 64 << 10, 32 << 20
    count = 4 * segment // size
    keys = [f"w-{i}" for i in range(count)]
    src = np.random.default_rng(9).integers(0, 256, size, dtype=np.uint8)
    dst = np.empty(size, dtype=np.uint8)
    rng = np.random.default_rng(11)
    warm, measured = 6 * count, 4 * count
    order = rng.integers(0, count, warm + measured)
    fio = _fio(base, "randread", size, 1)
    print(f"\nhit rate: {count} objects of {_fmt_size(size)} (4x a {_fmt_size(segment)} segment), uniform random reads, "
          "a miss puts the object again")
    for name in ("disk tier", "no disk tier"):
        d = os.path.join(base, "tier-hits")
        store = Store(segment, prefault=True, lease_ttl=0, **({"disk_path": d, "disk_size": "1GiB"} if name == "disk tier" else {}))
        try:
            hits, t_read = _hit_loop(store, store if name == "disk tier" else None, keys, order, warm, src, dst)
            st = store.stats()
        finally:
            store.close()
            shutil.rmtree(d, ignore_errors=True)
        rate = hits / measured
        gbps = (warm + measured) * size / t_read / 1e9
        record({"op": "disk_hit_rate", "tier": name, "size": size, "objects": count, "segment": segment, "hit_rate": rate,
                "disk_hits": st["disk_hits"], "reads_gb_per_s": gbps, "fio_rand_gb_per_s": fio})
        print(f"  {name:<13} hit rate {rate * 100:5.1f}%  (disk hits {st['disk_hits']}, reads {gbps:.2f} GB/s; "
              f"fio random {_fmt_size(size)} reads, 1 job: {fio or 0:.2f} GB/s)", flush=True)
    return 0


def _cluster(base: str, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    """Read-back and hit rate of a connected client's disk tier (see the module's doc)."""
    master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "-1",
                       "--lease-ttl", "0.1"], r"listening on 127\.0\.0\.1:(\d+)")
    url = f"kvstore://127.0.0.1:{master.match.group(1)}"
    try:
        print("\ncluster (a master process; owner: a client with the segment and the disk tier; remote: a pure "
              "client reading through the owner's segment server)")
        header = f"{'read-back':<22}{'size':>9}{'count':>7}{'owner GB/s':>12}{'remote GB/s':>13}{'fio rand':>10}" \
                 f"{'owner/fio':>11}{'remote/fio':>12}"
        print(header)
        print("-" * len(header))
        for op, size, count, segment, batch in (("get_into", 1 << 20, 384, 64 << 20, 1),
                                                ("get_into", 16 << 20, 24, 64 << 20, 1),
                                                ("batch_get_into", 64 << 10, 2048, 32 << 20, 256)):
            d = os.path.join(base, f"cluster-{size}")
            owner = Store.connect(url, segment_size=segment, prefault=True, disk_path=d, disk_size=4 * size * count + (64 << 20),
                                  disk_admission="all")
            reader = Store.connect(url, segment_size=0)
            try:
                keys = [f"c-{size}-{i}" for i in range(count)]
                src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
                for i, k in enumerate(keys):
                    owner.put_from(k, src)
                    if (i + 1) * size % (segment // 8) == 0:
                        owner.wait_for_disk_copies()
                owner.wait_for_disk_copies()
                dst = np.zeros(size, dtype=np.uint8)
                dsts = np.zeros((batch, size), dtype=np.uint8)

                def one_pass(store: Store) -> float:
                    t0 = time.perf_counter()
                    _read_all(store, keys, dst, dsts)
                    return time.perf_counter() - t0

                one_pass(reader)
                owners, remotes, rands = [], [], []
                for _ in range(repeat):
                    owners.append(one_pass(owner))
                    remotes.append(one_pass(reader))
                    rand = _fio(base, "randread", size, 4 if batch > 1 else 1, seconds=1.0)
                    if rand is not None:
                        rands.append(rand)
                if batch > 1:
                    dst[:] = dsts[-1]
                if not np.array_equal(dst, src):
                    print("cluster read-back: wrong bytes", flush=True)
                    return 1
                hits = owner.stats()["disk_hits"]
            finally:
                _close_all([reader, owner], [])
                shutil.rmtree(d, ignore_errors=True)
            og = size * count / statistics.median(owners) / 1e9
            rg = size * count / statistics.median(remotes) / 1e9
            rand = statistics.median(rands) if rands else None
            record({"op": f"disk_cluster_{op}", "size": size, "count": count, "batch": batch, "owner_gb_per_s": og,
                    "remote_gb_per_s": rg, "fio_rand_gb_per_s": rand, "disk_hits": hits})
            what = op + (f" x{batch}" if batch > 1 else "")
            print(f"{what:<22}{_fmt_size(size):>9}{count:>7}{og:>12.2f}{rg:>13.2f}{rand or 0:>10.2f}"
                  f"{og / rand if rand else 0:>11.2f}{rg / rand if rand else 0:>12.2f}", flush=True)
        return _cluster_hit_rate(base, url, record)
    finally:
        master.stop()


def _cluster_hit_rate(base: str, url: str, record: Callable[[dict[str, Any]], None]) -> int:
    size, segment = 64 << 10, 32 << 20
    count = 4 * segment // size
    keys = [f"cw-{i}" for i in range(count)]
    src = np.random.default_rng(9).integers(0, 256, size, dtype=np.uint8)
    dst = np.empty(size, dtype=np.uint8)
    order = np.random.default_rng(11).integers(0, count, 10 * count)
    warm = 6 * count
    print(f"\ncluster hit rate: {count} objects of {_fmt_size(size)} (4x the owner's {_fmt_size(segment)} segment), "
          "read by a pure client, uniform random; a miss puts the object again")
    for name in ("disk tier", "no disk tier"):
        d = os.path.join(base, "cluster-hits")
        owner = Store.connect(url, segment_size=segment, prefault=True,
                              **({"disk_path": d, "disk_size": "1GiB"} if name == "disk tier" else {}))
        reader = Store.connect(url, segment_size=0)
        try:
            reader.remove_all(force=True)
            hits, t_read = _hit_loop(reader, owner if name == "disk tier" else None, keys, order, warm, src, dst)
            st = owner.stats()
        finally:
            _close_all([reader, owner], [])
            shutil.rmtree(d, ignore_errors=True)
        rate = hits / (len(order) - warm)
        gbps = len(order) * size / t_read / 1e9
        record({"op": "disk_cluster_hit_rate", "tier": name, "size": size, "objects": count, "segment": segment,
                "hit_rate": rate, "disk_hits": st["disk_hits"], "reads_gb_per_s": gbps})
        print(f"  {name:<13} hit rate {rate * 100:5.1f}%  (disk hits {st['disk_hits']}, reads {gbps:.2f} GB/s)", flush=True)
    return 0
