"""``bench --ops failover``: how long a cluster takes to serve again when its elected master is
killed. A three-member etcd cluster runs on loopback; two masters stand for election with an
etcd lease TTL of 1 s; two holder processes own segments and this process writes N objects into
them. Then the leader is killed (SIGKILL) and three moments are timed from the kill: etcd names
the new leader; a client that was connected finds every object again (``batch_exists``, polled);
its first ``put`` succeeds through the new leader (polled every 5 ms). Every object is then read
back and compared: acknowledged objects lost are counted. Run with the master's default lease
TTL (5 s) and with 1 s: a remounted segment takes new objects only once every lease the old
leader granted has surely ended (docs/architecture.md, "Restart")."""

from __future__ import annotations

import base64
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .._errors import StoreError
from .._store import Store
from .common import _fill, _holders, _Process
from .etcd import ElectedMaster, Etcd, etcd_binary, token_file


def _leader(etcd: Etcd, cluster: str) -> int:
    key = base64.b64encode(f"/kvstore/{cluster}/leader".encode()).decode()
    kvs = etcd.call("/v3/kv/range", {"key": key}).get("kvs") or []
    return int(kvs[0]["create_revision"]) if kvs else 0


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def run_failover(count: int, size: int, repeat: int, record: Callable[[dict[str, Any]], None]) -> int:
    if etcd_binary() is None:
        print("failover: etcd is not installed (apt-get install etcd-server; ./dev.sh bench installs it)", file=sys.stderr)
        return 1
    print(f"\nkvstore bench failover: 3-member etcd, 2 masters (etcd lease TTL 1 s), {count:,} objects of {size} B "
          f"in 2 holders; leader killed; {repeat} runs per lease TTL; medians")
    directory = tempfile.mkdtemp(prefix="kvstore-failover-")
    path = token_file(directory)
    with open(path) as f:
        secret = f.read().strip()
    with Etcd(members=3) as etcd:
        endpoints = etcd.endpoints.replace("http://", "")
        for lease in (5, 1):
            elected, readable, put, lost = [], [], [], 0
            for run in range(repeat):
                cluster = f"bench-{os.getpid()}-{lease}-{run}"
                url = f"kvstore+etcd://{endpoints}/{cluster}"
                masters = [ElectedMaster(etcd, cluster, path, "--lease-ttl", str(lease)) for _ in range(2)]
                procs: list[_Process] = []
                stores: list[Store] = []
                try:
                    if not _wait(lambda: _leader(etcd, cluster) > 0 and any(m.serving() for m in masters), 15):
                        print("failover: no leader was elected", file=sys.stderr)
                        return 1
                    term = _leader(etcd, cluster)
                    segment = count * ((size + 63) // 64 * 64) + (32 << 20)
                    procs += _holders(url, 2, segment, secret)
                    writer = Store.connect(url, segment_size=0, token=secret)
                    stores.append(writer)
                    keys = [f"f{i}" for i in range(count)]
                    values = [os.urandom(size) for _ in range(64)]
                    if not _fill(writer, keys, values, "failover"):
                        return 1
                    time.sleep(0.3)   # the holders have read their notices
                    leader = next(m for m in masters if m.terms()[-1:] == [term])
                    t0 = time.perf_counter()
                    leader.proc.send_signal(signal.SIGKILL)
                    times: dict[str, float] = {}
                    probe = 0
                    while len(times) < 3 and time.perf_counter() - t0 < 60:
                        now = time.perf_counter() - t0
                        if "elected" not in times and _leader(etcd, cluster) > term:
                            times["elected"] = now
                        if "readable" not in times:
                            try:
                                if all(writer.batch_exists(keys)):
                                    times["readable"] = time.perf_counter() - t0
                            except StoreError:
                                pass
                        if "put" not in times:
                            try:
                                writer.put(f"probe-{probe}", b"p" * size)
                                times["put"] = time.perf_counter() - t0
                            except StoreError:
                                probe += 1
                        time.sleep(0.005)
                    if len(times) < 3:
                        print(f"failover: not back within 60 s ({times})", file=sys.stderr)
                        return 1
                    missing = sum(1 for i in range(count) if writer.get(keys[i]) != values[i % 64])
                    lost += missing
                    elected.append(times["elected"])
                    readable.append(times["readable"])
                    put.append(times["put"])
                    print(f"  lease {lease} s, run {run + 1}: leader elected {times['elected'] * 1000:.0f} ms, all objects readable "
                          f"{times['readable'] * 1000:.0f} ms, first put {times['put'] * 1000:.0f} ms after the kill; "
                          f"{missing} of {count:,} acknowledged objects lost", flush=True)
                finally:
                    for s in stores:
                        s.close()
                    for p in reversed(procs):
                        p.stop()
                    for m in masters:
                        m.stop()
            meds = {k: statistics.median(v) for k, v in (("elected", elected), ("readable", readable), ("put", put))}
            record({"op": "failover", "lease_ttl": lease, "etcd_ttl": 1, "count": count, "size": size, "lost": lost,
                    **{f"{k}_seconds": v for k, v in meds.items()}})
            print(f"failover (lease TTL {lease} s): median {meds['elected'] * 1000:.0f} ms to a new leader, "
                  f"{meds['readable'] * 1000:.0f} ms to every object readable, {meds['put'] * 1000:.0f} ms to the first put; "
                  f"{lost} acknowledged objects lost in {repeat} runs")
    return 0
