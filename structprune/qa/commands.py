"""``structprune finetune | prune | eval``: the QA workflow from the command line.

Every command writes a run directory holding ``config.json`` (the arguments and command line),
``log.jsonl`` (training) and ``metrics.json``; training is resumable by re-running the same command.
"""
from __future__ import annotations

import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad2"


def _default_model() -> str:
    from ..demo import default_model_path

    return default_model_path()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _start_run(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    config["command_line"] = "structprune " + shlex.join(getattr(args, "argv", sys.argv[1:]))
    _write_json(out / "config.json", config)
    return out


def load_qa_model(path: str):
    """A QA model from a local directory: a structprune save (pruned shapes kept) or a HF directory."""
    import transformers

    import structprune as sp

    if (Path(path) / "structprune_config.json").is_file():
        model = sp.from_pretrained(path)
    else:
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(path)
    return model.eval()


def _tokenizer(path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def _data(path: str | None, split: str, limit: int | None):
    from .data import load_squad

    source = path or str(DEFAULT_DATA / f"{split}.json")
    return load_squad(source, limit=limit)


def _train_kwargs(args) -> dict:
    return dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                doc_stride=args.doc_stride, seed=args.seed, max_steps=args.max_steps,
                stop_after_seconds=args.stop_after_seconds)


def evaluate_into(model, tokenizer, args, out: Path, name: str = "metrics.json", extra: dict | None = None) -> dict:
    from .evaluate import evaluate_qa

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


def finetune(args) -> int:
    """Fine-tune a QA model (the teacher) on SQuAD-format data."""
    from .train import train_qa

    out = _start_run(args)
    torch.set_num_threads(args.threads)
    model_path = args.model or _default_model()
    import transformers

    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_path)
    tokenizer = _tokenizer(model_path)
    train = _data(args.train, "train", args.train_limit)
    train_qa(model, tokenizer, train, out, **_train_kwargs(args))
    if not _finished(out):
        print(f"paused; re-run the same command to resume from {out}")
        return 0
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    if not args.no_eval:
        evaluate_into(model, tokenizer, args, out)
    return 0


def _finished(run_dir: Path) -> bool:
    from .train import checkpoint_state

    state = checkpoint_state(run_dir)
    return bool(state and state.get("finished"))


def evaluate_cmd(args) -> int:
    out = _start_run(args)
    model = load_qa_model(args.model)
    evaluate_into(model, _tokenizer(args.model), args, out)
    return 0


def _gain_batches(model, tokenizer, args):
    from .features import build_train_features, collate

    data = _data(args.train, "train", args.gain_examples)
    feats = build_train_features(data, tokenizer, args.max_length, args.doc_stride)
    cols = ["input_ids", "attention_mask", "start_positions", "end_positions"]
    if "token_type_ids" in feats.column_names:
        cols.append("token_type_ids")
    for i in range(0, len(feats), args.batch_size):
        yield collate(feats[i:i + args.batch_size], tokenizer, cols)


