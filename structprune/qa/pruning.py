"""``structprune prune``: choose masks with a strategy (random, gain, L0 with an optional selection phase),
train the survivors (optionally distilled, from live or cached teacher logits), compact, save, time and evaluate."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from structprune.qa.runs import (_data, _default_model, _progress, _dev_eval_fn, _finished, _start_run, _tokenizer,
                                 _train_kwargs, _write_json, evaluate_into, load_qa_model, save_null_threshold)
from structprune.qa.l0_selection import (_decide_l0, _l0_controller, _pruning_loss_fn, _save_masks, _select_l0,
                                         _steps_left_after_selection)
from structprune.qa.teacher_cache import cached_teacher_logits
from structprune.qa.layer_distill import check_layer_distill, layer_distill_kwargs, share_teacher


def _gain_batches(model, tokenizer, args):
    from structprune.qa.features import build_train_features, collate

    data = _data(args.train, "train", args.gain_examples)
    feats = build_train_features(data, tokenizer, args.max_length, args.doc_stride)
    cols = ["input_ids", "attention_mask", "start_positions", "end_positions"]
    if "token_type_ids" in feats.column_names:
        cols.append("token_type_ids")
    for i in range(0, len(feats), args.batch_size):
        yield collate(feats[i:i + args.batch_size], tokenizer, cols)


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

    if args.method == "layerdrop" or getattr(args, "keep_layers", None) is not None:  # a shallower student
        from structprune.qa.layerdrop import prune_layerdrop

        return prune_layerdrop(args, measure_speedup)
    args.model = args.model or _default_model()
    out = _start_run(args)
    check_layer_distill(args)
    torch.set_num_threads(args.threads)
    teacher = load_qa_model(args.model)
    tokenizer = _tokenizer(args.model)
    full = bool(getattr(args, "full", False))
    if full and args.method != "l0":
        from structprune.cli import UsageError

        raise UsageError(f"--full gates sublayers and hidden dimensions for --method l0 only, got --method {args.method}")
    student = sp.patch(copy.deepcopy(teacher), sublayers=full, hidden=full)
    target = prune_target(args, teacher)
    train = _data(args.train, "train", args.train_limit)
    masks_file = out / "masks.json"
    distill = dict(alpha=args.distill_alpha, temperature=args.temperature)
    if args.distill and args.teacher_logits:
        distill["teacher_cache"] = cached_teacher_logits(teacher, tokenizer, train, args, Path(args.teacher_logits))
    else:
        distill["teacher"] = teacher if args.distill else None
    distill = share_teacher(distill, args)  # --distill-layers: one teacher forward per step for logits and states
    controller = None
    if args.method == "l0" and args.l0_steps:
        if not _select_l0(student, tokenizer, train, target, args, out, distill):
            print(f"paused; re-run the same command to resume from {out}")
            return 0
    elif args.method == "l0":
        controller, groups = _l0_controller(student, target, args, out / "train")
    elif masks_file.is_file():  # resumed run: the decision is already made
        saved = json.loads(masks_file.read_text())
        sp.set_masks(student, **{k: torch.tensor(v) if k not in ("heads", "ffn") else v for k, v in saved.items()})
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
    kwargs = layer_distill_kwargs(kwargs, student, distill, args, run_dir)
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
        "method": method_name(args), "distill": args.distill,
        **cofi_structure(student),
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


def method_name(args) -> str:
    """The method recorded in ``metrics.json``: ``l0-full`` for L0 with sublayer and hidden-dimension gates."""
    return "l0-full" if getattr(args, "full", False) else args.method


def cofi_structure(model) -> dict:
    """The hidden width and sublayers a (compacted) student kept, for ``metrics.json`` (empty without such gates)."""
    import structprune as sp

    m = sp.get_masks(model)
    out = {}
    if m.hidden is not None:
        out["hidden_kept"] = int(m.hidden.sum())
    if m.attn_sublayers is not None:
        out["attn_sublayers_kept"] = m.attn_sublayers.int().tolist()
        out["ffn_sublayers_kept"] = m.ffn_sublayers.int().tolist()
    return out


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
        if args.multiple_of != 1:
            raise UsageError("--multiple-of needs a budget (--speedup, --latency-ms or --max-params): with --heads and "
                             "--ffn alone the fractions are kept as asked")
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
                       params=args.max_params, at=at, backend=args.latency_backend, table=table,
                       multiple_of=args.multiple_of)


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
        "method": method_name(args), "trained_steps": 0, **cofi_structure(student),
        "heads_kept": kept.num_heads_kept, "ffn_kept": kept.num_ffn_kept,
        "heads_per_layer": [r.heads_kept for r in report.layers], "ffn_per_layer": [r.ffn_kept for r in report.layers],
        "encoder_params": report.total("params"), "encoder_params_original": report.total("params_original"),
        "latency": report.latency})
    return 0


def speed_batch(tokenizer, args) -> dict:
    """The batch speed-ups are timed on: the first ``args.eval_batch_size`` features of ``args.dev`` (at
    ``args.max_length`` / ``args.doc_stride``)."""
    from structprune.qa.features import build_eval_features, collate

    feats = build_eval_features(_data(args.dev, "dev", 64), tokenizer, args.max_length, args.doc_stride)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in feats.column_names]
    return collate(feats[: args.eval_batch_size], tokenizer, cols)


@torch.inference_mode()
def measure_speedup(dense, pruned, tokenizer, args, repeats: int = 5) -> dict:
    """Forward time of the dense teacher and the pruned model on the same real dev batch, the two alternated
    call by call (:func:`structprune.tools.timing.compare`); the speed-up is the median of the per-pair ratios,
    reported with its quartiles."""
    from structprune.tools.timing import compare

    torch.set_num_threads(args.threads)
    batch = speed_batch(tokenizer, args)
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
