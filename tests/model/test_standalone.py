"""Compacted checkpoints load with plain transformers (trust_remote_code) where structprune cannot be imported."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import structprune as sp
from helpers.models import FAMILIES, PREFIXES, SUFFIXES, layer_part, outputs, pruning_masks, tiny_batch, tiny_model
from structprune.model import io as sp_io

L, H, I = 3, 4, 96
LOADER = Path(__file__).resolve().parents[1] / "helpers" / "standalone_loader.py"
AUTO = {"qa": "AutoModelForQuestionAnswering", "cls": "AutoModelForSequenceClassification", "bare": "AutoModel"}


def compacted(family, head, seed=0):
    model = sp.patch(tiny_model(family, head, seed=seed))
    heads, ffn = pruning_masks(3)
    sp.set_masks(model, heads=heads, ffn=ffn)
    return sp.compact(model)


def run_isolated(tmp_path, jobs, batch):
    torch.save(batch, tmp_path / "inputs.pt")
    (tmp_path / "jobs.json").write_text(json.dumps({"inputs": str(tmp_path / "inputs.pt"), "jobs": jobs}))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-I", str(LOADER), str(tmp_path / "jobs.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def test_blocker_is_needed_and_works(tmp_path):
    """Control: without the blocker ``python -I`` imports structprune (editable install), so the block matters."""
    probe = "import importlib.util, sys; print(importlib.util.find_spec('structprune') is not None)"
    free = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    blocked = subprocess.run([sys.executable, "-I", "-c", f"import runpy, sys; sys.argv=['x']; "
                              f"runpy.run_path({str(LOADER)!r}, run_name='loader'); {probe}"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert free.stdout.strip() == "True", free.stderr
    assert blocked.returncode != 0 and "structprune is blocked" in blocked.stderr


def test_plain_transformers_load_matches_structprune(tmp_path):
    batch = tiny_batch()
    jobs, expected = [], {}
    for family in FAMILIES:
        for head in ("qa", "cls", "bare"):
            directory = tmp_path / f"{family}-{head}"
            sp.save_pretrained(compacted(family, head), directory)
            with torch.no_grad():
                expected[(family, head)] = outputs(sp.from_pretrained(directory), batch)
            jobs.append([str(directory), AUTO[head], str(tmp_path / f"{family}-{head}.pt")])
        # the encoder alone, from a QA checkpoint
        jobs.append([str(tmp_path / f"{family}-qa"), "AutoModel", str(tmp_path / f"{family}-qa-base.pt")])
    run_isolated(tmp_path, jobs, batch)
    for family in FAMILIES:
        for head in ("qa", "cls", "bare"):
            got = torch.load(tmp_path / f"{family}-{head}.pt")
            assert got["_structprune_modules"] == []
            assert got["_class"] == f"Pruned{PREFIXES[family]}{SUFFIXES[head]}"
            if "start_logits" in got:
                got = torch.cat([got["start_logits"], got["end_logits"]], dim=-1)
            else:
                got = got.get("logits", got.get("last_hidden_state"))
            torch.testing.assert_close(got, expected[(family, head)], atol=1e-5, rtol=0)
        base = torch.load(tmp_path / f"{family}-qa-base.pt")
        with torch.no_grad():
            qa = sp.from_pretrained(tmp_path / f"{family}-qa")
            want = qa.base_model(**batch).last_hidden_state
        torch.testing.assert_close(base["last_hidden_state"], want, atol=1e-5, rtol=0)


def test_config_records_sizes_and_version(tmp_path):
    model = compacted("bert", "qa")
    sp.save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    heads, ffn = pruning_masks(3)
    assert config["structprune_heads_per_layer"] == heads.sum(1).tolist()
    assert config["structprune_ffn_units_per_layer"] == ffn.sum(1).tolist()
    assert config["structprune_modeling_version"] == sp_io.modeling_version()
    assert f'STRUCTPRUNE_MODELING_VERSION = "{sp_io.modeling_version()}"' in \
        (tmp_path / "m" / sp_io.MODELING_FILE).read_text()
    assert config["auto_map"]["AutoModelForQuestionAnswering"] == \
        "modeling_structprune.PrunedBertForQuestionAnswering"
    assert not hasattr(model.config, "auto_map")  # the model's own config is not touched


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_in_process_load_handles_empty_layers(tmp_path, family):
    """Same check in this process (fast, gives a traceback): 0-head and 0-unit layers, padding mask."""
    model = compacted(family, "qa")
    sp.save_pretrained(model, tmp_path / "m")
    plain = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert layer_part(plain, 1, "query").weight.shape == (0, 64)
    assert layer_part(plain, 2, "ffn_in").weight.shape == (0, 64)
    batch = tiny_batch(pad_from=4)
    with torch.no_grad():
        torch.testing.assert_close(outputs(plain.eval(), batch), outputs(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("state", ["masked", "fractional"])
def test_gated_models_get_no_modeling_file(tmp_path, state):
    model = sp.patch(tiny_model())
    if state == "masked":
        sp.set_masks(model, heads=pruning_masks(3)[0])
    else:
        with torch.no_grad():
            next(sp.iter_gates(model)).log_alpha.fill_(0.0)  # deterministic gate 0.5
    assert not sp_io.is_standalone_exportable(model)
    sp.save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in config and "structprune_heads_per_layer" not in config
    assert not (tmp_path / "m" / sp_io.MODELING_FILE).exists()
    sp.from_pretrained(tmp_path / "m")  # still a structprune checkpoint
    # compacting then saving again adds them, and the structprune loader is unaffected by the auto_map
    sp.save_pretrained(sp.compact(model), tmp_path / "m")
    assert "auto_map" in json.loads((tmp_path / "m" / "config.json").read_text())
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(sp.from_pretrained(tmp_path / "m"), batch), outputs(model, batch),
                                   atol=1e-5, rtol=0)


def test_resave_with_new_masks_drops_stale_auto_map(tmp_path):
    """A standalone checkpoint loaded, masked again and saved: its config must not keep the old sizes."""
    sp.save_pretrained(compacted("bert", "qa"), tmp_path / "m")
    model = sp.from_pretrained(tmp_path / "m")
    assert hasattr(model.config, "auto_map")
    heads = [torch.ones(layer.attention.self.num_heads) for layer in model.base_model.encoder.layer]
    heads[0][0] = 0
    sp.set_masks(model, heads=heads)
    sp.save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in config and not any(k.startswith("structprune_") for k in config)
    sp.from_pretrained(tmp_path / "m")
