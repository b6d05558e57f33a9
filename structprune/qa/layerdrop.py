"""``structprune prune --method layerdrop --keep-layers K``: the layer-drop baseline (issue 27).

A shallower student initialised from the teacher (:func:`structprune.model.layer_drop.drop_layers`: the
embeddings, the kept layers and the QA head copied; which layers a count keeps is documented there), then trained
like every other student: the same loop and flags (``--distill``, ``--teacher-logits``, ``--epochs``,
``--eval-every``, ``--bf16``, resuming), saved as a plain transformers model in ``out/model``, timed against the
teacher and evaluated on dev into ``metrics.json`` (method ``layerdrop``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from structprune import atomic
from structprune.qa.runs import (_data, _default_model, _dev_eval_fn, _finished, _start_run, _tokenizer,
                                 _train_kwargs, _write_json, evaluate_into, load_hf_qa_model, save_null_threshold)

# prune's options that choose heads and units: a layer-drop student has its own structure (--keep-layers)
_MASK_TARGETS = ("heads", "ffn", "speedup", "latency_ms", "max_params")
LAYERS_FILE = "layers.json"  # the kept layers, written at the first start and checked on every re-run


def _check_layers(path: Path, layers: dict) -> None:
    """Refuse a re-run of the layer-drop run whose kept layers ``path`` records when it would keep others (its
    checkpoint holds the weights of the layers it started from)."""
    from structprune.cli import UsageError

    if path.is_file():
        before = atomic.read_json(path, "kept layers")
        if before != layers:
            raise UsageError(f"{path.parent} is a layer-drop run keeping layers {before['layers_kept']} of "
                             f"{before['layers_total']}, not {layers['layers_kept']} of {layers['layers_total']}; "
                             "pass a new --out (or the same --keep-layers to resume it)")


def keep_layers_arg(text: str) -> int | list[int]:
    """``--keep-layers``: a count (``3``) or comma-separated layer indices (``0,2,4``; ``5,`` keeps layer 5 alone)."""
    import argparse

    try:
        if "," not in text:
            return int(text)
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (e.g. 3) or layer indices (e.g. 0,2,4), got {text!r}")


def check_layerdrop_args(args) -> None:
    """``--keep-layers`` goes with ``--method layerdrop`` (and it with it), without a heads/FFN target."""
    from structprune.cli import UsageError

    keep = getattr(args, "keep_layers", None)
    if args.method != "layerdrop":
        if keep is not None:
            raise UsageError(f"--keep-layers is for --method layerdrop, not {args.method}")
        return
    if keep is None:
        raise UsageError("--method layerdrop needs --keep-layers (a count, e.g. 3, or layer indices, e.g. 0,2,4)")
    given = [name for name in _MASK_TARGETS if getattr(args, name, None) is not None]
    if given or args.l0_steps:
        flags = ", ".join("--" + name.replace("_", "-") for name in given + (["l0_steps"] if args.l0_steps else []))
        raise UsageError(f"--method layerdrop keeps whole layers (--keep-layers); {flags} choose heads and units "
                         "of the other methods")


def prune_layerdrop(args, measure_speedup) -> int:
    """Build the shallower student, train it (optionally distilled), save, time (``measure_speedup(teacher,
    student, tokenizer, args)``: prune's, so that every student is timed alike) and evaluate."""
    from structprune.cli import UsageError, check_model_dir
    from structprune.model.families import family_of
    from structprune.model.layer_drop import drop_layers, layers_to_keep

    check_layerdrop_args(args)
    from structprune.qa.layer_distill import check_layer_distill

    check_layer_distill(args)
    args.model = args.model or _default_model()
    if (check_model_dir(args.model) / "structprune_config.json").is_file():
        raise UsageError(f"--model {args.model} is a structprune (pruned) save; --method layerdrop starts from the "
                         "unpruned teacher (a transformers model directory)")
    torch.set_num_threads(args.threads)
    teacher = load_hf_qa_model(args.model).eval()
    family = family_of(teacher)
    total = len(family.layers(teacher))
    kept = layers_to_keep(args.keep_layers, total)
    layers = {"layers_kept": kept, "layers_total": total}
    _check_layers(Path(args.out) / LAYERS_FILE, layers)  # before the run directory records these arguments
    out = _start_run(args)
    if not (out / LAYERS_FILE).is_file():
        _write_json(out / LAYERS_FILE, layers)
    tokenizer = _tokenizer(args.model)
    student = drop_layers(teacher, kept)
    print(f"layer drop: layers {kept} of {total} kept")
    if args.max_steps != 0 and not _train(student, teacher, tokenizer, args, out):
        print(f"paused; re-run the same command to resume from {out}")
        return 0
    student.save_pretrained(out / "model")
    atomic.set_default_mode(*(out / "model").glob("*.safetensors"))  # safetensors writes 0600
    tokenizer.save_pretrained(out / "model")
    structure = _structure(family, teacher, student, kept, out)
    if args.max_steps == 0:  # built and saved only
        _write_json(out / "metrics.json", {**structure, "distill": args.distill, "trained_steps": 0})
        return 0
    speed = measure_speedup(teacher, student, tokenizer, args)
    metrics = evaluate_into(student, tokenizer, args, out, extra={**structure, "distill": args.distill, **speed})
    save_null_threshold(out / "model", metrics, args)
    return 0


def _train(student, teacher, tokenizer, args, out: Path) -> bool:
    """Train the student in ``out/train`` as prune trains every student (distilled from the live teacher or its
    cached logits with ``--distill``, a dev curve with ``--eval-every``); False when it paused before the end."""
    from structprune.qa.l0_selection import _pruning_loss_fn
    from structprune.qa.layer_distill import layer_distill_kwargs, share_teacher
    from structprune.qa.teacher_cache import cached_teacher_logits
    from structprune.qa.train import train_qa

    train = _data(args.train, "train", args.train_limit)
    run_dir = out / "train"
    kwargs = _train_kwargs(args)
    if args.distill:
        distill = dict(alpha=args.distill_alpha, temperature=args.temperature)
        if args.teacher_logits:
            distill["teacher_cache"] = cached_teacher_logits(teacher, tokenizer, train, args, Path(args.teacher_logits))
        else:
            distill["teacher"] = teacher
        distill = share_teacher(distill, args)  # one teacher forward for the logits and, with --distill-layers, layers
        kwargs["extra_loss_fn"] = _pruning_loss_fn(None, distill, out, run_dir)
        kwargs = layer_distill_kwargs(kwargs, student, distill, args, run_dir)
    if args.eval_every:  # a dev curve of the training; the model kept is the last one
        kwargs.update(eval_fn=_dev_eval_fn(tokenizer, args), eval_every=args.eval_every)
    train_qa(student, tokenizer, train, run_dir, **kwargs)
    return _finished(run_dir)


def _structure(family, teacher, student, kept: list[int], out: Path) -> dict:
    """What the student keeps, as ``metrics.json`` records every student's structure (heads and units kept, and
    the layers), also written to ``out/summary.txt``."""
    sizes, total = family.sizes(teacher.config), len(family.layers(teacher))
    params = [sum(p.numel() for p in family.layers(m).parameters()) for m in (student, teacher)]
    (out / "summary.txt").write_text(f"layer-drop student: layers {kept} of {total} kept ({len(kept)} x "
                                     f"{sizes.heads} heads, {sizes.intermediate} FFN units); encoder-layer "
                                     f"parameters {params[0] / 1e6:.3f}M/{params[1] / 1e6:.3f}M\n")
    return {"method": "layerdrop", "layers_kept": kept, "layers_total": total,
            "heads_kept": len(kept) * sizes.heads, "heads_total": total * sizes.heads,
            "ffn_kept": len(kept) * sizes.intermediate, "ffn_total": total * sizes.intermediate,
            "heads_per_layer": [sizes.heads] * len(kept), "ffn_per_layer": [sizes.intermediate] * len(kept),
            "encoder_params": params[0], "encoder_params_original": params[1]}
