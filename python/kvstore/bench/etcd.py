"""A throwaway etcd cluster on loopback ports, and elected masters: what the failover tests and
``bench --ops failover`` run (Debian's ``etcd-server`` package; ``./dev.sh`` installs it).

The members use a 50 ms heartbeat and a 500 ms election timeout, so etcd grants leases as
short as 1 s (its minimum lease TTL is 1.5 election timeouts, rounded up to whole seconds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from .common import _Logged


def etcd_binary() -> str | None:
    return shutil.which("etcd") or next((p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """``members`` etcd servers on loopback; ``endpoints`` is "http://127.0.0.1:P,...". Stops
    every member (and removes its data) on ``stop``."""

    def __init__(self, members: int = 1) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server; ./dev.sh does it)")
        self.dir = tempfile.mkdtemp(prefix="kvstore-etcd-")
        names = [f"m{i}" for i in range(members)]
        client = [free_port() for _ in names]
        peer = [free_port() for _ in names]
        cluster = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, peer))
        self.client_ports = client
        self.endpoints = ",".join(f"http://127.0.0.1:{p}" for p in client)
        self.procs: list[subprocess.Popen] = []
        for n, c, p in zip(names, client, peer):
            cmd = [binary, "--name", n, "--data-dir", os.path.join(self.dir, n),
                   "--listen-client-urls", f"http://127.0.0.1:{c}", "--advertise-client-urls", f"http://127.0.0.1:{c}",
                   "--listen-peer-urls", f"http://127.0.0.1:{p}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                   "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token", self.dir,
                   "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "error"]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        end = time.monotonic() + 30
        while True:
            try:
                self.call("/v3/kv/range", {"key": "eA=="})
                break
            except OSError:
                if time.monotonic() > end or any(p.poll() is not None for p in self.procs):
                    self.stop()
                    raise RuntimeError("etcd did not start") from None
                time.sleep(0.05)

    def call(self, path: str, body: dict, member: int | None = None) -> dict:
        """POSTs to one member (``member``), or to the first one alive."""
        members = [member] if member is not None else [i for i, p in enumerate(self.procs) if p.poll() is None]
        error: OSError | None = None
        for i in members:
            req = urllib.request.Request(f"http://127.0.0.1:{self.client_ports[i]}{path}", data=json.dumps(body).encode())
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    return json.loads(r.read())
            except OSError as e:
                error = e
        raise error or OSError("no etcd member is running")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)   # a frozen member must see the signal
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ElectedMaster(_Logged):
    """``python -m kvstore master --etcd ...`` on a free port, as leader or standby; its log is
    kept in ``log`` (``terms`` and ``serving`` read it)."""

    def __init__(self, etcd: Etcd, cluster: str, token_file: str, *args: str, ttl: int = 1) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "kvstore", "master", "--port", str(self.port), "--metrics-port", "-1",
               "--etcd", etcd.endpoints, "--cluster", cluster, "--etcd-ttl", str(ttl), "--token-file", token_file, *args]
        super().__init__(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))

    def terms(self) -> list[int]:
        """The terms this master has won, in order."""
        return [int(m.group(1)) for line in list(self.log) if (m := re.search(r"leader of cluster '.*' \(term (\d+)", line))]

    def serving(self) -> bool:
        """Whether its last log line about leading says it serves now."""
        for line in reversed(list(self.log)):
            if "listening on" in line:
                return True
            if "stopped serving" in line or "no longer the leader" in line:
                return False
        return False


def token_file(directory: str) -> str:
    """A 0600 file holding a fresh cluster token (every elected master proves the same one)."""
    path = os.path.join(directory, "cluster.token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
    return path
