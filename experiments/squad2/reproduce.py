"""Run the McCarley et al. (2019) protocol on SQuAD 2.0 with MiniLM-L6-H384, resumably (issue 12).

    python experiments/squad2/reproduce.py --runs runs/qa2                 # teacher, students, held-out predictions
    python experiments/squad2/report.py --runs runs/qa2 --out experiments/squad2/results

1. The teacher: MiniLM fine-tuned on all of train.json, evaluated on all of dev.json every EVAL_EVERY steps; the run
   stops once dev best F1 has not improved for two evaluations in a row (never before one epoch), and the best
   evaluated weights are the teacher.
2. The teacher's logits on every train feature, cached once (``--teacher-logits``), so distilled students train
   without a teacher forward.
3. The students at the paper's operating point (50% of heads, 30% of FFN units kept) and at 75% / 50%: random, gain
   and L0, each distilled, plus L0 without distillation at the paper's point; every one trains its weights for the
   same STUDENT_EPOCHS, with a dev evaluation every STUDENT_EVAL_EVERY steps (the curve says whether more would
   help). L0: gates and weights trained together with the Lagrangian, the target reached over the first 400 steps;
   each structure's gates stop where their expected count reaches the target and the decision comes once all have
   (``--l0-until-target``), then the survivors train for the rest of the epoch.
4. Issue 17: L0, distilled, with its Lagrangian on the expected latency instead of on counts (``--speedup`` at
   LATENCY_AT on the cpp backend, one thread, the table measured once into ``latency-<at>.json``), at the speed-up
   the table predicts for the count-targeted L0 student (LATENCY_SPEEDUP), to compare the two at equal speed.
5. ``structprune predict`` on heldout-questions.json (no answers: a blind test) for the teacher and every student,
   with the null threshold chosen on dev; and on dev.json (``devpred/``), so that report.py can compare the models
   at their own dev-chosen thresholds.

Each step is one ``structprune`` command (printed, and stored in commands.txt); a step whose output exists is
skipped, and a step that was interrupted resumes from its checkpoint when the script is run again. On a GPU machine
the same commands run unchanged (they use the GPU when torch sees one); pass ``--data`` for the full SQuAD 2.0
(``train-v2.0.json``/``dev-v2.0.json``).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad2"
# 192-token windows with a 64-token stride hold nearly every paragraph of this data in one window (see the results
# README) at half the cost of BERT's 384; batch 16 at lr 1e-4 is the largest step MiniLM trained stably here.
SETTINGS = ["--max-length", "192", "--doc-stride", "64", "--batch-size", "16"]
TEACHER = ["--lr", "1e-4", "--epochs", "3", "--eval-every", "400", "--patience", "2", "--min-epochs", "1"]
STUDENT_LR, STUDENT_EPOCHS, STUDENT_EVAL_EVERY = "5e-5", "1", "300"
# the selection phase may take at most 800 steps (the gates reach the targets near step 500 here), and its weight
# training counts toward the epoch
L0_FLAGS = ["--gate-lr", "0.1", "--lambda-lr", "0.1", "--l0-warmup-steps", "400", "--l0-steps", "800",
            "--l0-until-target", "--l0-train-weights"]
LEVELS = [(0.5, 0.3), (0.75, 0.5)]  # (heads, FFN units) KEPT; the first is the paper's operating point
METHODS = ["random", "gain", "l0"]
LATENCY_SPEEDUP, LATENCY_AT = "2.52", "32x192"  # the table's prediction for the count-targeted L0 student's counts


def student_runs() -> list[tuple[str, float, float, str, bool]]:
    """(name, heads, ffn, method, distill) of every student, the paper's point first."""
    runs = [(f"{m}-h{h}-f{f}-distill", h, f, m, True) for h, f in LEVELS for m in METHODS]
    h, f = LEVELS[0]
    return runs + [(f"l0-h{h}-f{f}", h, f, "l0", False)]


