"""Measured evidence for pruning to a speed target (issue 17): does ``PruneTarget(speedup=s)`` give a compacted
model that is really ``s`` times faster on this machine?

    python bench/latency_targets.py            # MiniLM QA, cpp, 2 threads, B8xL128 and B32xL192, 2x and 3x
    python bench/latency_targets.py --shapes 2x32 --targets 2 --repeats 3 --out /tmp/lat   # smoke

For each input shape: the latency table is measured (or read from ``<out>/tables``), masks are planned for each
target with random importance and with gain importance (on a few SQuAD 2.0 train questions), the pruned models are
compacted, and then the dense model and every pruned model are timed alternated call by call
(:func:`structprune.tools.timing.compare`): the measured speed-up is the median of the per-round ratios, with its IQR.
The prediction of the table is also checked on a few random per-layer counts (FFN counts on the table's grid, as
the planner chooses them).

``--pause-pid PIDFILE`` stops (SIGSTOP) the process in PIDFILE for each measurement and resumes it (SIGCONT) right
after, also on errors and on SIGINT/SIGTERM. Writes ``<out>/results.json`` and ``<out>/README.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

import structprune as sp
from structprune.benchmark import machine_info
from structprune.latency import check_predictions, get_table
from structprune.latency.cost_model import compare_timer
from structprune.strategies import PruneTarget, gain_masks, random_masks
from structprune.strategies.targets import parse_at
from structprune.tools.timing import compare

ROOT = Path(__file__).resolve().parents[1]


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat; 0.0 where it cannot be read)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


BUSY_LOG: list[float] = []
OTHERS_LOG: list[float] = []


@contextlib.contextmanager
def watch_others():
    """Measure the share of all CPUs that OTHER processes used during the block (total busy time from
    /proc/stat minus this process's CPU time); appended to ``OTHERS_LOG`` (None where it cannot be read)."""
    import resource

    def stat():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), sum(v) - v[3] - v[4]

    def ours():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    try:
        (t0, b0), o0 = stat(), ours()
    except OSError:
        OTHERS_LOG.append(None)
        yield
        return
    yield
    (t1, b1), o1 = stat(), ours()
    tick = os.sysconf("SC_CLK_TCK")
    OTHERS_LOG.append(max(0.0, (b1 - b0) - (o1 - o0) * tick) / max(1, t1 - t0))


def measured(args, what: str, fn):
    """``fn()`` with the training run paused, repeated (at most ``args.attempts`` times) while other processes
    used more than ``args.max_others`` of the CPUs during it; returns (result, others' share)."""
    for attempt in range(1, args.attempts + 1):
        with paused(args.pause_pid, quiet=args.quiet, max_wait_s=args.max_wait), watch_others():
            result = fn(attempt)
        others = OTHERS_LOG[-1]
        print(f"  {what}: other processes used {100 * (others or 0):.0f}% of the CPUs meanwhile", flush=True)
        if others is None or others <= args.max_others or attempt == args.attempts:
            return result, others
        print(f"  measuring {what} again (attempt {attempt + 1})", flush=True)
        time.sleep(20)


@contextlib.contextmanager
def paused(pidfile: str | None, limit_s: float = 170.0, quiet: float = 0.0, max_wait_s: float = 240.0):
    """SIGSTOP the process in ``pidfile`` for the block, SIGCONT afterwards whatever happens. With ``quiet`` > 0,
    first wait (at most ``max_wait_s``, the process running meanwhile) until, with it stopped, other work keeps
    the CPUs busy less than ``quiet`` of the time; the last busy fraction seen is appended to ``BUSY_LOG``."""
    pid = int(Path(pidfile).read_text().split()[0]) if pidfile and Path(pidfile).is_file() else None
    if pid is None:
        BUSY_LOG.append(cpu_busy() if quiet else None)
        yield
        return

    def resume(*_):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in handlers:
        signal.signal(s, lambda *a: (resume(), sys.exit(130)))
    waited = time.monotonic()
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        busy = cpu_busy() if quiet else None
        if not quiet or busy < quiet or time.monotonic() - waited > max_wait_s:
            break
        resume()
        print(f"  (other work keeps {100 * busy:.0f}% of the CPUs busy; waiting)", flush=True)
        time.sleep(15)
    BUSY_LOG.append(busy)
    t0 = time.monotonic()
    import threading

    watchdog = threading.Timer(limit_s, resume)  # never paused longer than limit_s, even if the block runs on
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        resume()
        for s, h in handlers.items():
            signal.signal(s, h)
        took = time.monotonic() - t0
        print(f"  (pid {pid} paused for {min(took, limit_s):.0f}s{' (resumed by the watchdog)' if took > limit_s else ''}; "
              f"the block took {took:.0f}s)", flush=True)


