"""Run `structprune demo` N times back to back and report the spread of its speed-ups (issue 16's target:
max/min < 1.15 over ten runs on an idle machine).

    python bench/demo_spread.py --runs 10 --out bench/results/cpu/demo_spread.json [-- demo arguments]

Each run is a fresh process, as a user would start it; the speed-up line of each is parsed, and the load average
before and after is recorded (the machine must be idle for the figure to mean anything).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

LINE = re.compile(r"speed-up, median of pairs \(IQR\)\s+([\d.]+)x \(([\d.]+)-([\d.]+)\)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", help="write the runs and the spread here (JSON)")
    parser.add_argument("demo_args", nargs="*", help="arguments for structprune demo (after --)")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "structprune.cli", "demo", *args.demo_args], capture_output=True,
                             text=True, check=True).stdout
        match = LINE.search(out)
        if match is None:
            raise SystemExit(f"run {i + 1}: no speed-up line in the demo's output:\n{out}")
        median, q1, q3 = map(float, match.groups())
        runs.append({"speedup": median, "q1": q1, "q3": q3, "load_before": round(load, 2),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"run {i + 1}: {median:.2f}x ({q1:.2f}-{q3:.2f}), load average before {load:.2f}", flush=True)
    speedups = [r["speedup"] for r in runs]
    spread = max(speedups) / min(speedups)
    print(f"spread max/min = {max(speedups):.2f} / {min(speedups):.2f} = {spread:.3f} (target < 1.15)")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "spread": spread, "demo_args": args.demo_args,
                                              "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
