"""The extractive-QA task loss, shared by the plain training loop (``qa.train``) and the Trainer integration."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qa_task_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
                 end_positions: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropies in fp32, as ``BertForQuestionAnswering`` computes its loss:
    positions outside the sequence are clamped to its length and ignored."""
    n = start_logits.size(-1)
    start = F.cross_entropy(start_logits.float(), start_positions.reshape(-1).clamp(0, n), ignore_index=n)
    end = F.cross_entropy(end_logits.float(), end_positions.reshape(-1).clamp(0, n), ignore_index=n)
    return (start + end) / 2
