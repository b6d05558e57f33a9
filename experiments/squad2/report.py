"""Collect the runs of experiments/squad2/reproduce.py into results.csv, a Markdown table, plots and the per-run records.

    python experiments/squad2/report.py --runs runs/qa2 --out experiments/squad2/results
    python experiments/squad2/report.py --replot     # redraw student_curves.png from the committed CSVs alone

Every student is compared with the teacher on the same dev questions by a paired bootstrap (1,000 resamples over
questions) of its F1 and HasAns F1 difference: at threshold 0, at each model's own dev-chosen threshold and, where
``predictions_always.json`` exists (issue 27), always answering (every question given its best non-null span: reading
comprehension apart from the null threshold). Methods are compared with each other at the same size and, for the
frontier's methods (l0-full, L0, layer drop), at equal measured speed; ``f1_vs_speedup.png`` draws each method's
frontier as its own line. While the teacher is still training, only its learning curve so far is written
(teacher_curve.csv / .png).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_plots import plot_curve, plot_student_curves, plot_students  # noqa: E402
from structprune.qa.bootstrap import compare_predictions, per_question_f1  # noqa: E402
from structprune.qa.data import load_squad  # noqa: E402

COLUMNS = ["run", "method", "distill", "target", "steps", "l0_selection_steps", "heads_kept", "heads_total",
           "ffn_kept", "ffn_total", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "f1_diff", "f1_diff_lo", "f1_diff_hi",
           "HasAns_f1_diff", "HasAns_f1_diff_lo", "HasAns_f1_diff_hi", "thr_f1", "thr_HasAns_f1", "thr_f1_diff",
           "thr_f1_diff_lo", "thr_f1_diff_hi", "thr_HasAns_f1_diff", "thr_HasAns_f1_diff_lo", "thr_HasAns_f1_diff_hi",
           "speedup", "l0_rank_cut_heads", "l0_rank_cut_ffn", "l0_rank_fill_heads", "l0_rank_fill_ffn",
           "heads_kept_speaking", "ffn_kept_speaking", "speedup_drop_silent", "layers_kept", "always_f1",
           "always_HasAns_f1", "always_f1_diff", "always_f1_diff_lo", "always_f1_diff_hi", "always_HasAns_f1_diff",
           "always_HasAns_f1_diff_lo", "always_HasAns_f1_diff_hi", "speedup_served", "speedup_served_same_runtime"]
CURVE = ["step", "epoch", "f1", "HasAns_f1", "NoAns_f1", "best_f1"]
ALWAYS = "predictions_always.json"  # structprune predict --always-answer, or written by eval beside the metrics
# Frontier methods compared at equal measured speed (a minus b, the issue's expected order), and what counts as
# equal: measured speed-ups within SPEED_TOLERANCE of each other (relative).
SPEED_PAIRS = (("l0-full", "layerdrop"), ("l0-full", "l0"), ("l0", "layerdrop"))
SPEED_TOLERANCE = 0.15
RECORDS = ("config.json", "metrics.json", "speed.json", "speed_drop_silent.json", "speed_serving.json", "best_eval.json",
           "summary.txt",
           "masks.json", "l0_log.jsonl", "l0_stats.json", "log.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def teacher_curve(log: Path) -> list[dict]:
    """The teacher's dev evaluations so far (step, epoch and the SQuAD 2.0 scores) from its ``log.jsonl``."""
    return [{"step": r["step"], "epoch": r["epoch"], **{k: r["metrics"][k] for k in CURVE[2:]}}
            for r in read_jsonl(log) if r.get("event") == "eval"]


def l0_rank_cut(run: Path, metrics: dict) -> dict:
    """The share of each group that the final L0 decision had to settle by rank instead of by the gates: cut
    (gates still deterministically open beyond the kept count when training ended; the issue's rule: over 5% means
    the L0 phase was too short) or filled (fewer gates open than the kept count, the rest re-opened by rank)."""
    stats_path = run / "l0_stats.json"
    if metrics.get("method") != "l0" or not stats_path.is_file():
        return {}
    stats = json.loads(stats_path.read_text())
    out = {}
    for s in ("heads", "ffn"):
        surplus = (stats[f"kept_{s}"] - metrics[f"{s}_kept"]) / metrics[f"{s}_total"]
        out.update({f"l0_rank_cut_{s}": max(0.0, surplus), f"l0_rank_fill_{s}": max(0.0, -surplus)})
    return out


