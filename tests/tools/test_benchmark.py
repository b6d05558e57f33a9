"""Smoke test of the benchmark runner (structprune.benchmark) on a tiny layer: rows, ratios, files."""
import csv
import json

import pytest
import torch

from structprune import benchmark as bm
from structprune.ops import dispatch as ops

FRACS = (1.0, 0.5)


def _tiny_config(**kw):
    cfg = dict(shapes=["tiny"], batch=2, seq=16, device="cpu", threads=1, head_fracs=FRACS, ffn_fracs=FRACS,
               backends=("torch",), compile=False, warmup=1, repeats=1, quiet=True)
    cfg.update(kw)
    return bm.BenchConfig(**cfg)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    result = bm.run_benchmark(_tiny_config())
    out = tmp_path_factory.mktemp("bench")
    result.write(out)
    return result, out


def test_rows_per_variant_and_fraction(quick_result):
    result, out = quick_result
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    for mode in bm.MODES:
        got = {(r["variant"], r["head_frac"], r["ffn_frac"]) for r in rows if r["mode"] == mode}
        expected = {("dense-eager", 1.0, 1.0), ("dense-sdpa", 1.0, 1.0)}
        expected |= {(v, h, f) for v in ("compacted", "pruned[torch]") for h in FRACS for f in FRACS}
        # the baseline is re-timed beside every fraction group
        expected |= {("dense-sdpa", h, f) for h in FRACS for f in FRACS}
        assert got == expected, mode
    regrouped = sum((h, f) != (1.0, 1.0) for h in FRACS for f in FRACS)
    assert len(rows) == 2 * (2 + 2 * len(FRACS) ** 2 + regrouped)
    assert not [s for s in data["skipped"] if s.get("error")], data["skipped"]
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert set(bm.CSV_COLUMNS) <= set(csv_rows[0])


def test_ratios_and_models(quick_result):
    result, _ = quick_result
    shape = bm.SHAPES["tiny"]
    for r in result.rows:
        assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["speedup_vs_dense"] is not None and r["gflop_per_s"] > 0 and r["gb_per_s"] > 0
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup_vs_dense"] / r["ideal_speedup"])
        if r["kind"] in ("compacted", "pruned"):
            assert r["speedup_vs_compacted"] is not None
            assert r["heads_kept"] == round(r["head_frac"] * shape.heads)
            assert r["units_kept"] == round(r["ffn_frac"] * shape.ffn)
        if r["variant"] == "dense-sdpa":
            assert r["speedup_vs_dense"] == pytest.approx(1.0) and r["ideal_speedup"] == pytest.approx(1.0)
        if r["variant"] == "compacted":
            assert r["speedup_vs_compacted"] == pytest.approx(1.0)
            assert "attention=torch" in r["ran_backends"]
        if r["variant"] == "pruned[torch]" and r["mode"] == "inference":
            assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-4  # same output as the compacted layer
    half = next(r for r in result.rows if r["variant"] == "compacted" and r["head_frac"] == 0.5
                and r["ffn_frac"] == 0.5 and r["mode"] == "inference")
    full_flops = bm.flop_byte_model(shape, 2, 16, shape.heads, shape.ffn, 4, False)[0]
    assert half["ideal_speedup"] == pytest.approx(full_flops / half["flops"])
    train = next(r for r in result.rows if r["variant"] == "dense-sdpa" and r["mode"] == "training")
    assert train["flops"] == 3 * full_flops


def test_machine_info_and_plots(quick_result):
    result, out = quick_result
    machine = json.loads((out / "results.json").read_text())["machine"]
    for key in ("cpu", "threads", "torch", "transformers", "date", "command", "git_commit", "backends", "device"):
        assert key in machine, key
    assert machine["threads"] == 1 and machine["cpu"]
    assert machine["backends"]["torch"] == "available"
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["speedup_tiny_fp32_inference.png", "speedup_tiny_fp32_training.png"]
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pruned[torch]" in (out / "table.txt").read_text()


def test_cli_quick(tmp_path, capsys):
    from structprune.cli import main

    rc = main(["bench", "--quick", "--backend", "torch", "--threads", "1", "--mode", "inference",
               "--variants", "dense-sdpa", "compacted", "pruned", "--heads-kept", "0.5", "--ffn-kept", "0.5",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dense-sdpa" in printed and "pruned[torch]" in printed and "results.json" in printed
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["batch"] == 2 and data["config"]["seq"] == 16
    assert {r["variant"] for r in data["rows"]} == {"dense-sdpa", "compacted", "pruned[torch]"}
    assert (tmp_path / "speedup_tiny_fp32_inference.png").exists()


def test_unavailable_backend_is_skipped_with_reason(monkeypatch):
    def availability(name, device="cpu"):
        if name == "cpp":
            raise AttributeError("half-written backend")
        return None if name == "torch" else "not built"

    monkeypatch.setattr(ops, "availability", availability)
    cases, skipped = bm.plan(_tiny_config(backends=None, modes=("inference",)))
    reasons = {s["variant"]: s["reason"] for s in skipped}
    assert "half-written backend" in reasons["pruned[cpp]"]
    assert reasons["pruned[triton]"] == "not built"
    assert {c.backend for c in cases if c.kind == "pruned"} == {"torch"}


def test_random_masks_are_nested_and_seeded():
    a = bm.random_mask(3072, 0.3, seed=1)
    assert int(a.sum()) == round(0.3 * 3072)
    assert torch.equal(a, bm.random_mask(3072, 0.3, seed=1))
    small = bm.random_mask(3072, 0.1, seed=1)
    assert torch.all(a[small.bool()] == 1)  # kept units at 10% are among those kept at 30%
    assert not torch.equal(a[: int(a.sum())], torch.ones(int(a.sum())))  # not simply the first units
    assert bm.keep_count(12, 0.0) == 0 and bm.keep_count(12, 0.01) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown shape"):
        bm.parse_shape("huge")
    assert bm.parse_shape("128x4x256") == bm.Shape("128x4x256", 128, 4, 256)
    with pytest.raises(ValueError, match="unknown variant"):
        bm.plan(_tiny_config(variants=("sparse",)))
