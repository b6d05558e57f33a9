"""Run the McCarley et al. (2019) protocol on real SQuAD 2.0 data with MiniLM-L6-H384, resumably.

    python bench/qa/reproduce.py --runs runs/qa            # teacher, then every pruning run, in order
    python bench/qa/report.py --runs runs/qa --out bench/results/qa

Each step is one `structprune` command (printed and stored in commands.txt); a step whose metrics.json exists
is skipped, so re-running the script continues where it stopped; ``--workers 2`` runs two pruning runs at once
(one thread each), ``--only`` a subset in a chosen order. The settings are reduced to fit a 2-core CPU
(see SETTINGS and bench/results/qa/README.md). ``--prune-steps N`` (other than the default 80) plans the same
runs with N steps of continued training, named ``<run>-sN``, plus ``teacher-sN``: the teacher fine-tuned N steps
more with the same settings, the reference those runs are compared to.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SETTINGS = ["--max-length", "192", "--doc-stride", "64", "--batch-size", "16", "--dev-limit", "400"]
# The teacher is fine-tuned in resumable stages, each continuing from the previous model:
# (name, lr, steps); stage 1 starts from MiniLM.
TEACHER_STAGES = [("teacher-stage1", "1e-4", "250"), ("teacher-stage2", "5e-5", "750"), ("teacher", "1e-4", "700")]
# continued training of the survivors, the same for every method: 80 steps at lr 5e-5
PRUNE_LR, PRUNE_STEPS = "5e-5", 80
METHOD_FLAGS = {
    "random": [],
    "gain": ["--gain-examples", "128"],
    # a 60-step selection phase (weights frozen; the target reached after 30), then the decision. So short a
    # phase needs learning rates far above CoFi's 0.01, which assumes thousands of steps; these were chosen
    # on the stage-1 teacher (bench/results/qa/README.md, "L0 selection settings")
    "l0": ["--l0-steps", "60", "--l0-warmup-steps", "30", "--gate-lr", "1.0", "--lambda-lr", "3"],
}
# kept fractions (heads, ffn); the first is the paper's operating point (~50% heads, ~70% FFN removed)
LEVELS = [(0.5, 0.3), (0.75, 0.5), (0.25, 0.1)]
METHODS = ["random", "gain", "l0"]


def steps_suffix(steps: int) -> str:
    """What the names of runs with ``steps`` of continued training end with ("" for the default)."""
    return "" if steps == PRUNE_STEPS else f"-s{steps}"


def commands(runs: Path, threads: int, prune_threads: int, steps: int = PRUNE_STEPS) -> list[tuple[Path, list[str]]]:
    out, previous = [], None
    for name, lr, stage_steps in TEACHER_STAGES:
        cmd = ["structprune", "finetune"] + (["--model", str(previous / "model")] if previous else [])
        out.append((runs / name, cmd + ["--out", str(runs / name)] + SETTINGS + ["--threads", str(threads)]
                    + ["--lr", lr, "--max-steps", stage_steps]))
        previous = runs / name
    common = SETTINGS + ["--threads", str(prune_threads)]
    teacher = previous
    suffix = steps_suffix(steps)
    prune = ["--lr", PRUNE_LR, "--max-steps", str(steps)]
    for heads, ffn in LEVELS:
        for method in METHODS:
            for distill in (False, True):
                name = f"{method}-h{heads}-f{ffn}" + ("-distill" if distill else "") + suffix
                cmd = ["structprune", "prune", "--model", str(teacher / "model"), "--method", method,
                       "--heads", str(heads), "--ffn", str(ffn), "--out", str(runs / name)] + common + prune \
                    + METHOD_FLAGS[method]
                out.append((runs / name, cmd + (["--distill"] if distill else [])))
    if suffix:
        out.append((runs / f"teacher{suffix}", ["structprune", "finetune", "--model", str(teacher / "model"), "--out",
                                                str(runs / f"teacher{suffix}")] + common + prune))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/qa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1,
                        help="pruning runs at once, each with threads // workers threads (the teacher stages run "
                             "one at a time with all threads)")
    parser.add_argument("--prune-steps", type=int, default=PRUNE_STEPS,
                        help="continued-training steps of every pruning run (default %(default)s); other values name "
                             "the runs <run>-s<N> and add teacher-s<N>")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--only", nargs="+", metavar="RUN",
                        help="run just these pruning runs (by run name); the teacher stages always run if missing")
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    plan = full_plan = commands(runs, args.threads, max(1, args.threads // args.workers), args.prune_steps)
    stages = [name for name, _, _ in TEACHER_STAGES]
    if args.only:  # the teacher stages, then the named runs in the order given
        order = {name: i for i, name in enumerate(stages + args.only)}
        unknown = set(args.only) - {run_dir.name for run_dir, _ in plan}
        if unknown:
            parser.error(f"--only: no run named {sorted(unknown)}")
        plan = sorted((step for step in plan if step[0].name in order), key=lambda step: order[step[0].name])
    todo = [(run_dir, cmd) for run_dir, cmd in plan if not (run_dir / "metrics.json").is_file()]
    for run_dir, cmd in todo:
        print("+", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    (runs / f"commands{steps_suffix(args.prune_steps)}.txt").write_text("\n".join(shlex.join(c) for _, c in full_plan) + "\n")
    for step in [step for step in todo if step[0].name in stages]:  # each stage continues the previous one
        if run(runs, *step) != 0:
            return 1
    with ThreadPoolExecutor(args.workers) as pool:
        failed = sum(rc != 0 for rc in pool.map(lambda step: run(runs, *step),
                                               [step for step in todo if step[0].name not in stages]))
    return 1 if failed else 0


def run(runs: Path, run_dir: Path, cmd: list[str]) -> int:
    """One step, its output appended to ``runs/<name>.log``; non-zero when it failed or paused."""
    with open(runs / f"{run_dir.name}.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0 or not (run_dir / "metrics.json").is_file():
        print(f"step failed or paused (rc {rc}); see {runs / (run_dir.name + '.log')}", file=sys.stderr, flush=True)
        return rc or 1
    print(f"done: {run_dir.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
