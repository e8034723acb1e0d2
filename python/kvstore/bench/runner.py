"""``python -m kvstore bench``: throughput of the embedded store next to numpy.copyto.

Every store case has a numpy.copyto baseline that moves the same bytes between the same
number of distinct buffers. The two are timed alternately, ``--repeat`` pairs after one
untimed warm-up of each (five times as many pairs for the cheap batch cases), so both see the
same state of a noisy machine; GB/s columns are medians, and the ratio is the median of the
per-pair ratios (copyto time / store time), i.e. the fraction of the memcpy limit reached:

- put, put_from: one source buffer copied into ``n`` distinct objects; baseline: copyto of
  one source into ``n`` distinct destination arrays. ``put`` passes a ``bytes`` value (the
  common case); ``put_from`` passes a registered numpy array.
- get_into: ``n`` objects copied into one destination; baseline: ``n`` distinct sources into
  one destination.
- get: like get_into, but each call also allocates the ``bytes`` it returns.
- put_tensor / get_tensor_into: like put_from / get_into with a float32 numpy array (uint8
  when the size is not a multiple of 4): the 304-byte header and the data are two parts of
  one write (the baseline copies the data bytes only).
- gpu (needs torch and a CUDA device): GPU→store ``upsert_tensor`` and store→GPU
  ``get_tensor_into`` of each size, in stores with pinning on and off, against torch's own
  copy between the CUDA tensor and a pinned CPU tensor of the same size (the ratio column is
  store / torch there).
- batch_put_from / batch_get_into: one call moving COUNT objects of SIZE between the store and
  the rows of a 2-D array; baseline: one copyto of the whole array (the memcpy limit for the
  same bytes).
- evict: 64 KiB puts into a store at 300% fill (evicting) against a store at 50% fill, side
  by side (``bench/cache.py``; its own table). evict-cluster: the same in two clusters (a
  master and a holder process each), where freed space waits for its holder's confirmation.
- cluster: a master and holder processes; shared-memory and TCP transfers and 4 KiB
  operations through the network master (``bench/cluster.py``; its own table).
- disk: the disk tier's read-back against fio, puts while it offloads, and the hit rate of a
  working set 4x the segment (``bench/disk.py``; its own table).
- kv: prefill→decode block pulls, per-block against aggregated and against copyto, in one
  process, between processes and over TCP (``bench/kv.py``; its own table).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import numpy as np

from .._sizes import parse_size
from .._store import Store
from .common import _count_for, _fmt_size, _gather, _paired, _put_all, _same, _scatter, _segment_for

# Operations with their own table (and their own setup), then all of them.
_OWN_TABLE = ("evict", "evict-cluster", "cluster", "kv", "checksum", "restart", "failover", "cold", "reshard", "dropin", "disk")
_ALL_OPS = ("put", "get", "put_from", "get_into", "put_tensor", "get_tensor_into", "batch", "gpu", *_OWN_TABLE)


def run_bench(args: argparse.Namespace) -> int:
    if args.baseline:
        from .compare import run_compare

        argv = ["--ops", args.ops, "--sizes", args.sizes, "--repeat", str(args.repeat), "--batch", args.batch,
                "--budget", args.budget, "--small-ops", str(args.small_ops), "--cluster-size", args.cluster_size]
        if args.cluster_cases != "shm,tcp,ops":   # (a baseline build may not know the flag)
            argv += ["--cluster-cases", args.cluster_cases]
        return run_compare(args.baseline, argv, max(2, args.rounds))
    if args.against and args.engines:
        from .engines import run_engines

        if [p.strip() for p in args.against.split(",") if p.strip()] != ["mooncake"]:
            print("--engines compares with Mooncake Store only: --against mooncake", file=sys.stderr)
            return 2
        rows: list[dict[str, object]] = []
        rc = run_engines(args.repeat, rows.append)
        if rc == 0 and args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return rc
    if args.against:
        from .against import run_against

        results_against: list[dict[str, object]] = []
        peers = [p.strip() for p in args.against.split(",") if p.strip()]
        rc = run_against(peers, args.repeat, args.small_ops, max(1, args.against_count), results_against.append, args.chart)
        if rc == 0 and args.json:
            with open(args.json, "w") as f:
                json.dump(results_against, f, indent=2)
        return rc
    sizes = [parse_size(s.strip(), name="size") for s in args.sizes.split(",") if s.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in _ALL_OPS]
    if unknown or args.repeat < 1 or any(s <= 0 for s in sizes):
        print(f"bad arguments: ops must be among {', '.join(_ALL_OPS)}; sizes and --repeat positive", file=sys.stderr)
        return 2
    budget = parse_size(args.budget, name="budget")
    batch_count_s, _, batch_size_s = args.batch.partition("x")
    batch_count, batch_size = int(batch_count_s), parse_size(batch_size_s, name="batch size")

    results: list[dict[str, object]] = []
    header = f"{'operation':<16}{'size':>10}{'count':>8}{'ops/s':>14}{'GB/s':>9}{'copyto GB/s':>13}{'ratio':>8}"
    if any(o not in _OWN_TABLE for o in ops):
        print(f"kvstore bench: {args.repeat} alternating store/copyto pairs after a warm-up; medians; ratio = store / numpy.copyto")
        print(header)
        print("-" * len(header))

    def report(op: str, size: int, count: int, timing: tuple[float, float, float]) -> None:
        t, base_t, ratio = timing
        moved = size * count
        row = {
            "op": op, "size": size, "count": count, "seconds": t,
            "ops_per_s": count / t, "gb_per_s": moved / t / 1e9,
            "copyto_gb_per_s": moved / base_t / 1e9, "ratio": ratio,
        }
        results.append(row)
        ops_s = row["ops_per_s"] if not op.startswith("batch") else 1 / t
        print(f"{op:<16}{_fmt_size(size):>10}{count:>8}{ops_s:>14,.0f}{row['gb_per_s']:>9.2f}"
              f"{row['copyto_gb_per_s']:>13.2f}{row['ratio']:>8.2f}", flush=True)

    single = [o for o in ops if o not in ("batch", "gpu", *_OWN_TABLE)]
    for size in (sizes if single else []):
        n = _count_for(size, budget, args.small_ops)
        keys = [f"bench-{size}-{i}" for i in range(n)]
        src = np.full(size, 7, dtype=np.uint8)
        src_bytes = src.tobytes()
        dst = np.empty(size, dtype=np.uint8)
        dst.fill(0)  # fault the pages in now, not inside a timed copy
        pool = np.ones((n, size), dtype=np.uint8)  # baseline's n distinct buffers, pages faulted
        rows = list(pool)

        def copy_scatter() -> None:
            _scatter(rows, src)  # noqa: F821 (ruff 0.17 misreads this loop-body name)

        def copy_gather() -> None:
            _gather(rows, dst)  # noqa: F821 (ruff 0.17 misreads this loop-body name)


        tensor = src.view(np.float32) if size % 4 == 0 else src

        with Store(_segment_for(n, size + 304), prefault=True) as store:  # room for tensor headers
            store.register_buffer(src)
            # op -> (call, value): each run puts `value` under every key.
            writes: dict[str, tuple[Callable[[str, object], None], object]] = {
                "put": (store.put, src_bytes), "put_from": (store.put_from, src), "put_tensor": (store.put_tensor, tensor),
            }
            # op -> (write op whose objects are read, call, target): each run reads every key into
            # `target` (None: `get`, which returns new bytes); targets are checked after timing.
            reads: dict[str, tuple[str, Callable[..., object], np.ndarray | None]] = {
                "get": ("put_from", store.get, None),
                "get_into": ("put_from", store.get_into, dst),
                "get_tensor_into": ("put_tensor", store.get_tensor_into, dst.view(tensor.dtype)),
            }

            for op in single:
                if op in writes:
                    fn, value = writes[op]

                    def run_write(fn: Callable[[str, object], None] = fn, value: object = value) -> None:
                        for k in keys:
                            fn(k, value)

                    report(op, size, n, _paired(run_write, lambda: store.remove_all(force=True), copy_scatter, args.repeat))
                    continue
                written, read, target = reads[op]
                write, value = writes[written]
                store.remove_all(force=True)
                for k in keys:
                    write(k, value)

                def run_read(read: Callable[..., object] = read, target: np.ndarray | None = target) -> None:
                    if target is None:
                        for k in keys:
                            read(k)
                    else:
                        for k in keys:
                            read(k, target)

                timing = _paired(run_read, lambda: None, copy_gather, args.repeat)
                if target is not None:
                    dst.fill(0)
                    run_read()
                    if not _same(op, dst, src):
                        return 1
                report(op, size, n, timing)
        del rows, pool

    if "batch" in ops:
        src2 = np.full((batch_count, batch_size), 3, dtype=np.uint8)
        dst2 = np.zeros((batch_count, batch_size), dtype=np.uint8)
        keys = [f"batch-{i}" for i in range(batch_count)]
        srcs, dsts = list(src2), list(dst2)
        reps = args.repeat * 5  # a batch takes about a millisecond: more pairs, steadier medians

        def base() -> None:
            np.copyto(dst2, src2)

        with Store(_segment_for(batch_count, batch_size), prefault=True) as store:
            def run_batch_put() -> None:
                _put_all(store, keys, srcs)

            report("batch_put_from", batch_size, batch_count, _paired(run_batch_put, lambda: store.remove_all(force=True), base, reps))

            def run_batch_get() -> None:
                store.batch_get_into(keys, dsts)

            timing = _paired(run_batch_get, lambda: None, base, reps)
            dst2.fill(0)
            run_batch_get()
            if not _same("batch_get_into", dst2, src2):
                return 1
            report("batch_get_into", batch_size, batch_count, timing)

    if "gpu" in ops:
        from .gpu import run_gpu

        rc = run_gpu(sizes, args.repeat, report)
        if rc:
            return rc

    for op in ("evict", "evict-cluster"):
        if op not in ops:
            continue
        from .cache import run_evict

        rc = run_evict(parse_size(args.evict_segment, name="evict segment"), parse_size(args.evict_size, name="evict size"),
                       args.evict_count, args.repeat * 3, results.append, cluster=op == "evict-cluster")
        if rc:
            return rc

    if "cluster" in ops:
        from .cluster import CASES, run_cluster

        cases = tuple(c.strip() for c in args.cluster_cases.split(",") if c.strip())
        if not cases or any(c not in CASES for c in cases):
            print(f"bad --cluster-cases: choose among {', '.join(CASES)}", file=sys.stderr)
            return 2
        rc = run_cluster(parse_size(args.cluster_size, name="cluster size"), budget, batch_count, batch_size,
                         args.repeat, args.small_ops, results.append, cases)
        if rc:
            return rc

    if "restart" in ops:
        from .restart import run_restart

        rc = run_restart(args.restart_count, 1024, args.repeat, results.append)
        if rc:
            return rc

    if "cold" in ops:
        from .cold import run_cold

        rc = run_cold(parse_size(args.cold_segment, name="cold segment"), args.cold_wait, args.repeat, results.append)
        if rc:
            return rc

    if "disk" in ops:
        from .disk import run_disk

        rc = run_disk(args.disk_dir, args.repeat, results.append)
        if rc:
            return rc

    if "dropin" in ops:
        from .dropin import run_dropin

        rc = run_dropin(args.repeat, results.append)
        if rc:
            return rc

    if "reshard" in ops:
        from .reshard import run_reshard

        rc = run_reshard(args.repeat, results.append)
        if rc:
            return rc

    if "failover" in ops:
        from .failover import run_failover

        rc = run_failover(args.failover_count, 1024, args.repeat, results.append)
        if rc:
            return rc

    if "checksum" in ops:
        from .checksum import run_checksum

        rc = run_checksum(sizes, budget, args.repeat, args.small_ops, results.append)
        if rc:
            return rc

    if "kv" in ops:
        from .kv import run_kv

        parts = args.kv_shape.split("x")
        if len(parts) != 3:
            print("--kv-shape is LAYERSxBLOCKSxBLOCK_SIZE", file=sys.stderr)
            return 2
        rc = run_kv(int(parts[0]), int(parts[1]), parse_size(parts[2], name="block size"), args.kv_pull, args.repeat, results.append)
        if rc:
            return rc

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
