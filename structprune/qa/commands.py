"""``structprune finetune | prune | eval``: the QA workflow from the command line.

Every command writes a run directory holding ``config.json`` (the arguments and command line),
``log.jsonl`` (training) and ``metrics.json``; training is resumable by re-running the same command.
``finetune`` and ``eval`` live here, ``prune`` in :mod:`.pruning`, what they share in :mod:`.runs`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from structprune import atomic
from structprune.qa import prune_args
from structprune.qa.pruning import prune
from structprune.qa.runs import (THRESHOLD_FILE, _common, _data, _default_model, _dev_eval_fn, _finished, _start_run,
                                 _tokenizer, _train_kwargs, evaluate_into, load_qa_model, save_null_threshold)


def finetune(args) -> int:
    """Fine-tune a QA model (the teacher) on SQuAD-format data."""
    from structprune.qa.train import train_qa

    out = _start_run(args)
    torch.set_num_threads(args.threads)
    model_path = args.model or _default_model()
    import transformers

    torch.manual_seed(args.seed)  # a checkpoint without a QA head gets it freshly initialised: from the run's seed
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_path)
    tokenizer = _tokenizer(model_path)
    train = _data(args.train, "train", args.train_limit)
    kwargs = _train_kwargs(args)
    if args.eval_every:
        kwargs.update(eval_fn=_dev_eval_fn(tokenizer, args), eval_every=args.eval_every, patience=args.patience,
                      min_epochs=args.min_epochs, select_metric=args.select_metric)
    train_qa(model, tokenizer, train, out, **kwargs)
    if not _finished(out):
        print(f"paused; re-run the same command to resume from {out}")
        return 0
    finish_finetune(model, tokenizer, args, out)
    return 0


def finish_finetune(model, tokenizer, args, out: Path) -> dict | None:
    """What ``finetune`` does once training has ended: with ``--eval-every``, the best evaluated weights into
    ``model``; the model and tokenizer saved to ``out/model``; unless ``--no-eval``, the dev evaluation and the
    null threshold beside the model. Returns the best evaluation's record (``step``, ``metrics``), or None."""
    best = None
    if args.eval_every:
        from structprune.qa.checkpoints import load_best_weights

        best = load_best_weights(model, out)
        print(f"keeping the best evaluated weights: step {best['step']}, {args.select_metric} "
              f"{best['metrics'][args.select_metric]:.2f}")
    model.save_pretrained(out / "model")
    atomic.set_default_mode(*(out / "model").glob("*.safetensors"))  # safetensors writes 0600
    tokenizer.save_pretrained(out / "model")
    if not args.no_eval:
        metrics = evaluate_into(model, tokenizer, args, out)
        save_null_threshold(out / "model", metrics, args)
    return best


def evaluate_cmd(args) -> int:
    bundled = args.model is None
    args.model = args.model or _default_model()
    out = _start_run(args)
    model = load_qa_model(args.model)
    metrics = evaluate_into(model, _tokenizer(args.model), args, out)
    if not args.no_save_threshold and not bundled:  # never written into the installed package
        save_null_threshold(Path(args.model), metrics, args)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a QA model (the teacher) on SQuAD 2.0-format data")
    p.add_argument("--model", default=None, help="local HF model directory (default: the bundled MiniLM)")
    p.add_argument("--no-eval", action="store_true", help="skip the dev evaluation after training")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on dev every N steps, keep the best weights (by --select-metric) as the model "
                        "(default: only after training)")
    p.add_argument("--patience", type=int, default=None,
                   help="with --eval-every: stop once N evaluations in a row have not improved on the best "
                        "(default: never stop early)")
    p.add_argument("--min-epochs", type=float, default=0.0, help="with --patience: never stop before this")
    p.add_argument("--select-metric", default="best_f1", choices=["best_f1", "f1", "HasAns_f1"],
                   help="with --eval-every: the dev metric that chooses the weights kept")
    _common(p, train=True)
    p.set_defaults(func=finetune)

    p = subparsers.add_parser("prune", help="prune a fine-tuned QA model, train the survivors, compact, evaluate")
    prune_args.add_arguments(p)
    _common(p, train=True)
    p.set_defaults(func=prune, epochs=1.0)

    p = subparsers.add_parser("eval", help="evaluate a QA model (HF or structprune directory) on SQuAD 2.0")
    p.add_argument("--model", default=None,
                   help="QA model directory (HF or structprune) or an exported .onnx (default: the bundled MiniLM, "
                        "whose QA head is untrained)")
    p.add_argument("--no-save-threshold", action="store_true",
                   help=f"do not store the dev-chosen null threshold ({THRESHOLD_FILE}) beside the model")
    _common(p, train=False)
    p.set_defaults(func=evaluate_cmd)
