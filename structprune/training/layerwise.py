"""Layerwise distillation with dynamic layer matching (CoFi: Xia, Zhong & Chen 2022, section 3.3).

The student's hidden states are mapped by ONE learned linear map ``W`` (d x d, initialised to the identity, bias 0,
trained with the student) and compared with the teacher's. For each teacher layer ``i`` in a fixed set ``T``, the
matched student layer is ``m(i) = argmin_{j >= m(i-1)} MSE(W h_s^j, h_t^i)`` (``m(i_0)`` over all student layers),
recomputed every step; the loss is ``sum_i MSE(W h_s^{m(i)}, h_t^i)``. Layers are counted from 0 over the layer
outputs (``hidden_states[1:]``: the embedding output is never matched, as in CoFi).

Where this differs from CoFiPruning's ``trainer.py`` (``calculate_layer_distillation_loss``, version 4):

* CoFi matches greedily from the top teacher layer down, each match strictly below the one above, so it needs at
  least ``|T|`` student layers. Here the greedy goes bottom up and a student layer may be matched more than once
  (``j >= m(i-1)``), so a shallower student (a layer-drop baseline: 2 layers against ``T = {1, 3, 5}``) is matched
  too. Ties go to the lower layer (a fully skipped layer repeats the state below it, which is then chosen).
* CoFi leaves out the student layers whose attention sublayer is pruned (``head_layer_z == 0``); here every layer
  is a candidate (a layer with both sublayers skipped ties with the one below and loses the tie).
* CoFi averages the squared error over padding too (it trims the batch to its longest row); here padding positions
  (``attention_mask == 0``) are left out of every MSE.
* CoFi's map is an ``nn.Linear`` with the default random initialisation; ours starts at the identity, so an unpruned
  copy of the teacher starts at loss 0.

Which teacher layers (:func:`default_teacher_layers`): at most 4, every ``ceil(L / 4)``-th layer counting down from
the top one. That is CoFi's ``{2, 5, 8, 11}`` for 12 layers, ``{5, 11, 17, 23}`` for 24, ``{1, 3, 5}`` for
MiniLM's 6 (the layers an every-other-layer student keeps), and every layer below 5.

Masked hidden dimensions are 0 in a patched student's states; the map reads the full width ``d`` and writes the
teacher's full width, so the loss stays defined (the masked dims' columns of ``W`` get no gradient), as in CoFi.
The MSEs are computed in fp32 with autocast off, whatever precision the models ran in. Only the matched pairs are
computed with autograd; the ``|T| x L_s`` cost table for the matching is computed without it.

Why the teacher runs live instead of from a cache (as :class:`~structprune.training.distill.TeacherCache` does for
logits): our SQuAD 2.0 run has 19,172 train windows of 192 tokens (MiniLM, d = 384, ``T = {1, 3, 5}``):
19,172 x 192 x 384 x 3 = 4.2e9 values, 17 GB in fp32 (8.5 GB in bf16, which would round the targets), against
23 GB of RAM on the training machine; BERT-base on SQuAD 2.0 at 384 tokens (about 132k windows, 4 layers of
768) needs 132e3 x 384 x 768 x 4 x 2 B = 311 GB in bf16. The live teacher costs one forward without backward per
step (by FLOPs a third of a dense student's forward and backward); :class:`SharedTeacher` makes that one forward
serve the logit distillation too. ``bench/layerwise_overhead.py`` measures the step with and without it.

Use with :func:`structprune.qa.train.train_qa`::

    shared = SharedTeacher(teacher)
    distiller = LayerwiseDistiller.for_models(teacher, student)
    kd = PruningLoss(teacher=shared).extra_loss_fn()          # logit KD from the same teacher forward
    fn = layerwise_loss_fn(shared, distiller, inner=kd, log_path=out / LOG_FILE)
    train_qa(student, tok, data, out, extra_loss_fn=fn, model_kwargs=MODEL_KWARGS,
             param_groups=[*default_param_groups(student, 0.01), distiller.param_group()])
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from structprune.training.distill import model_inputs

# CoFi's distill_loss_alpha: its README lists 0.9, 0.7, 0.5 for the layer loss with 0.1, 0.3, 0.5 for the logit KD
# (temperature 2) on SQuAD, and its trainer then drops the task loss; see structprune.qa.layer_distill for how ours
# combines with the task loss.
DEFAULT_LAYER_WEIGHT = 0.9
MAX_MATCHED_LAYERS = 4      # CoFi matches 4 teacher layers of 12
MODEL_KWARGS = {"output_hidden_states": True}  # what the student must be called with (train_qa(model_kwargs=...))
LOG_FILE = "layer_distill.jsonl"


def default_teacher_layers(num_layers: int, count: int = MAX_MATCHED_LAYERS) -> list[int]:
    """The teacher layers matched by default: at most ``count``, every ``ceil(num_layers / count)``-th layer counting
    down from the top one (12 layers: ``[2, 5, 8, 11]``, CoFi's; 6: ``[1, 3, 5]``; 3: ``[0, 1, 2]``)."""
    if num_layers < 1 or count < 1:
        raise ValueError(f"num_layers and count must be >= 1, got num_layers={num_layers}, count={count}")
    stride = math.ceil(num_layers / count)
    return sorted(range(num_layers - 1, -1, -stride))


def monotone_matching(costs: torch.Tensor) -> list[int]:
    """Greedy monotone matching of a ``[teacher layers, student layers]`` cost table: row ``i`` takes the cheapest
    column ``j >= `` the previous row's (the first row any column); ties go to the lowest column."""
    if costs.ndim != 2 or costs.shape[0] < 1 or costs.shape[1] < 1:
        raise ValueError(f"costs must be a non-empty [teacher layers, student layers] table, got {tuple(costs.shape)}")
    previous, matching = 0, []
    for row in costs.tolist():
        tail = row[previous:]
        previous += min(range(len(tail)), key=tail.__getitem__)  # first minimum
        matching.append(previous)
    return matching


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b)  # one fused pass, forward and backward


