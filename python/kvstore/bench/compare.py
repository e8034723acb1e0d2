"""``python -m kvstore bench --baseline DIR``: this build against another, side by side.

DIR holds another build of the package (for example ``pip install --target DIR .`` from a
checkout of the previous commit). Each round runs the same ``bench`` command once with
``PYTHONPATH=DIR`` (the baseline, with its own master and holders; its benchmark code replaced by
this build's, so both run the same cases) and once with this build,
alternating, so both see the same machine state; the table shows each case's median over
the rounds and the ratio this / baseline (ops/s for small operations, GB/s otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict


def run_compare(baseline: str, argv: list[str], rounds: int) -> int:
    if not os.path.isdir(os.path.join(baseline, "kvstore")):
        print(f"--baseline {baseline}: no kvstore package there (make one with pip install --target {baseline} .)",
              file=sys.stderr)
        return 2
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # holds kvstore/
    # Both builds run this build's benchmark code (kvstore.bench), so a case added since the
    # baseline runs on both: a copy of the baseline with this bench package laid over it.
    overlay = tempfile.TemporaryDirectory(prefix="kvstore-baseline-")
    shutil.copytree(baseline, overlay.name, dirs_exist_ok=True, symlinks=True)
    shutil.rmtree(os.path.join(overlay.name, "kvstore", "bench"), ignore_errors=True)
    shutil.copytree(os.path.join(here, "kvstore", "bench"), os.path.join(overlay.name, "kvstore", "bench"))
    baseline = overlay.name
    values: dict[str, dict[tuple[str, int], list[float]]] = {"baseline": defaultdict(list), "this": defaultdict(list)}
    for r in range(rounds):
        for name, path in (("baseline", baseline), ("this", here)) if r % 2 == 0 else (("this", here), ("baseline", baseline)):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                env = {**os.environ, "PYTHONPATH": path}
                p = subprocess.run([sys.executable, "-m", "kvstore", "bench", *argv, "--json", f.name], env=env,
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{name} run failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}", file=sys.stderr)
                    return 1
                for row in json.load(open(f.name)):
                    small = row.get("size", 0) <= 4096
                    values[name][(row["op"], row.get("size", 0))].append(row["ops_per_s"] if small else row["gb_per_s"])
    print(f"\nkvstore bench --baseline {baseline}: {rounds} alternating rounds of `bench {' '.join(argv)}`; medians")
    header = f"{'case':<34}{'size':>9}{'baseline':>14}{'this':>14}{'unit':>7}{'this/base':>11}"
    print(header)
    print("-" * len(header))
    for key in values["this"]:
        op, size = key
        t = statistics.median(values["this"][key])
        b = statistics.median(values["baseline"][key]) if key in values["baseline"] else None
        unit = "ops/s" if size <= 4096 else "GB/s"
        fmt = (lambda v: f"{v:,.0f}") if unit == "ops/s" else (lambda v: f"{v:.2f}")
        bs, rs = (fmt(b), f"{t / b:.3f}") if b else ("-", "-")
        print(f"{op:<34}{size:>9}{bs:>14}{fmt(t):>14}{unit:>7}{rs:>11}")
    return 0
