"""Knowledge distillation of a pruned student from the unpruned teacher: QA (McCarley et al. 2019 distil the pruned
model from the full one with a KL loss on the start and end logits) and causal LMs (:func:`lm_distillation_loss`, the
same KL with temperature on the next-token logits over the vocabulary).

Defaults: ``temperature=2.0`` and ``alpha=0.5`` (half KD loss, half task loss). These are the defaults of
Hugging Face's SQuAD distillation recipe (``run_squad_w_distillation.py``: ``alpha_ce=0.5``,
``alpha_squad=0.5``, ``temperature=2.0``), the public KL-on-start/end setup closest to McCarley et al.'s;
we could not check the exact T and alpha of their paper offline, so treat these as a starting point to
tune. T = 2 softens the span distributions enough to pass on the teacher's ranking of near-miss spans, and
the T^2 factor keeps the KD gradient's scale independent of T (Hinton et al. 2015).

Teacher logits come either on the fly (:func:`teacher_logits`, teacher in eval mode under ``no_grad``) or
from a :class:`TeacherCache` computed once and stored as safetensors, keyed by feature index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from structprune.atomic import set_default_mode

DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5
LABEL_KEYS = ("start_positions", "end_positions", "labels")
_MASKED = -1e9  # logit given to positions outside ``mask`` (finite, so no inf - inf)


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    s = student.float() / temperature
    t = teacher.detach().float() / temperature
    if mask is not None:
        keep = mask.to(torch.bool)
        s = s.masked_fill(~keep, _MASKED)
        t = t.masked_fill(~keep, _MASKED)
    # KL(p_t || p_s) summed over positions, mean over the batch
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")


def distillation_loss(student_start: torch.Tensor, student_end: torch.Tensor, teacher_start: torch.Tensor,
                      teacher_end: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * (KL(softmax(t_start/T) || softmax(s_start/T)) + KL(end ...)) / 2``, mean over the batch.

    Logits are ``[batch, seq]``; teacher logits are detached. ``mask`` (``[batch, seq]``, 1 = real token)
    leaves padding positions out of both distributions. Computed in fp32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, s, t in (("start", student_start, teacher_start), ("end", student_end, teacher_end)):
        if s.shape != t.shape:
            raise ValueError(f"student {name} logits have shape {tuple(s.shape)}, teacher's {tuple(t.shape)}")
    kd = _kl(student_start, teacher_start, temperature, mask) + _kl(student_end, teacher_end, temperature, mask)
    return kd * (temperature ** 2) / 2.0


def qa_distill_loss(task_loss: torch.Tensor | None, student_start: torch.Tensor, student_end: torch.Tensor,
                    teacher_start: torch.Tensor, teacher_end: torch.Tensor, alpha: float = DEFAULT_ALPHA,
                    temperature: float = DEFAULT_TEMPERATURE, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * KD + (1 - alpha) * task_loss`` (``task_loss`` None: KD alone). ``alpha=1`` is pure
    distillation; see the module docstring for the defaults."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kd = distillation_loss(student_start, student_end, teacher_start, teacher_end, temperature, mask)
    if task_loss is None:
        return kd
    return alpha * kd + (1.0 - alpha) * task_loss


def lm_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token distillation of a causal LM: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the vocabulary at
    each position, averaged over the real tokens.

    ``student`` / ``teacher``: logits ``[batch, seq, vocab]`` (the teacher's detached); ``mask`` (``[batch, seq]``,
    1 = real token, e.g. the ``attention_mask``) leaves padding positions out; None counts every position.
    Computed in fp32. Both models predict the next token at the same positions, so no shift is needed."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(f"student and teacher logits must both be [batch, seq, vocab]; got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(student.shape[:2]):
        raise ValueError(f"mask must be [batch, seq] = {tuple(student.shape[:2])}, got {tuple(mask.shape)}")
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)  # KL(p_t || p_s) at each position
    if mask is None:
        return per_token.mean() * temperature ** 2
    keep = mask.to(per_token.device).bool()
    return per_token[keep].sum() / keep.sum().clamp(min=1) * temperature ** 2


def model_inputs(batch: Mapping, drop: Sequence[str] = ()) -> dict:
    """The batch without labels and the given extra keys (what the teacher is called with)."""
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS and k not in drop}


@torch.no_grad()
def teacher_logits(teacher: nn.Module, batch: Mapping, drop: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits of ``teacher`` on ``batch`` in eval mode without gradients (labels are not passed)."""
    if teacher.training:
        teacher.eval()
    out = teacher(**model_inputs(batch, drop))
    return out.start_logits.detach(), out.end_logits.detach()


