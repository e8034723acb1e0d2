"""``bench --ops checksum``: what ``checksum=True`` costs (a CRC32C computed in the copy's pass
and checked by every read). Each case runs without and with checksums in alternating pairs in
one run, after a warm-up of each (`_paired`); medians; cost = median of the per-pair time
ratios − 1.
Cases: the embedded store, and a connected client holding its own segment (the same-host
path: a master process, the copy into mapped shared memory), with ``put_from`` and
``get_into`` at each size."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .._store import Store
from .common import _close_all, _count_for, _fmt_size, _paired, _Process, _segment_for


def run_checksum(sizes: list[int], budget: int, repeat: int, small_ops: int, record: Callable[[dict[str, Any]], None]) -> int:
    header = f"{'store':<10}{'operation':<10}{'size':>9}{'count':>8}{'without GB/s':>14}{'with GB/s':>11}{'cost':>8}"
    print(f"\nkvstore bench checksum: {repeat} pairs without/with checksum=True after a warm-up; medians")
    print(header)
    print("-" * len(header))
    procs: list[_Process] = []
    stores: list[Store] = []
    try:
        master = _Process([sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "-1"],
                          r"listening on 127\.0\.0\.1:(\d+)")
        procs.append(master)
        url = f"kvstore://127.0.0.1:{master.match.group(1)}"
        for size in sizes:
            n = _count_for(size, budget, small_ops)
            segment = 2 * _segment_for(n, size)
            rng = np.random.default_rng(size)
            src = rng.integers(0, 256, size, dtype=np.uint8)
            dst = np.zeros(size, dtype=np.uint8)
            plain = [f"p-{i}" for i in range(n)]
            checked = [f"c-{i}" for i in range(n)]
            for name in ("embedded", "cluster"):
                store = Store(segment, prefault=True) if name == "embedded" else Store.connect(url, segment_size=segment, prefault=True)
                stores.append(store)

                def report(op: str, timing: tuple[float, float, float], name: str = name, n: int = n, size: int = size) -> None:
                    t_off, t_on, ratio = timing
                    row = {"op": f"checksum_{name}_{op}", "size": size, "count": n, "seconds_without": t_off, "seconds_with": t_on,
                           "gb_per_s_without": size * n / t_off / 1e9, "gb_per_s_with": size * n / t_on / 1e9,
                           "cost": ratio - 1}
                    record(row)
                    print(f"{name:<10}{op:<10}{_fmt_size(size):>9}{n:>8}{row['gb_per_s_without']:>14.2f}"
                          f"{row['gb_per_s_with']:>11.2f}{(ratio - 1) * 100:>7.1f}%", flush=True)

                def put(keys: list[str], checksum: bool, store: Store = store) -> Callable[[], None]:
                    def run() -> None:
                        for k in keys:
                            store.put_from(k, src, checksum=checksum)
                    return run

                def get(keys: list[str], store: Store = store) -> Callable[[], None]:
                    def run() -> None:
                        for k in keys:
                            store.get_into(k, dst)
                    return run

                def empty(store: Store = store) -> None:
                    store.remove_all(force=True)

                # Without as the "store" case, with as the "baseline": the ratio is with / without.
                report("put_from", _paired(put(plain, False), empty, put(checked, True), repeat, base_setup=empty))
                store.remove_all(force=True)
                put(plain, False)()
                put(checked, True)()
                report("get_into", _paired(get(plain), lambda: None, get(checked), repeat))
                dst.fill(0)
                store.get_into(checked[-1], dst)
                if not np.array_equal(dst, src):
                    print(f"checksum: {name} get_into returned wrong bytes", file=sys.stderr)
                    return 1
                st = store.stats()
                if st["checksum_failures"] or st["checksums_verified"] < n:
                    print(f"checksum: {name} counted {st['checksums_verified']} checked reads, {st['checksum_failures']} failures",
                          file=sys.stderr)
                    return 1
                stores.remove(store)
                store.close()
    finally:
        _close_all(stores, procs)
    return 0
