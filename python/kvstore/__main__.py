"""Command line: ``python -m kvstore demo``, ``bench`` and ``master``."""

from __future__ import annotations

import argparse
import sys


def console() -> None:
    """The ``kvstore`` console script (``kvstore demo|bench|master``)."""
    sys.exit(main(prog="kvstore"))


def main(argv: list[str] | None = None, prog: str = "python -m kvstore") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="kvstore command line")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prefill/decode KV-cache workload on the embedded store, every byte verified")
    demo.add_argument("--requests", type=int, default=32, help="simulated requests (default 32)")
    demo.add_argument("--layers", type=int, default=16, help="model layers (default 16)")
    demo.add_argument("--blocks", type=int, default=8, help="KV blocks per request and layer (default 8)")
    demo.add_argument("--block-tokens", type=int, default=16, help="tokens per block (default 16)")
    demo.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    demo.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    demo.add_argument("--segment-size", default=None, help="store size, e.g. 1GiB (default: 1.25 x the data)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--disk", default=None, metavar="DIR",
                      help="add a disk tier in DIR; the segment defaults to a quarter of the data (docs/disk-tier.md)")
    demo.add_argument("--disk-size", default=None, help="disk tier size (default: 4 x the data)")

    bench = sub.add_parser("bench", help="measure put/get throughput against numpy.copyto")
    bench.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,256MiB",
                       help="comma-separated value sizes (default 4KiB,64KiB,1MiB,16MiB,256MiB)")
    bench.add_argument("--ops", default="put,get,put_from,get_into,put_tensor,get_tensor_into,batch,evict,cluster,kv",
                       help="comma-separated operations: put,get,put_from,get_into,put_tensor,get_tensor_into,batch,evict,evict-cluster,"
                            "cluster,kv,gpu (gpu needs torch and a CUDA device); also checksum, cold, restart, failover (needs etcd)")
    bench.add_argument("--repeat", type=int, default=7, help="timed store/copyto pairs per case (batch cases: 5x); medians are reported")
    bench.add_argument("--batch", default="256x64KiB", help="batch shape COUNTxSIZE (default 256x64KiB)")
    bench.add_argument("--budget", default="512MiB", help="bytes moved per repetition for large sizes (default 512MiB)")
    bench.add_argument("--small-ops", type=int, default=200_000, help="operations per repetition for small sizes")
    bench.add_argument("--cluster-size", default="16MiB", help="object size of the cluster shm/tcp cases (default 16MiB)")
    bench.add_argument("--cluster-cases", default="shm,tcp,ops",
                       help="which parts of --ops cluster run: shm, tcp, ops (auth and 4 KiB ops) (default all)")
    bench.add_argument("--evict-segment", default="256MiB", help="segment of each store in the evict case (default 256MiB)")
    bench.add_argument("--evict-size", default="64KiB", help="value size in the evict case (default 64KiB)")
    bench.add_argument("--evict-count", type=int, default=1024, help="puts per timed round in the evict case (default 1024)")
    bench.add_argument("--restart-count", type=int, default=100_000,
                       help="objects of 1 KiB held by 4 clients in --ops restart (default 100000)")
    bench.add_argument("--disk-dir", default=None, help="directory for --ops disk (its file system is measured; default /var/tmp)")
    bench.add_argument("--cold-segment", default="2GiB", help="segment of the fresh client in --ops cold (default 2GiB)")
    bench.add_argument("--cold-wait", type=float, default=5.0, help="seconds from connect to the first put in --ops cold (default 5)")
    bench.add_argument("--failover-count", type=int, default=10_000,
                       help="objects of 1 KiB held by 2 clients in --ops failover (default 10000)")
    bench.add_argument("--kv-shape", default="32x1024x16KiB",
                       help="KV layout of the kv case, LAYERSxBLOCKSxBLOCK_SIZE (default 32x1024x16KiB: 1 GiB)")
    bench.add_argument("--kv-pull", type=int, default=512, help="blocks pulled per layer and kind in the kv case (default 512)")
    bench.add_argument("--against", default=None, metavar="PEERS",
                       help="compare with mooncake and/or redis (comma-separated): the same workloads on each, "
                            "interleaved; runs only the comparison")
    bench.add_argument("--engines", action="store_true",
                       help="with --against mooncake: run the engines' own connectors (LMCache) through kvstore and Mooncake "
                            "instead (needs KVSTORE_ENGINES_PYTHON; ./dev.sh bench sets it up)")
    bench.add_argument("--against-count", type=int, default=256, help="1 MiB values per round in --against (default 256)")
    bench.add_argument("--chart", metavar="PNG", default=None, help="with --against: write a chart (needs matplotlib)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--baseline", metavar="DIR", default=None,
                       help="compare with another build of kvstore installed in DIR (pip install --target DIR .): "
                            "the same bench, alternating runs, medians and ratios")
    bench.add_argument("--rounds", type=int, default=4, help="alternating rounds of --baseline (default 4)")

    # The master's flags are defined once, in the Swift core (shared with kvstore-master):
    # everything after "master" goes there, --help included.
    sub.add_parser("master", add_help=False, help="run the network master (the same server and flags as kvstore-master; "
                                                   "master --help lists them)")

    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["master"]:
        from . import _native

        return _native.master_main("kvstore master", list(raw[1:]))
    args = parser.parse_args(raw)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(args)
    from .bench import run_bench

    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
