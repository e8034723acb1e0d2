"""Smoke test of an installed wheel (run by ./dev.sh test in a fresh virtual environment with
only the wheel and numpy): the embedded store, the kvstore console script, and a master with a
connected client. Exits non-zero on any failure."""

import os
import re
import subprocess
import sys

import kvstore

with kvstore.Store("8MiB") as s:
    s.put("k", b"v" * 1000)
    assert s.get("k") == b"v" * 1000
    assert s.keys() == ["k"]

bindir = os.path.dirname(sys.executable)
out = subprocess.run([os.path.join(bindir, "kvstore"), "--help"], capture_output=True, text=True, check=True).stdout
assert "master" in out and "bench" in out

master = subprocess.Popen([os.path.join(bindir, "kvstore"), "master", "--port", "0", "--metrics-port", "-1"],
                          stderr=subprocess.PIPE, text=True)
try:
    line = master.stderr.readline()
    port = re.search(r"listening on [\d.]+:(\d+)", line).group(1)
    with kvstore.Store.connect(f"kvstore://127.0.0.1:{port}", segment_size="8MiB") as c:
        c.put("x", b"y" * 5000)
        assert c.get("x") == b"y" * 5000
finally:
    master.terminate()
    master.wait(timeout=10)
print(f"wheel smoke test passed: kvstore from {os.path.dirname(kvstore.__file__)}")
