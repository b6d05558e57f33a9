"""ModernBERT (fused Wqkv, GLU FFN, rotary positions, local/global attention): gated and compacted models compute
what Hugging Face's model computes (open gates), what an oracle with the pruned heads' and units' columns zeroed
computes (masks), and keep it through compaction, save/load, the standalone template and ONNX export."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import structprune as sp
from helpers.models import one_thread_reference_backend  # noqa: F401  (autouse fixture)

L, H, I, HIDDEN, WINDOW = 4, 4, 48, 64, 8  # local_attention 8: keys within |q - k| <= 4 in local layers
SEQ = 20  # longer than the local window
LOADER = str(Path(__file__).resolve().parents[1] / "helpers" / "standalone_loader.py")
HEADS = {"qa": "ForQuestionAnswering", "cls": "ForSequenceClassification", "tok": "ForTokenClassification",
         "mlm": "ForMaskedLM", "bare": "Model"}


def tiny_config(attn="sdpa", bias=False, **kw):
    cfg = dict(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=L, num_attention_heads=H, intermediate_size=I,
               max_position_embeddings=128, local_attention=WINDOW, global_attn_every_n_layers=2, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, attn_implementation=attn,
               attention_bias=bias, mlp_bias=bias, norm_bias=bias, local_rope_theta=50.0, initializer_range=0.2)
    cfg.update(kw)
    return transformers.ModernBertConfig(**cfg)


def tiny_model(head="qa", attn="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    return getattr(transformers, "ModernBert" + HEADS[head])(tiny_config(attn, **kw)).eval()


def batch(b=3, s=SEQ, pad_from=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "start_logits", None) is not None:
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def masks(seed=3):
    """Random masks with a layer at 0 heads (layer 1, local) and a layer at 0 FFN units (layer 2, global)."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(L, H, generator=g) < 0.5
    heads[0], heads[1] = True, False
    heads[3, :2] = True
    ffn = torch.rand(L, I, generator=g) < 0.3
    ffn[0, :3], ffn[2] = True, False
    return heads, ffn


def oracle(model, heads, ffn):
    """Plain HF model with forward pre-hooks on ``attn.Wo`` and ``mlp.Wo`` zeroing the pruned heads' / units'
    input columns."""
    d = HIDDEN // H
    for i, layer in enumerate(model.model.layers):
        col = heads[i].repeat_interleave(d).float()
        layer.attn.Wo.register_forward_pre_hook(lambda m, a, c=col: (a[0] * c,))
        layer.mlp.Wo.register_forward_pre_hook(lambda m, a, c=ffn[i].float(): (a[0] * c,))
    return model


def test_config_has_local_and_global_layers_with_their_own_theta():
    cfg = tiny_config()
    assert cfg.layer_types == ["full_attention", "sliding_attention"] * 2
    thetas = {t: cfg.rope_parameters[t]["rope_theta"] for t in ("full_attention", "sliding_attention")}
    assert thetas["full_attention"] != thetas["sliding_attention"]
    # control: the window and the per-layer theta matter for this batch (the tests below could not pass otherwise)
    base = outputs(tiny_model(), batch())
    assert (outputs(tiny_model(local_attention=64), batch()) - base).abs().max() > 1e-3
    assert (outputs(tiny_model(local_rope_theta=160000.0), batch()) - base).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("head", list(HEADS))
