"""Paired bootstrap confidence intervals for the difference between two QA models on the same questions.

Both models' predictions are scored per question with the official SQuAD 2.0 F1 (:mod:`.metric`); the questions
are resampled with replacement (the same resample for both models, hence *paired*) and the difference of the mean
F1 recomputed each time; the interval is the percentile interval of those differences. HasAns F1 resamples among
the answerable questions only. A difference whose interval excludes 0 is unlikely to be resampling noise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from structprune.qa.metric import get_raw_scores, make_qid_to_has_ans, references_from


@dataclass(frozen=True)
class Difference:
    """``a - b`` in F1 points (mean over the questions), with its paired bootstrap percentile interval."""

    diff: float
    lo: float
    hi: float
    questions: int
    resamples: int
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


def per_question_f1(predictions: Mapping[str, str], references: Any) -> tuple[dict[str, float], dict[str, bool]]:
    """Official per-question F1 (0..1) of ``predictions`` and whether each question has an answer."""
    refs = references_from(references)
    _, f1 = get_raw_scores(refs, {str(k): v for k, v in predictions.items()})
    return f1, make_qid_to_has_ans(refs)


def paired_bootstrap(scores_a: Mapping[str, float], scores_b: Mapping[str, float], qids=None,
                     resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Difference:
    """Difference of mean scores (``a - b``, in percent points) over ``qids`` (default: all of ``scores_a``)
    with its paired bootstrap interval."""
    qids = list(scores_a) if qids is None else list(qids)
    if not qids:
        raise ValueError("no questions to compare")
    missing = [q for q in qids if q not in scores_a or q not in scores_b]
    if missing:
        raise ValueError(f"{len(missing)} questions lack a score in one of the two models, e.g. {missing[:5]}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    delta = 100.0 * (np.array([scores_a[q] for q in qids]) - np.array([scores_b[q] for q in qids]))
    rng = np.random.default_rng(seed)
    means = delta[rng.integers(0, len(delta), size=(resamples, len(delta)))].mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return Difference(float(delta.mean()), float(lo), float(hi), len(qids), resamples, confidence)


def compare_predictions(predictions_a: Mapping[str, str], predictions_b: Mapping[str, str], references: Any,
                        resamples: int = 1000, seed: int = 0) -> dict[str, Difference]:
    """``{"f1": ..., "HasAns_f1": ...}``: paired bootstrap differences of model a minus model b."""
    f1_a, has_answer = per_question_f1(predictions_a, references)
    f1_b, _ = per_question_f1(predictions_b, references)
    answerable = [q for q, has in has_answer.items() if has]
    out = {"f1": paired_bootstrap(f1_a, f1_b, list(has_answer), resamples, seed=seed)}
    if answerable:
        out["HasAns_f1"] = paired_bootstrap(f1_a, f1_b, answerable, resamples, seed=seed)
    return out
