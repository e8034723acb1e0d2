"""Chaos (issue 17): writers and readers run a self-checking workload (every value carries its
key, generation and a CRC) while the test freezes a reader past its lease, kills holders,
freezes a writer past the write timeout and the client TTL, and kills and restarts the master.

Asserted: no reader ever gets a wrong byte; no worker crashes; every key's final value is
intact and never older than its last acknowledged put — a key may be gone only when every
segment that held it was killed or the master that knew it was (the master does not yet
rebuild its table after a restart: issue 17 item 6); those are counted and listed. A key
whose last put was acknowledged after the last such event is read back at that generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from chaos_worker import check
from cluster import Master

import kvstore

WORKER = os.path.join(os.path.dirname(__file__), "chaos_worker.py")
FLAGS = ("--lease-ttl", "0.5", "--client-ttl", "2", "--write-timeout", "1.5", "--read-wait", "0.05")
WRITERS, KEYS = 2, 48


class Proc:
    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.err: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            if line.strip() == "ready":
                self.ready.set()
            else:
                self.lines.append(line)

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def finish(self) -> dict:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        rc = self.p.wait(timeout=30)
        time.sleep(0.1)
        summaries = [json.loads(line)["summary"] for line in self.lines if "\"summary\"" in line]
        assert rc == 0 and summaries, f"a worker crashed (rc {rc}): {''.join(self.err)[-2000:]}"
        return summaries[0]


def test_chaos_no_wrong_bytes_no_lost_acknowledged_puts():
    master = Master(*FLAGS)
    port = master.port
    holders = [Proc("holder", master.url, f"h{i}") for i in range(2)]
    for h in holders:
        assert h.ready.wait(20)
    writers = [Proc("writer", master.url, f"w{i}", str(KEYS)) for i in range(WRITERS)]
    readers = [Proc("reader", master.url, str(WRITERS), str(KEYS)) for _ in range(2)]
    for p in writers + readers:
        assert p.ready.wait(20)
    losses: list[float] = []      # when an event that may lose objects happened
    killed: list[Proc] = []

    def freeze(p: Proc, seconds: float) -> None:
        p.signal(signal.SIGSTOP)
        time.sleep(seconds)
        p.signal(signal.SIGCONT)

    def kill_holder(i: int) -> None:
        losses.append(time.time())
        holders[i].signal(signal.SIGKILL)
        killed.append(holders[i])
        holders.append(Proc("holder", master.url, f"h{len(holders)}"))

    try:
        time.sleep(2)
        freeze(readers[0], 1.2)                      # a reader frozen past its lease
        time.sleep(0.8)
        kill_holder(0)                               # a holder dies
        time.sleep(1.5)
        freeze(writers[0], 2.6)                      # a writer frozen past the write timeout and TTL
        time.sleep(1.5)
        losses.append(time.time())
        master.stop(signal.SIGKILL)                  # the master dies and comes back on its port
        master = Master(*FLAGS, port=port)
        time.sleep(3)
        kill_holder(1)                               # another holder dies
        time.sleep(3)
        summaries = [r.finish() for r in readers]
        writer_summaries = [w.finish() for w in writers]
    except BaseException:
        for p in writers + readers + holders:
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait()
        master.stop()
        raise

    # Readers: zero wrong reads, and they read plenty.
    for s in summaries:
        assert s["wrong"] == 0, s
    assert sum(s["verified"] for s in summaries) > 100, summaries
    assert sum(w["acked"] for w in writer_summaries) > 100, writer_summaries

    # Every key: intact, and never older than its last acknowledged put.
    acked: dict[str, tuple[int, float]] = {}
    failed: dict[str, set[int]] = {}
    for w in writers:
        for line in w.lines:
            d = json.loads(line)
            if "summary" in d:
                continue
            if d.get("failed"):
                failed.setdefault(d["key"], set()).add(d["gen"])
            elif d["gen"] > acked.get(d["key"], (0, 0))[0]:
                acked[d["key"]] = (d["gen"], d["t"])
    time.sleep(0.5)
    lost, stale = [], []
    check_client = None
    try:
        check_client = kvstore.Store.connect(master.url, segment_size=0)
        for key, (gen, t) in sorted(acked.items()):
            try:
                got = check(key, check_client.get(key))
            except kvstore.ObjectNotFoundError:
                lost.append((key, gen, t))
                continue
            assert got is not None, f"{key}: wrong bytes"
            if got < gen or (got > gen and got not in failed.get(key, set())):
                stale.append((key, got, gen))
    finally:
        if check_client is not None:
            check_client.close()
        for h in holders:
            if h not in killed:
                h.finish()
        master.stop()
    assert not stale, f"keys whose value is not their last acknowledged put: {stale}"
    late = [k for k, _, t in lost if t > losses[-1] + 0.5]
    assert not late, f"acknowledged after the last loss event, yet gone: {late}"
    print(f"chaos: {sum(s['verified'] for s in summaries)} verified reads, 0 wrong; {len(acked)} keys, "
          f"{len(lost)} lost with their holders or the master: {[k for k, _, _ in lost]}")