@torch.no_grad()
def teacher_lm_logits(teacher: nn.Module, batch: Mapping, drop: Sequence[str] = ()) -> torch.Tensor:
    """``[batch, seq, vocab]`` next-token logits of a causal-LM ``teacher`` (eval, no gradients, no labels)."""
    if teacher.training:
        teacher.eval()
    return teacher(**model_inputs(batch, drop)).logits.detach()


class TeacherCache:
    """Teacher start/end logits keyed by feature index, stored as safetensors.

    Each feature's logits are kept up to its real length (the attention-mask sum; features are right-padded,
    as BERT/RoBERTa tokenizers do); :meth:`get` pads them to
    the batch's sequence length with a very negative logit, so padding positions get teacher probability 0.
    Use with ``mask=attention_mask`` in :func:`distillation_loss` to match on-the-fly teacher logits exactly.
    """

    def __init__(self):
        self._start: dict[int, torch.Tensor] = {}
        self._end: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._start)

    def __contains__(self, index: int) -> bool:
        return int(index) in self._start

    def add(self, indices, start: torch.Tensor, end: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        indices = torch.as_tensor(indices).flatten().tolist()
        lengths = (attention_mask.sum(-1).tolist() if attention_mask is not None else [start.shape[-1]] * len(indices))
        for row, (i, n) in enumerate(zip(indices, lengths)):
            n = int(n)
            self._start[int(i)] = start[row, :n].detach().float().cpu().clone()
            self._end[int(i)] = end[row, :n].detach().float().cpu().clone()

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, batches: Iterable[Mapping], index_key: str = "feature_index") -> "TeacherCache":
        """Run ``teacher`` (eval, no_grad) over ``batches``, each carrying ``index_key`` (feature indices)."""
        cache = cls()
        device = next(teacher.parameters()).device
        for batch in batches:
            if index_key not in batch:
                raise KeyError(f"batches must carry {index_key!r} (the feature index) to be cached")
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            start, end = teacher_logits(teacher, batch, drop=(index_key,))
            cache.add(batch[index_key], start, end, batch.get("attention_mask"))
        return cache

    def get(self, indices, seq_len: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, seq_len]`` start and end logits for ``indices`` (padding positions get a very negative
        logit). Raises KeyError for an index that was never cached."""
        rows = torch.as_tensor(indices).flatten().tolist()
        missing = [i for i in rows if int(i) not in self._start]
        if missing:
            raise KeyError(f"no cached teacher logits for feature indices {missing[:5]}")
        start = torch.full((len(rows), seq_len), _MASKED)
        end = torch.full((len(rows), seq_len), _MASKED)
        for r, i in enumerate(rows):
            s, e = self._start[int(i)], self._end[int(i)]
            if s.numel() > seq_len:
                raise ValueError(f"cached logits of feature {i} have {s.numel()} real positions, batch has {seq_len}")
            start[r, : s.numel()] = s
            end[r, : e.numel()] = e
        return start.to(device), end.to(device)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        idx = sorted(self._start)
        lengths = torch.tensor([self._start[i].numel() for i in idx], dtype=torch.int64)
        tensors = {
            "indices": torch.tensor(idx, dtype=torch.int64),
            "lengths": lengths,
            "start": torch.cat([self._start[i] for i in idx]) if idx else torch.zeros(0),
            "end": torch.cat([self._end[i] for i in idx]) if idx else torch.zeros(0),
        }
        save_file(tensors, str(path), metadata={"format": "structprune.TeacherCache/1"})
        set_default_mode(path)  # safetensors writes 0600
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TeacherCache":
        t = load_file(str(path))
        cache = cls()
        lengths = t["lengths"].tolist()
        for i, s, e in zip(t["indices"].tolist(), t["start"].split(lengths), t["end"].split(lengths)):
            cache._start[int(i)] = s.clone()
            cache._end[int(i)] = e.clone()
        return cache
