"""Paired bootstrap intervals of F1 differences (structprune.qa.bootstrap)."""
import numpy as np
import pytest

from structprune.qa.bootstrap import compare_predictions, paired_bootstrap
from structprune.qa.metric import squad_v2_metric

REFS = {f"q{i}": ([f"answer {i}"] if i % 3 else []) for i in range(60)}  # 40 answerable, 20 not


def _predictions(seed: int, right: float) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    out = {}
    for qid, answers in REFS.items():
        correct = rng.random() < right
        out[qid] = (answers[0] if answers else "") if correct else ("" if answers else "something")
    return out


def test_difference_is_the_metric_difference_and_inside_its_interval():
    a, b = _predictions(0, 0.8), _predictions(1, 0.5)
    result = compare_predictions(a, b, REFS, resamples=500)
    ma, mb = squad_v2_metric(a, REFS), squad_v2_metric(b, REFS)
    assert result["f1"].diff == pytest.approx(ma["f1"] - mb["f1"])
    assert result["HasAns_f1"].diff == pytest.approx(ma["HasAns_f1"] - mb["HasAns_f1"])
    assert result["HasAns_f1"].questions == 40 and result["f1"].questions == 60
    for d in result.values():
        assert d.lo <= d.diff <= d.hi and d.lo < d.hi


def test_identical_models_give_a_zero_width_interval_and_seeds_repeat():
    a = _predictions(0, 0.7)
    same = compare_predictions(a, dict(a), REFS)["f1"]
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)
    b = _predictions(2, 0.6)
    assert compare_predictions(a, b, REFS, seed=3) == compare_predictions(a, b, REFS, seed=3)


def test_interval_narrows_with_more_questions():
    rng = np.random.default_rng(0)
    small = {str(i): float(rng.random() < 0.6) for i in range(50)}
    other = {str(i): float(rng.random() < 0.5) for i in range(50)}
    big = {str(i): small[str(i % 50)] for i in range(5000)}
    big_other = {str(i): other[str(i % 50)] for i in range(5000)}
    narrow, wide = paired_bootstrap(big, big_other), paired_bootstrap(small, other)
    assert narrow.hi - narrow.lo < (wide.hi - wide.lo) / 5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="lack a score"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap({"a": 1.0}, {"a": 1.0}, resamples=0)