def commands(runs: Path, data: Path, threads: int, student_epochs: str = STUDENT_EPOCHS) -> list[tuple[Path, list[str]]]:
    """(what the step produces, command) in order."""
    teacher = runs / "teacher"
    common = SETTINGS + ["--threads", str(threads), "--train", str(data / "train.json"), "--dev", str(data / "dev.json")]
    plan = [(teacher / "metrics.json", ["structprune", "finetune", "--out", str(teacher)] + common + TEACHER)]
    logits = runs / "teacher-logits.safetensors"
    for name, heads, ffn, method, distill in student_runs():
        cmd = ["structprune", "prune", "--model", str(teacher / "model"), "--method", method, "--heads", str(heads),
               "--ffn", str(ffn), "--out", str(runs / name), "--lr", STUDENT_LR, "--epochs", student_epochs,
               "--eval-every", STUDENT_EVAL_EVERY] + common
        cmd += (L0_FLAGS if method == "l0" else ["--gain-examples", "256"] if method == "gain" else [])
        cmd += ["--distill", "--teacher-logits", str(logits)] if distill else []
        plan.append((runs / name / "metrics.json", cmd))
    table = runs / f"latency-{LATENCY_AT}.json"
    plan.append((table, ["structprune", "latency-table", "--model", str(teacher / "model"), "--at", LATENCY_AT,
                         "--backend", "cpp", "--threads", "1", "--out", str(table)]))
    name = f"l0-speed{LATENCY_SPEEDUP}-distill"
    plan.append((runs / name / "metrics.json",
                 ["structprune", "prune", "--model", str(teacher / "model"), "--method", "l0", "--speedup",
                  LATENCY_SPEEDUP, "--latency-table", str(table), "--latency-backend", "cpp", "--out", str(runs / name),
                  "--lr", STUDENT_LR, "--epochs", student_epochs, "--eval-every", STUDENT_EVAL_EVERY]
                 + common + L0_FLAGS + ["--distill", "--teacher-logits", str(logits)]))
    for run in ["teacher"] + [name for name, *_ in student_runs()] + [name]:
        for data_file, folder in (("heldout-questions.json", "heldout"), ("dev.json", "devpred")):
            out = runs / folder / run
            plan.append((out / "predictions.json", ["structprune", "predict", "--model", str(runs / run / "model"),
                                                    "--data", str(data / data_file), "--out", str(out),
                                                    "--threads", str(threads), "--quiet"]))
    return plan


def run(runs: Path, product: Path, cmd: list[str]) -> int:
    """One step, its output appended to ``runs/logs/<step>.log``; non-zero when it failed or paused."""
    name = "-".join(product.relative_to(runs).parts[:-1]) or product.stem
    (runs / "logs").mkdir(parents=True, exist_ok=True)
    with open(runs / "logs" / f"{name}.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0 or not product.is_file():
        print(f"step failed or paused (rc {rc}); see {runs / 'logs' / (name + '.log')}", file=sys.stderr, flush=True)
        return rc or 1
    print(f"done: {name}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/qa2")
    parser.add_argument("--data", default=str(DATA), help="folder with train.json, dev.json, heldout-questions.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="students at once (threads // workers threads each)")
    parser.add_argument("--student-epochs", default=STUDENT_EPOCHS)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    threads = max(1, args.threads // args.workers)
    plan = commands(runs, Path(args.data), threads, args.student_epochs)
    (runs / "commands.txt").write_text("\n".join(shlex.join(cmd) for _, cmd in plan) + "\n")
    todo = [(product, cmd) for product, cmd in plan if not product.is_file()]
    for _, cmd in todo:
        print("+", shlex.join(cmd), flush=True)
    if args.dry_run or not todo:
        return 0
    teacher, *rest = todo if todo[0][1][1] == "finetune" else [None] + todo
    if teacher is not None and run(runs, *teacher) != 0:
        return 1
    # the latency table first, alone (it times; the latency-targeted student reads it)
    if any(run(runs, *step) != 0 for step in rest if step[1][1] == "latency-table"):
        return 1
    students = [step for step in rest if step[1][1] == "prune"]
    with ThreadPoolExecutor(args.workers) as pool:
        failed = sum(rc != 0 for rc in pool.map(lambda step: run(runs, *step), students))
    failed += sum(run(runs, *step) != 0 for step in rest if step[1][1] == "predict"
                  and (Path(step[1][step[1].index("--model") + 1]) / "config.json").is_file())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
