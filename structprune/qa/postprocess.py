"""From start/end logits of features to answer strings (SQuAD 2.0 n-best post-processing).

For each example, over all of its features:

* candidate spans are the pairs among the ``n_best_size`` highest start and end logits of a feature whose
  tokens are both context tokens (``offset_mapping`` not ``None``), with ``start <= end`` and at most
  ``max_answer_length`` tokens; a span scores ``start_logit + end_logit``;
* the null score is the CLS start + end logit, the *minimum* over the example's features (the feature
  most confident that an answer exists decides);
* ``null_score_diff = null_score - best_span_score``; the prediction is ``""`` when it exceeds
  ``threshold``, the best span's context text otherwise. An example without any valid span predicts ``""``
  with a diff of ``+inf``.

This follows ``postprocess_qa_predictions`` of the Hugging Face ``run_qa`` example (and the original
BERT ``run_squad.py``), whose diffs the official evaluation script reads as ``na_probs``.

:func:`best_spans` gives every question's best non-null span whatever the null score (the *always answering*
predictions, which measure reading comprehension apart from the null threshold); :func:`apply_null_threshold`
turns them into the thresholded predictions.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np


def postprocess_qa_predictions(
    examples,
    features,
    start_logits: Sequence[np.ndarray] | np.ndarray,
    end_logits: Sequence[np.ndarray] | np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Turn per-feature logits into predictions.

    Args:
        examples: rows with ``id`` and ``context`` (a squad_v2-schema ``Dataset`` or a list of dicts).
        features: eval features (see :func:`structprune.qa.features.build_eval_features`) with
            ``example_id``, ``offset_mapping`` and optionally ``cls_index`` (default 0), in the same order as
            the logits.
        start_logits, end_logits: one 1-D array per feature (lengths may differ; padding positions beyond
            ``len(offset_mapping)`` are ignored), or a 2-D array ``[num_features, seq_len]``.
        threshold: predict ``""`` where ``null_score_diff > threshold``.

    Returns:
        ``(predictions, null_score_diffs)``: ``id -> answer text`` (``""`` for no answer) and
        ``id -> null score - best span score``.
    """
    spans, diffs = best_spans(examples, features, start_logits, end_logits, n_best_size, max_answer_length)
    return apply_null_threshold(spans, diffs, threshold), diffs


def apply_null_threshold(spans: dict[str, str], diffs: dict[str, float], threshold: float) -> dict[str, str]:
    """The predictions at ``threshold``: ``""`` where ``null_score_diff > threshold``, the best span otherwise."""
    return {qid: "" if diffs[qid] > threshold else text for qid, text in spans.items()}


def best_spans(
    examples,
    features,
    start_logits: Sequence[np.ndarray] | np.ndarray,
    end_logits: Sequence[np.ndarray] | np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict[str, str], dict[str, float]]:
    """Every question's best non-null span, whatever its null score (the always-answering predictions; ``""``
    only where no valid span exists), and its null-score difference.

    Args:
        examples: rows with ``id`` and ``context`` (a squad_v2-schema ``Dataset`` or a list of dicts).
        features: eval features (see :func:`structprune.qa.features.build_eval_features`) with
            ``example_id``, ``offset_mapping`` and optionally ``cls_index`` (default 0), in the same order as
            the logits.
        start_logits, end_logits: one 1-D array per feature (lengths may differ; padding positions beyond
            ``len(offset_mapping)`` are ignored), or a 2-D array ``[num_features, seq_len]``.

    Returns:
        ``(spans, null_score_diffs)``: ``id -> best span text`` and ``id -> null score - best span score``
        (``+inf`` where no valid span exists).
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(
            f"expected one start and one end logit row per feature ({len(features)}), "
            f"got {len(start_logits)} and {len(end_logits)}"
        )
    feature_ids = features["example_id"] if hasattr(features, "column_names") else [f["example_id"] for f in features]
    offset_mappings = (
        features["offset_mapping"] if hasattr(features, "column_names") else [f["offset_mapping"] for f in features]
    )
    if hasattr(features, "column_names"):
        cls_indices = features["cls_index"] if "cls_index" in features.column_names else [0] * len(features)
    else:
        cls_indices = [f.get("cls_index", 0) for f in features]

    features_per_example = collections.defaultdict(list)
    for i, example_id in enumerate(feature_ids):
        features_per_example[example_id].append(i)

    spans: dict[str, str] = {}
    diffs: dict[str, float] = {}
    ids = examples["id"] if hasattr(examples, "column_names") else [e["id"] for e in examples]
    contexts = examples["context"] if hasattr(examples, "column_names") else [e["context"] for e in examples]
    for example_id, context in zip(ids, contexts):
        null_score = None
        best_score, best_span = -np.inf, None
        for fi in features_per_example.get(example_id, ()):
            starts = np.asarray(start_logits[fi], dtype=np.float64)
            ends = np.asarray(end_logits[fi], dtype=np.float64)
            offsets = offset_mappings[fi]
            n = min(len(offsets), len(starts), len(ends))
            starts, ends = starts[:n], ends[:n]
            cls = cls_indices[fi]
            feature_null = starts[cls] + ends[cls]
            if null_score is None or feature_null < null_score:
                null_score = feature_null
            is_context = np.fromiter((o is not None for o in offsets[:n]), dtype=bool, count=n)
            # The n_best_size largest logits over all tokens (best first), then kept if they are context.
            start_idx = np.argsort(-starts, kind="stable")[:n_best_size]
            end_idx = np.argsort(-ends, kind="stable")[:n_best_size]
            start_idx = start_idx[is_context[start_idx]]
            end_idx = end_idx[is_context[end_idx]]
            if len(start_idx) == 0 or len(end_idx) == 0:
                continue
            length = end_idx[None, :] - start_idx[:, None] + 1
            scores = np.where(
                (length >= 1) & (length <= max_answer_length),
                starts[start_idx][:, None] + ends[end_idx][None, :],
                -np.inf,
            )
            k = int(np.argmax(scores))  # first maximum in (start rank, end rank) order
            score = scores.flat[k]
            if score > best_score:
                s, e = start_idx[k // len(end_idx)], end_idx[k % len(end_idx)]
                best_score, best_span = score, (offsets[s][0], offsets[e][1])
        if null_score is None:
            raise ValueError(f"example {example_id!r} has no features; were the features built from these examples?")
        if best_span is None:
            diffs[example_id] = float("inf")
            spans[example_id] = ""
            continue
        diffs[example_id] = float(null_score - best_score)
        spans[example_id] = context[best_span[0] : best_span[1]]
    return spans, diffs