def target_of(config: dict) -> str:
    """What the run pruned to: kept fractions ("counts 0.5/0.3") or a speed target ("speedup 2.3 @ 32x192")."""
    if config.get("speedup") is not None or config.get("latency_ms") is not None:
        at = config.get("at")
        if at is None and config.get("latency_table"):
            key = json.loads(Path(config["latency_table"]).read_text()).get("key", {})
            at = f"{key.get('batch')}x{key.get('seq_len')}"
        goal = f"speedup {config['speedup']}" if config.get("speedup") is not None else f"{config['latency_ms']} ms"
        return f"{goal} @ {at}"
    return f"counts {config.get('heads')}/{config.get('ffn')}"


def thresholded(runs: Path, run: str, dev) -> dict | None:
    """The dev predictions of ``run`` at its own dev-chosen null threshold (``<runs>/devpred/<run>/``, written by
    ``structprune predict`` with the threshold stored beside the model), or None when they were not made."""
    path = runs / "devpred" / run / "predictions.json"
    return json.loads(path.read_text()) if path.is_file() else None


def always_answering(runs: Path, run: str) -> dict | None:
    """The always-answering dev predictions of ``run`` (``<runs>/devpred/<run>/`` from ``predict --always-answer``,
    else the run's own from its evaluation), or None when there are none."""
    for path in (runs / "devpred" / run / ALWAYS, runs / run / ALWAYS):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def thresholded_scores(predictions: dict, dev, prefix: str = "thr_") -> dict:
    """Overall and HasAns F1 (percent) of ``predictions`` on ``dev``, keyed ``<prefix>f1`` and
    ``<prefix>HasAns_f1``."""
    f1, has_answer = per_question_f1(predictions, dev)
    answerable = [q for q, has in has_answer.items() if has]
    return {f"{prefix}f1": 100.0 * sum(f1.values()) / len(f1),
            f"{prefix}HasAns_f1": 100.0 * sum(f1[q] for q in answerable) / max(1, len(answerable))}


def method_of(metrics: dict, config: dict) -> str:
    """The run's method as results.csv names it: ``l0-full`` for L0 over whole sublayers and hidden dimensions
    (``prune --method l0 --full``), else the method recorded."""
    method = metrics.get("method") or config.get("method")
    return "l0-full" if method == "l0" and config.get("full") else method


def student_rows(runs: Path, teacher_predictions: dict, teacher_thr: dict | None, dev,
                 teacher_always: dict | None = None) -> list[dict]:
    rows = []
    for path in sorted(runs.glob("*/metrics.json")):
        run = path.parent
        if run.name == "teacher":
            continue
        m = {**json.loads(path.read_text()), "run": run.name}
        if (run / "speed.json").is_file():  # re-measured alone
            m.update(json.loads((run / "speed.json").read_text()))
        if (run / "speed_drop_silent.json").is_file():  # experiments/squad2/speed.py --drop-silent
            silent = json.loads((run / "speed_drop_silent.json").read_text())
            m.update(heads_kept_speaking=silent["heads_kept"], ffn_kept_speaking=silent["ffn_kept"],
                     speedup_drop_silent=silent["speedup"])
        if (run / "speed_serving.json").is_file():  # experiments/squad2/speed.py --serving
            served = json.loads((run / "speed_serving.json").read_text())
            m.update(speedup_served=served["speedup"], speedup_served_same_runtime=served["speedup_same_runtime"])
        start = next((r for r in read_jsonl(run / "train" / "log.jsonl") if r.get("event") == "start"), {})
        config = json.loads((run / "config.json").read_text())
        m["steps"] = start.get("total_steps")
        selection = json.loads((run / "l0_stats.json").read_text()).get("selection_steps") \
            if (run / "l0_stats.json").is_file() else None
        if selection is not None:  # an L0 selection phase: its steps trained the weights too with --l0-train-weights
            m["l0_selection_steps"] = selection
            if config.get("l0_train_weights") and m["steps"] is not None:
                m["steps"] += selection
        m["distill"] = "yes" if m.get("distill") else "no"
        m["method"] = method_of(m, config)
        m["target"] = target_of(config)
        if m["method"] == "layerdrop":
            kept = m["layers_kept"]
            m["target"] = f"layers {','.join(map(str, kept))} of {m['layers_total']}"
            m["layers_kept"] = len(kept)
        diffs = compare_predictions(json.loads((run / "predictions.json").read_text()), teacher_predictions, dev)
        for key, d in diffs.items():
            m.update({f"{key}_diff": d.diff, f"{key}_diff_lo": d.lo, f"{key}_diff_hi": d.hi})
        student_thr = thresholded(runs, run.name, dev)
        if teacher_thr is not None and student_thr is not None:
            m.update(thresholded_scores(student_thr, dev))
            for key, d in compare_predictions(student_thr, teacher_thr, dev).items():
                m.update({f"thr_{key}_diff": d.diff, f"thr_{key}_diff_lo": d.lo, f"thr_{key}_diff_hi": d.hi})
        student_always = always_answering(runs, run.name)
        if student_always is not None:
            m.update(thresholded_scores(student_always, dev, "always_"))
            if teacher_always is not None:
                for key, d in compare_predictions(student_always, teacher_always, dev).items():
                    m.update({f"always_{key}_diff": d.diff, f"always_{key}_diff_lo": d.lo,
                              f"always_{key}_diff_hi": d.hi})
        m.update(l0_rank_cut(run, m))
        rows.append(m)
    return sorted(rows, key=lambda r: (-r.get("heads_kept", 0), -r.get("ffn_kept", 0), r["method"], r["distill"]))


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None or value == "" else format(value, spec)


