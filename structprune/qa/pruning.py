"""``structprune prune``: choose masks with a strategy (random, gain, L0 with an optional selection phase),
train the survivors (optionally distilled, from live or cached teacher logits), compact, save, time and evaluate."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from structprune import atomic
from structprune.qa.runs import (DEFAULT_DATA, _data, _default_model, _dev_eval_fn, _finished, _start_run, _tokenizer,
                                 _train_kwargs, _write_json, evaluate_into, load_qa_model, save_null_threshold)


def _gain_batches(model, tokenizer, args):
    from structprune.qa.features import build_train_features, collate

    data = _data(args.train, "train", args.gain_examples)
    feats = build_train_features(data, tokenizer, args.max_length, args.doc_stride)
    cols = ["input_ids", "attention_mask", "start_positions", "end_positions"]
    if "token_type_ids" in feats.column_names:
        cols.append("token_type_ids")
    for i in range(0, len(feats), args.batch_size):
        yield collate(feats[i:i + args.batch_size], tokenizer, cols)


def _progress() -> bool:
    """Progress bars unless ``STRUCTPRUNE_QUIET=1`` (the tests', the benchmark's)."""
    return os.environ.get("STRUCTPRUNE_QUIET") != "1"


class _Counted:
    """The gain batches, re-iterable once per iterative step, advancing one progress bar over all the passes (the
    importance pass is a forward and backward per batch: minutes on a CPU)."""

    def __init__(self, batches: list, steps: int):
        self.batches = batches
        self.bar = tqdm(total=len(batches) * steps, desc="gain importance", unit="batch", disable=not _progress())

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield batch
            self.bar.update(1)


def prune(args) -> int:
    """Choose masks with a strategy, train the survivors (optionally distilled), compact, save, evaluate."""
    import structprune as sp
    from structprune.strategies import gain_masks, random_masks

    from structprune.qa.train import train_qa

    args.model = args.model or _default_model()
    out = _start_run(args)
    torch.set_num_threads(args.threads)
    teacher = load_qa_model(args.model)
    tokenizer = _tokenizer(args.model)
    student = sp.patch(copy.deepcopy(teacher))
    target = prune_target(args, teacher)
    train = _data(args.train, "train", args.train_limit)
    masks_file = out / "masks.json"
    distill = dict(alpha=args.distill_alpha, temperature=args.temperature)
    if args.distill and args.teacher_logits:
        distill["teacher_cache"] = cached_teacher_logits(teacher, tokenizer, train, args, Path(args.teacher_logits))
    else:
        distill["teacher"] = teacher if args.distill else None
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
            batches = _Counted(list(_gain_batches(student, tokenizer, args)), args.gain_steps)
            with batches.bar:
                masks = gain_masks(student, batches, target, steps=args.gain_steps)
        sp.set_masks(student, heads=masks.heads, ffn=masks.ffn)
        print(f"{args.method} masks chosen in {time.perf_counter() - t0:.1f}s")
        _save_masks(student, masks_file)
    if args.max_steps == 0:  # decide, compact and save only
        return _decided_only(student, tokenizer, target, args, out)

    run_dir = out / "train"
    kwargs = _train_kwargs(args)
    if args.method == "l0" and args.l0_steps and args.l0_train_weights:
        kwargs["max_steps"] = _steps_left_after_selection(args, out / "l0")
    if controller is not None or args.distill:
        kwargs["extra_loss_fn"] = _pruning_loss_fn(controller, distill, out, run_dir)
    if controller is not None:
        kwargs["param_groups"] = groups
    if args.eval_every:  # a dev curve of the continued training; the model kept is the last one
        kwargs.update(eval_fn=_dev_eval_fn(tokenizer, args), eval_every=args.eval_every)
    train_qa(student, tokenizer, train, run_dir, **kwargs)
    if controller is not None:
        controller.save(run_dir)
        _write_json(out / "l0_stats.json", controller.stats())
    if not _finished(run_dir):
        print(f"paused; re-run the same command to resume from {out}")
        return 0
    if controller is not None:
        _decide_l0(controller, target, args)
        _save_masks(student, masks_file)
    layers_kept, report = _compact_and_save(student, tokenizer, target, args, out)
    speed = measure_speedup(teacher, student, tokenizer, args)
    if report.latency:
        speed["predicted_speedup"] = report.latency["predicted_speedup"]
    extra = {
        "method": args.method, "distill": args.distill,
        "heads_kept": layers_kept.num_heads_kept, "heads_total": report.total("heads_total"),
        "ffn_kept": layers_kept.num_ffn_kept, "ffn_total": report.total("ffn_total"),
        "heads_per_layer": [r.heads_kept for r in report.layers],
        "ffn_per_layer": [r.ffn_kept for r in report.layers],
        "encoder_params": report.total("params"), "encoder_params_original": report.total("params_original"),
        **speed,
    }
    metrics = evaluate_into(student, tokenizer, args, out, extra=extra)
    save_null_threshold(out / "model", metrics, args)
    return 0


def prune_target(args, model):
    """The :class:`PruneTarget` of ``prune``'s arguments: fractions kept (``--heads``/``--ffn``), or a speed target
    (``--speedup``/``--latency-ms`` at ``--at BxL``, optionally with ``--max-params``; ``--heads``/``--ffn`` then cap),
    whose latency table is read from ``--latency-table`` or the per-machine cache (measured when missing)."""
    from structprune.cli import UsageError
    from structprune.latency import LatencyTable, get_table
    from structprune.strategies import PruneTarget
    from structprune.strategies.targets import parse_at

    if getattr(args, "l0_until_target", False) and not (args.method == "l0" and args.l0_steps):
        raise UsageError("--l0-until-target needs --method l0 --l0-steps N (the selection phase it ends)")
    if args.max_steps == 0 and args.method == "l0" and not args.l0_steps:
        raise UsageError("--max-steps 0 with --method l0 needs --l0-steps N (the selection phase that decides)")
    speed = args.speedup is not None or args.latency_ms is not None
    if not speed and args.max_params is None:
        if args.heads is None or args.ffn is None:
            raise UsageError("prune needs --heads and --ffn (fractions kept), or a budget: --speedup / --latency-ms "
                             "with --at BATCHxSEQ_LEN, or --max-params")
        return PruneTarget(heads=args.heads, ffn=args.ffn, per_layer=args.per_layer)
    table, at = None, None
    if speed:
        if args.latency_table:
            table = LatencyTable.load(args.latency_table)
            at = (table.key.batch, table.key.seq_len)
        elif args.at is None:
            raise UsageError("--speedup / --latency-ms need --at BATCHxSEQ_LEN (the input shape the latency refers to)")
        else:
            at = parse_at(args.at)
            table = get_table(model, *at, backend=args.latency_backend, cache_dir=args.latency_cache,
                              refresh=args.refresh_latency)
    return PruneTarget(heads=1.0 if args.heads is None else args.heads, ffn=1.0 if args.ffn is None else args.ffn,
                       per_layer=args.per_layer, speedup=args.speedup, latency_ms=args.latency_ms,
                       params=args.max_params, at=at, backend=args.latency_backend, table=table)


def _compact_and_save(student, tokenizer, target, args, out: Path):
    """Compact the decided student, save it to ``out/model`` and its summary to ``out/summary.txt``; returns the
    masks it was compacted from and the summary (with the predicted latency for a speed target)."""
    import structprune as sp

    kept = sp.get_masks(student)
    sp.compact(student)
    sp.save_pretrained(student, out / "model", tokenizer=tokenizer)
    report = sp.summary(student, seq_len=args.max_length, latency=target.table)
    (out / "summary.txt").write_text(str(report) + "\n")
    print(report)
    return kept, report


def _decided_only(student, tokenizer, target, args, out: Path) -> int:
    """``prune --max-steps 0``: compact and save the decided model, with its summary (and predicted latency)."""
    kept, report = _compact_and_save(student, tokenizer, target, args, out)
    _write_json(out / "metrics.json", {
        "method": args.method, "trained_steps": 0,
        "heads_kept": kept.num_heads_kept, "ffn_kept": kept.num_ffn_kept,
        "heads_per_layer": [r.heads_kept for r in report.layers], "ffn_per_layer": [r.ffn_kept for r in report.layers],
        "encoder_params": report.total("params"), "encoder_params_original": report.total("params_original"),
        "latency": report.latency})
    return 0


def cached_teacher_logits(teacher, tokenizer, train, args, path: Path):
    """The teacher's start/end logits on every train feature, computed once and stored at ``path`` (a
    safetensors :class:`~structprune.training.distill.TeacherCache` plus ``<path>.json`` saying what it was built from), so
    that distilled students train without a teacher forward. An existing cache is reused only when it was built
    for the same teacher, data and window settings."""
    from structprune.training.distill import TeacherCache

    from structprune.qa.features import build_train_features, collate

    features = build_train_features(train, tokenizer, args.max_length, args.doc_stride)
    meta = {"teacher": str(Path(args.model).resolve()), "train": str(Path(args.train or DEFAULT_DATA / "train.json").resolve()),
            "train_limit": args.train_limit, "max_length": args.max_length, "doc_stride": args.doc_stride,
            "num_features": len(features)}
    meta_path = path.with_name(path.name + ".json")
    if path.is_file() and meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        if saved != meta:
            differ = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
            raise ValueError(f"{path} holds teacher logits built for other settings ({{name: (cache, now)}}: "
                             f"{differ}); pass another --teacher-logits path or delete it")
        return TeacherCache.load(path)
    names = [n for n in tokenizer.model_input_names if n in features.column_names]
    inputs = features.select_columns(names)

    def batches():
        for begin in tqdm(range(0, len(features), args.eval_batch_size), desc="teacher logits", unit="batch",
                          disable=not _progress()):
            batch = collate(inputs[begin:begin + args.eval_batch_size], tokenizer, names)
            batch["feature_index"] = torch.arange(begin, min(begin + args.eval_batch_size, len(features)))
            yield batch

    t0 = time.perf_counter()
    cache = TeacherCache.build(teacher, batches())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:  # the metadata first: a cache without it is rebuilt, never trusted
        cache.save(tmp)
        _write_json(meta_path, meta)
    print(f"teacher logits of {len(features)} train features cached in {path} ({time.perf_counter() - t0:.0f}s)")
    return cache


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
    from structprune.training.trainer import PruningLoss

    from structprune.qa.checkpoints import checkpoint_state

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

    from structprune.model.patching import gate_parameters

    from structprune.qa.checkpoints import checkpoint_state
    from structprune.qa.train import train_qa

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
    if getattr(args, "l0_until_target", False):  # decide as soon as the gates reach the target: no overshoot past it
        kwargs["stop_fn"] = controller.reached_target
    for p in frozen:
        p.requires_grad_(False)
    try:
        train_qa(student, tokenizer, train, run_dir, **kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    controller.save(run_dir)
    _write_json(out / "l0_stats.json", {**controller.stats(), "selection_steps": checkpoint_state(run_dir)["step"]})
    if not _finished(run_dir):
        return False
    _decide_l0(controller, target, args)
    _save_masks(student, out / "masks.json")
    with atomic.replacing(run_dir / DECIDED_FILE) as tmp:  # a resumed run trusts this file: all or nothing
        safetensors.torch.save_model(student, str(tmp))
    return True


def _steps_left_after_selection(args, selection_dir: Path) -> int:
    """With ``--l0-train-weights`` the selection phase trains the weights too, so its steps count toward the run's
    budget (``--max-steps``, else ``--epochs``): the continued training gets what the selection left."""
    import math

    from structprune.qa.checkpoints import checkpoint_state

    state = checkpoint_state(selection_dir)
    per_epoch = state["settings"]["steps_per_epoch"]
    total = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * per_epoch)
    left = total - state["step"]
    if left < 1:
        raise ValueError(f"the L0 selection phase took {state['step']} steps, the whole budget of {total} "
                         "(--max-steps/--epochs) with --l0-train-weights: give a larger budget or a smaller --l0-steps")
    return left


def _decide_l0(controller, target, args) -> None:
    """The L0 decision (:func:`structprune.strategies.finalize_l0`), saying what it kept."""
    keep_dead = getattr(args, "l0_keep_dead", False)
    masks = controller.finalize(target, keep_dead=keep_dead)
    print(f"L0 decision: {masks.num_heads_kept} heads and {masks.num_ffn_kept} FFN units kept"
          + ("" if keep_dead else " (units whose gate closed are dropped even when that leaves fewer than the "
                                  "target: they computed zeros)"))


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
    """Forward time of the dense teacher and the pruned model on the same real dev batch, the two alternated
    call by call (:func:`structprune.tools.timing.compare`); the speed-up is the median of the per-pair ratios,
    reported with its quartiles."""
    from structprune.tools.timing import compare

    from structprune.qa.features import build_eval_features, collate

    torch.set_num_threads(args.threads)
    dev = _data(args.dev, "dev", 64)
    feats = build_eval_features(dev, tokenizer, args.max_length, args.doc_stride)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in feats.column_names]
    batch = collate(feats[: args.eval_batch_size], tokenizer, cols)
    dense.eval()
    pruned.eval()
    shape = tuple(batch["input_ids"].shape)
    timing = compare({"dense": lambda: dense(**batch), "pruned": lambda: pruned(**batch)}, warmup=1,
                     repeats=repeats, shapes=f"batch {shape[0]} x seq {shape[1]}")
    ratio = timing.speedup("pruned")
    return {"dense_forward_s": timing.time("dense").median, "pruned_forward_s": timing.time("pruned").median,
            "speedup": ratio.median, "speedup_q1": ratio.q1, "speedup_q3": ratio.q3,
            "speed_repeats": repeats, "speed_threads": timing.threads,
            "speed_batch": int(shape[0]), "speed_seq": int(shape[1])}


def add_arguments(p) -> None:
    """The options of ``structprune prune`` (besides those every training command takes: ``runs._common``)."""
    from structprune.cli import fraction

    p.add_argument("--model", default=None,
                   help="the fine-tuned (teacher) model directory (default: the bundled MiniLM, whose QA head is "
                        "untrained: fine-tune it first for a meaningful teacher)")
    p.add_argument("--method", choices=["random", "gain", "l0"], required=True,
                   help="how the kept heads and units are chosen: random, gain (gradient importance, Michel et al.) "
                        "or l0 (trained hard-concrete gates)")
    p.add_argument("--heads", type=fraction, default=None,
                   help="fraction of heads KEPT, in (0, 1] (e.g. 0.5); with a speed target: at most this fraction "
                        "(default: all, with a budget; otherwise required)")
    p.add_argument("--ffn", type=fraction, default=None,
                   help="fraction of FFN units KEPT, in (0, 1] (e.g. 0.3); with a speed target: at most this fraction "
                        "(default: all, with a budget; otherwise required)")
    p.add_argument("--per-layer", action="store_true", help="the target holds in every layer (default: global)")
    p.add_argument("--speedup", type=float, default=None,
                   help="prune to this predicted end-to-end speed-up over the dense model (>= 1), at --at "
                        "(default: no speed target)")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="prune to this predicted latency (ms), at --at (default: no latency target)")
    p.add_argument("--at", default=None, metavar="BxL",
                   help="input shape of the speed target, e.g. 8x128 (default: the --latency-table's)")
    p.add_argument("--max-params", type=fraction, default=None,
                   help="keep at most this fraction of the heads' and FFN units' parameters (alone or with a speed "
                        "target; default: no parameter budget)")
    p.add_argument("--latency-backend", default="cpp", choices=["torch", "triton", "cpp"],
                   help="backend the latency table is measured on")
    p.add_argument("--latency-table", default=None, metavar="JSON",
                   help="use this latency table (structprune latency-table) instead of the per-machine cache (default: "
                        "the cache, measured when missing)")
    p.add_argument("--latency-cache", default=None, metavar="DIR",
                   help="latency table cache directory (default: $STRUCTPRUNE_CACHE_DIR/latency or "
                        "~/.cache/structprune/latency)")
    p.add_argument("--refresh-latency", action="store_true", help="measure the latency table again")
    p.add_argument("--distill", action="store_true", help="distil from the unpruned model while training")
    p.add_argument("--teacher-logits", default=None, metavar="FILE",
                   help="with --distill: the teacher's logits on the train features, cached once in FILE (built "
                        "there when missing, reused by every student with the same data and settings), so the "
                        "students train without a teacher forward (default: the teacher runs beside the "
                        "student)")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help="with --distill: weight of the distillation loss (1 - it: the loss on the gold answers)")
    p.add_argument("--temperature", type=float, default=2.0, help="with --distill: softmax temperature of the logits")
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
                   help="with --l0-steps: train the weights during the selection phase too (default: frozen); its "
                        "steps then count toward --epochs/--max-steps, so the continued training gets the rest")
    p.add_argument("--l0-until-target", action="store_true",
                   help="with --l0-steps: end the selection phase (and decide) as soon as, after --l0-warmup-steps, "
                        "the gates' expected kept counts (or latency) reach the target; --l0-steps is then the most "
                        "it may take. Without it the gates keep training to --l0-steps and may overshoot the target")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on dev every N steps of the continued training (the curve goes to train/log.jsonl); "
                        "the model kept is the last one, as without it (default: evaluate only at the end)")
    p.add_argument("--l0-keep-dead", action="store_true",
                   help="L0 only: when the gates end below the target, keep the closed units ranked in (they compute "
                        "zeros) so that exactly the target count is kept (default: drop them; faster, same outputs)")
