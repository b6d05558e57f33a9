"""The SQuAD 2.0 metric against scores computed by hand on crafted predictions."""
import math

import pytest

pytest.importorskip("datasets")

from structprune.qa.data import load_squad, squad_json_to_records  # noqa: E402
from structprune.qa.metric import compute_exact, compute_f1, normalize_answer, squad_v2_metric  # noqa: E402

KEYS = {
    "exact", "f1", "total",
    "HasAns_exact", "HasAns_f1", "HasAns_total",
    "NoAns_exact", "NoAns_f1", "NoAns_total",
    "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
}


def test_normalize_answer():
    assert normalize_answer("The Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("  A  cat,  an apple; the end. ") == "cat apple end"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert normalize_answer("") == ""


def test_exact_match_answerable():
    m = squad_v2_metric({"q1": "France"}, {"q1": ["France", "France"]})
    assert m["exact"] == 100.0 and m["f1"] == 100.0 and m["total"] == 1
    m = squad_v2_metric({"q1": "Germany"}, {"q1": ["France"]})
    assert m["exact"] == 0.0 and m["f1"] == 0.0


def test_partial_overlap_f1():
    # gold tokens (normalised): [10th, and, 11th, centuries]; pred: [in, 10th, century]; common: {10th}.
    precision, recall = 1 / 3, 1 / 4
    expected = 2 * precision * recall / (precision + recall)  # = 2/7
    assert compute_f1("the 10th and 11th centuries", "in the 10th century") == pytest.approx(expected)
    m = squad_v2_metric({"q": "in the 10th century"}, {"q": ["the 10th and 11th centuries"]})
    assert m["exact"] == 0.0
    assert m["f1"] == pytest.approx(100 * 2 / 7)


def test_repeated_tokens_count_once_per_occurrence():
    # gold [new, york, new, york], pred [new, york]: common = 2, P = 1, R = 1/2, F1 = 2/3.
    assert compute_f1("New York New York", "New York") == pytest.approx(2 / 3)


def test_unanswerable_questions():
    refs = {"na1": [], "na2": []}
    m = squad_v2_metric({"na1": "", "na2": "some span"}, refs)
    assert m["exact"] == 50.0 and m["f1"] == 50.0
    assert m["NoAns_total"] == 2 and m["NoAns_exact"] == 50.0
    # Empty prediction on an answerable question scores 0; a gold answer that normalises to "" is dropped.
    assert compute_f1("France", "") == 0 and compute_exact("", "") == 1
    m = squad_v2_metric({"q": ""}, {"q": ["the"]})  # only gold answer normalises to "": treated as no-answer
    assert m["exact"] == 100.0


def test_punctuation_and_articles():
    m = squad_v2_metric({"q": "eiffel tower"}, {"q": ["The Eiffel Tower!"]})
    assert m["exact"] == 100.0 and m["f1"] == 100.0


def test_max_over_gold_answers():
    gold = ["Denmark, Iceland and Norway", "Norway", "the kingdom of Norway"]
    m = squad_v2_metric({"q": "Norway"}, {"q": gold})
    assert m["exact"] == 100.0
    # pred [kingdom, norway]: vs [denmark, iceland, and, norway] F1 = 2*(1/2*1/4)/(3/4) = 1/3;
    # vs [norway] F1 = 2*(1/2*1)/(3/2) = 2/3; vs [kingdom, of, norway] F1 = 2*(1*2/3)/(5/3) = 4/5.
    m = squad_v2_metric({"q": "kingdom Norway"}, {"q": gold})
    assert m["exact"] == 0.0
    assert m["f1"] == pytest.approx(80.0)


def test_has_ans_no_ans_split():
    refs = {"a1": ["Paris"], "a2": ["blue whale"], "a3": ["1066"], "n1": [], "n2": []}
    preds = {"a1": "Paris", "a2": "whale", "a3": "", "n1": "", "n2": "London"}
    m = squad_v2_metric(preds, refs)
    assert set(m) == KEYS
    assert (m["total"], m["HasAns_total"], m["NoAns_total"]) == (5, 3, 2)
    # HasAns: EM 1,0,0; F1 1, 2/3 ([whale] vs [blue, whale]: P 1, R 1/2), 0.
    assert m["HasAns_exact"] == pytest.approx(100 / 3)
    assert m["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert m["NoAns_exact"] == 50.0 and m["NoAns_f1"] == 50.0
    assert m["exact"] == pytest.approx(100 * 2 / 5)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 5)


def test_empty_split_reported_as_nan():
    m = squad_v2_metric({"a": "x"}, {"a": ["x"]})
    assert set(m) == KEYS
    assert m["NoAns_total"] == 0 and math.isnan(m["NoAns_exact"])


def test_best_threshold():
    refs = {"q1": ["yes"], "q2": [], "q3": ["Rome"], "q4": []}
    preds = {"q1": "yes", "q2": "a wrong span", "q3": "Rome", "q4": ""}
    na = {"q1": 0.1, "q2": 0.8, "q3": 0.5, "q4": 0.3}
    m = squad_v2_metric(preds, refs, na_probs=na)
    # na_prob_thresh=1.0: nothing is overridden; correct: q1, q3, q4.
    assert m["exact"] == 75.0
    # Sweep in na order, starting from "everything unanswerable" = 2 correct (q2, q4):
    # q1 (0.1) +1 -> 3; q4 (0.3) +0 -> 3; q3 (0.5) +1 -> 4 (best, thresh 0.5); q2 (0.8) -1 -> 3.
    assert m["best_exact"] == 100.0 and m["best_exact_thresh"] == 0.5
    assert m["best_f1"] == 100.0 and m["best_f1_thresh"] == 0.5
    # Applying a threshold of 0.4: q3 and q2 count as "no answer" -> q1, q2, q4 correct.
    m = squad_v2_metric(preds, refs, na_probs=na, na_prob_thresh=0.4)
    assert m["exact"] == 75.0 and m["HasAns_exact"] == 50.0 and m["NoAns_exact"] == 100.0


def test_best_threshold_never_better_than_all_null():
    refs = {"q1": ["yes"], "q2": []}
    preds = {"q1": "no", "q2": "span"}
    m = squad_v2_metric(preds, refs, na_probs={"q1": 0.2, "q2": 0.7})
    assert m["exact"] == 0.0
    # Starting score: 1 (q2 as no-answer); q1 adds 0, q2 subtracts 1: best stays at the start, thresh 0.0.
    assert m["best_exact"] == 50.0 and m["best_exact_thresh"] == 0.0


def test_reference_forms_agree():
    squad = {
        "version": "v2.0",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Paris is the capital of France.",
                        "qas": [
                            {"id": "a", "question": "Capital?", "is_impossible": False,
                             "answers": [{"text": "Paris", "answer_start": 0}]},
                            {"id": "b", "question": "Moon?", "is_impossible": True, "answers": [],
                             "plausible_answers": [{"text": "France", "answer_start": 24}]},
                        ],
                    }
                ],
            }
        ],
    }
    preds = {"a": "paris", "b": "France"}
    expected = squad_v2_metric(preds, {"a": ["Paris"], "b": []})
    assert squad_v2_metric(preds, squad) == expected
    assert squad_v2_metric(preds, squad["data"]) == expected
    import datasets

    ds = load_squad(datasets.Dataset.from_list(squad_json_to_records(squad)))
    assert squad_v2_metric(preds, ds) == expected
    assert expected["exact"] == 50.0


def test_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match="missing predictions for 1 of 2"):
        squad_v2_metric({"a": "x"}, {"a": ["x"], "b": []})