def prune(args) -> int:
    """Choose masks with a strategy, train the survivors (optionally distilled), compact, save, evaluate."""
    import structprune as sp
    from structprune.strategies import PruneTarget, gain_masks, random_masks

    from .train import train_qa

    out = _start_run(args)
    torch.set_num_threads(args.threads)
    teacher = load_qa_model(args.model)
    tokenizer = _tokenizer(args.model)
    student = sp.patch(copy.deepcopy(teacher))
    target = PruneTarget(heads=args.heads, ffn=args.ffn, per_layer=args.per_layer)
    train = _data(args.train, "train", args.train_limit)
    masks_file = out / "masks.json"
    distill = dict(teacher=teacher if args.distill else None, alpha=args.distill_alpha, temperature=args.temperature)
    controller = None
    if args.method == "l0" and args.l0_steps:
        if not _select_l0(student, tokenizer, train, target, args, out, distill):
            print(f"paused; re-run the same command to resume from {out}")
            return 0
    elif args.method == "l0":
        controller, groups = _l0_controller(student, target, args, out / "train")
    elif masks_file.is_file():  # resumed run: the decision is already made
        saved = json.loads(masks_file.read_text())
        sp.set_masks(student, heads=saved["heads"], ffn=saved["ffn"])
    else:
        t0 = time.perf_counter()
        if args.method == "random":
            masks = random_masks(student, target, seed=args.seed)
        else:
            masks = gain_masks(student, list(_gain_batches(student, tokenizer, args)), target, steps=args.gain_steps)
        sp.set_masks(student, heads=masks.heads, ffn=masks.ffn)
        print(f"{args.method} masks chosen in {time.perf_counter() - t0:.1f}s")
        _save_masks(student, masks_file)

    run_dir = out / "train"
    kwargs = _train_kwargs(args)
    if controller is not None or args.distill:
        kwargs["extra_loss_fn"] = _pruning_loss_fn(controller, distill, out, run_dir)
    if controller is not None:
        kwargs["param_groups"] = groups
    train_qa(student, tokenizer, train, run_dir, **kwargs)
    if controller is not None:
        controller.save(run_dir)
        _write_json(out / "l0_stats.json", controller.stats())
    if not _finished(run_dir):
        print(f"paused; re-run the same command to resume from {out}")
        return 0
    if controller is not None:
        controller.finalize(target)
        _save_masks(student, masks_file)
    layers_kept = sp.get_masks(student)
    sp.compact(student)
    sp.save_pretrained(student, out / "model", tokenizer=tokenizer)
    report = sp.summary(student, seq_len=args.max_length)
    (out / "summary.txt").write_text(str(report) + "\n")
    print(report)
    speed = measure_speedup(teacher, student, tokenizer, args)
    extra = {
        "method": args.method, "distill": args.distill,
        "heads_kept": layers_kept.num_heads_kept, "heads_total": report.total("heads_total"),
        "ffn_kept": layers_kept.num_ffn_kept, "ffn_total": report.total("ffn_total"),
        "heads_per_layer": [r.heads_kept for r in report.layers],
        "ffn_per_layer": [r.ffn_kept for r in report.layers],
        "encoder_params": report.total("params"), "encoder_params_original": report.total("params_original"),
        **speed,
    }
    evaluate_into(student, tokenizer, args, out, extra=extra)
    return 0


def _l0_controller(student, target, args, run_dir: Path):
    """An L0 controller for ``student`` with its multipliers restored from ``run_dir`` (they are not model
    parameters, so they are kept beside the checkpoint), and its optimizer groups."""
    from structprune.strategies import LAGRANGIAN_FILE, L0Controller

    controller = L0Controller(student, target, warmup_steps=args.l0_warmup_steps, seed=args.seed)
    if (run_dir / LAGRANGIAN_FILE).is_file():
        controller.load(run_dir)
    lambda_lr = args.gate_lr if args.lambda_lr is None else args.lambda_lr
    return controller, controller.param_groups(student, lr=args.lr, gate_lr=args.gate_lr, lambda_lr=lambda_lr)


def _pruning_loss_fn(controller, distill: dict, out: Path, run_dir: Path):
    """The ``extra_loss_fn`` of a training phase in ``run_dir``: distillation and the L0 penalty, counting
    steps from the phase's checkpoint, with the controller's sparsity logged to ``out/l0_log.jsonl``."""
    from structprune.trainer import PruningLoss

    from .train import checkpoint_state

    step = (checkpoint_state(run_dir) or {}).get("step", 0)
    loss = PruningLoss(controller=controller, **distill)
    return _logged(loss.extra_loss_fn(start_step=step), controller, out, step)


DECIDED_FILE = "decided.safetensors"