def table(teacher: dict, rows: list[dict]) -> str:
    lines = ["| run | method | distill | target | steps | heads kept | FFN kept | F1 | HasAns F1 | NoAns | best F1 | "
             "ΔF1 [95% CI] | ΔHasAns F1 [95% CI] | speed-up | served (same runtime) |", "|" + "---|" * 15]
    lines.append(f"| teacher | - | - | - | {fmt(teacher.get('steps'), 'd')} | all | all | {teacher['f1']:.2f} | "
                 f"{teacher['HasAns_f1']:.2f} | {teacher['NoAns_f1']:.2f} | {teacher['best_f1']:.2f} | - | - | 1.00x | "
                 "1.00x |")
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['method']} | {r['distill']} | {r['target']} | {fmt(r['steps'], 'd')} | "
            f"{fmt(r.get('heads_kept'), 'd')}/{fmt(r.get('heads_total'), 'd')} | "
            f"{fmt(r.get('ffn_kept'), 'd')}/{fmt(r.get('ffn_total'), 'd')} | {r['f1']:.2f} | {r['HasAns_f1']:.2f} | {r['NoAns_f1']:.2f} | "
            f"{r['best_f1']:.2f} | {r['f1_diff']:+.2f} [{r['f1_diff_lo']:+.2f}, {r['f1_diff_hi']:+.2f}] | "
            f"{r['HasAns_f1_diff']:+.2f} [{r['HasAns_f1_diff_lo']:+.2f}, {r['HasAns_f1_diff_hi']:+.2f}] | "
            f"{fmt(r.get('speedup'))}x | {served(r)} |")
    return "\n".join(lines)


def served(r: dict) -> str:
    """The student under sp.optimize over the teacher under sp.optimize ("-" where speed.py --serving has not run)."""
    value = r.get("speedup_served_same_runtime")
    return "-" if value is None else f"{value:.2f}x"


def table_thresholded(teacher: dict, rows: list[dict]) -> str:
    """Scores at each model's own dev-chosen null threshold (what ``predict`` answers with), and the paired
    bootstrap of their differences to the teacher's."""
    lines = ["| run | target | F1 | HasAns F1 | ΔF1 [95% CI] | ΔHasAns F1 [95% CI] | speed-up |", "|" + "---|" * 7,
             f"| teacher | - | {teacher['thr_f1']:.2f} | {teacher['thr_HasAns_f1']:.2f} | - | - | 1.00x |"]
    for r in rows:
        if "thr_f1" not in r:
            continue
        lines.append(
            f"| {r['run']} | {r['target']} | {r['thr_f1']:.2f} | {r['thr_HasAns_f1']:.2f} | "
            f"{r['thr_f1_diff']:+.2f} [{r['thr_f1_diff_lo']:+.2f}, {r['thr_f1_diff_hi']:+.2f}] | "
            f"{r['thr_HasAns_f1_diff']:+.2f} [{r['thr_HasAns_f1_diff_lo']:+.2f}, {r['thr_HasAns_f1_diff_hi']:+.2f}] | "
            f"{fmt(r.get('speedup'))}x |")
    return "\n".join(lines)


