"""The L0 selection phase of ``structprune prune``: train the gates (and optionally the weights) under the
Lagrangian until the target is reached or the step cap, then decide the masks."""
from __future__ import annotations

import json
from pathlib import Path


from structprune import atomic
from structprune.qa.runs import (_finished, _train_kwargs, _write_json)


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
    from structprune.qa.layer_distill import layer_distill_kwargs
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
    kwargs = layer_distill_kwargs(kwargs, student, distill, args, run_dir)
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
    extra = {k: getattr(m, k).int().tolist() for k in ("hidden", "attn_sublayers", "ffn_sublayers")
             if getattr(m, k) is not None}
    _write_json(path, {"heads": [h.int().tolist() for h in m.heads_per_layer()],
                       "ffn": [f.int().tolist() for f in m.ffn], **extra})
