"""Training integration: the L0 Lagrangian and distillation in one loss, for plain loops and the HF Trainer.

Plain PyTorch::

    ctl = L0Controller(model, PruneTarget(heads=0.5, ffn=0.3), warmup_steps=1000)
    loss_fn = PruningLoss(controller=ctl, teacher=teacher)          # teacher: the unpruned model
    opt = torch.optim.AdamW(ctl.param_groups(model, lr=3e-5))
    for step, batch in enumerate(loader):
        loss = loss_fn(model(**model_inputs_of(batch)), batch, step)  # task + KD + L0 penalty
        ...

Hugging Face Trainer::

    trainer = PruningTrainer(model=model, args=args, train_dataset=ds, controller=ctl, teacher=teacher)
    trainer.train()                     # or train(resume_from_checkpoint=True): the lambdas come back too
    ctl.finalize()                      # exact target, masks set, gates folded

:class:`PruningTrainer` adds the terms in ``compute_loss``, builds the optimizer with separate weight /
gate / lambda groups, keeps the gate and lambda learning rates constant (CoFi gives them an optimizer
without schedule) unless ``constant_gate_lr=False``, logs expected and actual sparsity with every training
log, and writes the lambdas into each checkpoint (:data:`LAGRANGIAN_FILE`; the gates' ``log_alpha`` and
masks are model parameters/buffers and travel in the model weights).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from structprune.training.distill import (DEFAULT_ALPHA, DEFAULT_TEMPERATURE, TeacherCache, distillation_loss,
                                         lm_distillation_loss, teacher_lm_logits, teacher_logits)
from structprune.training.losses import qa_task_loss
from structprune.model.patching import gate_parameters
from structprune.strategies.l0 import LAGRANGIAN_FILE, L0Controller
from structprune.strategies.param_groups import CONSTANT_LR_GROUPS, constant_lr

logger = logging.get_logger(__name__)
DEFAULT_INDEX_KEY = "feature_index"


class PruningLoss:
    """``loss = pruning_loss(model_outputs, batch, step)``: task loss, distillation and L0 penalty.

    * task loss: ``model_outputs.loss`` (the QA loss when the batch carries start/end positions; a causal LM's
      next-token loss when it carries ``labels``);
    * distillation (with ``teacher`` or ``teacher_cache``): ``alpha * KD + (1 - alpha) * task``, KD from
      :func:`~structprune.training.distill.distillation_loss` at ``temperature`` (for outputs with ``logits`` and
      no ``start_logits``, a causal LM: :func:`~structprune.training.distill.lm_distillation_loss`, teacher model
      only); with ``mask_padding`` the KD
      distributions cover only real tokens (``attention_mask``), which makes cached and on-the-fly teacher
      logits give the same loss. A cache is looked up by ``batch[index_key]``;
    * L0: ``controller.penalty(step)`` added when a controller is given.

    ``last`` holds the components of the latest call as floats (for logging).
    """

    def __init__(self, controller: L0Controller | None = None, teacher: nn.Module | None = None,
                 teacher_cache: TeacherCache | None = None, alpha: float = DEFAULT_ALPHA,
                 temperature: float = DEFAULT_TEMPERATURE, index_key: str = DEFAULT_INDEX_KEY,
                 mask_padding: bool = True):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if teacher is not None and teacher_cache is not None:
            raise ValueError("give a teacher model or a teacher_cache, not both")
        self.controller = controller
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.alpha = alpha
        self.temperature = temperature
        self.index_key = index_key
        self.mask_padding = mask_padding
        self.last: dict[str, float] = {}
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    @property
    def distills(self) -> bool:
        return self.teacher is not None or self.teacher_cache is not None

    def teacher_logits(self, batch: Mapping, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher_cache is not None:
            if self.index_key not in batch:
                raise KeyError(f"a teacher_cache needs batch[{self.index_key!r}] (feature indices)")
            return self.teacher_cache.get(batch[self.index_key], seq_len, device)
        teacher_device = next(self.teacher.parameters()).device
        inputs = {k: v.to(teacher_device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        start, end = teacher_logits(self.teacher, inputs, drop=(self.index_key,))
        return start.to(device), end.to(device)

    def teacher_lm_logits(self, batch: Mapping, device: torch.device) -> torch.Tensor:
        if self.teacher is None:
            raise ValueError("distilling a causal LM needs the teacher model (a teacher_cache holds QA logits)")
        teacher_device = next(self.teacher.parameters()).device
        inputs = {k: v.to(teacher_device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return teacher_lm_logits(self.teacher, inputs, drop=(self.index_key,)).to(device)

    def task_loss(self, outputs, batch: Mapping) -> torch.Tensor | None:
        """``outputs.loss``; when the model was called without labels, the QA loss from the batch's
        ``start_positions``/``end_positions`` computed as ``BertForQuestionAnswering`` does (None without them)."""
        task = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if task is None and "start_positions" in batch and "end_positions" in batch:
            task = qa_task_loss(outputs["start_logits"], outputs["end_logits"], batch["start_positions"],
                                batch["end_positions"])
        return task

    def __call__(self, outputs, batch: Mapping, step: int) -> torch.Tensor:
        task = self.task_loss(outputs, batch)
        last = {}
        if self.distills:
            mask = batch.get("attention_mask") if self.mask_padding else None
            if outputs.get("start_logits") is None:  # a causal LM: next-token logits over the vocabulary
                kd = lm_distillation_loss(outputs["logits"], self.teacher_lm_logits(batch, outputs["logits"].device),
                                          self.temperature, mask)
            else:
                start, end = outputs["start_logits"], outputs["end_logits"]
                t_start, t_end = self.teacher_logits(batch, start.shape[-1], start.device)
                kd = distillation_loss(start, end, t_start, t_end, self.temperature, mask)
            loss = kd if task is None else self.alpha * kd + (1.0 - self.alpha) * task
            last["kd_loss"] = float(kd.detach())
        elif task is not None:
            loss = task
        else:
            raise ValueError("the model returned no loss (give start_positions/end_positions) and there is no "
                             "teacher to distil from")
        if task is not None:
            last["task_loss"] = float(task.detach())
        if self.controller is not None:
            penalty = self.controller.penalty(step)
            loss = loss + penalty.to(loss.device)
            last["l0_penalty"] = float(penalty.detach())
        self.last = last
        return loss

    def extra_loss_fn(self, start_step: int = 0):
        """An ``extra_loss_fn(model, batch, outputs)`` for :func:`structprune.qa.train.train`, which adds it to
        the QA loss: returns ``pruning_loss - task_loss``. Counts steps itself from ``start_step`` (one per
        call, i.e. no gradient accumulation)."""
        state = {"step": start_step}

        def fn(model, batch, outputs):
            total = self(outputs, batch, state["step"])
            state["step"] += 1
            task = self.task_loss(outputs, batch)
            return total - task if task is not None else total

        return fn


class PruningCallback(TrainerCallback):
    """Writes the controller's lambdas into every checkpoint folder (``checkpoint-<step>/`` under
    ``args.output_dir``) on the main process, and clears their gradients after every optimizer step (the
    Trainer zeroes only the model's gradients, and the lambdas live outside the model). Added by
    :class:`PruningTrainer`; usable with any Trainer."""

    def __init__(self, controller: L0Controller):
        self.controller = controller

    def _zero_lambda_grads(self):
        for p in self.controller.lagrangian_parameters():
            p.grad = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._zero_lambda_grads()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._zero_lambda_grads()
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self.controller.save(folder / LAGRANGIAN_FILE)
            else:
                logger.warning(f"structprune: checkpoint folder {folder} not found; lambdas not saved")
        return control


class PruningTrainer(Trainer):
    """A :class:`transformers.Trainer` for L0 pruning and/or distillation of a patched QA model or causal LM.

    Extra keyword arguments (everything else goes to ``Trainer``):
        controller: an :class:`~structprune.strategies.L0Controller` (None: no L0 term; gates are frozen,
            as in continued training of survivors after random/gain pruning).
        teacher / teacher_cache: distil from the unpruned teacher on the fly or from cached logits
            (batches then carry ``index_key``, kept by the Trainer's column filter).
        distill_alpha, temperature: see :mod:`structprune.training.distill`.
        gate_lr, lambda_lr: learning rates of ``log_alpha`` and of the lambdas (CoFi's 0.01).
        constant_gate_lr: keep those two constant instead of following the Trainer's schedule.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by the GA steps

    def __init__(self, *args, controller: L0Controller | None = None, teacher: nn.Module | None = None,
                 teacher_cache: TeacherCache | None = None, distill_alpha: float = DEFAULT_ALPHA,
                 temperature: float = DEFAULT_TEMPERATURE, gate_lr: float = 0.01, lambda_lr: float = 0.01,
                 constant_gate_lr: bool = True, index_key: str = DEFAULT_INDEX_KEY, **kwargs):
        super().__init__(*args, **kwargs)
        self.controller = controller
        self.gate_lr = gate_lr
        self.lambda_lr = lambda_lr
        self.constant_gate_lr = constant_gate_lr
        self.index_key = index_key
        if teacher is not None:
            teacher.to(self.args.device)
        if controller is not None:
            controller.lagrangian.to(self.args.device)
            self.add_callback(PruningCallback(controller))
        self.pruning_loss = PruningLoss(controller, teacher, teacher_cache, distill_alpha, temperature, index_key)
        self._component_sums: dict[str, float] = defaultdict(float)
        self._component_count = 0

    # ---- data: keep the feature index through the column filter -----------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.index_key not in self._signature_columns:
            self._signature_columns.append(self.index_key)

    # ---- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        inputs = dict(inputs)
        index = inputs.pop(self.index_key, None)
        outputs = model(**inputs)  # the QA loss is a per-batch mean: num_items_in_batch is not used
        if not model.training:
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
            return (loss, outputs) if return_outputs else loss
        batch = inputs if index is None else {**inputs, self.index_key: index}
        loss = self.pruning_loss(outputs, batch, step=self.state.global_step)
        for k, v in self.pruning_loss.last.items():
            self._component_sums[k] += v
        self._component_count += 1
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != self.index_key}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ---- optimizer / schedule ------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        gates = gate_parameters(self.model)
        gate_ids = {id(p) for p in gates}
        decay = set(self.get_decay_parameter_names(opt_model))
        weights = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in gate_ids]
        groups = [
            {"params": [p for n, p in weights if n in decay], "weight_decay": self.args.weight_decay,
             "name": "weights"},
            {"params": [p for n, p in weights if n not in decay], "weight_decay": 0.0, "name": "weights_no_decay"},
        ]
        if self.controller is not None:
            groups.append({"params": gates, "lr": self.gate_lr, "weight_decay": 0.0, "name": "gates"})
            groups.append({"params": self.controller.lagrangian_parameters(), "lr": self.lambda_lr,
                           "weight_decay": 0.0, "name": "lagrangian"})
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and self.constant_gate_lr and self.controller is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                opt = scheduler.optimizer
                for i, group in enumerate(opt.param_groups):
                    if group.get("name") in CONSTANT_LR_GROUPS:
                        scheduler.lr_lambdas[i] = constant_lr
                        group["lr"] = scheduler.base_lrs[i]
            else:
                logger.warning(f"structprune: {type(scheduler).__name__} is not a LambdaLR; gate and lambda "
                               "learning rates follow the Trainer's schedule")
        return scheduler

    # ---- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            extra = {}
            if self._component_count:
                extra.update({k: v / self._component_count for k, v in self._component_sums.items()})
                self._component_sums.clear()
                self._component_count = 0
            if self.controller is not None:
                extra.update(self.controller.stats(self.state.global_step))
            logs = {**logs, **{k: round(v, 6) for k, v in extra.items()}}
        super().log(logs, start_time)

    # ---- resume --------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None and self.controller is not None:
            path = Path(checkpoint) / LAGRANGIAN_FILE
            if path.is_file():
                self.controller.load(path)
            else:
                logger.warning(f"structprune: {path} not found; the lambdas restart from their current values")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


__all__ = ["PruningLoss", "qa_task_loss", "PruningCallback", "PruningTrainer", "DEFAULT_INDEX_KEY"]
