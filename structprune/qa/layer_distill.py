"""``structprune prune --distill --distill-layers``: CoFi's layerwise distillation
(:mod:`structprune.training.layerwise`) beside the logit distillation, in every training phase of the run.

The loss of a step is ``alpha * KD + (1 - alpha) * task + weight * layer_loss`` (``--distill-alpha``,
``--temperature``, ``--layer-distill-weight``; plus the L0 penalty with ``--method l0``), and one teacher forward
per step gives both the logits and the hidden states. Each phase (the L0 selection in ``l0/``, the training in
``train/``) starts its map at the identity and checkpoints it with its optimizer, so a resumed phase continues
exactly; the layer loss and the matching go to ``<phase>/layer_distill.jsonl``.

Defaults: ``alpha = 0.5`` and ``T = 2`` stay those of ``--distill`` (CoFi's temperature is 2 too), so adding
``--distill-layers`` changes nothing else; the weight 0.9 is CoFi's layer weight. CoFi itself trains on
``0.1 * KD + 0.9 * layer_loss`` without the task loss: ``--distill-alpha 1 --layer-distill-weight 9`` gives its
proportions at ten times its scale (Adam hardly sees the scale; the gradient clipping at 1.0 and the L0 penalty's
relative weight do). The weight is not tuned on our data.
"""
from __future__ import annotations

import inspect
from pathlib import Path


def parse_teacher_layers(text: str | None) -> list[int] | None:
    """``--distill-layers``' value: ``auto`` (None: the default rule) or comma-separated teacher layers."""
    from structprune.cli import UsageError

    if text is None or text == "auto":
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--distill-layers {text}: expected 'auto' or comma-separated teacher layer indices "
                         "counted from 0, e.g. 1,3,5") from None


def check_layer_distill(args) -> None:
    """Refuse ``--distill-layers`` without ``--distill`` (the live teacher it needs) or with ``--teacher-logits``
    (the teacher runs every step anyway, and its logits come with its hidden states)."""
    from structprune.cli import UsageError

    if getattr(args, "distill_layers", None) is None:
        return
    if not args.distill:
        raise UsageError("--distill-layers needs --distill (use --distill-alpha 0 to drop the logit distillation)")
    if args.teacher_logits:
        raise UsageError("--distill-layers runs the teacher on every step for its hidden states, which gives its "
                         "logits too: drop --teacher-logits")
    if args.layer_distill_weight < 0:
        raise UsageError(f"--layer-distill-weight must be >= 0, got {args.layer_distill_weight}")
    parse_teacher_layers(args.distill_layers)


def share_teacher(distill: dict, args) -> dict:
    """``prune``'s distillation settings with the teacher wrapped in a
    :class:`~structprune.training.layerwise.SharedTeacher` under ``--distill-layers`` (unchanged otherwise)."""
    from structprune.training.layerwise import SharedTeacher

    if getattr(args, "distill_layers", None) is None or isinstance(distill.get("teacher"), SharedTeacher):
        return distill
    return {**distill, "teacher": SharedTeacher(distill["teacher"])}


def layer_distill_kwargs(kwargs: dict, student, distill: dict, args, run_dir: Path) -> dict:
    """``train_qa``'s keyword arguments for one training phase in ``run_dir`` with ``--distill-layers``: the layer
    loss added to the ``extra_loss_fn`` already there (logit KD, L0 penalty), the map's parameters as one more
    optimizer group, and the student called with its hidden states. Unchanged without ``--distill-layers``."""
    from structprune.training.layerwise import LOG_FILE, MODEL_KWARGS, LayerwiseDistiller, layerwise_loss_fn

    from structprune.qa.checkpoints import checkpoint_state
    from structprune.qa.train import default_param_groups, train_qa

    if getattr(args, "distill_layers", None) is None:
        return kwargs
    shared = distill["teacher"]
    distiller = LayerwiseDistiller.for_models(shared.teacher, student, parse_teacher_layers(args.distill_layers))
    groups = kwargs.get("param_groups")
    if groups is None:  # train_qa's own default groups, then the map's
        decay = kwargs.get("weight_decay", inspect.signature(train_qa).parameters["weight_decay"].default)
        groups = default_param_groups(student, decay)
    start = (checkpoint_state(run_dir) or {}).get("step", 0)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fn = layerwise_loss_fn(shared, distiller, args.layer_distill_weight, kwargs.get("extra_loss_fn"),
                           log_path=Path(run_dir) / LOG_FILE, start_step=start)
    print(f"layerwise distillation: teacher layers {distiller.matched_layers} matched among the student's "
          f"{distiller.student_layers}, weight {args.layer_distill_weight}")
    return {**kwargs, "extra_loss_fn": fn, "param_groups": [*groups, distiller.param_group()],
            "model_kwargs": {**kwargs.get("model_kwargs", {}), **MODEL_KWARGS}}