def table_always(teacher: dict, rows: list[dict]) -> str:
    """Scores always answering (each question's best non-null span), and the paired bootstrap of their differences
    to the teacher's."""
    def ci(r, key) -> str:
        if f"{key}_diff" not in r:
            return "-"
        return f"{r[key + '_diff']:+.2f} [{r[key + '_diff_lo']:+.2f}, {r[key + '_diff_hi']:+.2f}]"

    lines = ["| run | method | target | F1 | HasAns F1 | ΔF1 [95% CI] | ΔHasAns F1 [95% CI] | speed-up | "
             "served (same runtime) |", "|" + "---|" * 9,
             f"| teacher | - | - | {teacher['always_f1']:.2f} | {teacher['always_HasAns_f1']:.2f} | - | - | 1.00x | "
             "1.00x |"]
    for r in rows:
        if "always_f1" in r:
            lines.append(f"| {r['run']} | {r['method']} | {r['target']} | {r['always_f1']:.2f} | "
                         f"{r['always_HasAns_f1']:.2f} | {ci(r, 'always_f1')} | {ci(r, 'always_HasAns_f1')} | "
                         f"{fmt(r.get('speedup'))}x | {served(r)} |")
    return "\n".join(lines)


METHOD_ORDER = ("l0", "gain", "random")  # the paper's expected order of accuracy at equal size


def compare_runs(runs: Path, ra: dict, rb: dict, dev, size: str) -> dict:
    """Paired bootstraps of run ``ra`` minus run ``rb``: HasAns F1 and F1 at threshold 0, and F1 and HasAns F1 at
    each model's own dev-chosen threshold and always answering when those predictions exist."""
    row = {"size": size, "a": ra["run"], "b": rb["run"]}
    preds = [json.loads((runs / r["run"] / "predictions.json").read_text()) for r in (ra, rb)]
    for key, d in compare_predictions(*preds, dev).items():
        row[key] = d
    thr = [thresholded(runs, r["run"], dev) for r in (ra, rb)]
    if None not in thr:
        for key, d in compare_predictions(*thr, dev).items():
            row[f"thr_{key}"] = d
    always = [always_answering(runs, r["run"]) for r in (ra, rb)]
    if None not in always:
        for key, d in compare_predictions(*always, dev).items():
            row[f"always_{key}"] = d
    return row


def speed_pairs(runs: Path, rows: list[dict], dev) -> list[dict]:
    """Paired bootstraps between the frontier's methods at equal measured speed (SPEED_PAIRS, a minus b): each
    distilled run of a against the distilled run of b nearest in speed-up, when within SPEED_TOLERANCE."""
    out = []
    for a, b in SPEED_PAIRS:
        others = [r for r in rows if r["method"] == b and r["distill"] == "yes" and r.get("speedup")]
        for ra in (r for r in rows if r["method"] == a and r["distill"] == "yes" and r.get("speedup")):
            gap = {rb["run"]: abs(math.log(ra["speedup"] / rb["speedup"])) for rb in others}
            near = [rb for rb in others if gap[rb["run"]] <= math.log1p(SPEED_TOLERANCE)]
            if near:
                rb = min(near, key=lambda r: gap[r["run"]])
                out.append(compare_runs(runs, ra, rb, dev, f"{ra['speedup']:.2f}x / {rb['speedup']:.2f}x"))
    return out