class LayerwiseDistiller(nn.Module):
    """CoFi's layerwise distillation loss with its learned map ``W`` (see the module docstring).

    Args:
        hidden_size: ``d``, the teacher's hidden width (a patched student's states have it too, masked dims 0).
        teacher_layers: the teacher's number of layers.
        student_layers: the student's number of layers (fewer for a layer-drop student).
        matched_layers: the teacher layers ``T`` (0-based, increasing); default :func:`default_teacher_layers`.

    Its parameters (``W`` and its bias) belong in the optimizer (:meth:`param_group`); a checkpoint of
    :func:`~structprune.qa.train.train_qa` then saves and restores them with the optimizer's other parameters
    outside the model.
    """

    def __init__(self, hidden_size: int, teacher_layers: int, student_layers: int,
                 matched_layers: Sequence[int] | None = None):
        super().__init__()
        if hidden_size < 1 or teacher_layers < 1 or student_layers < 1:
            raise ValueError(f"hidden_size, teacher_layers and student_layers must be >= 1, got {hidden_size}, "
                             f"{teacher_layers}, {student_layers}")
        matched = default_teacher_layers(teacher_layers) if matched_layers is None else [int(i) for i in matched_layers]
        if not matched or matched != sorted(set(matched)) or matched[0] < 0 or matched[-1] >= teacher_layers:
            raise ValueError(f"matched_layers must be increasing teacher layer indices in [0, {teacher_layers}), "
                             f"got {list(matched_layers)}")
        self.hidden_size, self.teacher_layers, self.student_layers = hidden_size, teacher_layers, student_layers
        self.matched_layers = matched
        self.linear = nn.utils.skip_init(nn.Linear, hidden_size, hidden_size)  # draws no random numbers
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden_size))
            self.linear.bias.zero_()

    @classmethod
    def for_models(cls, teacher: nn.Module, student: nn.Module, matched_layers: Sequence[int] | None = None,
                   ) -> "LayerwiseDistiller":
        """A distiller sized from the two models' configs (``num_hidden_layers``, ``hidden_size``: every family's
        config answers to these names, DistilBERT's through its attribute map)."""
        t, s = teacher.config, student.config
        if s.hidden_size != t.hidden_size:
            raise ValueError(f"the student's hidden size ({s.hidden_size}) differs from the teacher's "
                             f"({t.hidden_size}): layerwise distillation maps the student's states at the teacher's "
                             "width (mask hidden dimensions, compact them only after training)")
        device = next(student.parameters()).device
        return cls(t.hidden_size, t.num_hidden_layers, s.num_hidden_layers, matched_layers).to(device)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, teacher_layers={self.teacher_layers}, "
                f"student_layers={self.student_layers}, matched_layers={self.matched_layers}")

    def param_group(self, lr: float | None = None) -> dict:
        """An optimizer parameter group for the map, without weight decay (decay would pull it toward 0, not
        toward the identity it starts at); ``lr`` None: the optimizer's default."""
        group = {"params": list(self.parameters()), "weight_decay": 0.0, "name": "layer_distill"}
        if lr is not None:
            group["lr"] = lr
        return group

    def _layer_states(self, states, layers: int, who: str) -> list[torch.Tensor]:
        states = list(states) if states is not None else []
        if len(states) != layers + 1:
            raise ValueError(f"expected the {who}'s hidden states of the embeddings and its {layers} layers "
                             f"({layers + 1} tensors, as output_hidden_states=True gives), got {len(states)}")
        for h in states:
            if h.ndim != 3 or h.shape[-1] != self.hidden_size:
                raise ValueError(f"the {who}'s hidden states must be [batch, seq, {self.hidden_size}], got "
                                 f"{tuple(h.shape)}")
        return states[1:]

    def forward(self, student_hidden_states: Sequence[torch.Tensor], teacher_hidden_states: Sequence[torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """``(loss, matching)``: the fp32 scalar loss and, for each teacher layer in ``matched_layers``, the student
        layer matched to it. The states are the models' ``hidden_states`` (embedding output first); padding
        positions (``attention_mask == 0``) are left out."""
        student = self._layer_states(student_hidden_states, self.student_layers, "student")
        teacher = self._layer_states(teacher_hidden_states, self.teacher_layers, "teacher")
        teacher = [teacher[i] for i in self.matched_layers]
        device, shape = student[0].device, student[0].shape[:2]
        if any(h.shape[:2] != shape for h in (*student, *teacher)):
            raise ValueError(f"student and teacher hidden states must share [batch, seq] = {tuple(shape)}")
        rows = None  # the real tokens' rows of the flattened [batch * seq, d] states
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(shape):
                raise ValueError(f"attention_mask must be [batch, seq] = {tuple(shape)}, got "
                                 f"{tuple(attention_mask.shape)}")
            rows = attention_mask.to(device).reshape(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                raise ValueError("attention_mask keeps no position: nothing to distil")
            if rows.numel() == attention_mask.numel():
                rows = None

        def tokens(h: torch.Tensor) -> torch.Tensor:  # [real tokens, d] in fp32
            h = h.to(device).reshape(-1, self.hidden_size)
            return (h if rows is None else h.index_select(0, rows)).float()

        with torch.autocast(device.type, enabled=False):
            s = [tokens(h) for h in student]
            t = [tokens(h).detach() for h in teacher]
            with torch.no_grad():
                costs = torch.empty(len(t), len(s), device=device)
                for j, sj in enumerate(s):
                    mapped = self.linear(sj)
                    for i, ti in enumerate(t):
                        costs[i, j] = _mse(mapped, ti)
            matching = monotone_matching(costs)
            mapped = {j: self.linear(s[j]) for j in sorted(set(matching))}
            loss = torch.stack([_mse(mapped[j], ti) for j, ti in zip(matching, t)]).sum()
        return loss, matching


class SharedTeacher(nn.Module):
    """The teacher, run once per batch (eval mode, no gradients, with hidden states) for every loss that reads it.

    Calling it with inputs equal to the previous call's (same keys, ``torch.equal`` tensors) returns the previous
    outputs instead of running the teacher again; :meth:`clear` drops them. Give it as ``teacher`` to
    :class:`~structprune.training.trainer.PruningLoss` and to :func:`layerwise_loss_fn`, so that the logit and the
    layer distillation of one step share one teacher forward.
    """

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._inputs: dict | None = None
        self._outputs = None
        self.forwards = 0  # how many times the teacher ran

    @staticmethod
    def _same(a: Mapping, b: Mapping) -> bool:
        if a.keys() != b.keys():
            return False
        for k, v in a.items():
            w = b[k]
            if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor):
                return False
            if isinstance(v, torch.Tensor):
                if v.device != w.device or v.shape != w.shape or not torch.equal(v, w):
                    return False
            elif v != w:
                return False
        return True

    @torch.no_grad()
    def forward(self, **inputs):
        if self._outputs is not None and self._same(inputs, self._inputs):
            return self._outputs
        if self.teacher.training:
            self.teacher.eval()
        self._outputs = self.teacher(**inputs, output_hidden_states=True)
        self._inputs = dict(inputs)
        self.forwards += 1
        return self._outputs

    def clear(self) -> None:
        self._inputs = self._outputs = None


def layerwise_loss_fn(teacher: SharedTeacher, distiller: LayerwiseDistiller, weight: float = DEFAULT_LAYER_WEIGHT,
                      inner: Callable | None = None, *, index_key: str = "feature_index",
                      log_path: str | Path | None = None, start_step: int = 0, log_every: int = 10) -> Callable:
    """An ``extra_loss_fn(model, batch, outputs)`` for :func:`~structprune.qa.train.train_qa`:
    ``weight * layer_loss`` plus ``inner``'s extra loss (e.g. logit KD and the L0 penalty of a
    :class:`~structprune.training.trainer.PruningLoss` built with the same ``teacher``).

    The student must be called with ``output_hidden_states=True`` (``train_qa(model_kwargs=MODEL_KWARGS)``).
    With ``log_path``, one JSON line every ``log_every`` steps (counted from ``start_step``, the step a resumed run
    starts at): the step, the mean unweighted layer loss over the ``steps`` since the previous line of this process,
    the latest matching and the teacher layers it matches.
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    log_path = Path(log_path) if log_path is not None else None
    state = {"step": start_step, "sum": 0.0, "n": 0}

    def fn(model, batch, outputs):
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None:
            raise ValueError("the student returned no hidden_states: call it with output_hidden_states=True "
                             "(train_qa(..., model_kwargs=MODEL_KWARGS))")
        device = next(teacher.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in model_inputs(batch, drop=(index_key,)).items()}
        try:
            taught = teacher(**inputs)
            loss, matching = distiller(hidden, taught.hidden_states, batch.get("attention_mask"))
            extra = weight * loss
            if inner is not None:
                extra = extra + inner(model, batch, outputs)
        finally:
            teacher.clear()
        state["step"] += 1
        state["sum"] += loss.detach()
        state["n"] += 1
        if log_path is not None and state["step"] % log_every == 0:
            record = {"step": state["step"], "steps": state["n"], "layer_loss": float(state["sum"]) / state["n"],
                      "matching": matching, "teacher_layers": distiller.matched_layers}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            state["sum"], state["n"] = 0.0, 0
        return extra

    return fn


__all__ = ["DEFAULT_LAYER_WEIGHT", "LOG_FILE", "MODEL_KWARGS", "LayerwiseDistiller", "SharedTeacher",
           "default_teacher_layers", "layerwise_loss_fn", "monotone_matching"]
