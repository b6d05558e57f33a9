"""experiments/squad2/report.py on a tiny made-up runs folder (real dev questions, predictions derived from their
gold answers): the l0-full and layer-drop rows, the always-answering columns, the method pairs at equal speed and
the frontier plot."""
import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from structprune.qa.bootstrap import compare_predictions
from structprune.qa.data import load_squad
from structprune.qa.metric import squad_v2_metric

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT.parent / "shared" / "data" / "squad2" / "dev.json"
pytestmark = pytest.mark.skipif(not DEV.is_file(), reason=f"no SQuAD data at {DEV}")


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "experiments" / "squad2" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    """The first 60 questions of dev.json, as a SQuAD JSON file."""
    data = json.loads(DEV.read_text())
    kept, n = [], 0
    for article in data["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if n >= 60:
                break
            paragraphs.append(paragraph)
            n += len(paragraph["qas"])
        if paragraphs:
            kept.append({**article, "paragraphs": paragraphs})
        if n >= 60:
            break
    path = tmp_path_factory.mktemp("dev") / "dev.json"
    path.write_text(json.dumps({"version": data["version"], "data": kept}))
    return path


def answers(dev, seed: int, right: float, abstain: float) -> dict:
    """Predictions that give the gold answer with probability ``right``, else a wrong span or (``abstain``) none."""
    rng = random.Random(seed)
    out = {}
    for qid, gold, context in zip(dev["id"], dev["answers"], dev["context"]):
        text = gold["text"][0] if gold["text"] else context.split()[0]
        out[qid] = text if rng.random() < right else "" if rng.random() < abstain else context.split()[-1]
    return out


def write_run(runs: Path, name: str, metrics: dict, config: dict, dev, seed: int, right: float):
    run = runs / name
    (run / "train").mkdir(parents=True)
    scored = squad_v2_metric(answers(dev, seed, right, 0.5), dev)
    (run / "metrics.json").write_text(json.dumps({**scored, **metrics}))
    (run / "config.json").write_text(json.dumps({"command_line": "structprune prune", **config}))
    (run / "predictions.json").write_text(json.dumps(answers(dev, seed, right, 0.5)))
    (run / "train" / "log.jsonl").write_text(json.dumps({"event": "start", "total_steps": 10}) + "\n")
    (runs / "devpred" / name).mkdir(parents=True)
    (runs / "devpred" / name / "predictions.json").write_text(json.dumps(answers(dev, seed + 1, right, 0.7)))
    (runs / "devpred" / name / "predictions_always.json").write_text(json.dumps(answers(dev, seed + 2, right, 0.0)))


STUDENTS = [  # name, method recorded, config, speed-up, share answered right
    ("layerdrop-k3-distill", "layerdrop", {"method": "layerdrop", "keep_layers": 3}, 2.0, 0.5),
    ("layerdrop-k2-distill", "layerdrop", {"method": "layerdrop", "keep_layers": 2}, 3.2, 0.4),
    ("l0-full-speed3-distill", "l0", {"method": "l0", "full": True, "speedup": 3.0, "at": "32x192"}, 2.1, 0.6),
    ("l0-full-speed4-distill", "l0", {"method": "l0", "full": True, "speedup": 4.0, "at": "32x192"}, 3.0, 0.55),
    ("l0-h0.5-f0.3-distill", "l0", {"method": "l0", "heads": 0.5, "ffn": 0.3}, 2.25, 0.58),
]


@pytest.fixture(scope="module")
def results(report, dev_file, tmp_path_factory, monkeypatch_module):
    dev = load_squad(dev_file)
    runs, out = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("results")
    write_run(runs, "teacher", {}, {"command": "finetune"}, dev, 0, 0.7)
    (runs / "teacher" / "model").mkdir()
    (runs / "teacher" / "model" / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}))
    for i, (name, method, config, speedup, right) in enumerate(STUDENTS):
        layers = {"layers_kept": [1, 3, 5] if "k3" in name else [2, 5], "layers_total": 6} if method == "layerdrop" \
            else {}
        kept = 12 * len(layers["layers_kept"]) if layers else 36
        write_run(runs, name, {"method": method, "distill": True, "speedup": speedup, "heads_kept": kept,
                               "heads_total": 72, "ffn_kept": kept * 128, "ffn_total": 9216, **layers},
                  {"distill": True, **config}, dev, 10 * (i + 1), right)
    (runs / "l0-full-speed4-distill" / "speed_serving.json").write_text(json.dumps(  # speed.py --serving
        {"speedup": 3.6, "speedup_same_runtime": 3.1}))
    monkeypatch_module.setattr(sys, "argv", ["report.py", "--runs", str(runs), "--out", str(out), "--dev",
                                             str(dev_file)])
    assert report.main() == 0
    with open(out / "results.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    return rows, out, runs, dev


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_rows_name_the_new_methods_and_their_structure(results):
    rows, *_ = results
    assert {r["method"] for r in rows.values()} == {"teacher", "layerdrop", "l0-full", "l0"}
    assert rows["l0-full-speed3-distill"]["method"] == "l0-full" and rows["l0-h0.5-f0.3-distill"]["method"] == "l0"
    assert rows["layerdrop-k3-distill"]["target"] == "layers 1,3,5 of 6"
    assert rows["layerdrop-k3-distill"]["layers_kept"] == "3" and rows["teacher"]["layers_kept"] == "6"
    assert rows["l0-full-speed4-distill"]["target"] == "speedup 4.0 @ 32x192"
    served = rows["l0-full-speed4-distill"]
    assert (served["speedup_served"], served["speedup_served_same_runtime"]) == ("3.6", "3.1")
    assert rows["l0-full-speed3-distill"]["speedup_served"] == ""  # not measured: left empty


def test_always_answering_columns_score_the_always_predictions_against_the_teachers(results):
    rows, _, runs, dev = results
    teacher = json.loads((runs / "devpred" / "teacher" / "predictions_always.json").read_text())
    for name in [s[0] for s in STUDENTS]:
        always = json.loads((runs / "devpred" / name / "predictions_always.json").read_text())
        row = rows[name]
        assert float(row["always_HasAns_f1"]) == pytest.approx(squad_v2_metric(always, dev)["HasAns_f1"])
        assert float(row["always_f1"]) == pytest.approx(squad_v2_metric(always, dev)["f1"])
        d = compare_predictions(always, teacher, dev)["HasAns_f1"]
        assert float(row["always_HasAns_f1_diff"]) == pytest.approx(d.diff)
        assert float(row["always_HasAns_f1_diff_lo"]) <= d.diff <= float(row["always_HasAns_f1_diff_hi"])
    assert float(rows["teacher"]["always_HasAns_f1"]) == pytest.approx(squad_v2_metric(teacher, dev)["HasAns_f1"])


def test_methods_are_paired_at_equal_speed(results):
    rows, out, *_ = results
    pairs = json.loads((out / "pairs.json").read_text())
    # each run of a against the nearest run of b within 15% in measured speed-up; layerdrop-k2 at 3.2x has only
    # l0-full-speed4 (3.0x) near it
    assert {(p["a"], p["b"]) for p in pairs} == {
        ("l0-full-speed3-distill", "layerdrop-k3-distill"), ("l0-full-speed4-distill", "layerdrop-k2-distill"),
        ("l0-full-speed3-distill", "l0-h0.5-f0.3-distill"), ("l0-h0.5-f0.3-distill", "layerdrop-k3-distill")}
    for p in pairs:
        assert {"HasAns_f1", "f1", "thr_HasAns_f1", "always_HasAns_f1"} <= set(p)
        assert p["always_HasAns_f1"]["lo"] <= p["always_HasAns_f1"]["diff"] <= p["always_HasAns_f1"]["hi"]
    table = (out / "table.md").read_text()
    assert "Always answering" in table and "2.10x / 2.00x" in table
    assert (out / "f1_vs_speedup.png").stat().st_size > 0


def test_frontier_keeps_the_points_nothing_beats(report):
    from report_plots import frontier

    assert frontier([(1, 5), (2, 6), (3, 4), (2, 3), (4, 4)]) == [(2, 6), (4, 4)]
    assert frontier([(1, 1), (2, 2), (3, 3)]) == [(3, 3)]
    assert frontier([(3, 1), (2, 2), (1, 3)]) == [(1, 3), (2, 2), (3, 1)]
    assert frontier([]) == []
