"""Helpers of the multi-process tests: a master server process and client worker processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from kvstore.bench.common import _Logged

WORKER = str(Path(__file__).with_name("cluster_worker.py"))


class Master(_Logged):
    """``python -m kvstore master`` on a free loopback port (or ``port``); stops on exit."""

    def __init__(self, *args: str, port: int = 0, netns: str | None = None, host: str = "127.0.0.1") -> None:
        cmd = [sys.executable, "-m", "kvstore", "master", "--host", host, "--port", str(port), "--metrics-port", "-1", *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        m = re.search(r"listening on [\d.]+:(\d+)", line)
        if not m:
            proc.kill()
            raise RuntimeError(f"master did not start: {line}{proc.stderr.read()}")
        self.port = int(m.group(1))
        self.url = f"kvstore://{host}:{self.port}"
        super().__init__(proc, [line])   # keeps reading what it logs: a full pipe would block it

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker(*args: str, env: dict[str, str] | None = None, netns: str | None = None) -> subprocess.Popen:
    """Starts ``cluster_worker.py`` with ``args``; it prints one JSON line when done."""
    cmd = [sys.executable, WORKER, *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
