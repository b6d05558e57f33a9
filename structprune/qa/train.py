"""A plain, resumable PyTorch fine-tuning loop for extractive QA (SQuAD 2.0).

AdamW, linear warm-up then linear decay to 0, gradient clipping, and a checkpoint in
``output_dir/checkpoint/`` written every ``save_every_seconds`` and at the end::

    model.safetensors   model state (safetensors.torch.save_model: buffers such as masks included)
    optimizer.pt        optimizer state
    scheduler.pt        LR scheduler state
    rng.pt              Python / NumPy / torch (CPU and CUDA) RNG states
    extra_params.safetensors   optimizer parameters outside the model (L0 Lagrange multipliers), if any
    state.json          step, total_steps, the settings that must match on resume, finished flag

Calling :func:`train_qa` again with the same ``output_dir`` resumes: the batch order is a pure function of
``(seed, epoch)``, so the batches already done are skipped without being read. A finished run only
reloads its weights. The checkpoint is swapped in atomically (write ``checkpoint.tmp``, then rename), so an
interrupted save leaves the previous one usable.

``output_dir/log.jsonl`` gets one JSON line per ``log_every`` steps (mean loss, QA loss, extra loss,
learning rate, gradient norm, elapsed seconds) and one per event (start, resume, checkpoint, eval, paused, done).

With ``eval_fn`` and ``eval_every``, the model is evaluated every ``eval_every`` steps and at the end; every
evaluation is logged (``"event": "eval"``) and kept in ``state.json``, the best one's weights are kept in
``output_dir/best/`` (by ``select_metric``, higher is better), and with ``patience`` the run ends early once
that many evaluations in a row have not improved on the best (never before ``min_epochs``). A checkpoint is
written right after each evaluation, so a resumed run neither repeats nor skips one.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import safetensors.torch
import torch
from tqdm.auto import tqdm

from structprune.strategies.param_groups import CONSTANT_LR_GROUPS, constant_lr
from structprune.training.losses import qa_task_loss
from structprune.qa.checkpoints import (_find_checkpoint, _load_extra_params, _log, _model_device, _save_best,
                                        _save_checkpoint, _set_rng_state)
from structprune.qa.data import load_squad
from structprune.qa.features import build_train_features, collate

FEATURE_INDEX = "feature_index"  # batch key: the index of each row in the train features
# Settings that fix the batch order and schedule; a resumed run must agree on all of them.
# (lr and weight_decay too: the optimizer state loaded on resume would silently override new values; the autocast
# precision, so that a run never switches precision half way; and model_kwargs, because an extra loss reading what
# they add, e.g. layerwise distillation, brings its own optimizer parameters. A checkpoint from before a key was
# recorded reads as its default.)
_RESUME_KEYS = (
    "num_features", "batch_size", "total_steps", "warmup_steps", "seed", "lr", "weight_decay", "max_length",
    "doc_stride", "autocast_dtype", "model_kwargs",
)

ExtraLossFn = Callable[[torch.nn.Module, dict, object], torch.Tensor]
EvalFn = Callable[[torch.nn.Module], dict]


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, LayerNorm weights and 1-D gate parameters get none."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over ``warmup_steps``, then 1 -> 0 linearly at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def train_qa(
    model: torch.nn.Module,
    tokenizer,
    train_dataset,
    output_dir: str | os.PathLike,
    epochs: float = 2.0,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 384,
    doc_stride: int = 128,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    seed: int = 42,
    save_every_seconds: float = 180,
    extra_loss_fn: ExtraLossFn | None = None,
    param_groups: Iterable[dict] | None = None,
    progress: bool = True,
    *,
    max_steps: int | None = None,
    max_grad_norm: float | None = 1.0,
    log_every: int = 10,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_query_length: int = 64,
    stop_at_step: int | None = None,
    stop_after_seconds: float | None = None,
    eval_fn: EvalFn | None = None,
    eval_every: int | None = None,
    select_metric: str = "best_f1",
    patience: int | None = None,
    min_epochs: float = 0.0,
    stop_fn: Callable[[int], bool] | None = None,
    model_kwargs: dict | None = None,
) -> torch.nn.Module:
    """Fine-tune ``model`` on SQuAD-style data, resuming from ``output_dir`` when it holds a checkpoint.

    Args:
        model: a Hugging Face-style QA model (outputs with ``.start_logits`` / ``.end_logits``); trained in
            place, returned in eval mode.
        tokenizer: its fast tokenizer.
        train_dataset: squad_v2-schema examples, or anything :func:`~structprune.qa.data.load_squad` accepts.
        epochs: passes over the train features (may be fractional); ``max_steps`` overrides it.
        lr: peak learning rate (the default for groups in ``param_groups`` that set none).
        warmup_ratio: fraction of the steps with linear warm-up (then linear decay to 0).
        weight_decay: AdamW decay of weight matrices (see :func:`default_param_groups`).
        seed: seeds the torch / NumPy / Python RNGs at the start, and the batch order of each epoch.
        save_every_seconds: wall-clock interval between checkpoints (one is always written at the end).
        extra_loss_fn: ``fn(model, batch, outputs) -> scalar tensor`` added to the QA loss (distillation, L0
            penalty); ``batch`` holds the model inputs plus ``start_positions`` / ``end_positions`` and
            ``feature_index`` (each row's index in the train features, as :class:`~structprune.training.distill.TeacherCache`
            keys them).
        param_groups: optimizer parameter groups replacing :func:`default_param_groups` (e.g. gate
            parameters with their own ``lr``); every group follows the same warm-up/decay schedule.
        max_steps: stop after this many optimizer steps in total.
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        log_every: steps per ``log.jsonl`` record.
        device: where to train (default: where the model's parameters are).
        autocast_dtype: e.g. ``torch.bfloat16`` to train under ``torch.autocast``; default full precision.
        stop_at_step, stop_after_seconds: end this call early (checkpoint written, run not finished) once
            the global step reaches ``stop_at_step`` or this call has trained for ``stop_after_seconds``;
            call again to continue. The schedule still spans ``total_steps``. :func:`checkpoint_state`
            tells whether a run has finished.
        eval_fn: ``fn(model) -> dict`` of metrics (e.g. dev SQuAD metrics), called in eval mode every
            ``eval_every`` steps and at the end of training.
        select_metric: the key of ``eval_fn``'s result that decides the best evaluation (higher is better);
            the best weights are kept in ``output_dir/best/`` (see :func:`load_best_weights`).
        patience, min_epochs: end the run (finished, ``stopped_early`` in ``state.json``) once ``patience``
            evaluations in a row have not improved on the best, but not before ``min_epochs`` epochs.
        stop_fn: ``fn(step) -> bool``, called after every optimizer step with the global step; True ends the run
            there, finished (``stopped_early`` in ``state.json``), e.g. once L0 gates have reached their target.
            It is called once more on resuming, before training goes on; its answer then is ignored (the step it
            would have stopped at was checked before the checkpoint).
        model_kwargs: extra keyword arguments of every training forward, e.g. ``{"output_hidden_states": True}``
            for an ``extra_loss_fn`` that reads the student's hidden states (layerwise distillation); recorded in
            the run's settings when given, and a resumed run must give the same.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (eval_every is None) != (eval_fn is None) or (eval_every is not None and eval_every < 1):
        raise ValueError(f"eval_fn and eval_every (>= 1) go together, got eval_every={eval_every}")
    if patience is not None and (patience < 1 or eval_fn is None):
        raise ValueError(f"patience must be >= 1 and needs eval_fn, got patience={patience}")
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    if not hasattr(train_dataset, "column_names"):
        train_dataset = load_squad(train_dataset)
    features = build_train_features(
        train_dataset, tokenizer, max_length=max_length, doc_stride=doc_stride,
        max_query_length=max_query_length, progress=progress,
    )
    num_features = len(features)
    if num_features == 0:
        raise ValueError("the training set produced no features")
    steps_per_epoch = math.ceil(num_features / batch_size)
    total_steps = max_steps if max_steps is not None else math.ceil(epochs * steps_per_epoch)
    if total_steps < 1:
        raise ValueError(f"nothing to train: epochs={epochs}, max_steps={max_steps} give {total_steps} steps")
    warmup_steps = math.ceil(warmup_ratio * total_steps)

    groups = list(param_groups) if param_groups is not None else default_param_groups(model, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    decay = linear_warmup_decay(warmup_steps, total_steps)  # the weights'; the gates and lambdas keep theirs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [constant_lr if g.get("name") in CONSTANT_LR_GROUPS else decay for g in optimizer.param_groups])
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]

    settings = {
        "num_features": num_features, "batch_size": batch_size, "total_steps": total_steps,
        "warmup_steps": warmup_steps, "seed": seed, "steps_per_epoch": steps_per_epoch,
        "epochs": epochs, "lr": lr, "max_length": max_length, "doc_stride": doc_stride,
        "weight_decay": weight_decay, "warmup_ratio": warmup_ratio,
        "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
    }
    if model_kwargs:
        settings["model_kwargs"] = model_kwargs
    step, elapsed_before, evals = 0, 0.0, []
    ckpt = _find_checkpoint(output_dir)
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        saved = state["settings"]
        mismatched = {k: (saved.get(k), settings.get(k)) for k in _RESUME_KEYS if saved.get(k) != settings.get(k)}
        if mismatched:
            raise ValueError(
                f"{ckpt} was written by a run with other settings ({{name: (checkpoint, now)}}: {mismatched}); "
                "resume with the same data and settings, or use a new output_dir"
            )
        safetensors.torch.load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        _load_extra_params(ckpt, model, optimizer)
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        step, elapsed_before, evals = state["step"], state.get("elapsed", 0.0), state.get("evals", [])
        _log(output_dir, {"event": "resume", "step": step, "total_steps": total_steps, "from": str(ckpt)})
        if state.get("finished") or step >= total_steps:
            model.eval()
            return model
        if stop_fn is not None and step > 0:
            stop_fn(step)  # restores what it acts on (e.g. frozen gates) from the resumed weights
    else:
        _log(output_dir, {"event": "start", **settings})

    input_names = [n for n in tokenizer.model_input_names if n in features.column_names]
    columns = [*input_names, "start_positions", "end_positions"]
    order_epoch, order = -1, None
    t_start = time.monotonic()
    last_save = t_start
    zero = torch.zeros((), device=device)
    sums = {"loss": zero, "qa_loss": zero, "extra_loss": zero, "grad_norm": zero}
    n_logged = 0
    stop_step = total_steps if stop_at_step is None else min(total_steps, max(stop_at_step, step))

    stopped_early = None

    def state_dict(finished: bool) -> dict:
        return {
            "step": step, "total_steps": total_steps, "finished": finished,
            "elapsed": elapsed_before + time.monotonic() - t_start, "settings": settings,
            "evals": evals, "stopped_early": stopped_early,
        }

    def evaluate() -> bool:
        """Evaluate, keep the best weights, checkpoint; True when patience has run out."""
        model.eval()
        t0 = time.monotonic()
        metrics = eval_fn(model)
        model.train()
        if select_metric not in metrics:
            raise KeyError(f"eval_fn returned no {select_metric!r} (select_metric); it returned {sorted(metrics)}")
        record = {"step": step, "epoch": step / steps_per_epoch, "seconds": time.monotonic() - t0,
                  "metrics": metrics}
        best = max((e["metrics"][select_metric] for e in evals), default=-math.inf)
        evals.append(record)
        _log(output_dir, {"event": "eval", **record})
        if metrics[select_metric] > best:
            _save_best(output_dir, model, record)
        since_best = len(evals) - 1 - max(range(len(evals)), key=lambda i: evals[i]["metrics"][select_metric])
        return patience is not None and since_best >= patience and step >= min_epochs * steps_per_epoch

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not progress, unit="step")
    while step < stop_step:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order, order_epoch = torch.randperm(num_features, generator=generator).tolist(), epoch
        idx = order[position * batch_size : (position + 1) * batch_size]
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(features[idx], tokenizer, columns).items()}
        batch[FEATURE_INDEX] = torch.tensor(idx)  # for extra_loss_fn (cached teacher logits); not a model input
        inputs = {k: batch[k] for k in input_names}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = model(**inputs, **(model_kwargs or {}))
            loss_qa = qa_task_loss(
                outputs.start_logits, outputs.end_logits, batch["start_positions"], batch["end_positions"]
            )
            extra = extra_loss_fn(model, batch, outputs) if extra_loss_fn is not None else None
        loss = loss_qa + extra if extra is not None else loss_qa
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, max_grad_norm)
        else:
            norms = [p.grad.detach().float().norm() for p in clip_params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else zero
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)

        # Summed on the device; read back (one sync) only when logging.
        sums["loss"] = sums["loss"] + loss.detach().float()
        sums["qa_loss"] = sums["qa_loss"] + loss_qa.detach().float()
        if extra is not None:
            sums["extra_loss"] = sums["extra_loss"] + extra.detach().float()
        sums["grad_norm"] = sums["grad_norm"] + grad_norm.detach().float()
        n_logged += 1
        out_of_time = stop_after_seconds is not None and time.monotonic() - t_start >= stop_after_seconds
        if step % log_every == 0 or step == stop_step or out_of_time:
            record = {k: v.item() / n_logged for k, v in sums.items()}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"non-finite loss by step {step} (mean over the last {n_logged} steps: {record}); "
                    f"the last checkpoint in {output_dir} predates it"
                )
            record.update(step=step, epoch=step / steps_per_epoch, lr=scheduler.get_last_lr()[0],
                          elapsed=elapsed_before + time.monotonic() - t_start)
            _log(output_dir, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            sums = dict.fromkeys(sums, zero)
            n_logged = 0
        if eval_fn is not None and (step % eval_every == 0 or step == total_steps):
            if evaluate():
                stopped_early = step
                _log(output_dir, {"event": "stopped_early", "step": step, "patience": patience})
                break
            if step < total_steps:
                _save_checkpoint(output_dir, model, optimizer, scheduler, state_dict(finished=False))
                last_save = time.monotonic()
        if stop_fn is not None and step < total_steps and stop_fn(step):
            stopped_early = step
            _log(output_dir, {"event": "stopped_early", "step": step, "by": "stop_fn"})
            break
        if out_of_time:
            break
        if step < stop_step and time.monotonic() - last_save >= save_every_seconds:
            if n_logged and not math.isfinite(sums["loss"].item()):  # never checkpoint diverged weights
                raise FloatingPointError(f"non-finite loss by step {step}; not overwriting the checkpoint")
            _save_checkpoint(output_dir, model, optimizer, scheduler, state_dict(finished=False))
            _log(output_dir, {"event": "checkpoint", "step": step})
            last_save = time.monotonic()
    bar.close()
    finished = step >= total_steps or stopped_early is not None
    _save_checkpoint(output_dir, model, optimizer, scheduler, state_dict(finished=finished))
    _log(output_dir, {"event": "done" if finished else "paused", "step": step,
                      "elapsed": elapsed_before + time.monotonic() - t_start})
    model.eval()
    return model