def _select_l0(student, tokenizer, train, target, args, out: Path, distill: dict) -> bool:
    """The L0 selection phase of ``prune --l0-steps N``, in ``out/l0``: N steps of hard-concrete gate training
    toward ``target`` (the weights frozen unless ``--l0-train-weights``), then the deterministic decision, whose
    masks and folded weights are saved so that a resumed run starts the continued training from them.
    Returns False when the phase paused before its end."""
    import safetensors.torch

    from structprune.patching import gate_parameters

    from .train import train_qa

    run_dir = out / "l0"
    if (run_dir / DECIDED_FILE).is_file():
        safetensors.torch.load_model(student, str(run_dir / DECIDED_FILE), strict=True)
        return True
    if args.l0_warmup_steps > args.l0_steps:
        raise ValueError(f"--l0-warmup-steps ({args.l0_warmup_steps}) must not exceed --l0-steps ({args.l0_steps}): "
                         "the target must be reached before the decision")
    controller, groups = _l0_controller(student, target, args, run_dir)
    frozen = []
    if not args.l0_train_weights:
        gates = {id(p) for p in gate_parameters(student)}
        frozen = [p for p in student.parameters() if p.requires_grad and id(p) not in gates]
        groups = [g for g in groups if g["name"] in ("gates", "lagrangian")]
    kwargs = {**_train_kwargs(args), "max_steps": args.l0_steps, "param_groups": groups,
              "extra_loss_fn": _pruning_loss_fn(controller, distill, out, run_dir)}
    for p in frozen:
        p.requires_grad_(False)
    try:
        train_qa(student, tokenizer, train, run_dir, **kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    controller.save(run_dir)
    _write_json(out / "l0_stats.json", controller.stats())
    if not _finished(run_dir):
        return False
    controller.finalize(target)
    _save_masks(student, out / "masks.json")
    safetensors.torch.save_model(student, str(run_dir / DECIDED_FILE))
    return True


def _logged(fn, controller, out: Path, step: int, every: int = 10):
    """Append the L0 controller's expected and actual sparsity to ``l0_log.jsonl`` every ``every`` steps."""
    if controller is None:
        return fn
    state = {"step": step}

    def wrapped(model, batch, outputs):
        extra = fn(model, batch, outputs)
        state["step"] += 1
        if state["step"] % every == 0:
            with open(out / "l0_log.jsonl", "a") as f:
                f.write(json.dumps({"step": state["step"], **controller.stats(state["step"])}) + "\n")
        return extra

    return wrapped


def _save_masks(model, path: Path) -> None:
    import structprune as sp

    m = sp.get_masks(model)
    _write_json(path, {"heads": [h.int().tolist() for h in m.heads_per_layer()],
                       "ffn": [f.int().tolist() for f in m.ffn]})


@torch.inference_mode()
def measure_speedup(dense, pruned, tokenizer, args, repeats: int = 5) -> dict:
    """Median forward time of the dense teacher and the pruned model on the same real dev batch, the two timed
    in turn within each repeat so that load from elsewhere falls on both."""
    from .features import build_eval_features, collate

    torch.set_num_threads(args.threads)
    dev = _data(args.dev, "dev", 64)
    feats = build_eval_features(dev, tokenizer, args.max_length, args.doc_stride)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in feats.column_names]
    batch = collate(feats[: args.eval_batch_size], tokenizer, cols)
    models = {"dense": dense, "pruned": pruned}
    samples = {name: [] for name in models}
    for model in models.values():
        model.eval()
        model(**batch)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(**batch)
            samples[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(s) for name, s in samples.items()}
    return {"dense_forward_s": times["dense"], "pruned_forward_s": times["pruned"],
            "speedup": times["dense"] / times["pruned"], "speed_batch": int(batch["input_ids"].shape[0]),
            "speed_seq": int(batch["input_ids"].shape[1])}


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


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a QA model (the teacher) on SQuAD 2.0-format data")
    p.add_argument("--model", default=None, help="local HF model directory (default: the bundled MiniLM)")
    p.add_argument("--no-eval", action="store_true")
    _common(p, train=True)
    p.set_defaults(func=finetune)

    p = subparsers.add_parser("prune", help="prune a fine-tuned QA model, train the survivors, compact, evaluate")
    p.add_argument("--model", required=True, help="the fine-tuned (teacher) model directory")
    p.add_argument("--method", choices=["random", "gain", "l0"], required=True)
    p.add_argument("--heads", type=float, required=True, help="fraction of heads KEPT (e.g. 0.5)")
    p.add_argument("--ffn", type=float, required=True, help="fraction of FFN units KEPT (e.g. 0.3)")
    p.add_argument("--per-layer", action="store_true", help="the target holds in every layer (default: global)")
    p.add_argument("--distill", action="store_true", help="distil from the unpruned model while training")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--gain-examples", type=int, default=256, help="questions used to estimate gain importance")
    p.add_argument("--gain-steps", type=int, default=1, help="iterative gain pruning steps")
    p.add_argument("--gate-lr", type=float, default=0.01, help="learning rate of the gates' log_alpha")
    p.add_argument("--lambda-lr", type=float, default=None,
                   help="learning rate of the Lagrange multipliers (default: --gate-lr); short runs need it "
                        "large, since Adam moves a multiplier by about its learning rate per step")
    p.add_argument("--l0-warmup-steps", type=int, default=100, help="steps over which the L0 target is reached")
    p.add_argument("--l0-steps", type=int, default=0,
                   help="L0 only: a selection phase of this many gate-training steps, then the decision, then "
                        "--max-steps of continued training as for the other methods (0: gates and weights are "
                        "trained together for the whole run and the decision comes at its end)")
    p.add_argument("--l0-train-weights", action="store_true",
                   help="with --l0-steps: train the weights during the selection phase too (default: frozen)")
    _common(p, train=True)
    p.set_defaults(func=prune, epochs=1.0)

    p = subparsers.add_parser("eval", help="evaluate a QA model (HF or structprune directory) on SQuAD 2.0")
    p.add_argument("--model", required=True)
    _common(p, train=False)
    p.set_defaults(func=evaluate_cmd)
