"""Dev F1 of exported QA models: PyTorch against ONNX fp32 and ONNX int8 (ONNX Runtime dynamic quantization).

    python experiments/squad2/export_f1.py --model teacher=runs/qa2s/teacher/model --model l0=runs/qa2s/l0-h0.5-f0.3/model \\
        --work runs/export_f1 --out experiments/squad2/results/export_f1

Each model (a structprune save or a Hugging Face directory) is exported with ``structprune export``'s code path
(``structprune.export.command.run_export``), fp32 and ``--quantize int8``, into ``--work``; the three versions are scored
on all of dev with the same windows (``--max-length``/``--doc-stride``) and threshold 0, and compared question by
question with a paired bootstrap (1,000 resamples, ``structprune.qa.bootstrap``): ONNX fp32 minus PyTorch (the
export is exact when this is 0) and int8 minus fp32 (the cost of quantization). Writes ``results.json`` and
``table.md`` into ``--out``; the ONNX files stay in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from structprune.export.command import run_export  # noqa: E402
from structprune.tools.machine import machine_info  # noqa: E402
from structprune.qa.bootstrap import compare_predictions  # noqa: E402
from structprune.qa.data import load_squad  # noqa: E402
from structprune.qa.evaluate import evaluate_qa  # noqa: E402
from structprune.qa.runs import _tokenizer, load_qa_model  # noqa: E402

DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad2" / "dev.json"
KEYS = ("f1", "HasAns_f1", "NoAns_f1", "best_f1")


def score(path: str, tokenizer, dev, args) -> tuple[dict, dict, float]:
    """(metrics, predictions, seconds) of the model at ``path`` (a directory or an .onnx file) on ``dev``."""
    model = load_qa_model(path)
    t0 = time.perf_counter()
    metrics, predictions = evaluate_qa(model, tokenizer, dev, max_length=args.max_length, doc_stride=args.doc_stride,
                                       batch_size=args.batch_size, progress=False)
    return metrics, predictions, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--dev", default=str(DEV))
    parser.add_argument("--work", default="runs/export_f1", help="where the ONNX files go")
    parser.add_argument("--out", default="experiments/squad2/results/export_f1")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--doc-stride", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = load_squad(args.dev)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info(torch.device("cpu")), "dev": args.dev, "max_length": args.max_length,
               "doc_stride": args.doc_stride, "models": {}}
    try:
        import onnxruntime
        results["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    for spec in args.model:
        name, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"--model {spec!r}: expected NAME=DIR")
        tokenizer = _tokenizer(directory)
        work = Path(args.work) / name
        paths = {"pytorch": directory}
        for kind, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
            path = work / kind / "model.onnx"
            export = run_export(directory, "onnx", str(path), quantize=quantize, data=args.dev, log=lambda *_: None)
            paths[kind] = str(path)
            results["models"].setdefault(name, {})[f"{kind}_parity_max_abs_diff"] = export["max_abs_diff"]
        row = results["models"][name]
        predictions = {}
        for kind, path in paths.items():
            metrics, predictions[kind], seconds = score(path, tokenizer, dev, args)
            row[kind] = {**{k: metrics[k] for k in KEYS}, "eval_seconds": round(seconds, 1)}
            print(f"{name} {kind}: " + ", ".join(f"{k} {metrics[k]:.2f}" for k in KEYS), flush=True)
        for a, b in (("onnx_fp32", "pytorch"), ("onnx_int8", "onnx_fp32")):
            diffs = compare_predictions(predictions[a], predictions[b], dev)
            row[f"{a}_minus_{b}"] = {k: d.as_dict() for k, d in diffs.items()}
        row["identical_predictions_fp32"] = predictions["onnx_fp32"] == predictions["pytorch"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| model | version | F1 | HasAns F1 | NoAns | best F1 | ΔF1 [95% CI] | ΔHasAns F1 [95% CI] |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["models"].items():
        for kind, versus in (("pytorch", None), ("onnx_fp32", "pytorch"), ("onnx_int8", "onnx_fp32")):
            m = row[kind]
            delta = ["-", "-"]
            if versus is not None:
                d = row[f"{kind}_minus_{versus}"]
                delta = [f"{d[k]['diff']:+.2f} [{d[k]['lo']:+.2f}, {d[k]['hi']:+.2f}] vs {versus}"
                         for k in ("f1", "HasAns_f1")]
            lines.append(f"| {name} | {kind} | {m['f1']:.2f} | {m['HasAns_f1']:.2f} | {m['NoAns_f1']:.2f} | "
                         f"{m['best_f1']:.2f} | {delta[0]} | {delta[1]} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
