"""The RDMA transport end to end on the verbs test double (doubles/verbs.c, built by
`./dev.sh test` against the real <infiniband/verbs.h>): a holder process serves its segment,
a reader process on another "host" (KVSTORE_HOST_ID) reaches it through PeerLink, with queue
pairs between the two processes, one-sided READ/WRITE moving real bytes, and the double
checking the RC state machine, addressing, keys and access as a NIC would.

Each side is its own process (rdma_peer.py): the double and kvstore's RDMA discovery are per
process. This machine's `ulimit -l` is 8 MiB and cannot be raised here, so holders use small
segments; FAKEVERBS_MEMLOCK stands in for a raised limit where a case needs one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import Master

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parents[1]
LIBRARY = Path(os.environ.get("KVSTORE_VERBS_DOUBLE", ROOT / "build" / "verbs-double" / "libibverbs.so.1"))
PEER = str(TESTS / "rdma_peer.py")

pytestmark = pytest.mark.skipif(
    not LIBRARY.exists(),
    reason=os.environ.get("KVSTORE_VERBS_DOUBLE_SKIP", f"no verbs test double at {LIBRARY} (./dev.sh test builds it)"))

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def fabric(tmp_path):
    """Environment shared by both sides: the double as libibverbs and a fabric file of its own."""
    path = Path("/dev/shm") / f"kvstore-fakeverbs-test-{os.getpid()}-{tmp_path.name}"
    env = {"KVSTORE_IBVERBS_LIBRARY": str(LIBRARY), "FAKEVERBS_FABRIC": str(path)}
    yield env
    path.unlink(missing_ok=True)


class Holder:
    """A connected client on host h1 holding `count` objects of `size` bytes."""

    def __init__(self, url: str, env: dict[str, str], count: int, size: int, segment: str = "4MiB"):
        self.proc = subprocess.Popen([sys.executable, PEER, "hold", url, str(count), str(size), "--segment", segment],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "KVSTORE_HOST_ID": "h1", "FAKEVERBS_HOST": "1", **env})
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"holder did not start: {line}{self.proc.stderr.read()}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        return self.proc.stderr.read()


def read(url: str, env: dict[str, str], count: int, size: int, *args: str, timeout: float = 120) -> dict:
    r = subprocess.run([sys.executable, PEER, "read", url, str(count), str(size), *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "KVSTORE_HOST_ID": "h2", "FAKEVERBS_HOST": "2", **env})
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["log"] = r.stderr
    return out


def pair(fabric: dict[str, str], count: int, size: int, *read_args: str, hold: dict[str, str] | None = None,
         reader: dict[str, str] | None = None, segment: str = "4MiB") -> dict:
    """A master, a holder of `count` objects of `size` bytes and one reader run with
    `read_args`; the reader's summary. `hold`/`reader`: extra environment of each side."""
    with Master() as m:
        h = Holder(m.url, {**fabric, **(hold or {})}, count, size, segment=segment)
        try:
            return read(m.url, {**fabric, **(reader or {})}, count, size, *read_args)
        finally:
            h.stop()


def exact(out: dict) -> None:
    assert out["wrong"] == 0 and out["errors"] == [], out


def test_reads_and_writes_move_by_rdma_byte_exact(fabric):
    out = pair(fabric, 8, 256 * KiB, "--write")
    exact(out)
    assert out["rdma"]["in_use"] and out["rdma_bytes"] >= 2 * 8 * 256 * KiB, out


def test_a_connection_idle_past_the_servers_timeout_keeps_its_queue_pair(fabric):
    # RDMA traffic sends no TCP message: the server must not tear the connection (and its
    # queue pair) down as idle while the peer still reads by RDMA.
    out = pair({**fabric, "KVSTORE_SEGMENT_IDLE_TIMEOUT": "1"}, 4, 64 * KiB, "--pause", "2.5")
    exact(out)
    assert out["rounds"] == 2 and out["rdma_bytes"] >= 2 * 2 * 4 * 64 * KiB, out
    assert out["queue_pairs_created"] == 1, out   # not torn down and connected again


def test_routed_roce_picks_a_routable_v2_gid_and_a_wrong_gid_falls_back_to_tcp(fabric):
    # The two hosts are in different subnets: RoCE v1 and link-local GIDs do not route.
    chosen = pair(fabric, 4, 64 * KiB, hold={"FAKEVERBS_SUBNET": "1"}, reader={"FAKEVERBS_SUBNET": "2"})
    # GID 0 (RoCE v1, link-local) on both sides: the handshake succeeds, the data path does
    # not. The connection must notice and carry the bytes over TCP.
    forced = pair(fabric, 4, 64 * KiB, hold={"FAKEVERBS_SUBNET": "1", "KVSTORE_RDMA_GID_INDEX": "0"},
                  reader={"FAKEVERBS_SUBNET": "2", "KVSTORE_RDMA_GID_INDEX": "0"})
    exact(chosen)
    assert chosen["rdma_bytes"] > 0, chosen
    exact(forced)
    assert forced["rdma_bytes"] == 0, forced
    assert "falling back to TCP" in forced["log"], forced["log"]


