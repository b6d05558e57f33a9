"""Perplexity of a causal LM: ``exp`` of the mean negative log-likelihood of every next token that is not padding."""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from structprune.lm.data import IGNORE


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"perplexity", "nll", "tokens"}`` over ``batches`` (``input_ids``, ``attention_mask``, ``labels`` with
    -100 at padding): the logits at position ``t`` predict the label at ``t + 1``; positions whose label is -100
    (padding, or where the attention mask is 0) are left out. Model in eval mode, fp32 sums."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = batch.get("labels", ids).to(device).masked_fill(mask == 0, IGNORE)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                                  reduction="sum")
            total += float(nll)
            count += int((target != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no token to predict: the data has no block with two or more real tokens")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


__all__ = ["perplexity"]
