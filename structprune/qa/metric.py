"""The official SQuAD 2.0 evaluation, reimplemented from ``evaluate-v2.0.py`` (Rajpurkar et al., 2018).

Function names and arithmetic follow the official script line by line, so numbers match it exactly:

* answers are normalised (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed);
* exact match and token F1 take the max over gold answers; gold answers that normalise to ``""`` are dropped
  and an unanswerable question has the single gold answer ``""`` (F1 is 1 if the prediction is empty too,
  0 otherwise);
* a question whose ``na_prob > na_prob_thresh`` counts as predicted unanswerable;
* ``best_exact`` / ``best_f1`` are the scores at the best ``na_prob`` threshold (``find_best_thresh``).

Deliberate differences, all where the official script has no behaviour worth copying: a missing
prediction raises ``ValueError`` (the official script prints it and then fails with a ``KeyError``); the
``best_*`` keys are always present (the official script adds them only when given an ``na_prob`` file; with
all ``na_probs`` 0, as it then assumes, they are still well defined); and an empty HasAns/NoAns split is
reported with total 0 and NaN scores instead of leaving its keys out. Scores are in percent.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(_ARTICLES, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        return "".join(ch for ch in text if ch not in _PUNCTUATION)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def get_tokens(s: str) -> list[str]:
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise.
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def references_from(data: Any) -> dict[str, list[str]]:
    """``id -> gold answer texts`` (empty list when unanswerable) from any of:

    * a mapping ``id -> [texts]`` (returned as a copy);
    * a squad_v2-schema ``datasets.Dataset`` or an iterable of rows with ``id`` and ``answers``
      (``answers`` a ``{"text": [...]}`` dict, or a list of ``{"text": ...}`` dicts);
    * an official SQuAD JSON object ``{"data": [articles]}`` or its ``data`` list of articles.
    """
    if isinstance(data, Mapping) and "data" in data and isinstance(data["data"], list):
        data = data["data"]
    if isinstance(data, Mapping):
        return {str(k): list(v) for k, v in data.items()}
    if hasattr(data, "column_names"):
        return {str(i): list(a["text"]) for i, a in zip(data["id"], data["answers"])}
    refs: dict[str, list[str]] = {}
    for row in data:
        if "paragraphs" in row:  # an official SQuAD article
            for p in row["paragraphs"]:
                for qa in p["qas"]:
                    refs[str(qa["id"])] = [a["text"] for a in qa["answers"]]
            continue
        answers = row["answers"]
        refs[str(row["id"])] = list(answers["text"]) if isinstance(answers, Mapping) else [a["text"] for a in answers]
    return refs


def make_qid_to_has_ans(references: Mapping[str, Sequence[str]]) -> dict[str, bool]:
    return {qid: bool(answers) for qid, answers in references.items()}


def get_raw_scores(
    references: Mapping[str, Sequence[str]], preds: Mapping[str, str]
) -> tuple[dict[str, int], dict[str, float]]:
    exact_scores, f1_scores = {}, {}
    missing = [qid for qid in references if qid not in preds]
    if missing:
        raise ValueError(
            f"missing predictions for {len(missing)} of {len(references)} questions, e.g. {missing[:5]}"
        )
    for qid, answers in references.items():
        gold_answers = [a for a in answers if normalize_answer(a)]
        if not gold_answers:
            # For unanswerable questions, only correct answer is empty string.
            gold_answers = [""]
        a_pred = preds[qid]
        # Take max over all gold answers.
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def apply_no_ans_threshold(scores, na_probs, qid_to_has_ans, na_prob_thresh):
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        if pred_na:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = s
    return new_scores


def make_eval_dict(exact_scores, f1_scores, qid_list=None):
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict(
            [
                ("exact", 100.0 * sum(exact_scores.values()) / total),
                ("f1", 100.0 * sum(f1_scores.values()) / total),
                ("total", total),
            ]
        )
    total = len(qid_list)
    return collections.OrderedDict(
        [
            ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
            ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
            ("total", total),
        ]
    )


def merge_eval(main_eval, new_eval, prefix):
    for k in new_eval:
        main_eval[f"{prefix}_{k}"] = new_eval[k]


def find_best_thresh(preds, scores, na_probs, qid_to_has_ans):
    """Sweep the ``na_prob`` threshold over the sorted ``na_probs``; returns (best score in %, threshold)."""
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            if preds[qid]:
                diff = -1
            else:
                diff = 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def find_all_best_thresh(main_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans):
    best_exact, exact_thresh = find_best_thresh(preds, exact_raw, na_probs, qid_to_has_ans)
    best_f1, f1_thresh = find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
    main_eval["best_exact"] = best_exact
    main_eval["best_exact_thresh"] = exact_thresh
    main_eval["best_f1"] = best_f1
    main_eval["best_f1_thresh"] = f1_thresh


def squad_v2_metric(
    predictions: Mapping[str, str],
    references: Any,
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """Score predictions like the official ``evaluate-v2.0.py``.

    Args:
        predictions: ``id -> answer text`` (``""`` for no answer); extra ids are ignored.
        references: gold answers in any form :func:`references_from` accepts.
        na_probs: ``id -> no-answer score`` (a probability, or a null-score diff from
            :func:`~structprune.qa.postprocess.postprocess_qa_predictions`); default 0 for every prediction.
        na_prob_thresh: a question with ``na_prob > na_prob_thresh`` counts as answered ``""``.

    Returns:
        ``exact, f1, total, HasAns_exact, HasAns_f1, HasAns_total, NoAns_exact, NoAns_f1, NoAns_total,
        best_exact, best_exact_thresh, best_f1, best_f1_thresh``; scores in percent. Where the references
        hold no answerable (or no unanswerable) question, that split has total 0 and NaN scores.
    """
    refs = references_from(references)
    if not refs:
        raise ValueError("no reference questions to score")
    preds = {str(k): v for k, v in predictions.items()}
    if na_probs is None:
        na_probs = {k: 0.0 for k in preds}
    else:
        na_probs = {str(k): float(v) for k, v in na_probs.items()}
        missing = [qid for qid in refs if qid not in na_probs]
        if missing:
            raise ValueError(f"na_probs lacks {len(missing)} of {len(refs)} questions, e.g. {missing[:5]}")
    qid_to_has_ans = make_qid_to_has_ans(refs)
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = get_raw_scores(refs, preds)
    exact_thresh = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    for prefix, qids in (("HasAns", has_ans_qids), ("NoAns", no_ans_qids)):
        if qids:
            merge_eval(out_eval, make_eval_dict(exact_thresh, f1_thresh, qid_list=qids), prefix)
        else:  # the official script leaves the keys out; NaN keeps tables and dashboards uniform
            merge_eval(out_eval, {"exact": float("nan"), "f1": float("nan"), "total": 0}, prefix)
    find_all_best_thresh(out_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans)
    return dict(out_eval)

