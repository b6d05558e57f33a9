import json

import pytest
import torch

import structprune as sp
from helpers.models import FAMILIES, HEADS, layer_part, outputs, tiny_batch, tiny_model

L, H, I = 3, 4, 96


def random_masks(seed, p_head=0.5, p_ffn=0.3):
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(L, H, generator=g) < p_head
    heads[0] = True   # one layer keeps everything
    heads[1] = False  # one layer loses every head
    ffn = torch.rand(L, I, generator=g) < p_ffn
    ffn[2] = False    # one layer loses every FFN unit
    return heads, ffn


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_compact_does_not_change_outputs(family, head):
    model = sp.patch(tiny_model(family, head))
    heads, ffn = random_masks(3)
    sp.set_masks(model, heads=heads, ffn=ffn)
    batch = tiny_batch()
    with torch.no_grad():
        before = outputs(model, batch)
    assert sp.compact(model) is model
    with torch.no_grad():
        after = outputs(model, batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert [layer_part(model, i, "attention").num_heads for i in range(L)] == heads.sum(1).tolist()
    assert [layer_part(model, i, "ffn_in").out_features for i in range(L)] == ffn.sum(1).tolist()
    assert layer_part(model, 1, "query").weight.shape == (0, 64)


def test_compact_folds_fractional_gates():
    model = sp.patch(tiny_model())
    with torch.no_grad():
        for gate in sp.iter_gates(model):
            gate.log_alpha.copy_(torch.linspace(-4, 3, gate.n))  # some 0, some fractional, some 1
    batch = tiny_batch()
    with torch.no_grad():
        before = outputs(model, batch)
    sp.compact(model)
    with torch.no_grad():
        after = outputs(model, batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(g.is_fully_open() for g in sp.iter_gates(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_drop_silent_removes_zero_output_units_exactly(family, tmp_path):
    """Heads / units whose output-projection columns are all zero add nothing: drop_silent removes them, outputs
    unchanged, also from a model compacted and saved before."""
    model = sp.patch(tiny_model(family))
    heads, ffn = random_masks(5)
    sp.set_masks(model, heads=heads, ffn=ffn)
    sp.compact(model)
    D = layer_part(model, 0, "attention").head_dim
    with torch.no_grad():
        layer_part(model, 0, "attn_out").weight[:, D:2 * D] = 0  # head 1 of layer 0 (layer 0 keeps all 4)
        out = layer_part(model, 0, "ffn_out").weight
        silent = [0, out.shape[1] - 1]
        out[:, silent] = 0
    sp.save_pretrained(model, tmp_path / "saved")
    batch = tiny_batch()
    with torch.no_grad():
        before = outputs(model, batch)
    for m in (model, sp.from_pretrained(tmp_path / "saved")):
        sp.compact(m, drop_silent=True)
        with torch.no_grad():
            torch.testing.assert_close(outputs(m, batch), before, atol=1e-5, rtol=0)
        assert layer_part(m, 0, "attention").num_heads == H - 1
        assert layer_part(m, 0, "ffn_in").out_features == int(ffn[0].sum()) - len(silent)
        assert [layer_part(m, i, "attention").num_heads for i in (1, 2)] == heads.sum(1).tolist()[1:]


def test_compact_twice_is_idempotent_and_summary_counts():
    model = sp.patch(tiny_model())
    heads, ffn = random_masks(4)
    sp.set_masks(model, heads=heads, ffn=ffn)
    s_masked = sp.summary(model)
    sp.compact(model)
    sp.compact(model)
    s = sp.summary(model)
    assert s.total("heads_kept") == s_masked.total("heads_kept") == int(heads.sum())
    assert s.total("ffn_kept") == int(ffn.sum())
    assert s.total("params") == s_masked.total("params")
    counted = sum(p.numel() for n, p in model.base_model.encoder.layer.named_parameters() if not n.endswith("log_alpha"))
    assert s.total("params") == counted
    assert "heads" in str(s) and "all" in str(s)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compacted", [False, True])
def test_save_load_round_trip(tmp_path, family, compacted):
    model = sp.patch(tiny_model(family, "qa"))
    heads, ffn = random_masks(5)
    sp.set_masks(model, heads=heads, ffn=ffn)
    if compacted:
        sp.compact(model)
    sp.save_pretrained(model, tmp_path / "m")
    back = sp.from_pretrained(tmp_path / "m")
    assert type(back) is type(model) and sp.is_patched(back)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(back, batch), outputs(model, batch), atol=1e-6, rtol=0)
    assert sp.get_masks(back).num_heads_kept == int(heads.sum())
    assert sp.get_masks(back).num_ffn_kept == int(ffn.sum())
    meta = json.loads((tmp_path / "m" / "structprune_config.json").read_text())
    expected_heads = heads.sum(1).tolist() if compacted else [H] * L
    assert meta["heads_per_layer"] == expected_heads
    assert not list((tmp_path / "m").glob("*.bin"))


def test_load_rejects_foreign_directory(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="not a structprune model"):
        sp.from_pretrained(tmp_path / "hf")


def test_save_refuses_to_clobber_a_foreign_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        sp.save_pretrained(sp.patch(tiny_model()), target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_save_over_previous_structprune_save(tmp_path):
    model = sp.patch(tiny_model())
    sp.save_pretrained(model, tmp_path / "m")
    sp.set_masks(model, heads=torch.zeros(L, H))
    sp.save_pretrained(model, tmp_path / "m")
    assert sp.get_masks(sp.from_pretrained(tmp_path / "m")).num_heads_kept == 0