def method_pairs(runs: Path, rows: list[dict], dev, extra: list[str] = ()) -> list[dict]:
    """Paired bootstraps between the distilled, count-targeted students of each size, in the expected order (L0
    minus gain, gain minus random, L0 minus random), then the frontier's methods at equal speed
    (:func:`speed_pairs`), then the ``extra`` pairs ("runA:runB")."""
    out = []
    counted = [r for r in rows if r["target"].startswith("counts")]
    sizes = sorted({(r["heads_kept"], r["ffn_kept"]) for r in counted}, reverse=True)
    for size in sizes:
        by_method: dict[str, list[dict]] = {}
        for r in counted:
            if (r["heads_kept"], r["ffn_kept"]) == size and r["distill"] == "yes":
                by_method.setdefault(r["method"], []).append(r)
        for a, b in (("l0", "gain"), ("gain", "random"), ("l0", "random")):
            for ra in by_method.get(a, []):  # every variant of a method (e.g. L0 decided at the target or at the end)
                for rb in by_method.get(b, []):
                    out.append(compare_runs(runs, ra, rb, dev, f"{size[0]} heads / {size[1]} units"))
    out += speed_pairs(runs, rows, dev)
    by_name = {r["run"]: r for r in rows}
    for pair in extra:
        a, _, b = pair.partition(":")
        if a not in by_name or b not in by_name:
            raise SystemExit(f"--pair {pair}: expected two run names among {sorted(by_name)}")
        out.append(compare_runs(runs, by_name[a], by_name[b], dev, "(asked)"))
    return out


def table_pairs(pairs: list[dict]) -> str:
    def ci(d) -> str:
        return "-" if d is None else f"{d.diff:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]"

    lines = ["| size or speed | a | b | Δ HasAns F1 (thr 0) | Δ F1 (thr 0) | Δ F1 (own thr) | Δ HasAns F1 (own thr) | "
             "Δ HasAns F1 (always answering) |", "|" + "---|" * 8]
    for p in pairs:
        lines.append(f"| {p['size']} | {p['a']} | {p['b']} | {ci(p.get('HasAns_f1'))} | {ci(p.get('f1'))} | "
                     f"{ci(p.get('thr_f1'))} | {ci(p.get('thr_HasAns_f1'))} | {ci(p.get('always_HasAns_f1'))} |")
    return "\n".join(lines)


def student_curves(*folders: Path) -> dict[str, list[dict]]:
    """The dev evaluations of each student's continued training (``prune --eval-every``), by run, from the runs in
    ``folders``."""
    curves = {}
    for log in sorted(log for folder in folders for log in folder.glob("*/train/log.jsonl")):
        if log.parent.parent.name != "teacher":
            curve = teacher_curve(log)
            if curve:
                curves[log.parent.parent.name] = curve
    return curves


def replot(out: Path) -> int:
    """Redraw the plots that the committed CSVs of ``out`` hold all the data for (``student_curves.png`` from
    ``student_curves.csv`` and the teacher's row of ``results.csv``), without the runs or the dev set."""
    def read_csv(path: Path) -> list[dict]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    teacher = next(r for r in read_csv(out / "results.csv") if r["run"] == "teacher")
    teacher = {k: float(teacher[k]) for k in ("best_f1", "HasAns_f1")}
    curves: dict[str, list[dict]] = {}
    for r in read_csv(out / "student_curves.csv"):
        curves.setdefault(r["run"], []).append({"step": int(r["step"]), **{k: float(r[k]) for k in CURVE[1:]}})
    plot_student_curves(curves, teacher, out / "student_curves.png")
    print(f"redrew {out / 'student_curves.png'} ({len(curves)} students)")
    return 0


