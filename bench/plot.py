"""Re-draw the PNG plots of a sweep from its results.json (e.g. after editing the plot code, or on another machine).

    python bench/plot.py results/cpu/results.json            # PNGs next to the JSON
    python bench/plot.py results.json --out figures/
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from structprune.benchmark import BenchResult, plot_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="results.json written by `structprune bench --out DIR`")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: beside the JSON)")
    args = parser.parse_args(argv)
    result = BenchResult.from_json(json.loads(args.results.read_text()))
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_results(result, out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
