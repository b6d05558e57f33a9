"""ONNX Runtime speed of a dense QA model against structprune-pruned students (CPU, fp32 and int8).

    python bench/export_ort.py [--teacher DIR] [--student NAME=DIR ...] [--f1-limit N] [--out bench/results/export]

Every model is exported with ``structprune export``'s code path (plain operators), optionally optimized with
``onnxruntime.transformers.optimizer`` (SkipLayerNormalization / BiasGelu fusions) and quantized (dynamic
int8). Timing: sessions with ``intra_op_num_threads=--threads``, sequential execution; rounds interleave all
models (``structprune.tools.timing.compare``: order reversed every other round), each round times ``--iters`` calls
per model (their mean) after a warm-up; the speed-up of a student is the per-round ratio teacher/student,
reported as median and [min, max] over rounds.

Without ``--student``, students are built from the teacher with ``structprune.strategies.random_masks``
(global, seed 0) at 75%/50% and 50%/30% heads/FFN kept: the speed does not depend on which units are kept,
but F1 does, so F1 is only computed (``--f1-limit``) when fine-tuned models are given.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

import structprune as sp
from structprune.export import onnx as spx
from structprune.export.command import load_plain_qa
from structprune.strategies import PruneTarget, apply_masks, random_masks
from structprune.tools.timing import compare, sample

SHAPES = ((1, 384), (8, 128))
DEFAULT_STUDENTS = ((0.75, 0.5), (0.5, 0.3))


def build_teacher(tmp: Path) -> Path:
    from structprune.tools.demo import default_model_path

    path = default_model_path()
    torch.manual_seed(0)  # the (untrained) QA head
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()
    out = tmp / "teacher"
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def build_student(teacher: Path, heads: float, ffn: float, tmp: Path) -> Path:
    model = sp.patch(transformers.AutoModelForQuestionAnswering.from_pretrained(teacher).eval())
    apply_masks(model, random_masks(model, PruneTarget(heads=heads, ffn=ffn), seed=0))
    out = tmp / f"student-h{heads}-f{ffn}"
    sp.save_pretrained(sp.compact(model), out, tokenizer=transformers.AutoTokenizer.from_pretrained(teacher))
    return out


@torch.no_grad()
def pad_ffn(model, multiple: int):
    """Pad every layer's FFN to a multiple of ``multiple`` units with zero weights and biases (gelu(0) = 0 and
    the added output columns are 0, so outputs do not change)."""
    for layer in model.base_model.encoder.layer:
        inter, out = layer.intermediate.dense, layer.output.dense
        n = inter.out_features
        extra = -n % multiple
        if n == 0 or extra == 0:
            continue
        new_in = torch.nn.Linear(inter.in_features, n + extra)
        new_in.weight.zero_(); new_in.bias.zero_()
        new_in.weight[:n], new_in.bias[:n] = inter.weight, inter.bias
        new_out = torch.nn.Linear(n + extra, out.out_features)
        new_out.weight.zero_()
        new_out.weight[:, :n], new_out.bias[:] = out.weight, out.bias
        layer.intermediate.dense, layer.output.dense = new_in, new_out
    return model


def export_variants(name: str, model_dir: Path, tmp: Path, kinds, quantize: bool, pad: int) -> dict:
    """{(kind, dtype): onnx path} for one model; kind "plain" (as exported) or "opt" (ORT transformer fusions)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    plain, _ = load_plain_qa(model_dir, log=lambda *_: None)
    if name == "teacher-template":  # the dense model through the same plain-PyTorch code as the students
        plain = spx.to_plain(sp.patch(plain), log=lambda *_: None)
    if pad > 1 and name.startswith("student"):
        plain = pad_ffn(plain, pad)
    names = spx.input_names(plain, tokenizer)
    fp32 = spx.export_onnx(plain, names, spx.example_batch(plain.config.vocab_size, names), tmp / f"{name}.onnx")
    paths = {}
    for kind in kinds:
        path = fp32 if kind == "plain" else spx.optimize_onnx(fp32, tmp / f"{name}.opt.onnx")
        paths[(kind, "fp32")] = path
        if quantize:
            paths[(kind, "int8")] = spx.quantize_int8(path, tmp / f"{name}.{kind}.int8.onnx")
    return paths


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed(sess, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    full = {"input_ids": rng.integers(1000, 20000, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    return {i.name: full[i.name] for i in sess.get_inputs()}


def time_interleaved(sessions: dict, batch: int, seq: int, rounds: int, iters: int) -> dict[str, list[float]]:
    """Per model, the mean seconds per call of each round (``iters`` calls); the rounds alternate the models call
    by call (:func:`structprune.tools.timing.compare`, after 3 warm-up rounds)."""
    feeds = {k: feed(s, batch, seq) for k, s in sessions.items()}
    fns = {k: functools.partial(s.run, None, feeds[k]) for k, s in sessions.items()}
    if len(fns) == 1:  # nothing to alternate with
        (k, fn), = fns.items()
        return {k: sample(fn, warmup=3, repeats=rounds, number=iters)[0]}
    return compare(fns, warmup=3, repeats=rounds, number=iters).seconds


def f1_on_dev(path: Path, tokenizer_dir: Path, limit: int, threads: int) -> float:
    """SQuAD 2.0 F1 of an ONNX graph on the first ``limit`` dev questions (``structprune eval``'s code)."""
    from structprune.qa.evaluate import evaluate_qa

    metrics, _ = evaluate_qa(spx.OrtQAModel(path, threads=threads), transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir), _dev(limit), progress=False)
    return round(float(metrics["f1"]), 2)


def _dev(limit: int):
    from structprune.qa.data import load_squad

    return load_squad("/work/shared/data/squad2/dev.json", limit=limit)


class paused:
    """SIGSTOP the process in ``pid_file`` (a training run sharing the CPU) for a timing block; always resumed."""

    def __init__(self, pid_file: str | None):
        self.pid = int(Path(pid_file).read_text().strip()) if pid_file and Path(pid_file).is_file() else None

    def __enter__(self):
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGSTOP)
            except ProcessLookupError:
                self.pid = None

    def __exit__(self, *exc):
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, default=None, help="dense QA model directory (default: MiniLM + QA head)")
    p.add_argument("--student", action="append", default=[], metavar="NAME=DIR",
                   help="a pruned model to compare (default: random 75%%/50%% and 50%%/30%% students)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--graphs", default="plain,opt",
                   help="plain: the exported graph; opt: after onnxruntime.transformers.optimizer fusions")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--pad", type=int, default=1, help="pad each layer's kept heads' and units' counts to a multiple")
    p.add_argument("--shapes", default="1x384,8x128")
    p.add_argument("--f1-limit", type=int, default=0,
                   help="score F1 on the first N SQuAD 2.0 dev questions (meaningful for fine-tuned models only)")
    p.add_argument("--pause-pid-file", default=None,
                   help="file holding the pid of a process to SIGSTOP while timing (resumed after each block)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--table-from", type=Path, default=None, help="only print the markdown table of a results JSON")
    args = p.parse_args(argv)
    if args.table_from is not None:
        print(table(json.loads(args.table_from.read_text())), end="")
        return 0
    torch.set_num_threads(1)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    with tempfile.TemporaryDirectory(prefix="export-ort-") as tmp_name:
        tmp = Path(tmp_name)
        teacher = args.teacher or build_teacher(tmp)
        students = dict(s.split("=", 1) for s in args.student) if args.student else {
            f"student-h{int(h * 100)}-f{int(f * 100)}": build_student(teacher, h, f, tmp) for h, f in DEFAULT_STUDENTS}
        models = {"teacher": Path(teacher), "teacher-template": Path(teacher),
                  **{k: Path(v) for k, v in students.items()}}
        graphs = {}
        kinds = [k for k in args.graphs.split(",")]
        for name, directory in models.items():
            for (kind, dtype), path in export_variants(name, directory, tmp, kinds, not args.no_int8,
                                                       args.pad).items():
                graphs[(name, kind, dtype)] = (path, directory)
        f1s = {}
        if args.f1_limit:
            for key, (path, directory) in graphs.items():
                f1s[key] = f1_on_dev(path, directory, args.f1_limit, args.threads)
        rows = []
        for dtype in ("fp32", "int8"):
            subset = {k: v for k, v in graphs.items() if k[2] == dtype}
            if not subset:
                continue
            sessions = {k: session(v[0], args.threads) for k, v in subset.items()}
            for batch, seq in shapes:
                with paused(args.pause_pid_file):
                    times = time_interleaved(sessions, batch, seq, args.rounds, args.iters)
                # speed-up against the fastest dense graph of this dtype (HF's export or the template's,
                # plain or optimized): the most conservative ratio
                fast = min((k for k in times if k[0].startswith("teacher")), key=lambda k: statistics.median(times[k]))
                for key, t in times.items():
                    ratios = [b / x for b, x in zip(times[fast], t)]
                    rows.append({"model": key[0], "graph": key[1], "dtype": dtype, "batch": batch, "seq": seq,
                                 "ms_median": 1e3 * statistics.median(t), "ms_min": 1e3 * min(t),
                                 "ms_max": 1e3 * max(t), "speedup_median": statistics.median(ratios),
                                 "speedup_min": min(ratios), "speedup_max": max(ratios),
                                 "speedup_vs": "/".join(fast[:2]), "f1_dev": f1s.get(key, "n/a")})
                    print(f"{dtype} {batch}x{seq} {key[0]:18s} {key[1]:5s} {rows[-1]['ms_median']:8.2f} ms  "
                          f"speed-up {rows[-1]['speedup_median']:.3f} [{min(ratios):.3f}, {max(ratios):.3f}] vs "
                          f"{rows[-1]['speedup_vs']}", flush=True)
    import onnxruntime as ort

    meta = {"machine": platform.processor() or platform.machine(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "threads": args.threads, "onnxruntime": ort.__version__, "torch": torch.__version__,
            "f1_dev_questions": args.f1_limit or None, "rounds": args.rounds, "iters": args.iters, "graphs": args.graphs, "pad": args.pad,
            "teacher": str(args.teacher or "MiniLM-L6-H384 + untrained QA head (default_model_path)"),
            "students": args.student or "random_masks seed 0, global, 75/50 and 50/30 (heads/FFN kept)",
            "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(args.out / f"results{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (args.out / f"table{args.tag}.md").write_text(table({"meta": meta, "rows": rows}))
    return 0


def table(result: dict) -> str:
    """Markdown table of a results JSON: per shape and dtype, ms and speed-up (median [min, max] over rounds)."""
    meta, rows = result["meta"], result["rows"]
    lines = [f"ONNX Runtime {meta['onnxruntime']}, CPU `{meta['cpu']}` ({meta['cores']} cores, shared), "
             f"{meta['threads']} intra-op threads, sequential execution; {meta['rounds']} interleaved rounds x "
             f"{meta['iters']} calls. Speed-up: per-round ratio against the fastest dense graph of the same dtype "
             "(column `vs`), median [min, max].", "",
             "| shape | dtype | model | graph | ms (median) | speed-up | vs | F1 dev |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']}x{r['seq']} | {r['dtype']} | {r['model']} | {r['graph']} | {r['ms_median']:.1f} | "
                     f"{r['speedup_median']:.2f} [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | "
                     f"{r['speedup_vs']} | {r['f1_dev']} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
