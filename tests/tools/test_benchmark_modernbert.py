"""``structprune bench --shape modernbert-*``: the paired ModernBERT layer benchmark on a tiny layer (global and local
layers, masked vs compacted vs dense HF, per-round ratios, files)."""
import json

import pytest

from structprune.benchmark.command import main
from structprune.ops import dispatch as ops


def test_cli_writes_paired_ratios_for_a_global_and_a_local_layer(tmp_path, capsys):
    backend = "cpp" if ops.availability("cpp") is None else "torch"
    code = main(["--shape", "modernbert-tiny", "--seq", "40", "24", "--batch", "2", "--local-attention", "8",
                         "--heads-kept", "0.5", "--ffn-kept", "0.3", "--threads", "1", "--warmup", "0", "--repeats",
                         "3", "--backend", backend, "--quiet", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["heads_kept"] == 2 and data["config"]["units_kept"] == 14 and data["config"]["threads"] == 1
    assert [(r["layer"], r["seq"]) for r in data["rows"]] == [("global", 40), ("local", 40), ("global", 24),
                                                              ("local", 24)]
    for r in data["rows"]:
        assert r["window"] == (4 if r["layer"] == "local" else -1)  # local_attention 8: keys within |q - k| <= 4
        assert r["ran_backends"] == f"attention={backend},ffn={backend}"
        assert r["max_abs_diff_masked_vs_compacted"] < 1e-4
        for key in ("masked_vs_compacted", "masked_vs_dense"):
            ratio = r[key]
            assert len(ratio["samples"]) == 3 and ratio["q1"] <= ratio["median"] <= ratio["q3"]
            assert all(x > 0 for x in ratio["samples"])
    assert data["machine"]["cpu"] and "compacted/masked" in (tmp_path / "table.txt").read_text()
    assert "local" in capsys.readouterr().out


def test_modernbert_shape_refuses_what_it_cannot_run():
    with pytest.raises(SystemExit, match="runs alone"):
        main(["--shape", "modernbert-tiny", "tiny"])
    with pytest.raises(SystemExit, match="one --heads-kept"):
        main(["--shape", "modernbert-tiny", "--heads-kept", "0.5,1"])
    with pytest.raises(SystemExit, match="one --seq"):
        main(["--shape", "tiny", "--seq", "16", "32", "--quick"])
