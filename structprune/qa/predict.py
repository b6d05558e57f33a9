"""``structprune predict``: answers for SQuAD-format questions (with or without gold answers) or a plain list of
``{id, question, context}``, from a QA model directory (HF or structprune, pruned or not) or an exported model.

Writes ``predictions.json`` (``{id: answer text, "" for no answer}``, the official SQuAD 2.0 format) and
``null_odds.json`` (``{id: null score - best span score}``, the evaluation script's ``na_prob`` file; ``Infinity``
where no valid span exists). The null threshold is the one stored beside the model by ``finetune`` / ``prune`` /
``eval`` (chosen on dev for the best F1), unless ``--null-threshold`` overrides it; the window length and stride
default to the ones that threshold was chosen with. With ``--always-answer`` it also writes
``predictions_always.json``, where every question gets its best non-null span whatever its null score (reading
comprehension apart from the threshold), from the same forward passes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from structprune.qa.runs import ALWAYS_FILE, THRESHOLD_FILE, _write_json, load_qa_model

DEFAULT_WINDOW = (384, 128)


def model_folder(model: str) -> Path:
    """The folder holding the model's tokenizer and threshold: the model directory itself, or the folder of an
    exported model file."""
    path = Path(model)
    return path if path.is_dir() else path.parent


def stored_threshold(model: str) -> dict | None:
    """The ``null_threshold.json`` record stored beside ``model``, or ``None``."""
    path = model_folder(model) / THRESHOLD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record.get("null_threshold"), (int, float)):
        raise ValueError(f"{path}: expected a number under 'null_threshold', got {record.get('null_threshold')!r}")
    return record


def predict_qa(model, tokenizer, dataset, threshold: float, max_length: int, doc_stride: int, batch_size: int = 32,
               progress: bool = True, return_always: bool = False) -> tuple:
    """Predictions and null-score differences of ``model`` on ``dataset`` (squad_v2 schema, answers ignored),
    and timing information; with ``return_always``, the always-answering predictions (each question's best
    non-null span) fourth."""
    from structprune.qa.evaluate import predict_logits
    from structprune.qa.features import build_eval_features
    from structprune.qa.postprocess import apply_null_threshold, best_spans

    features = build_eval_features(dataset, tokenizer, max_length=max_length, doc_stride=doc_stride,
                                   progress=progress)
    starts, ends, seconds = predict_logits(model, tokenizer, features, batch_size, progress=progress)
    spans, diffs = best_spans(dataset, features, starts, ends)
    info = {"num_examples": len(dataset), "num_features": len(features), "forward_seconds": seconds}
    out = (apply_null_threshold(spans, diffs, threshold), {k: float(v) for k, v in diffs.items()}, info)
    return (*out, spans) if return_always else out


def predict_cmd(args) -> int:
    import structprune as sp

    from structprune.cli import check_model_dir
    from structprune.qa.runs import _tokenizer
    from structprune.qa.data import load_squad

    check_model_dir(args.model, onnx=True)
    torch.set_num_threads(args.threads)
    if args.backend:
        sp.set_backend(args.backend)
    stored = stored_threshold(args.model)
    if args.null_threshold is not None:
        threshold, source = args.null_threshold, "--null-threshold"
    elif stored is not None:
        threshold, source = stored["null_threshold"], str(model_folder(args.model) / THRESHOLD_FILE)
    else:
        threshold, source = 0.0, "default (no threshold stored beside the model)"
        print(f"warning: {model_folder(args.model) / THRESHOLD_FILE} not found; predicting no answer where the null "
              "score beats the best span (threshold 0.0). Run `structprune eval` on dev to choose one, or pass "
              "--null-threshold.", file=sys.stderr)
    max_length = args.max_length or (stored or {}).get("max_length", DEFAULT_WINDOW[0])
    doc_stride = args.doc_stride or (stored or {}).get("doc_stride", DEFAULT_WINDOW[1])
    data = load_squad(args.data)
    model = load_qa_model(args.model)
    tokenizer = _tokenizer(str(model_folder(args.model)))
    t0 = time.perf_counter()
    predictions, diffs, info, *always = predict_qa(model, tokenizer, data, threshold, max_length, doc_stride,
                                                   args.batch_size, progress=not args.quiet,
                                                   return_always=args.always_answer)
    always = always[0] if always else None
    out = Path(args.out)
    _write_json(out / "predictions.json", predictions)
    _write_json(out / "null_odds.json", diffs)
    if always is not None:
        _write_json(out / ALWAYS_FILE, always)
    answered = sum(1 for text in predictions.values() if text)
    _write_json(out / "predict_info.json", {
        "model": args.model, "data": args.data, "null_threshold": threshold, "threshold_from": source,
        "max_length": max_length, "doc_stride": doc_stride, "backend": args.backend or "auto",
        "backends_used": dict(sp.last_backends()) if hasattr(sp, "last_backends") else None,
        "answered": answered, "seconds": time.perf_counter() - t0, "threads": args.threads,
        "always_answer": always is not None, **info})
    print(f"{len(predictions)} questions, {answered} answered, {len(predictions) - answered} 'no answer' "
          f"(null threshold {threshold:.4g} from {source}); wrote {out / 'predictions.json'} and "
          f"{out / 'null_odds.json'}" + ("" if always is None else f", and {out / ALWAYS_FILE} (always answering)"))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="answer SQuAD-format questions (or a {id, question, context} list)")
    p.add_argument("--model", required=True, help="QA model directory (HF or structprune) or an exported .onnx")
    p.add_argument("--data", required=True,
                   help="SQuAD-format JSON (answers optional) or a JSON list of {id, question, context}")
    p.add_argument("--out", required=True, help="folder for predictions.json and null_odds.json")
    p.add_argument("--null-threshold", type=float, default=None,
                   help="predict no answer where null score - best span score exceeds this "
                        f"(default: the one in {THRESHOLD_FILE} beside the model)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"window length (default: the threshold's, else {DEFAULT_WINDOW[0]})")
    p.add_argument("--doc-stride", type=int, default=None,
                   help=f"window overlap (default: the threshold's, else {DEFAULT_WINDOW[1]})")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward")
    p.add_argument("--backend", choices=["auto", "torch", "cpp", "triton"], default=None,
                   help="kernel backend of a structprune model (default: auto, the fastest available)")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()),
                   help="CPU threads (torch.set_num_threads; default: torch's, here %(default)s)")
    p.add_argument("--always-answer", action="store_true",
                   help=f"also write {ALWAYS_FILE}: every question answered with its best non-null span, whatever "
                        "its null score (default: only the thresholded predictions)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=predict_cmd)
