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
    from structprune.cli import UsageError, check_model_dir

    model = getattr(args, "model", None)
    if model is not None:
        check_model_dir(model, onnx=True)
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
    """A QA model from a local directory: a structprune save (pruned shapes kept) or a HF directory (a warning
    when it has no QA head); or an exported ``.onnx`` file, run by ONNX Runtime on the CPU, or an OpenVINO IR
    ``.xml`` (OpenVINO's CPU plugin); the tokenizer of an exported model is the one saved beside it."""
    import structprune as sp

    if str(path).endswith(".onnx"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist (export one with: structprune export --format onnx)")
        from structprune.export.onnx import OrtQAModel

        return OrtQAModel(path)
    if str(path).endswith(".xml"):  # an OpenVINO IR (structprune export --format openvino)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist (export one with: structprune export --format openvino)")
        from structprune.export.openvino import OvQAModel

        return OvQAModel(path)
    if not Path(path).is_dir():  # not the Hub's "Repo id must be in the form ..." for a typo
        raise FileNotFoundError(f"{path}: no such directory (the model folder does not exist)")
    if (Path(path) / "structprune_config.json").is_file():
        model = sp.from_pretrained(path)
    else:
        model = load_hf_qa_model(path)
    return model.eval()


def load_hf_qa_model(path):
    """``AutoModelForQuestionAnswering.from_pretrained(path)``, saying in one line (stderr) when the checkpoint has no
    QA head, so that its answers come from a freshly initialised (random) ``qa_outputs``."""
    import transformers

    model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(path, output_loading_info=True)
    fresh = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] == "qa_outputs")
    if fresh:
        print(f"warning: {path} has no QA head ({', '.join(fresh)} freshly initialised): its answers are random "
              "until it is fine-tuned (structprune finetune)", file=sys.stderr)
    return model


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
                stop_after_seconds=args.stop_after_seconds, save_every_seconds=args.save_every_seconds,
                autocast_dtype=torch.bfloat16 if getattr(args, "bf16", False) else None)


ALWAYS_FILE = "predictions_always.json"  # every question answered with its best non-null span


def evaluate_into(model, tokenizer, args, out: Path, name: str = "metrics.json", extra: dict | None = None) -> dict:
    """Evaluate on dev into ``out``: ``name`` (the metrics, with ``extra``), ``predictions.json`` (threshold 0)
    and ``predictions_always.json`` (always answering)."""
    from structprune.qa.evaluate import evaluate_qa

    torch.set_num_threads(args.threads)
    dev = _data(args.dev, "dev", args.dev_limit)
    metrics, predictions, always = evaluate_qa(model, tokenizer, dev, max_length=args.max_length,
                                               doc_stride=args.doc_stride, batch_size=args.eval_batch_size,
                                               return_always=True)
    metrics.update(extra or {})
    metrics["threads"] = args.threads
    _write_json(out / name, metrics)
    _write_json(out / "predictions.json", predictions)
    _write_json(out / ALWAYS_FILE, always)
    print(json.dumps({k: metrics[k] for k in ("f1", "exact", "HasAns_f1", "NoAns_f1", "best_f1", "always_HasAns_f1")
                      if k in metrics}))
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
    from structprune.qa.checkpoints import checkpoint_state

    state = checkpoint_state(run_dir)
    return bool(state and state.get("finished"))


def _common(p, train: bool) -> None:
    p.add_argument("--out", required=True, help="run directory (config, logs, metrics, model)")
    p.add_argument("--dev", default=None, help=f"SQuAD-format dev JSON (default {DEFAULT_DATA}/dev.json)")
    p.add_argument("--dev-limit", type=int, default=None,
                   help="evaluate on the first N dev questions (default: all of them)")
    p.add_argument("--max-length", type=int, default=384, help="tokens per window (question + context)")
    p.add_argument("--doc-stride", type=int, default=128, help="overlap, in tokens, of a long context's windows")
    p.add_argument("--eval-batch-size", type=int, default=32, help="windows per forward when evaluating")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()),
                   help="CPU threads (torch.set_num_threads; default: torch's, here %(default)s)")
    if train:
        p.add_argument("--train", default=None, help=f"SQuAD-format train JSON (default {DEFAULT_DATA}/train.json)")
        p.add_argument("--train-limit", type=int, default=None,
                       help="train on the first N questions (default: all of them)")
        p.add_argument("--epochs", type=float, default=2.0, help="passes over the train windows (may be fractional)")
        p.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many optimizer steps (default: as many as --epochs makes)")
        p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW, linear warm-up and decay)")
        p.add_argument("--batch-size", type=int, default=32, help="train windows per optimizer step")
        p.add_argument("--seed", type=int, default=42, help="seed of the shuffling, dropout and new weights")
        p.add_argument("--stop-after-seconds", type=float, default=None,
                       help="pause cleanly after this long; re-run the same command to resume "
                            "(default: run to the end)")
        p.add_argument("--save-every-seconds", type=float, default=180.0,
                       help="seconds between training checkpoints (0: after every step)")
        p.add_argument("--bf16", action="store_true",
                       help="train under torch.autocast in bfloat16 (the weights and optimizer stay fp32; evaluation "
                            "runs in fp32); a run resumes only in the precision it started in (default: fp32)")


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


def _progress() -> bool:
    """Progress bars unless ``STRUCTPRUNE_QUIET=1`` (the tests', the benchmark's)."""
    return os.environ.get("STRUCTPRUNE_QUIET") != "1"