def test_a_transfer_that_fails_after_connect_is_done_again_over_tcp(fabric):
    # The link drops on the reader's 4th work request (after the connect-time test READ and
    # two reads): that read and the rest of the connection's go over TCP, nothing fails.
    out = pair(fabric, 4, 64 * KiB, reader={"FAKEVERBS_FAIL_WR": "4"})
    exact(out)
    assert 0 < out["rdma_bytes"] < out["network_bytes"], out
    assert "falling back to TCP on this connection" in out["log"], out["log"]


def test_a_memlock_limit_below_the_staging_size_falls_back_instead_of_failing(fabric):
    # The holder may register its 24 MiB segment (a raised limit); the reader's limit is
    # this machine's 8 MiB, below a 16 MiB staging buffer.
    out = pair(fabric, 1, 16 * MiB, hold={"FAKEVERBS_MEMLOCK": str(1 << 30)}, reader={"FAKEVERBS_MEMLOCK": str(8 * MiB)},
               segment="24MiB")
    exact(out)
    assert out["rdma_bytes"] == 2 * 16 * MiB, out   # by RDMA, through a smaller staging buffer


def test_a_fork_after_registration_does_not_corrupt_rdma_reads(fabric):
    # On a kernel without copy-on-fork for DMA pages, a fork makes memory registered before
    # it stop receiving DMA in the parent unless ibv_fork_init ran first.
    out = pair({**fabric, "FAKEVERBS_FORK": "unsafe"}, 4, 64 * KiB, "--fork")
    exact(out)
    assert out["rounds"] == 2 and out["rdma_bytes"] > 0, out


def test_hard_coded_rdma_read_depths_fit_the_device(fabric):
    # A device that allows 4 outstanding RDMA READs per queue pair refuses a depth of 16.
    out = pair({**fabric, "FAKEVERBS_MAX_RD_ATOM": "4"}, 4, 64 * KiB)
    exact(out)
    assert out["rdma_bytes"] > 0, out


def test_a_peer_that_dies_mid_transfer_gives_errors_not_wrong_bytes(fabric):
    with Master() as m:
        h = Holder(m.url, fabric, 4, 1 * MiB)
        reader = subprocess.Popen([sys.executable, PEER, "read", m.url, "4", str(MiB), "--pause", "1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "KVSTORE_HOST_ID": "h2", "FAKEVERBS_HOST": "2", **fabric})
        time.sleep(0.8)
        h.proc.send_signal(signal.SIGKILL)
        h.proc.wait()
        stdout, stderr = reader.communicate(timeout=90)
    assert reader.returncode == 0, stdout + stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["wrong"] == 0, out


def test_after_a_master_restart_and_remount_reads_are_right_and_use_rdma_again(fabric):
    # The master restarts, the holder remounts and registers its segment again (the old keys
    # stop working): the reader's next reads must be right and RDMA must not be off for good.
    m = Master("--client-ttl", "5", "--lease-ttl", "1")
    try:
        h = Holder(m.url, fabric, 4, 64 * KiB)
        reader = subprocess.Popen([sys.executable, PEER, "read", m.url, "4", str(64 * KiB), "--pause", "4"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "KVSTORE_HOST_ID": "h2", "FAKEVERBS_HOST": "2", **fabric})
        time.sleep(1.0)
        port = m.port
        m.stop(signal.SIGKILL)
        m = Master("--client-ttl", "5", "--lease-ttl", "1", port=port)
        stdout, stderr = reader.communicate(timeout=90)
        h.stop()
    finally:
        m.stop()
    assert reader.returncode == 0, stdout + stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    exact(out)
    # Both rounds by RDMA: the reader's links were made again after its own reconnect, and
    # the remounted segment's new registration serves them.
    assert out["rounds"] == 2 and out["rdma_bytes"] == 2 * 2 * 4 * 64 * KiB, (out, stderr)


def test_an_unspecified_link_layer_is_not_used_for_rdma(fabric):
    out = pair({**fabric, "FAKEVERBS_LINK": "unspecified"}, 2, 64 * KiB)
    exact(out)
    assert not out["rdma"]["in_use"] and out["rdma_bytes"] == 0, out
    assert "link layer" in out["rdma"]["reason"], out["rdma"]


def test_infiniband_ports_use_gid_0_and_move_bytes(fabric):
    out = pair({**fabric, "FAKEVERBS_LINK": "infiniband"}, 4, 64 * KiB, "--write")
    exact(out)
    assert out["rdma"]["devices"][0]["link_layer"] == "infiniband" and out["rdma_bytes"] > 0, out


def test_a_port_that_goes_down_is_left_for_tcp_at_once(fabric):
    # The reader's port goes down between its two rounds: the device's asynchronous event
    # tells kvstore, which uses TCP from then on without first failing a transfer there.
    out = pair(fabric, 4, 64 * KiB, "--pause", "1.5", reader={"FAKEVERBS_PORT_DOWN_AFTER_MS": "700"})
    exact(out)
    assert "port error; RDMA is not used" in out["log"], out["log"]
    assert "falling back to TCP on this connection" not in out["log"], out["log"]
    assert 0 < out["rdma_bytes"] < out["network_bytes"], out