def qa_model(path: str):
    import transformers

    return transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()


def gain_batches(path: str, n_questions: int, seq: int, batch: int):
    import transformers

    from structprune.qa.data import load_squad
    from structprune.qa.features import build_train_features, collate

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    data = load_squad(str(ROOT.parent / "shared" / "data" / "squad2" / "train.json"), limit=n_questions)
    feats = build_train_features(data, tokenizer, max(seq, 64), min(32, max(seq, 64) // 4), progress=False)
    cols = ["input_ids", "attention_mask", "start_positions", "end_positions"]
    cols += ["token_type_ids"] if "token_type_ids" in feats.column_names else []
    return [collate(feats[i:i + batch], tokenizer, cols) for i in range(0, len(feats), batch)]


def counts(masks):
    return [int(h.sum()) for h in masks.heads_per_layer()], [int(f.sum()) for f in masks.ffn]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled MiniLM-L6-H384)")
    p.add_argument("--shapes", nargs="+", default=["8x128", "32x192"], help="BATCHxSEQ_LEN")
    p.add_argument("--targets", nargs="+", type=float, default=[2.0, 3.0])
    p.add_argument("--strategies", nargs="+", default=["random", "gain"], choices=["random", "gain"])
    p.add_argument("--backend", default="cpp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="alternated rounds when timing the pruned models")
    p.add_argument("--table-repeats", type=int, default=15, help="rounds when measuring the table")
    p.add_argument("--checks", type=int, default=3, help="random per-layer counts to check the prediction on")
    p.add_argument("--refresh", action="store_true", help="measure the tables again even when cached")
    p.add_argument("--pause-pid", default=None, metavar="PIDFILE", help="pause this process while timing")
    p.add_argument("--quiet", type=float, default=0.0, metavar="FRACTION",
                   help="before each measurement wait (up to --max-wait) until other work uses less than this "
                        "fraction of the CPUs")
    p.add_argument("--max-wait", type=float, default=240.0, metavar="S", help="longest wait for --quiet, seconds")
    p.add_argument("--max-others", type=float, default=0.1, metavar="FRACTION",
                   help="measure again when other processes used more than this share of the CPUs meanwhile")
    p.add_argument("--attempts", type=int, default=3, help="at most this many tries per measurement")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from structprune.tools.demo import default_model_path

    path = args.model or default_model_path()
    dense = qa_model(path)
    results = {"machine": machine_info(torch.device("cpu")), "model": path, "backend": args.backend,
               "threads": args.threads, "repeats": args.repeats, "shapes": []}
    for spec in args.shapes:
        batch, seq = parse_at(spec)
        print(f"== B{batch}xL{seq}", flush=True)
        t0 = time.perf_counter()
        table, others_table = measured(args, "table", lambda attempt: get_table(
            dense, batch, seq, backend=args.backend, cache_dir=out / "tables", refresh=args.refresh or attempt > 1,
            timer=compare_timer(2, args.table_repeats)))
        print(f"  table: dense {table.dense_measured_ms:.1f} ms, empty {table.empty_ms:.1f} ms, scale "
              f"{table.scale:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        batches = gain_batches(path, 24, seq, 8) if "gain" in args.strategies else None
        cases = {}
        for target in args.targets:
            for strategy in args.strategies:
                model = sp.patch(copy.deepcopy(dense))
                tgt = PruneTarget(speedup=target, table=table)
                masks = random_masks(model, tgt, seed=0) if strategy == "random" else gain_masks(model, batches, tgt)
                sp.set_masks(model, heads=masks.heads, ffn=masks.ffn)
                h, u = counts(masks)
                cases[f"{strategy}@{target:g}x"] = {"target": target, "strategy": strategy, "heads": h, "ffn": u,
                                                    "predicted_speedup": table.speedup(h, u),
                                                    "model": sp.compact(model).eval()}
        served = sp.compact(sp.patch(copy.deepcopy(dense))).eval()  # the dense model on the same backend
        from structprune.latency.models import model_inputs

        inputs = model_inputs(dense, batch, seq)
        fns = {"dense": lambda: dense(**inputs), "dense-compacted": lambda: served(**inputs)}
        for name, case in cases.items():
            fns[name] = lambda m=case["model"]: m(**inputs)
        saved = sp.get_backend()
        sp.set_backend(args.backend)
        try:
            with torch.inference_mode():
                timing, others_targets = measured(args, "targets", lambda attempt: compare(
                    fns, warmup=2, repeats=args.repeats, shapes=f"batch {batch} x seq {seq}"))
        finally:
            sp.set_backend(saved)
        print(timing.describe(), flush=True)
        rng = random.Random(batch * 1000 + seq)
        checks = [([rng.randint(0, table.num_heads) for _ in range(table.num_layers)],
                   [rng.choice(table.ffn_grid) for _ in range(table.num_layers)]) for _ in range(args.checks)]
        check_rows, others_checks = measured(args, "checks", lambda attempt: check_predictions(
            dense, table, checks, timer=compare_timer(2, args.repeats))) if checks else ([], None)
        for r in check_rows:
            print(f"  check heads {r['heads']} ffn {r['ffn']}: predicted {r['predicted_speedup']:.2f}x, measured "
                  f"{r['measured_speedup']:.2f}x (IQR {r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})", flush=True)
        rows = []
        for name, case in cases.items():
            vs = timing.speedup(name)
            vs_served = [s / p for s, p in zip(timing.seconds["dense-compacted"], timing.seconds[name])]
            from structprune.tools.timing import Spread

            vs_served = Spread.of(vs_served)
            rows.append({k: v for k, v in case.items() if k != "model"} | {
                "name": name, "pruned_ms": timing.time(name).median * 1e3,
                "measured_speedup": vs.median, "speedup_q1": vs.q1, "speedup_q3": vs.q3,
                "measured_speedup_vs_compacted_dense": vs_served.median,
                "vs_compacted_q1": vs_served.q1, "vs_compacted_q3": vs_served.q3,
                "error_vs_target": vs.median / case["target"] - 1.0})
        results["shapes"].append({
            "batch": batch, "seq_len": seq, "table": table.to_dict(), "timing": timing.to_dict(),
            "dense_ms": timing.time("dense").median * 1e3,
            "dense_compacted_ms": timing.time("dense-compacted").median * 1e3, "cases": rows, "checks": check_rows,
            "others_cpu_share": {"table": others_table, "targets": others_targets, "checks": others_checks}})
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "README.md").write_text(report(results))
    print(report(results))
    return 0


def report(results: dict) -> str:
    m = results["machine"]
    lines = ["# Pruning to a speed target: measured speed-ups", "",
             f"`python bench/latency_targets.py` on {m['cpu']} ({m['cpus_usable']} usable cores), torch {m['torch']}, "
             f"{results['backend']} backend, {results['threads']} threads, MiniLM-L6-H384 QA (`{Path(results['model']).name}`), "
             f"fp32, random token ids without padding. Dense and pruned models timed alternated call by call, "
             f"{results['repeats']} rounds; speed-up = median of the per-round ratios (IQR in brackets). "
             "'dense' is the unpatched Hugging Face model; 'dense (compacted)' the dense model patched and compacted, "
             "on the same backend (what the table's predictions refer to).", "",
             "| shape | target | strategy | heads kept / layer | FFN units kept / layer | predicted | measured vs dense | "
             "measured vs dense (compacted) | error vs target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape in results["shapes"]:
        for r in shape["cases"]:
            lines.append(f"| B{shape['batch']}xL{shape['seq_len']} | {r['target']:g}x | {r['strategy']} | "
                         f"{' '.join(map(str, r['heads']))} | {' '.join(map(str, r['ffn']))} | "
                         f"{r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x ({r['speedup_q1']:.2f}-"
                         f"{r['speedup_q3']:.2f}) | {r['measured_speedup_vs_compacted_dense']:.2f}x "
                         f"({r['vs_compacted_q1']:.2f}-{r['vs_compacted_q3']:.2f}) | {100 * r['error_vs_target']:+.1f}% |")
    lines += ["", "Dense times and the table's own check (random per-layer counts, FFN counts on the grid, compacted, "
              "vs the compacted dense):", ""]
    for shape in results["shapes"]:
        t = shape["table"]["derived"]
        lines.append(f"- B{shape['batch']}xL{shape['seq_len']}: dense {shape['dense_ms']:.1f} ms, dense (compacted) "
                     f"{shape['dense_compacted_ms']:.1f} ms; table scale {t['scale']:.3f}, max speed-up "
                     f"{t['max_speedup']:.1f}x; other processes' CPU share while measuring (table, targets, checks): "
                     + ", ".join("?" if v is None else f"{100 * v:.0f}%" for v in shape["others_cpu_share"].values())
                     + "; checks (predicted -> measured): " + ", ".join(
                         f"{c['predicted_speedup']:.2f}x -> {c['measured_speedup']:.2f}x" for c in shape["checks"]))
    lines += ["", "The QA-accuracy comparison of latency- vs count-targeted L0 students needs a trained teacher, which "
              "does not exist yet: not run.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
