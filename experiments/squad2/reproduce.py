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
6. Issue 27, with ``--frontier``: the accuracy-speed frontier. Layer-drop students keeping 3 and 2 of MiniLM's 6
   layers (``--method layerdrop --keep-layers K``: every other layer with the last, 1,3,5 and 2,5) and ``l0-full``
   students (L0 over heads, FFN units, whole sublayers and hidden dimensions, with
   layerwise distillation, as the layer-drop students: both from the live teacher, whose hidden states the layer
   loss reads) at predicted speed-ups of 3, 4 and 6 on a latency table measured for them
   (``latency-<at>-full.json``); all for STUDENT_EPOCHS with the dev curve, as above. Then held-out and dev
   predictions for the teacher, the existing L0 students and every new student, at the dev-chosen threshold and
   always answering (``--always-answer``: ``heldout/<run>/predictions_always.json``). ``--bf16`` trains the
   frontier students under bf16 autocast (their names end in ``-bf16``); ``--bf16-check`` adds the 3-layer
   layer-drop student in bf16 beside its fp32 run, for report.py's ``--pair`` to show whether bf16 costs accuracy.
   With both, the later bf16 students run too: the heads/FFN-only L0 student distilled the same way, and the
   ``l0-full`` variants of FULL_VARIANTS (the teacher's learning rate, a 4.0-4.5x target, a shorter selection,
   more weight on the teacher's logits, widths in multiples of 16), each with its own flags.

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
# issue 27's frontier: layers kept by the layer-drop students, predicted speed-ups of the l0-full students
LAYERDROP_KEEP = (3, 2)
FULL_SPEEDUPS = ("3", "4", "6")
# the bf16 frontier's later students (sessions 33-36): (predicted speed-up, name suffix after
# "l0-full-speed{speedup}-distill-bf16") -> their flags beyond the frontier's: the teacher's learning rate and more,
# a shorter selection phase (more continued training at the final shape), more weight on the teacher's logits
FULL_VARIANTS = {
    ("4", "-lr1e-4"): ["--lr", "1e-4"],
    ("4.4", "-lr1e-4"): ["--lr", "1e-4"],
    ("4.3", "-lr1e-4-sel200"): ["--lr", "1e-4", "--l0-warmup-steps", "200", "--l0-steps", "500"],
    ("4.3", "-lr2e-4-sel200"): ["--lr", "2e-4", "--l0-warmup-steps", "200", "--l0-steps", "500"],
    ("4.3", "-lr1e-4-sel200-a0.9"): ["--lr", "1e-4", "--l0-warmup-steps", "200", "--l0-steps", "500",
                                     "--distill-alpha", "0.9"],
    ("4.3", "-lr2e-4-sel200-a0.9"): ["--lr", "2e-4", "--l0-warmup-steps", "200", "--l0-steps", "500",
                                     "--distill-alpha", "0.9"],
    ("4.3", "-lr3e-4-sel200-a0.9"): ["--lr", "3e-4", "--l0-warmup-steps", "200", "--l0-steps", "500",
                                     "--distill-alpha", "0.9"],
    ("4.1", "-lr3e-4-sel200-a0.9"): ["--lr", "3e-4", "--l0-warmup-steps", "200", "--l0-steps", "500",
                                     "--distill-alpha", "0.9"],
    # session 36: the same, at widths that are multiples of 16 (odd GEMM widths ran slow on the AMD EPYC)
    ("4.3", "-lr3e-4-sel200-a0.9-m16"): ["--lr", "3e-4", "--l0-warmup-steps", "200", "--l0-steps", "500",
                                         "--distill-alpha", "0.9", "--multiple-of", "16"],
    ("4.5", "-lr3e-4-sel200-a0.9-m16"): ["--lr", "3e-4", "--l0-warmup-steps", "200", "--l0-steps", "500",
                                         "--distill-alpha", "0.9", "--multiple-of", "16"],
    # session 37: a lower target, for margin on accuracy above the 4.0x line
    ("4.0", "-lr3e-4-sel200-a0.9-m16"): ["--lr", "3e-4", "--l0-warmup-steps", "200", "--l0-steps", "500",
                                         "--distill-alpha", "0.9", "--multiple-of", "16"],
}

def student_runs() -> list[tuple[str, float, float, str, bool]]:
    """(name, heads, ffn, method, distill) of every student, the paper's point first."""
    runs = [(f"{m}-h{h}-f{f}-distill", h, f, m, True) for h, f in LEVELS for m in METHODS]
    h, f = LEVELS[0]
    return runs + [(f"l0-h{h}-f{f}", h, f, "l0", False)]


def commands(runs: Path, data: Path, threads: int, student_epochs: str = STUDENT_EPOCHS, frontier: bool = False,
             bf16: bool = False, bf16_check: bool = False, frontier_only: bool = False) -> list[tuple[Path, list[str]]]:
    """(what the step produces, command) in order; issue 27's steps too with ``frontier``; with ``frontier_only``
    the teacher and issue 27's steps alone (steps 1 and 6)."""
    teacher = runs / "teacher"
    common = SETTINGS + ["--threads", str(threads), "--train", str(data / "train.json"), "--dev", str(data / "dev.json")]
    plan = [(teacher / "metrics.json", ["structprune", "finetune", "--out", str(teacher)] + common + TEACHER)]
    if frontier_only:
        return plan + frontier_commands(runs, data, common, student_epochs, frontier=frontier, bf16=bf16,
                                        bf16_check=bf16_check)
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
    if frontier or bf16_check:
        plan += frontier_commands(runs, data, common, student_epochs, frontier=frontier, bf16=bf16,
                                  bf16_check=bf16_check)
    return plan


def frontier_students(bf16: bool = False, bf16_check: bool = False, frontier: bool = True) -> dict[str, list[str]]:
    """Issue 27's students, name -> the prune flags that make them: the frontier's (layer-drop first; names end in
    ``-bf16`` when trained in bf16) and, with ``bf16_check``, the first layer-drop student in fp32 and in bf16."""
    def tail(in_bf16: bool) -> str:
        return "-distill-bf16" if in_bf16 else "-distill"

    layerdrop = [(k, bf16) for k in LAYERDROP_KEEP] if frontier else []
    layerdrop += [(LAYERDROP_KEEP[0], False), (LAYERDROP_KEEP[0], True)] if bf16_check else []
    students = {f"layerdrop-k{k}{tail(in_bf16)}": ["--method", "layerdrop", "--keep-layers", str(k),
                                                    "--distill-layers"] + ["--bf16"] * in_bf16
                for k, in_bf16 in layerdrop}
    def full(speedup: str) -> list[str]:
        return (["--method", "l0", "--full", "--speedup", speedup, "--latency-table", "{full_table}",
                 "--latency-backend", "cpp"] + L0_FLAGS + ["--distill-layers"] + ["--bf16"] * bf16)

    for speedup in FULL_SPEEDUPS if frontier else ():
        students[f"l0-full-speed{speedup}{tail(bf16)}"] = full(speedup)
    if frontier and bf16:  # the later bf16 students: the heads/FFN-only L0 distilled the same way, then the variants
        h, f = LEVELS[0]
        students[f"l0-h{h}-f{f}-distill-bf16"] = (["--method", "l0", "--heads", str(h), "--ffn", str(f)] + L0_FLAGS
                                                  + ["--distill-layers", "--bf16"])
        for (speedup, suffix), flags in FULL_VARIANTS.items():
            students[f"l0-full-speed{speedup}{tail(bf16)}{suffix}"] = with_values(full(speedup), flags)
    return {name: flags if "--lr" in flags else ["--lr", STUDENT_LR] + flags for name, flags in students.items()}


def with_values(flags: list[str], changes: list[str]) -> list[str]:
    """``flags`` with each ``--flag value`` pair of ``changes`` set: in place where the flag is, appended where not."""
    flags = list(flags)
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in flags:
            flags[flags.index(flag) + 1] = value
        else:
            flags += [flag, value]
    return flags


def frontier_commands(runs: Path, data: Path, common: list[str], student_epochs: str = STUDENT_EPOCHS,
                      frontier: bool = True, bf16: bool = False, bf16_check: bool = False) -> list[tuple[Path, list[str]]]:
    """Issue 27's steps (see the module docstring): the latency table of the l0-full students, the students (all
    distilled the same way: logits and layers, from the live teacher, whose hidden states the layer loss reads), then held-out and dev predictions at the dev-chosen threshold and
    always answering, for them and, on the frontier, for the teacher and the L0 students already there."""
    teacher, logits = runs / "teacher" / "model", runs / "teacher-logits.safetensors"
    table = runs / f"latency-{LATENCY_AT}-full.json"
    plan = []
    if frontier:
        plan.append((table, ["structprune", "latency-table", "--model", str(teacher), "--at", LATENCY_AT, "--backend",
                             "cpp", "--threads", "1", "--out", str(table)]))
    students = frontier_students(bf16, bf16_check, frontier)
    for name, flags in students.items():
        flags = [str(table) if f == "{full_table}" else f for f in flags]
        distill = ["--distill"] + ([] if "--distill-layers" in flags else ["--teacher-logits", str(logits)])
        plan.append((runs / name / "metrics.json",
                     ["structprune", "prune", "--model", str(teacher), "--out", str(runs / name)] + flags + distill
                     + ["--epochs", student_epochs, "--eval-every", STUDENT_EVAL_EVERY] + common))
    existing = ["teacher"] + [name for name, _, _, method, distill in student_runs() if method == "l0" and distill]
    existing.append(f"l0-speed{LATENCY_SPEEDUP}-distill")
    threads = common[common.index("--threads") + 1]
    for run in (existing if frontier else []) + list(students):
        for data_file, folder in (("heldout-questions.json", "heldout"), ("dev.json", "devpred")):
            out = runs / folder / run
            plan.append((out / "predictions_always.json",
                         ["structprune", "predict", "--model", str(runs / run / "model"), "--data", str(data / data_file),
                          "--out", str(out), "--always-answer", "--threads", threads, "--quiet"]))
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
    parser.add_argument("--frontier", action="store_true", help="also issue 27's frontier steps (step 6)")
    parser.add_argument("--bf16", action="store_true", help="train the frontier's students under bf16 autocast")
    parser.add_argument("--bf16-check", action="store_true",
                        help="the 3-layer layer-drop student in fp32 and in bf16 (the paired check of bf16's cost)")
    parser.add_argument("--frontier-only", action="store_true",
                        help="the teacher and issue 27's steps only (with --frontier and/or --bf16-check)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    threads = max(1, args.threads // args.workers)
    plan = commands(runs, Path(args.data), threads, args.student_epochs, frontier=args.frontier, bf16=args.bf16,
                    bf16_check=args.bf16_check, frontier_only=args.frontier_only)
    (runs / "commands.txt").write_text("\n".join(shlex.join(cmd) for _, cmd in plan) + "\n")
    todo = [(product, cmd) for product, cmd in plan if not product.is_file()]
    # a latency table is measured only for a step that will read it
    todo = [(product, cmd) for product, cmd in todo if cmd[1] != "latency-table"
            or any(str(product) in other for _, other in todo if other is not cmd)]
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
