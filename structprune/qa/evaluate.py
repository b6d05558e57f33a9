"""Evaluating a question-answering model on SQuAD 2.0: features -> forward -> n-best -> official metric."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from structprune.qa.data import load_squad
from structprune.qa.features import build_eval_features, collate
from structprune.qa.metric import squad_v2_metric
from structprune.qa.postprocess import apply_null_threshold, best_spans


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict_logits(
    model: torch.nn.Module,
    tokenizer,
    features,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Run ``model`` over eval features in order (right-padded batches, ``inference_mode``, eval mode).

    Returns per-feature float32 start and end logits (unpadded) and the seconds spent in the forward passes
    (device-synchronised; tokenisation and post-processing excluded). The model's train/eval mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    was_training = model.training
    model.eval()
    input_names = [n for n in tokenizer.model_input_names if n in features.column_names]
    inputs = features.select_columns(input_names)
    lengths = [len(ids) for ids in inputs["input_ids"]]
    all_start, all_end = [], []
    seconds = 0.0
    try:
        with torch.inference_mode():
            for begin in tqdm(
                range(0, len(features), batch_size), desc="evaluate", disable=not progress, unit="batch"
            ):
                rows = inputs[begin : begin + batch_size]
                batch = {k: v.to(device, non_blocking=True) for k, v in collate(rows, tokenizer, input_names).items()}
                _synchronize(device)
                t0 = time.perf_counter()
                outputs = model(**batch)
                _synchronize(device)
                seconds += time.perf_counter() - t0
                start = outputs.start_logits.float().cpu().numpy()
                end = outputs.end_logits.float().cpu().numpy()
                for j in range(start.shape[0]):
                    n = lengths[begin + j]
                    all_start.append(start[j, :n])
                    all_end.append(end[j, :n])
    finally:
        model.train(was_training)
    return all_start, all_end, seconds


def evaluate_qa(
    model: torch.nn.Module,
    tokenizer,
    dataset,
    max_length: int = 384,
    doc_stride: int = 128,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = True,
    threshold: float = 0.0,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    max_query_length: int = 64,
    return_always: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Evaluate a Hugging Face-style QA model (outputs with ``.start_logits`` / ``.end_logits``) on SQuAD 2.0.

    Args:
        model: any model called as ``model(input_ids=..., attention_mask=..., [token_type_ids=...])``; BERT,
            RoBERTa and structprune-patched models alike. Moved to ``device`` when one is given, otherwise
            run where its parameters are.
        tokenizer: the model's fast tokenizer.
        dataset: squad_v2-schema examples, or anything :func:`~structprune.qa.data.load_squad` accepts.
        threshold: predict no answer where ``null score - best span score > threshold``.
        return_always: also return the always-answering predictions (each question's best non-null span).

    Returns:
        ``(metrics, predictions)``, and the always-answering predictions third with ``return_always``.
        ``metrics`` holds the official SQuAD 2.0 keys (``exact``, ``f1``, ``HasAns_*``, ``NoAns_*``, ``best_*``;
        the ``best_*_thresh`` values are thresholds on the null-score diff, usable as ``threshold``), the scores
        of the always-answering predictions (``always_exact``, ``always_f1`` and, where answerable questions
        exist, ``always_HasAns_exact``, ``always_HasAns_f1``: reading comprehension apart from the null
        threshold), ``seconds`` (model forward time), ``samples_per_second`` (features per forward second, as
        the Hugging Face Trainer counts eval samples), ``num_examples`` and ``num_features``. ``predictions``
        maps question id to answer text (``""`` for no answer).
    """
    if not hasattr(dataset, "column_names"):
        dataset = load_squad(dataset)
    features = build_eval_features(
        dataset, tokenizer, max_length=max_length, doc_stride=doc_stride, max_query_length=max_query_length
    )
    starts, ends, seconds = predict_logits(model, tokenizer, features, batch_size, device, progress)
    spans, diffs = best_spans(dataset, features, starts, ends, n_best_size=n_best_size,
                              max_answer_length=max_answer_length)
    predictions = apply_null_threshold(spans, diffs, threshold)
    # na_prob_thresh = threshold: the questions it marks unanswerable are exactly those already predicted "",
    # so the official re-thresholding changes nothing and best_* sweeps the same scale.
    metrics = squad_v2_metric(predictions, dataset, na_probs=diffs, na_prob_thresh=threshold)
    always = squad_v2_metric(spans, dataset)
    metrics.update({f"always_{k}": always[k] for k in ("exact", "f1", "HasAns_exact", "HasAns_f1") if k in always})
    metrics.update(
        seconds=seconds,
        samples_per_second=len(features) / seconds if seconds > 0 else float("inf"),
        num_examples=len(dataset),
        num_features=len(features),
    )
    return (metrics, predictions, spans) if return_always else (metrics, predictions)
