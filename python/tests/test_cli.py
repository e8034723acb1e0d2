"""The command line: the demo verifies every byte and the benchmark runs end to end."""

import json
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=300)


def test_demo_runs_and_verifies():
    r = run("demo", "--requests", "4", "--layers", "3", "--blocks", "5")
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: objects=60 ")
    assert "errors=0" in summary and "staged=0" in summary
    assert "prefill" in r.stderr and "decode" in r.stderr  # progress


def test_demo_with_a_disk_tier_reads_back_from_disk(tmp_path):
    r = run("demo", "--requests", "8", "--layers", "4", "--blocks", "8", "--disk", str(tmp_path / "tier"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    summary = out.strip().splitlines()[-1]
    assert "errors=0" in summary
    line = next(x for x in out.splitlines() if x.startswith("disk tier:"))
    copied, read_back = int(line.split()[2]), int(line.split(" read back")[0].rsplit(None, 1)[1])
    assert copied > 0 and read_back > 0, line


def test_demo_rejects_bad_arguments():
    assert run("demo", "--requests", "0").returncode == 2


def test_bench_small_run(tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", "--sizes", "4KiB,1MiB", "--repeat", "1", "--small-ops", "200",
            "--budget", "4MiB", "--batch", "8x4KiB", "--evict-segment", "4MiB", "--evict-count", "16",
            "--cluster-size", "1MiB", "--kv-shape", "2x16x4KiB", "--kv-pull", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert {row["op"] for row in rows} == {"put", "get", "put_from", "get_into", "put_tensor", "get_tensor_into",
                                           "batch_put_from", "batch_get_into", "put_evict",
                                           "cluster_shm_put_from", "cluster_shm_get_into", "cluster_shm_batch_put_from",
                                           "cluster_shm_batch_get_into", "cluster_tcp_put_from", "cluster_tcp_get_into",
                                           *(f"cluster_{path}_{op}" for path in ("ops", "ops_tcp")
                                             for op in ("put", "get", "get 4 threads", "put, core busy", "get, core busy",
                                                        "batch_exists")),
                                           "cluster_auth_connect+put",
                                           *(f"kv_{route}_{case}" for route in ("local", "shm", "tcp")
                                             for case in ("scattered_per_block", "scattered_aggregated", "contiguous_aggregated"))}
    assert all(row["gb_per_s"] > 0 or row["op"].endswith("batch_exists") for row in rows)
    assert all(row["ops_per_s"] > 0 for row in rows if row["op"].startswith("cluster_ops"))
    assert all(row["copyto_gb_per_s"] > 0 for row in rows if "copyto_gb_per_s" in row)
    assert all(row["ratio"] > 0 for row in rows if row["op"].startswith(("cluster_shm", "kv_")))
    evict = [row for row in rows if row["op"] == "put_evict"]
    assert [row["fill"] for row in evict] == ["50% fill", "300% fill"]
    assert evict[1]["evictions_per_put"] > 0 and evict[1]["ratio_to_half_fill"] > 0


def test_bench_rejects_unknown_op():
    assert run("bench", "--ops", "fly").returncode == 2


def test_bench_evict_rejects_rounds_that_would_fill_the_half_store():
    assert run("bench", "--ops", "evict", "--evict-segment", "4MiB", "--evict-count", "64").returncode == 2


def test_bench_gpu_mode_skips_cleanly_without_a_gpu():
    r = run("bench", "--ops", "gpu", "--sizes", "1MiB", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    if "cuda:0" not in __import__("kvstore").devices():
        assert "skipped" in r.stderr


def _start_master(*args):
    import subprocess
    import sys as _sys

    p = subprocess.Popen([_sys.executable, "-m", "kvstore", "master", "--port", "0", "--metrics-port", "0", *args],
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    return p, line


def test_master_serves_health_and_metrics_and_stops_on_sigterm():
    import re
    import signal
    import urllib.request

    p, line = _start_master()
    try:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+), metrics on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        base = f"http://127.0.0.1:{m.group(2)}"
        assert urllib.request.urlopen(base + "/health", timeout=5).read() == b"ok\n"
        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "kvstore_clients 0" in metrics and "# TYPE kvstore_objects gauge" in metrics
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
        assert "stopped" in p.stderr.read()


def test_master_serves_mooncakes_segment_endpoints():
    import json as _json
    import re
    import signal
    import urllib.error
    import urllib.request

    import kvstore

    p, line = _start_master()
    try:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+), metrics on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        base = f"http://127.0.0.1:{m.group(2)}"

        def get(path: str) -> bytes:
            return urllib.request.urlopen(base + path, timeout=5).read()

        assert get("/get_all_segments") == b""          # SGLang's check_server waits while it is empty
        assert _json.loads(get("/get_segments_detail")) == {"total_segments": 0, "segments": []}
        with kvstore.Store.connect(f"kvstore://127.0.0.1:{m.group(1)}", segment_size=8 << 20) as s:
            s.put("k", b"x" * 5000)
            names = get("/get_all_segments").decode().split()
            assert len(names) == 1 and names[0].startswith("kvstore-segment-")
            detail = get(f"/query_segment?segment={names[0]}").decode().splitlines()
            assert detail[0] == names[0] and detail[2] == f"Capacity(bytes): {8 << 20}"
            assert int(detail[1].split(": ")[1]) >= 5000
            seg = _json.loads(get("/get_segments_detail"))["segments"][0]
            assert seg["segment_name"] == names[0] and seg["size_bytes"] == 8 << 20 and seg["status"] == "MOUNTED"
            for bad in ("/query_segment?segment=nope", "/query_segment", "/get_all_keys"):
                try:
                    get(bad)
                    raise AssertionError(bad)
                except urllib.error.HTTPError as e:
                    assert e.code == 404, bad
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0


def test_master_refuses_bad_settings():
    for args in (["--token", "too-short"], ["--token-file", "/nonexistent/token"], ["--max-clients", "-1"],
                 ["--lease-ttl", "0"], ["--client-ttl", "-1"], ["--host", "not-an-ip"],
                 ["--port", "70000"], ["--metrics-port", "70000"], ["--soft-pin-ttl", "0"],
                 ["--eviction-ratio", "2"], ["--eviction-high-watermark", "0"], ["--default_kv_lease_ttl", "0"]):
        p, line = _start_master(*args)
        assert p.wait(timeout=10) == 2, args
        assert line.startswith("kvstore master:"), (args, line)


def test_bench_against_peers(tmp_path):
    out = tmp_path / "against.json"
    r = run("bench", "--against", "mooncake,redis", "--repeat", "1", "--small-ops", "100", "--against-count", "4",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    systems = {row["system"] for row in rows}
    assert {"kvstore", "memcpy"} <= systems
    # a peer that is installed is measured; one that is not says why
    for peer in ("mooncake", "redis"):
        assert peer in systems or f"{peer}: skipped" in r.stdout
    assert all(row["value"] > 0 for row in rows)
    assert run("bench", "--against", "memcached").returncode == 2


def test_bench_baseline_compares_two_builds(tmp_path):
    # The installed build against itself: both sides run, every case gets a ratio.
    import kvstore
    here = str(Path(kvstore.__file__).parent.parent)
    r = run("bench", "--ops", "put,get", "--sizes", "4KiB", "--repeat", "1", "--small-ops", "200",
            "--baseline", here, "--rounds", "2")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith(("put", "get"))]
    assert len(lines) == 2 and all(line.split()[-1] not in ("-",) for line in lines), r.stdout
    bad = run("bench", "--baseline", str(tmp_path))
    assert bad.returncode == 2 and "no kvstore package" in bad.stderr


def test_master_flags_are_defined_once_in_the_core():
    # kvstore master, python -m kvstore master and kvstore-master parse the same flags (the
    # Swift core's MasterCommandLine): the help lists every spelling, Mooncake's included.
    r = run("master", "--help")
    assert r.returncode == 0
    for flag in ("--rpc_port", "--metrics-port", "--token-file", "--max-clients", "--allow-uid", "--tenant",
                 "--default_kv_lease_ttl", "--eviction_high_watermark_ratio"):
        assert flag in r.stdout, flag
    bad = run("master", "--metrics-port", "-2")
    assert bad.returncode == 2 and "kvstore master: --metrics-port" in bad.stderr
