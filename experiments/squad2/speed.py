"""Re-measure the end-to-end inference speed-up of every pruned run against its teacher, one run at a time.

    python experiments/squad2/speed.py --runs runs/qa2         # writes runs/qa/<run>/speed.json; report.py prefers it
    python experiments/squad2/speed.py --runs runs/qa2 --drop-silent --only l0   # speed_drop_silent.json
    python experiments/squad2/speed.py --runs runs/qa2 --serving --only l0-full   # speed_serving.json

`prune` measures its speed-up right after training, which is noisy when other jobs share the CPU (for example
``reproduce.py --workers 2``); this measures every pair again, alone, with the same batch and timer.

``--drop-silent`` first removes the student's heads and FFN units whose output-projection columns are all zero
(``sp.compact(model, drop_silent=True)``: closed L0 gates that a decision made before structprune dropped them
kept, zeroed, to hold the target count), checks that the logits do not change, and records the speed-up of what
is left in ``speed_drop_silent.json``.

``--serving`` times four sides alternated on the same batch: the teacher as a Hugging Face model, the teacher under
``sp.optimize`` (fp32), the student as loaded and the student under ``sp.optimize``; ``speed_serving.json`` holds the
speed-up of each over the HF teacher and the student's over the teacher when both are served the same way (what
pruning alone gives in that runtime).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

import structprune as sp
from structprune.qa.pruning import measure_speedup, speed_batch
from structprune.qa.runs import load_qa_model
from structprune.tools.timing import Spread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/qa2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--missing", action="store_true", help="only the runs that have no speed.json yet")
    parser.add_argument("--only", help="only the runs whose name starts with this")
    parser.add_argument("--drop-silent", action="store_true",
                        help="time the student after removing its all-zero heads and units (speed_drop_silent.json)")
    parser.add_argument("--serving", action="store_true",
                        help="also time teacher and student under sp.optimize (fp32) into speed_serving.json")
    parser.add_argument("--versus", metavar="RUN_A:RUN_B",
                        help="time the teacher and the students of two runs alternated in one session (a speed-up of "
                             "each over the teacher, and of B over A per round) into speed_versus/A__B.json")
    args = parser.parse_args()
    runs = Path(args.runs)
    teacher = load_qa_model(str(runs / "teacher" / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(runs / "teacher" / "model"))
    if args.versus:
        return versus(runs, teacher, tokenizer, args)
    for metrics_file in sorted(runs.glob("*/metrics.json")):
        run = metrics_file.parent
        if run.name.startswith("teacher") or not (run / "model").is_dir():
            continue
        out = run / ("speed_drop_silent.json" if args.drop_silent else
                     "speed_serving.json" if args.serving else "speed.json")
        if (args.missing and out.is_file()) or (args.only and not run.name.startswith(args.only)):
            continue
        config = json.loads((run / "config.json").read_text())
        settings = argparse.Namespace(threads=args.threads, dev=config["dev"], max_length=config["max_length"],
                                      doc_stride=config["doc_stride"], eval_batch_size=config["eval_batch_size"])
        student = load_qa_model(str(run / "model"))
        if args.serving:
            speed = serving_speed(teacher, student, tokenizer, settings, args.repeats)
            out.write_text(json.dumps(speed, indent=2) + "\n")
            print(f"{run.name}: served {speed['speedup']:.2f}x over the HF teacher, "
                  f"{speed['speedup_same_runtime']:.2f}x over the served teacher")
            continue
        extra = drop_silent(student, tokenizer) if args.drop_silent else {}
        speed = measure_speedup(teacher, student, tokenizer, settings, repeats=args.repeats)
        speed.update(threads=args.threads, repeats=args.repeats, torch=torch.__version__, **extra)
        out.write_text(json.dumps(speed, indent=2) + "\n")
        print(f"{run.name}: {speed['speedup']:.2f}x {extra}")
    return 0


def versus(runs: Path, teacher, tokenizer, args) -> int:
    """``--versus A:B``: the teacher, A and B timed round by round on one real dev batch (the order reverses every
    round: :func:`structprune.tools.timing.compare`); B's speed-up over A is the median over rounds of A's time / B's."""
    from structprune.tools.timing import compare

    names = args.versus.split(":")
    if len(names) != 2 or not all((runs / n / "model").is_dir() for n in names):
        raise SystemExit(f"--versus {args.versus}: expected RUN_A:RUN_B, two runs with a model/ in {runs}")
    config = argparse.Namespace(**json.loads((runs / names[0] / "config.json").read_text()))
    torch.set_num_threads(args.threads)
    batch = speed_batch(tokenizer, config)
    models = {"teacher": teacher.eval(), **{n: load_qa_model(str(runs / n / "model")).eval() for n in names}}
    with torch.inference_mode():
        timing = compare({n: (lambda m=m: m(**batch)) for n, m in models.items()}, warmup=1, repeats=args.repeats,
                         shapes=f"batch {batch['input_ids'].shape[0]} x seq {batch['input_ids'].shape[1]}")
    a, b = (timing.seconds[n] for n in names)
    b_over_a = Spread.of([x / y for x, y in zip(a, b)])  # round by round
    out = {"a": names[0], "b": names[1], "b_speedup_over_a": b_over_a.median, "b_speedup_over_a_q1": b_over_a.q1,
           "b_speedup_over_a_q3": b_over_a.q3, "timing": timing.to_dict(), "torch": torch.__version__}
    dest = runs / "speed_versus" / f"{names[0]}__{names[1]}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(timing.describe())
    print(f"{names[1]} over {names[0]}: {b_over_a.median:.3f}x (IQR {b_over_a.q1:.3f}-{b_over_a.q3:.3f})")
    return 0


def serving_speed(teacher, student, tokenizer, settings, repeats: int) -> dict:
    """The four sides of ``--serving`` timed round by round on the first dev batch (see the module docstring)."""
    from structprune.tools.timing import compare

    torch.set_num_threads(settings.threads)
    batch = speed_batch(tokenizer, settings)
    models = {"teacher": teacher.eval(), "teacher_served": sp.optimize(teacher.eval()),
              "student": student.eval(), "student_served": sp.optimize(student.eval())}
    with torch.inference_mode():
        want = student(**batch).start_logits
        diff = (models["student_served"](**batch).start_logits - want).abs().max().item()
        if diff > 1e-3:
            raise SystemExit(f"sp.optimize changed the student's logits by {diff:.3g}; not timing it")
        timing = compare({n: (lambda m=m: m(**batch)) for n, m in models.items()}, warmup=1, repeats=repeats,
                         shapes=f"batch {batch['input_ids'].shape[0]} x seq {batch['input_ids'].shape[1]}")
    print(timing.describe())
    same = Spread.of([t / s for t, s in zip(timing.seconds["teacher_served"], timing.seconds["student_served"])])
    served = timing.speedup("student_served")
    return {"speedup": served.median, "speedup_q1": served.q1, "speedup_q3": served.q3,
            "speedup_same_runtime": same.median, "speedup_same_runtime_q1": same.q1,
            "speedup_same_runtime_q3": same.q3, "student_speedup": timing.speedup("student").median,
            "teacher_served_speedup": timing.speedup("teacher_served").median, "max_abs_logit_change": diff,
            "timing": timing.to_dict(), "threads": settings.threads, "repeats": repeats, "torch": torch.__version__}


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
