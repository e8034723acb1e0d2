"""Helpers shared by the benchmarks: timing pairs, formatting, byte checks, child processes."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from .._store import Store


def _fmt_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _paired(fn: Callable[[], None], setup: Callable[[], None], base: Callable[[], None],
            repeat: int, base_setup: Callable[[], None] | None = None) -> tuple[float, float, float]:
    """Times the store case and its copyto baseline alternately, ``repeat`` pairs after one
    warm-up of each, so both see the same machine state. Returns the median store time, the
    median baseline time, and the median of the per-pair ratios (baseline time / store time).
    ``base_setup`` runs untimed before each baseline run (when it needs a fresh state too).
    """
    setup()
    fn()  # warm-up: faults pages in, fills caches and allocator state
    if base_setup:
        base_setup()
    base()
    store_t, base_t, ratios = [], [], []
    for _ in range(repeat):
        setup()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if base_setup:
            base_setup()
        t2 = time.perf_counter()
        base()
        t3 = time.perf_counter()
        store_t.append(t1 - t0)
        base_t.append(t3 - t2)
        ratios.append((t3 - t2) / (t1 - t0))
    return statistics.median(store_t), statistics.median(base_t), statistics.median(ratios)


def _count_for(size: int, budget: int, small_ops: int) -> int:
    return max(2, min(small_ops, budget // size))


def _segment_for(count: int, size: int) -> int:
    """A segment that holds ``count`` objects of ``size`` bytes (64-byte granules) plus slack,
    below the default eviction watermark (90%), so nothing is evicted."""
    return (count * ((size + 63) // 64 * 64) + (1 << 20)) * 10 // 8


def _scatter(rows: list[np.ndarray], src: np.ndarray) -> None:
    """The copyto baseline of writing ``src`` into each of ``rows`` (distinct buffers)."""
    for row in rows:
        np.copyto(row, src)


def _gather(rows: list[np.ndarray], dst: np.ndarray) -> None:
    """The copyto baseline of reading each of ``rows`` into ``dst``."""
    for row in rows:
        np.copyto(dst, row)


def _fill(writer: Store, keys: list[str], values: list[bytes], name: str) -> bool:
    """Puts ``keys`` (key i gets ``values[i % len(values)]``) in batches of 1,024, as the
    restart and failover benchmarks load their holders; False (with the reason printed) when
    a put fails or the last keys are not found afterwards."""
    for i in range(0, len(keys), 1024):
        chunk = keys[i:i + 1024]
        errors = writer.put_batch(chunk, [values[j % len(values)] for j in range(i, i + len(chunk))])
        if any(errors):
            print(f"{name}: a put failed: {next(e for e in errors if e)}", file=sys.stderr)
            return False
    if not all(writer.batch_exists(keys[-10:])):
        print(f"{name}: the last puts are not found", file=sys.stderr)
        return False
    return True


# A client that holds a segment and idles until its standard input closes (argv: url,
# segment bytes, token or "", "1" to prefault).
_HOLDER = ("import sys, kvstore\n"
           "s = kvstore.Store.connect(sys.argv[1], segment_size=int(sys.argv[2]), token=sys.argv[3] or None,\n"
           "                          prefault=sys.argv[4] == '1')\n"
           "print('ready', flush=True)\n"
           "sys.stdin.read()\n"
           "s.close()\n")


def _holder(url: str, segment: int, token: str = "", prefault: bool = False, env: dict[str, str] | None = None) -> _Process:
    """A holder process with a segment of ``segment`` bytes, once it is ready."""
    return _Process([sys.executable, "-c", _HOLDER, url, str(segment), token, "1" if prefault else "0"], "ready",
                    env=env, stream="stdout")


def _holders(url: str, count: int, segment: int, token: str = "") -> list[_Process]:
    """``count`` holders (see ``_holder``)."""
    return [_holder(url, segment, token) for _ in range(count)]


def _put_all(store: Store, keys: list[str], values: list[np.ndarray]) -> None:
    """``batch_put_from`` that raises the first per-key failure: a refused put must not be
    timed as a fast one."""
    for failure in store.batch_put_from(keys, values):
        if failure is not None:
            raise failure


def _same(name: str, got: np.ndarray, want: np.ndarray) -> bool:
    if np.array_equal(got, want):
        return True
    print(f"{name} returned wrong bytes", file=sys.stderr)
    return False


class _Logged:
    """A child process whose standard error is kept, line by line, in ``log`` (read on a
    thread: a full pipe would block the child). ``stop`` signals it (a frozen one is woken
    first, so it sees the signal), waits, and returns what it logged."""

    def __init__(self, proc: subprocess.Popen, first: list[str] | None = None) -> None:
        self.proc = proc
        self.log: list[str] = list(first or [])
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            if sig != signal.SIGCONT:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        return "".join(self.log)


class _Process:
    """A child process whose first stderr/stdout line is awaited; the rest is drained."""

    def __init__(self, cmd: list[str], pattern: str, env: dict[str, str] | None = None, stream: str = "stderr") -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        out = getattr(self.proc, stream)
        line = out.readline()
        self.match = re.search(pattern, line)
        if not self.match:
            rest = self.proc.stderr.read() if stream == "stdout" else ""
            self.stop()
            raise RuntimeError(f"{cmd[:4]} did not start: {line}{rest}")
        for s in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=lambda s=s: [None for _ in s], daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _close_all(stores: list[Store], procs: list[_Process]) -> None:
    """Closes the stores, then stops the processes, the last started first."""
    for s in stores:
        s.close()
    for p in reversed(procs):
        p.stop()