def test_open_gates_match_hf(head, attn):
    model, inputs = tiny_model(head, attn), batch()
    want = outputs(model, inputs)
    sp.patch(model)
    got = outputs(model, inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert {k: sp.last_backends()[k] for k in ("attention", "ffn")} == {"attention": "torch", "ffn": "torch"}
    windows = [layer.attn.window for layer in model.base_model.layers]
    assert windows == [-1, WINDOW // 2, -1, WINDOW // 2]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masks_match_oracle_and_compaction_keeps_outputs(attn, bias):
    heads, ffn = masks()
    inputs = batch()
    want = outputs(oracle(tiny_model("qa", attn, bias=bias), heads, ffn), inputs)
    model = sp.patch(tiny_model("qa", attn, bias=bias))
    sp.set_masks(model, heads=heads, ffn=ffn)
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)
    sp.compact(model)
    layers = model.base_model.layers
    assert [layer.attn.Wqkv.weight.shape[0] for layer in layers] == [3 * int(h.sum()) * (HIDDEN // H) for h in heads]
    assert [layer.mlp.Wi.weight.shape[0] for layer in layers] == [2 * int(u.sum()) for u in ffn]
    assert layers[2].mlp.Wi.weight.shape == (0, HIDDEN) and layers[1].attn.Wqkv.weight.shape == (0, HIDDEN)
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)


def test_glu_unit_owns_its_row_pair():
    """Compaction keeps rows (u, u + I) of Wi for a kept unit u: the kept rows are exactly those."""
    model = sp.patch(tiny_model())
    wi = model.model.layers[0].mlp.Wi.weight.detach().clone()
    ffn = torch.zeros(L, I, dtype=torch.bool)
    ffn[:, [2, 5, 40]] = True
    sp.set_masks(model, ffn=ffn)
    sp.compact(model)
    torch.testing.assert_close(model.model.layers[0].mlp.Wi.weight, wi[[2, 5, 40, I + 2, I + 5, I + 40]])


def test_save_load_and_unpatch_keep_outputs(tmp_path):
    heads, ffn = masks()
    inputs = batch()
    model = sp.patch(tiny_model("qa"))
    sp.set_masks(model, heads=heads, ffn=ffn)
    want = outputs(model, inputs)
    sp.save_pretrained(model, tmp_path / "masked")  # masks kept, not compacted
    torch.testing.assert_close(outputs(sp.from_pretrained(tmp_path / "masked"), inputs), want, atol=1e-5, rtol=0)
    sp.compact(model)
    sp.save_pretrained(model, tmp_path / "compact")
    loaded = sp.from_pretrained(tmp_path / "compact")
    assert [layer.attn.num_heads for layer in loaded.model.layers] == [int(h.sum()) for h in heads]
    torch.testing.assert_close(outputs(loaded, inputs), want, atol=1e-5, rtol=0)
    plain = sp.unpatch(loaded)  # plain HF modules of the kept sizes (a zero-weight head where none is left)
    assert not sp.is_patched(plain)
    torch.testing.assert_close(outputs(plain, inputs), want, atol=1e-5, rtol=0)


def test_standalone_template_loads_with_plain_transformers(tmp_path):
    heads, ffn = masks()
    inputs = batch()
    jobs, expected = [], {}
    for head, auto in (("qa", "AutoModelForQuestionAnswering"), ("cls", "AutoModelForSequenceClassification"),
                       ("bare", "AutoModel")):
        model = sp.patch(tiny_model(head))
        sp.set_masks(model, heads=heads, ffn=ffn)
        sp.compact(model)
        expected[head] = outputs(model, inputs)
        sp.save_pretrained(model, tmp_path / head)
        jobs.append([str(tmp_path / head), auto, str(tmp_path / f"{head}.pt")])
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "jobs.json").write_text(json.dumps({"inputs": str(tmp_path / "inputs.pt"), "jobs": jobs}))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-I", LOADER, str(tmp_path / "jobs.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for head in expected:
        result = torch.load(tmp_path / f"{head}.pt")
        assert result["_class"].startswith("PrunedModernBert") and result["_structprune_modules"] == []
        got = torch.cat([result["start_logits"], result["end_logits"]], -1) if head == "qa" else \
            result.get("logits", result.get("last_hidden_state"))
        torch.testing.assert_close(got, expected[head], atol=1e-5, rtol=0)


def test_onnx_export_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    from structprune.export import onnx as spx

    heads, ffn = masks()
    model = sp.patch(tiny_model("qa"))
    sp.set_masks(model, heads=heads, ffn=ffn)
    sp.compact(model)
    names = ["input_ids", "attention_mask"]  # ModernBERT's tokenizer gives no token_type_ids
    path = spx.export_onnx(spx.to_plain(model), names, batch(2, SEQ, pad_from=11), tmp_path / "m.onnx", opset=17)
    runner = spx.OrtQAModel(path, threads=1)
    for b, s in ((3, 23), (1, 7), (2, 31)):  # none of them the traced shape; 23, 31: longer than the window
        inputs = batch(b, s, pad_from=5)
        got = runner(**inputs)
        got = torch.cat([got.start_logits, got.end_logits], dim=-1)
        torch.testing.assert_close(got, outputs(model, inputs), atol=1e-4, rtol=0)


def test_backends_without_the_kernels_refuse_with_reasons():
    """A kernel backend without rotary / sliding-window attention or GLU FFN kernels refuses them and says why."""
    from structprune.ops.support import Backend, OpInputs

    cpu = torch.device("cpu")
    kernel = Backend(name="k", availability=lambda d: None, gated_attention=None, gated_ffn=None)
    reasons = kernel.not_supported_reasons(OpInputs("attention", cpu, torch.float32, num_heads=4, rotary=True,
                                                    window=4))
    assert any("rotary" in r for r in reasons) and any("sliding-window" in r for r in reasons)
    assert any("GLU" in r for r in kernel.not_supported_reasons(OpInputs("ffn", cpu, torch.float32, glu=True)))
    assert kernel.not_supported_reasons(OpInputs("attention", cpu, torch.float32, num_heads=4)) == []


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cpp_backend_runs_attention_and_ffn_under_masks(attn, bias):
    """Under masks (a layer with no head, a layer with no unit, a padded sequence) the cpp backend, not the
    reference, runs the rotary / sliding-window attention and the GLU FFN, and computes what the oracle does;
    "auto" picks it on the CPU."""
    from structprune.backends.cpp import ops as cpp_ops

    if cpp_ops.load_error() is not None:
        pytest.skip(f"C++ extension unavailable: {cpp_ops.load_error()}")
    heads, ffn = masks()
    inputs = batch()
    # Padding queries whose whole band is padding are compared nowhere: HF's SDPA layers give them a zero context,
    # its eager layers (and the kernels, which get the key padding row and the window) a uniform one.
    valid = inputs["attention_mask"].bool().repeat(1, 2)  # start | end logits
    want = outputs(oracle(tiny_model("qa", attn, bias=bias), heads, ffn), inputs)
    model = sp.patch(tiny_model("qa", attn, bias=bias))
    sp.set_masks(model, heads=heads, ffn=ffn)
    for name in ("cpp", "auto"):
        with sp.use_backend(name):
            got = outputs(model, inputs)
            assert not sp.fallback_reasons()
        assert {k: sp.last_backends()[k] for k in ("attention", "ffn")} == {"attention": "cpp", "ffn": "cpp"}
        torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=0)
    with sp.use_backend("cpp"):  # training: gradients reach the kept weights and gates
        out = model(**inputs)
        (out.start_logits.sum() + out.end_logits.sum()).backward()
    assert sp.last_backends()["ffn"] == "cpp"
    assert model.model.layers[0].mlp.Wi.weight.grad.abs().sum() > 0
