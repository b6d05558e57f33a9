"""Re-measure the end-to-end inference speed-up of every pruned run against its teacher, one run at a time.

    python bench/qa/speed.py --runs runs/qa2         # writes runs/qa/<run>/speed.json; report.py prefers it

`prune` measures its speed-up right after training, which is noisy when other jobs share the CPU (for example
``reproduce.py --workers 2``); this measures every pair again, alone, with the same batch and timer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from structprune.qa.commands import load_qa_model, measure_speedup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/qa2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--missing", action="store_true", help="only the runs that have no speed.json yet")
    args = parser.parse_args()
    runs = Path(args.runs)
    teacher = load_qa_model(str(runs / "teacher" / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(runs / "teacher" / "model"))
    for metrics_file in sorted(runs.glob("*/metrics.json")):
        run = metrics_file.parent
        if run.name.startswith("teacher") or not (run / "model").is_dir():
            continue
        if args.missing and (run / "speed.json").is_file():
            continue
        config = json.loads((run / "config.json").read_text())
        settings = argparse.Namespace(threads=args.threads, dev=config["dev"], max_length=config["max_length"],
                                      doc_stride=config["doc_stride"], eval_batch_size=config["eval_batch_size"])
        speed = measure_speedup(teacher, load_qa_model(str(run / "model")), tokenizer, settings, repeats=args.repeats)
        speed.update(threads=args.threads, repeats=args.repeats, torch=torch.__version__)
        (run / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")
        print(f"{run.name}: {speed['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