def copy_records(runs: Path, out: Path) -> None:
    for run in sorted(p for p in runs.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        dest = out / "runs" / run.name
        for phase, prefix in (("", ""), ("train", "train_"), ("l0", "selection_")):
            for name in RECORDS:
                if (run / phase / name).is_file():
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(run / phase / name, dest / (prefix + name))
    for held in sorted((runs / "heldout").glob("*/predictions.json")):
        dest = out / "heldout" / held.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("predictions.json", "null_odds.json", "predict_info.json", ALWAYS):
            if (held.parent / name).is_file():
                shutil.copy(held.parent / name, dest / name)
    for timing in sorted((runs / "speed_versus").glob("*.json")):  # speed.py --versus
        (out / "speed_versus").mkdir(parents=True, exist_ok=True)
        shutil.copy(timing, out / "speed_versus" / timing.name)
    if (runs / "commands.txt").is_file():
        shutil.copy(runs / "commands.txt", out / "commands.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/qa2")
    parser.add_argument("--out", default="experiments/squad2/results")
    parser.add_argument("--teacher-log", help="the teacher's training log for its learning curve (default: "
                        "<runs>/teacher/log.jsonl); with a teacher snapshot, the log of the run it was taken from")
    parser.add_argument("--pair", action="append", default=[], metavar="RUN_A:RUN_B",
                        help="also compare these two runs (paired bootstrap, a minus b); repeatable")
    parser.add_argument("--curves-from", action="append", default=[], metavar="RUNS",
                        help="also plot the dev curves of the student runs in this folder (not in the tables)")
    parser.add_argument("--dev", default=str(Path(__file__).resolve().parents[3] / "shared/data/squad2/dev.json"))
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots whose data the CSVs in --out hold (no runs or dev set needed)")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    if args.replot:
        return replot(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = load_squad(args.dev)
    teacher_log = Path(args.teacher_log) if args.teacher_log else runs / "teacher" / "log.jsonl"
    curve = teacher_curve(teacher_log)
    no_answer = 100.0 * sum(1 for a in dev["answers"] if not a["text"]) / len(dev)
    if curve:
        with open(out / "teacher_curve.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CURVE)
            writer.writeheader()
            writer.writerows(curve)
        plot_curve(curve, out / "teacher_curve.png", no_answer)
    copy_records(runs, out)
    if not (runs / "teacher" / "metrics.json").is_file():
        print(f"teacher still training: {len(curve)} evaluations so far; no student table yet")
        return 0
    teacher = json.loads((runs / "teacher" / "metrics.json").read_text())
    best = runs / "teacher" / "best_eval.json"  # the evaluation the teacher's weights come from
    last = json.loads(best.read_text()) if best.is_file() else (read_jsonl(teacher_log) or [{}])[-1]
    teacher["steps"] = last.get("step")
    teacher_thr = thresholded(runs, "teacher", dev)
    teacher_always = always_answering(runs, "teacher")
    rows = student_rows(runs, json.loads((runs / "teacher" / "predictions.json").read_text()), teacher_thr, dev,
                        teacher_always)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        config = json.loads((runs / "teacher" / "model" / "config.json").read_text())
        sizes = {"heads_kept": config["num_hidden_layers"] * config["num_attention_heads"],
                 "ffn_kept": config["num_hidden_layers"] * config["intermediate_size"]}
        sizes.update(heads_total=sizes["heads_kept"], ffn_total=sizes["ffn_kept"], layers_kept=config["num_hidden_layers"])
        if teacher_thr is not None:
            teacher.update(thresholded_scores(teacher_thr, dev))
        if teacher_always is not None:
            teacher.update(thresholded_scores(teacher_always, dev, "always_"))
        writer.writerow({"run": "teacher", "method": "teacher", "distill": "no", "speedup": 1.0, **sizes, **teacher})
        writer.writerows(rows)
    md = ("At the null threshold 0 (F1, HasAns F1, NoAns) and the best dev threshold (best F1):\n\n"
          + table(teacher, rows))
    if teacher_thr is not None:
        md += ("\n\nAt each model's own dev-chosen null threshold (its `predict` answers):\n\n"
               + table_thresholded(teacher, rows))
    if teacher_always is not None:
        md += ("\n\nAlways answering (every question given its best non-null span: reading comprehension apart from "
               "the null threshold):\n\n" + table_always(teacher, rows))
    pairs = method_pairs(runs, rows, dev, args.pair)
    if pairs:
        md += ("\n\nMethod against method at the same size (distilled, count targets), then the frontier's methods "
               f"at equal measured speed (within {SPEED_TOLERANCE:.0%}), then the pairs asked for (a minus b, paired "
               "bootstrap over questions):\n\n" + table_pairs(pairs))
        (out / "pairs.json").write_text(json.dumps(
            [{k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in p.items()} for p in pairs], indent=2) + "\n")
    (out / "table.md").write_text(md + "\n")
    if rows:
        plot_students(teacher, rows, out / "f1_vs_speedup.png")
    curves = student_curves(runs, *map(Path, args.curves_from))
    if curves:
        with open(out / "student_curves.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["run", *CURVE])
            writer.writeheader()
            writer.writerows({"run": run, **c} for run, curve in curves.items() for c in curve)
        plot_student_curves(curves, teacher, out / "student_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
