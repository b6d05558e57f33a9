"""What the QA commands share: the run directory (``config.json`` with the arguments and command line, refusing
another command's directory), input checks, loading models, tokenizers and SQuAD data, evaluation into
``metrics.json``, the dev-chosen null threshold, and the options every command takes."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import torch

from structprune import atomic

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad2"


def _default_model() -> str:
    from structprune.tools.demo import default_model_path

    return default_model_path()


def _write_json(path: Path, obj) -> None:
    """Write a result file atomically (temp file, fsync, rename): a crash leaves the previous version."""
    atomic.write_json(path, obj)


def _check_inputs(args) -> None:
    """Fail fast, before any work, on input paths that do not exist (one clear line at the CLI)."""
    from structprune.cli import UsageError

    model = getattr(args, "model", None)
    exported = str(model).endswith((".onnx", ".xml")) and Path(model).is_file()  # ONNX graph or OpenVINO IR
    if model is not None and not Path(model).is_dir() and not exported:
        raise UsageError(f"--model {model}: no such directory; pass a local model directory (a HF model or the "
                         "'model' folder of a finetune/prune run)")
    for flag in ("train", "dev"):
        path = getattr(args, flag, None)
        if path is not None and not Path(path).exists():
            raise UsageError(f"--{flag} {path}: no such file; pass a SQuAD-format JSON file")


def _start_run(args) -> Path:
    """Check the inputs, create (or re-open) the run directory ``--out`` and record the arguments in its
    ``config.json``. A directory holding another command's run, or a ``config.json`` that is not a run's (a model
    directory), is refused."""
    from structprune.cli import UsageError

    _check_inputs(args)
    out = Path(args.out)
    command = getattr(args, "command", None)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the run directory ({exc.strerror or exc}); pass a "
                         "writable directory") from exc
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: not a writable directory; pass a writable directory")
    if (out / "config.json").is_file():
        try:
            previous = atomic.read_json(out / "config.json", "run config")
        except ValueError as exc:
            raise UsageError(f"{exc}; delete it or pass a new --out") from exc
        line = previous.get("command_line", "")
        if not line.startswith("structprune "):
            raise UsageError(f"--out {out} holds a config.json that is not a structprune run's (a model "
                             "directory?); pass a new --out")
        before = previous.get("command") or line.split()[1]
        if command is not None and before != command:
            raise UsageError(f"--out {out} is the run directory of 'structprune {before}', not of '{command}'; "
                             "pass a new --out (or re-run the same command there to resume it)")
    config = {k: v for k, v in vars(args).items() if k not in ("func", "argv", "debug")}
    config["command_line"] = "structprune " + shlex.join(getattr(args, "argv", sys.argv[1:]))
    _write_json(out / "config.json", config)
    return out


def load_qa_model(path: str):
    """A QA model from a local directory: a structprune save (pruned shapes kept) or a HF directory; or an
    exported ``.onnx`` file, run by ONNX Runtime on the CPU, or an OpenVINO IR ``.xml`` (OpenVINO's CPU plugin);
    the tokenizer of an exported model is the one saved beside it."""
    import transformers

    import structprune as sp

    if str(path).endswith(".onnx"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist (export one with: structprune export --format onnx)")
        from structprune.export.onnx_export import OrtQAModel

        return OrtQAModel(path)
    if str(path).endswith(".xml"):  # an OpenVINO IR (structprune export --format openvino)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist (export one with: structprune export --format openvino)")
        from structprune.export.openvino_export import OvQAModel

        return OvQAModel(path)
    if (Path(path) / "structprune_config.json").is_file():
        model = sp.from_pretrained(path)
    else:
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(path)
    return model.eval()


def _tokenizer(path: str):
    import transformers

    if str(path).endswith((".onnx", ".xml")):  # an exported model: structprune export saves the tokenizer beside it
        path = str(Path(path).parent)
    return transformers.AutoTokenizer.from_pretrained(path)


def _data(path: str | None, split: str, limit: int | None):
    from structprune.qa.data import load_squad

    source = path or str(DEFAULT_DATA / f"{split}.json")
    return load_squad(source, limit=limit)


def _train_kwargs(args) -> dict:
    return dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                doc_stride=args.doc_stride, seed=args.seed, max_steps=args.max_steps,
                stop_after_seconds=args.stop_after_seconds, save_every_seconds=args.save_every_seconds)


def evaluate_into(model, tokenizer, args, out: Path, name: str = "metrics.json", extra: dict | None = None) -> dict:
    from structprune.qa.evaluate import evaluate_qa

    torch.set_num_threads(args.threads)
    dev = _data(args.dev, "dev", args.dev_limit)
    metrics, predictions = evaluate_qa(model, tokenizer, dev, max_length=args.max_length, doc_stride=args.doc_stride,
                                       batch_size=args.eval_batch_size)
    metrics.update(extra or {})
    metrics["threads"] = args.threads
    _write_json(out / name, metrics)
    _write_json(out / "predictions.json", predictions)
    print(json.dumps({k: metrics[k] for k in ("f1", "exact", "HasAns_f1", "NoAns_f1", "best_f1") if k in metrics}))
    return metrics


THRESHOLD_FILE = "null_threshold.json"


def save_null_threshold(model_dir: Path, metrics: dict, args) -> None:
    """Store the dev-chosen null-score threshold (the one of ``best_f1``) beside the model, for ``predict``."""
    if "best_f1_thresh" not in metrics or not Path(model_dir).is_dir():
        return
    _write_json(Path(model_dir) / THRESHOLD_FILE, {
        "null_threshold": float(metrics["best_f1_thresh"]), "best_f1": metrics["best_f1"],
        "chosen_on": args.dev or str(DEFAULT_DATA / "dev.json"), "dev_limit": args.dev_limit,
        "max_length": args.max_length, "doc_stride": args.doc_stride,
    })


def _finished(run_dir: Path) -> bool:
    from structprune.qa.train import checkpoint_state

    state = checkpoint_state(run_dir)
    return bool(state and state.get("finished"))


def _common(p, train: bool) -> None:
    p.add_argument("--out", required=True, help="run directory (config, logs, metrics, model)")
    p.add_argument("--dev", default=None, help=f"SQuAD-format dev JSON (default {DEFAULT_DATA}/dev.json)")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev questions")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    if train:
        p.add_argument("--train", default=None, help=f"SQuAD-format train JSON (default {DEFAULT_DATA}/train.json)")
        p.add_argument("--train-limit", type=int, default=None, help="train on the first N questions")
        p.add_argument("--epochs", type=float, default=2.0)
        p.add_argument("--max-steps", type=int, default=None)
        p.add_argument("--lr", type=float, default=5e-5)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--stop-after-seconds", type=float, default=None,
                       help="pause cleanly after this long; re-run the same command to resume")
        p.add_argument("--save-every-seconds", type=float, default=180.0,
                       help="seconds between training checkpoints (0: after every step)")


def _dev_eval_fn(tokenizer, args):
    """``eval_fn`` for :func:`train_qa`: the SQuAD 2.0 metrics of the model on the dev set."""
    from structprune.qa.evaluate import evaluate_qa

    dev = _data(args.dev, "dev", args.dev_limit)

    def eval_fn(model) -> dict:
        metrics, _ = evaluate_qa(model, tokenizer, dev, max_length=args.max_length, doc_stride=args.doc_stride,
                                 batch_size=args.eval_batch_size, progress=False)
        print(json.dumps({k: round(metrics[k], 2) for k in ("f1", "HasAns_f1", "NoAns_f1", "best_f1")}), flush=True)
        return metrics

    return eval_fn
