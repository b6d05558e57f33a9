"""structprune.tools.timing: alternation order, per-pair ratios, spreads and argument checks (a fake clock, no timing)."""
import pytest

from structprune.tools.timing import Spread, compare, sample


class FakeClock:
    """A clock that each callable advances by its own cost; ``load`` adds time to every call while it is set."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self):
        return self.now

    def callable(self, name, cost, load=lambda i: 0.0):
        def fn():
            self.now += cost + load(len(self.calls))
            self.calls.append(name)
        return fn


def test_compare_alternates_and_takes_per_pair_ratios():
    clock = FakeClock()
    # a load that doubles every call from the 8th on: separate medians would be skewed, per-pair ratios are not
    load = lambda i: 0.0 if i < 8 else 1.0  # noqa: E731
    fns = {"dense": clock.callable("dense", 2.0, load), "pruned": clock.callable("pruned", 1.0, load)}
    t = compare(fns, warmup=1, repeats=6, clock=clock, shapes="batch 2 x seq 3")
    # warm-up round then rounds in alternating order: A B | A B, B A, A B, ...
    assert clock.calls == ["dense", "pruned", "dense", "pruned", "pruned", "dense", "dense", "pruned",
                           "pruned", "dense", "dense", "pruned", "pruned", "dense"]
    assert t.seconds["dense"][:4] == [2.0, 2.0, 2.0, 3.0]  # the load starts at call 8 (round 3)
    assert t.ratios["pruned"][0] == 2.0 and t.ratios["pruned"][-1] == 1.5
    assert t.speedup("dense") == Spread(1.0, 1.0, 1.0)
    assert t.threads >= 1 and "batch 2 x seq 3" in t.describe() and "dense/pruned" in t.describe()
    d = t.to_dict()
    assert d["sides"]["pruned"]["ratio_median"] == pytest.approx(t.speedup("pruned").median)


def test_compare_baseline_and_three_sides():
    clock = FakeClock()
    fns = {n: clock.callable(n, c) for n, c in (("a", 1.0), ("b", 4.0), ("c", 2.0))}
    t = compare(fns, warmup=0, repeats=3, baseline="b", clock=clock)
    assert t.baseline == "b" and set(t.ratios) == {"a", "c"}
    assert t.speedup("a").median == 4.0 and t.speedup("c").median == 2.0


def test_min_time_repeats_calls_within_a_sample():
    clock = FakeClock()
    t = compare({"x": clock.callable("x", 0.5), "y": clock.callable("y", 0.25)}, warmup=0, repeats=2,
                min_time=1.0, clock=clock)
    assert t.calls_per_sample == 4 and t.seconds["x"] == [0.5, 0.5]
    samples, number = sample(clock.callable("z", 0.1), warmup=1, repeats=3, min_time=0.35, clock=clock)
    assert number == 4 and samples == pytest.approx([0.1] * 3)


def test_number_fixes_the_calls_per_sample():
    clock = FakeClock()
    t = compare({"x": clock.callable("x", 0.5), "y": clock.callable("y", 0.25)}, warmup=1, repeats=2, number=3,
                clock=clock)
    assert t.calls_per_sample == 3 and t.seconds["x"] == [0.5, 0.5] and clock.calls.count("x") == 1 + 2 * 3
    samples, number = sample(clock.callable("z", 0.1), warmup=0, repeats=2, number=5, clock=clock)
    assert number == 5 and samples == pytest.approx([0.1] * 2)
    with pytest.raises(ValueError, match="not both"):
        sample(lambda: None, min_time=0.1, number=2)
    with pytest.raises(ValueError, match="number must be an int >= 1"):
        compare({"a": lambda: None, "b": lambda: None}, number=0)


def test_spread():
    s = Spread.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median == 3.0 and s.q1 == 2.0 and s.q3 == 4.0 and s.iqr == 2.0
    assert s.rel_halfwidth == pytest.approx(1 / 3)
    assert Spread.of([5.0]).rel_halfwidth == 0.0
    with pytest.raises(ValueError, match="no values"):
        Spread.of([])


@pytest.mark.parametrize("kwargs, match", [
    (dict(repeats=0), "repeats must be an int >= 1"),
    (dict(warmup=-1), "warmup must be an int >= 0"),
    (dict(min_time=-1.0), "min_time must be >= 0"),
    (dict(baseline="nope"), "baseline 'nope' is not one of"),
])
def test_compare_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare({"a": lambda: None, "b": lambda: None}, **kwargs)


def test_compare_needs_two_sides():
    with pytest.raises(ValueError, match="at least two"):
        compare({"a": lambda: None})
