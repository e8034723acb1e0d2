import os
import shutil
import subprocess

import pytest

import kvstore


@pytest.fixture
def store():
    s = kvstore.Store("64MiB")
    yield s
    s.close()


# ---- two network namespaces: different addresses, TCP only ----

NETNS = "kvstore-test-ns"


def _netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    r = subprocess.run(["ip", "netns", "add", NETNS + "-probe"], capture_output=True)
    if r.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", NETNS + "-probe"], capture_output=True)
    return True


@pytest.fixture
def netns():
    if not _netns_available():
        pytest.skip("needs root and ip netns (network namespaces)")
    def sh(*a: str) -> None:
        subprocess.run(a, check=True, capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "del", "kvs-veth0"], capture_output=True)
    sh("ip", "netns", "add", NETNS)
    try:
        sh("ip", "link", "add", "kvs-veth0", "type", "veth", "peer", "name", "kvs-veth1")
        sh("ip", "link", "set", "kvs-veth1", "netns", NETNS)
        sh("ip", "addr", "add", "10.213.0.1/24", "dev", "kvs-veth0")
        sh("ip", "link", "set", "kvs-veth0", "up")
        sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", "10.213.0.2/24", "dev", "kvs-veth1")
        sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "kvs-veth1", "up")
        sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        yield NETNS
    finally:
        subprocess.run(["ip", "link", "del", "kvs-veth0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
