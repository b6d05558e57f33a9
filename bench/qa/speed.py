"""Re-measure the end-to-end inference speed-up of every pruned run against its teacher, one run at a time.

    python bench/qa/speed.py --runs runs/qa2         # writes runs/qa/<run>/speed.json; report.py prefers it
    python bench/qa/speed.py --runs runs/qa2 --drop-silent --only l0   # speed_drop_silent.json

`prune` measures its speed-up right after training, which is noisy when other jobs share the CPU (for example
``reproduce.py --workers 2``); this measures every pair again, alone, with the same batch and timer.

``--drop-silent`` first removes the student's heads and FFN units whose output-projection columns are all zero
(``sp.compact(model, drop_silent=True)``: closed L0 gates that a decision made before structprune dropped them
kept, zeroed, to hold the target count), checks that the logits do not change, and records the speed-up of what
is left in ``speed_drop_silent.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

import structprune as sp
from structprune.qa.commands import load_qa_model, measure_speedup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/qa2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--missing", action="store_true", help="only the runs that have no speed.json yet")
    parser.add_argument("--only", help="only the runs whose name starts with this")
    parser.add_argument("--drop-silent", action="store_true",
                        help="time the student after removing its all-zero heads and units (speed_drop_silent.json)")
    args = parser.parse_args()
    runs = Path(args.runs)
    teacher = load_qa_model(str(runs / "teacher" / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(runs / "teacher" / "model"))
    for metrics_file in sorted(runs.glob("*/metrics.json")):
        run = metrics_file.parent
        if run.name.startswith("teacher") or not (run / "model").is_dir():
            continue
        out = run / ("speed_drop_silent.json" if args.drop_silent else "speed.json")
        if (args.missing and out.is_file()) or (args.only and not run.name.startswith(args.only)):
            continue
        config = json.loads((run / "config.json").read_text())
        settings = argparse.Namespace(threads=args.threads, dev=config["dev"], max_length=config["max_length"],
                                      doc_stride=config["doc_stride"], eval_batch_size=config["eval_batch_size"])
        student = load_qa_model(str(run / "model"))
        extra = drop_silent(student, tokenizer) if args.drop_silent else {}
        speed = measure_speedup(teacher, student, tokenizer, settings, repeats=args.repeats)
        speed.update(threads=args.threads, repeats=args.repeats, torch=torch.__version__, **extra)
        out.write_text(json.dumps(speed, indent=2) + "\n")
        print(f"{run.name}: {speed['speedup']:.2f}x {extra}")
    return 0


@torch.inference_mode()
def drop_silent(student, tokenizer) -> dict:
    """Remove the student's all-zero heads and units in place; their counts before/after and the largest logit
    change on a few sentences (0 up to rounding: they added nothing)."""
    batch = tokenizer(["What does the gate keep?"] * 2, ["Structured pruning removes whole heads and units."] * 2,
                      return_tensors="pt")
    before = student(**batch)
    counts = sp.summary(student)
    sp.compact(student, drop_silent=True)
    after = student(**batch)
    s = sp.summary(student)
    diff = max((a - b).abs().max().item() for a, b in ((after.start_logits, before.start_logits),
                                                       (after.end_logits, before.end_logits)))
    return {"heads_kept_before": counts.total("heads_kept"), "ffn_kept_before": counts.total("ffn_kept"),
            "heads_kept": s.total("heads_kept"), "ffn_kept": s.total("ffn_kept"), "max_abs_logit_change": diff}


if __name__ == "__main__":
    raise SystemExit(main())
