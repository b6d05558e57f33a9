"""Decoders with grouped-query attention (Llama, Mistral with a sliding window, Qwen2, Qwen3 with its q/k norms), on a
left-padded batch: open gates compute what Hugging Face's model computes; under masks (a whole KV group pruned in
one layer, one query head in another, a layer with no FFN unit left) the patched model, on the reference and on
the cpp backend, and the compacted model compute what an oracle zeroing the pruned heads' and units' columns
computes, greedy generation with HF's DynamicCache gives the oracle's tokens, and save/load keeps the outputs."""
import pytest
import torch

import structprune as sp
from helpers.decoders import (FAMILIES, H, HEADS, I, KV, L, WINDOW, greedy, head_dim, left_padded, masks, oracle,
                              outputs, tiny_model)
from helpers.models import one_thread_reference_backend  # noqa: F401  (autouse fixture)


def _cpp_or_skip():
    from structprune.backends.cpp import ops as cpp_ops

    if cpp_ops.load_error() is not None:
        pytest.skip(f"C++ extension unavailable: {cpp_ops.load_error()}")


def _decoder_fallbacks() -> dict:
    """Why the decoder's ops last fell back, if they did (other tests may leave reasons of other ops)."""
    return {k: v for k, v in sp.fallback_reasons().items() if k in ("qkv", "attention", "ffn")}


def _masked(family, head="lm", attn="sdpa"):
    heads, ffn = masks()
    model = sp.patch(tiny_model(family, head, attn))
    sp.set_masks(model, heads=heads, ffn=ffn)
    return model


def test_the_batch_and_the_window_matter():
    """Controls: the batch is left-padded, Mistral's window is shorter than it and changes the outputs, and the
    masks change every family's outputs (the comparisons below could not pass otherwise)."""
    inputs = left_padded()
    assert inputs["attention_mask"][:, 0].tolist() == [1, 0, 0] and inputs["input_ids"].shape[1] > WINDOW
    narrow, wide = outputs(tiny_model("mistral"), inputs), outputs(tiny_model("mistral", sliding_window=64), inputs)
    assert (narrow - wide).abs().max() > 1e-3
    heads, ffn = masks()
    for family in FAMILIES:
        full = outputs(tiny_model(family), inputs)
        pruned = outputs(oracle(tiny_model(family), heads, ffn, head_dim(family)), inputs)
        assert (full - pruned).abs().max() > 1e-3, family


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_match_hf(family, head):
    model, inputs = tiny_model(family, head), left_padded()
    want = outputs(model, inputs)
    sp.patch(model)
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)
    assert {k: sp.last_backends()[k] for k in ("qkv", "attention", "ffn")} == dict.fromkeys(
        ("qkv", "attention", "ffn"), "torch")


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_match_hf_eager(family):
    model, inputs = tiny_model(family, attn="eager"), left_padded()
    want = outputs(model, inputs)
    torch.testing.assert_close(outputs(sp.patch(model), inputs), want, atol=1e-5, rtol=0)


def test_windows_per_layer():
    assert [layer.self_attn.window for layer in sp.patch(tiny_model("mistral")).model.layers] == [WINDOW] * L
    assert [layer.self_attn.window for layer in sp.patch(tiny_model("llama")).model.layers] == [-1] * L
    qwen = sp.patch(tiny_model("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1))
    assert [layer.self_attn.window for layer in qwen.model.layers] == [-1, 5, 5]


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_match_the_oracle_on_reference_and_cpp(family):
    """The reference and the cpp backend (which then runs the projections, the attention and the FFN) compute
    what the oracle computes; padding positions included (the kernels give a query with no visible key a zero
    context, as HF's SDPA layers do)."""
    _cpp_or_skip()
    heads, ffn = masks()
    inputs = left_padded()
    want = outputs(oracle(tiny_model(family), heads, ffn, head_dim(family)), inputs)
    model = _masked(family)
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)
    for name in ("cpp", "auto"):
        with sp.use_backend(name):
            got = outputs(model, inputs)
            assert not _decoder_fallbacks()
        assert {k: sp.last_backends()[k] for k in ("qkv", "attention", "ffn")} == dict.fromkeys(
            ("qkv", "attention", "ffn"), "cpp")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_eager_masks_match_the_oracle(family):
    """attn_implementation "eager" (additive masks): the reference matches everywhere; the cpp backend on the real
    tokens (HF's eager layers give a query with no visible key a uniform context, the kernels a zero one)."""
    _cpp_or_skip()
    heads, ffn = masks()
    inputs = left_padded()
    want = outputs(oracle(tiny_model(family, attn="eager"), heads, ffn, head_dim(family)), inputs)
    model = _masked(family, attn="eager")
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)
    real = inputs["attention_mask"].bool()
    with sp.use_backend("cpp"):
        got = outputs(model, inputs)
    assert sp.last_backends()["attention"] == "cpp"
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_compaction_removes_pruned_kv_heads_and_keeps_outputs(family):
    heads, ffn = masks()
    inputs = left_padded()
    model = _masked(family)
    want = outputs(model, inputs)
    sp.compact(model)
    attn = [layer.self_attn for layer in model.model.layers]
    d = head_dim(family)
    assert [a.num_heads for a in attn] == [5, 7, 8] and [a.num_kv_heads for a in attn] == [3, 4, 4]
    assert [a.k_proj.weight.shape[0] for a in attn] == [3 * d, 4 * d, 4 * d]
    assert [a.v_proj.weight.shape[0] for a in attn] == [3 * d, 4 * d, 4 * d]
    assert attn[0].kv_index.tolist() == [0, 0, 1, 1, 2] and attn[1].kv_index.tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == [int(u.sum()) for u in ffn]
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    kv_slots = [layer.keys.shape[1] for layer in cache.layers]
    assert kv_slots == [3, 4, 4]


def test_masked_model_caches_only_the_kept_kv_heads():
    """Before compaction the patched model computes and caches the kept KV heads only."""
    model = _masked("llama")
    with torch.no_grad():
        cache = model(**left_padded(), use_cache=True).cache
    assert [layer.keys.shape[1] for layer in cache.layers] == [3, KV, KV]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_gives_the_oracles_tokens(family):
    """HF's generate() with its DynamicCache (Mistral: the sliding-window cache) gives the oracle's tokens, patched
    (reference and cpp backend: prefill and decode steps through the kernels) and compacted."""
    _cpp_or_skip()
    heads, ffn = masks()
    inputs = left_padded()
    want = greedy(oracle(tiny_model(family), heads, ffn, head_dim(family)), inputs)
    model = _masked(family)
    assert torch.equal(greedy(model, inputs), want)
    with sp.use_backend("cpp"):
        assert torch.equal(greedy(model, inputs), want)
        assert not _decoder_fallbacks()
    assert {k: sp.last_backends()[k] for k in ("qkv", "attention", "ffn")} == dict.fromkeys(
        ("qkv", "attention", "ffn"), "cpp")
    sp.compact(model)
    assert torch.equal(greedy(model, inputs), want)
    with sp.use_backend("cpp"):
        assert torch.equal(greedy(model, inputs), want)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_load_keeps_outputs(family, tmp_path):
    inputs = left_padded()
    model = _masked(family, "cls")
    want = outputs(model, inputs)
    sp.save_pretrained(model, tmp_path / "masked")  # masks kept, not compacted
    torch.testing.assert_close(outputs(sp.from_pretrained(tmp_path / "masked"), inputs), want, atol=1e-5, rtol=0)
    sp.compact(model)
    sp.save_pretrained(model, tmp_path / "compact")
    loaded = sp.from_pretrained(tmp_path / "compact")
    assert [a.self_attn.kv_index.tolist() for a in loaded.model.layers] == \
        [a.self_attn.kv_index.tolist() for a in model.model.layers]
    torch.testing.assert_close(outputs(loaded, inputs), want, atol=1e-5, rtol=0)


def test_kv_heads_mask_prunes_its_query_heads():
    model = sp.patch(tiny_model("llama"))
    kv = torch.ones(L, KV, dtype=torch.bool)
    kv[1, 2] = False
    heads = torch.ones(L, H, dtype=torch.bool)
    heads[0, [0, 1]] = False  # all of KV head 0's query heads: KV head 0 goes too
    sp.set_masks(model, heads=heads, kv_heads=kv)
    got = sp.get_masks(model)
    assert got.heads[1].tolist() == [True] * 4 + [False] * 2 + [True] * 2 and got.heads[0, :2].sum() == 0
    assert got.kv_heads.tolist() == [[False, True, True, True], [True, True, False, True], [True] * 4]
    sp.set_masks(model, kv_heads=torch.ones(L, KV))  # on top of the current head masks: nothing comes back
    assert torch.equal(sp.get_masks(model).heads, got.heads)
    with pytest.raises(ValueError, match=r"kv_heads mask must be \[3, 4\]"):
        sp.set_masks(model, kv_heads=torch.ones(L, H))
    bert = sp.patch(__import__("helpers.models", fromlist=["tiny_model"]).tiny_model("bert"))
    with pytest.raises(TypeError, match="grouped-query attention"):
        sp.set_masks(bert, kv_heads=torch.ones(3, 4))


def test_summary_counts_kv_heads_and_cache_bytes():
    model = _masked("qwen3")
    s = sp.summary(model, seq_len=16)
    assert [r.heads_kept for r in s.layers] == [5, 7, 8] and [r.kv_heads_kept for r in s.layers] == [3, 4, 4]
    assert [r.ffn_kept for r in s.layers] == [int(u.sum()) for u in masks()[1]]
    assert [r.kv_cache_bytes for r in s.layers] == [3 * 2 * 16 * 4, 4 * 2 * 16 * 4, 4 * 2 * 16 * 4]
    assert s.layers[0].kv_cache_bytes_original == KV * 2 * 16 * 4
    text = str(s)
    assert "kv heads" in text and "KV cache B/token" in text
    # parameters: what the compacted layers hold (projections and GLU weights, two RMSNorms, q/k norms not counted)
    sp.compact(model)
    for row, layer in zip(s.layers, model.model.layers):
        held = sum(p.numel() for n, p in layer.named_parameters()
                   if not n.endswith("log_alpha") and "q_norm" not in n and "k_norm" not in n)
        assert row.params == held


@pytest.mark.parametrize("family", FAMILIES)
def test_rms_norms_run_the_cpp_kernel_and_unpatch_gives_hfs_back(family):
    """Every RMSNorm of a patched decoder (two per layer and the final one) stands in for HF's holding its very
    weight: the state dict keeps HF's keys and tensors, the cpp kernel runs them without gradients (outputs as HF's),
    and unpatch puts HF's modules back."""
    from structprune.model.families.decoder import DecoderRMSNorm

    _cpp_or_skip()
    model, inputs = tiny_model(family), left_padded()
    hf_types = {n: type(m) for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    keys = set(model.state_dict())
    want = outputs(model, inputs)
    sp.patch(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, DecoderRMSNorm)}
    assert swapped == {n for n in hf_types if "self_attn" not in n} and len(swapped) == 2 * L + 1
    assert set(model.state_dict()) >= keys
    with sp.use_backend("cpp"):
        got = outputs(model, inputs)
    assert sp.last_backends()["norm"] == "cpp"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    plain = sp.unpatch(model)
    assert {n: type(m) for n, m in plain.named_modules() if type(m).__name__.endswith("RMSNorm")} == hf_types
    torch.testing.assert_close(outputs(plain, inputs), want, atol=1e-5, rtol=0)


def test_unpatch_needs_equal_groups():
    inputs = left_padded()
    model = _masked("llama")
    with pytest.raises(ValueError, match="unequal"):
        sp.unpatch(model)
    assert sp.is_patched(model)  # nothing changed
    heads = torch.ones(L, H, dtype=torch.bool)
    heads[0, [2, 3]] = False  # a whole KV group: the groups stay equal
    sp.set_masks(model, heads=heads, ffn=torch.ones(L, I))
    want = outputs(model, inputs)
    plain = sp.unpatch(model)
    assert not sp.is_patched(plain) and plain.model.layers[0].self_attn.k_proj.out_features == 3 * 8
    torch.testing.assert_close(outputs(plain, inputs), want, atol=1e-5, rtol=0)


def test_custom_mask_falls_back_to_the_reference_with_a_reason():
    """A 4D mask that is not causal + key padding + window (here: a hole in the causal part) runs on the
    reference even when the cpp backend is asked for, and fallback_reasons says why."""
    _cpp_or_skip()
    model = _masked("llama", "bare")
    inputs = left_padded()
    s = inputs["input_ids"].shape[1]
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(3, 1, s, s).clone()
    mask[:, :, 6, 2] = False
    with sp.use_backend("cpp"), torch.no_grad():
        got = model(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        assert sp.last_backends()["attention"] == "torch"
        assert "not causal" in sp.fallback_reasons()["attention"]
    with torch.no_grad():
        want = model(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the RMSNorms ran the cpp kernel in ``got``


def test_training_step_through_the_cpp_backend():
    """Gradients reach the kept weights and the gates through the cpp decoder ops (loss of the causal LM)."""
    _cpp_or_skip()
    inputs = left_padded()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    grads = {}
    for name in ("torch", "cpp"):
        model = _masked("qwen3")
        model.train()
        with sp.use_backend(name):
            model(**inputs, labels=labels).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sp.last_backends()["attention"] == "cpp"
    assert grads["cpp"].keys() == grads["torch"].keys() and "model.layers.0.self_attn.head_gate.log_alpha" in grads["cpp"]
    for n, g in grads["torch"].items():
        torch.testing.assert_close(grads["cpp"][n], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_plain_transformers_loads_the_compacted_decoders(tmp_path):
    """A compacted decoder saved with sp.save_pretrained loads with AutoModelFor<Task>.from_pretrained(dir,
    trust_remote_code=True) in a process where structprune cannot be imported, with the per-layer heads, KV heads,
    head -> KV maps and units in config.json; outputs and greedy tokens (with HF's DynamicCache) are the same."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    loader = Path(__file__).resolve().parents[1] / "helpers" / "standalone_loader.py"
    inputs = left_padded()
    jobs, expected = [], {}
    autos = {"lm": "AutoModelForCausalLM", "cls": "AutoModelForSequenceClassification", "bare": "AutoModel"}
    no_head = torch.ones(L, H, dtype=torch.bool)
    no_head[1] = False  # a layer with no head (and no KV head) left
    for family in FAMILIES + ("llama-no-head",):
        for head in ("lm", "cls", "bare") if family == "qwen3" else ("lm",):
            if family == "llama-no-head":
                model = sp.compact(sp.set_masks(sp.patch(tiny_model("llama")), heads=no_head))
            else:
                model = sp.compact(_masked(family, head))
            directory = tmp_path / f"{family}-{head}"
            sp.save_pretrained(model, directory)
            config = json.loads((directory / "config.json").read_text())
            if family == "llama-no-head":
                assert config["structprune_kv_heads_per_layer"] == [KV, 0, KV]
            else:
                assert config["structprune_heads_per_layer"] == [5, 7, 8]
                assert config["structprune_kv_heads_per_layer"] == [3, 4, 4]
                assert config["structprune_kv_index_per_layer"][0] == [0, 0, 1, 1, 2]
                assert config["structprune_ffn_units_per_layer"] == [int(u.sum()) for u in masks()[1]]
            assert config["auto_map"][autos[head]].endswith(f"{type(model).__name__}")
            expected[(family, head)] = (outputs(model, inputs), greedy(model, inputs) if head == "lm" else None)
            jobs.append([str(directory), autos[head], str(tmp_path / f"{family}-{head}.pt")]
                        + ([{"generate": 6}] if head == "lm" else []))
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "jobs.json").write_text(json.dumps({"inputs": str(tmp_path / "inputs.pt"), "jobs": jobs}))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-I", str(loader), str(tmp_path / "jobs.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for (family, head), (want, tokens) in expected.items():
        result = torch.load(tmp_path / f"{family}-{head}.pt")
        assert result["_class"].startswith("Pruned") and result["_structprune_modules"] == []
        got = result.get("logits", result.get("last_hidden_state"))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, f=family, h=head: f"{f}-{h}: {m}")
        if tokens is not None:
            assert torch.equal(result["generated"], tokens), family


def test_deepcopy_and_pickle_after_a_forward(tmp_path):
    """The routing and fused-weight caches the modules keep are not part of a copy or a pickle."""
    import copy
    import pickle

    inputs = left_padded()
    model = _masked("llama")
    want = outputs(model, inputs)  # fills the caches
    torch.testing.assert_close(outputs(copy.deepcopy(model), inputs), want, atol=0, rtol=0)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.model.layers[0].mlp.__dict__["_fused"] is None and clone.model.layers[0].self_attn._routing is None
    torch.testing.assert_close(outputs(clone, inputs), want, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_autocast_stays_within_hfs_own_rounding(family):
    """Under torch.autocast(bf16) the patched model (reference and cpp backends) is as close to HF's fp32 outputs
    as HF's own bf16-autocast outputs are (the half-precision rule of tests/helpers/tolerances.py)."""
    _cpp_or_skip()
    from helpers.tolerances import check_close

    inputs = left_padded()
    model = tiny_model(family, "bare")
    ref32 = outputs(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = outputs(model, inputs)
    sp.patch(model)
    for name in ("torch", "cpp"):
        with sp.use_backend(name), torch.autocast("cpu", dtype=torch.bfloat16):
            got = outputs(model, inputs)
        assert sp.last_backends()["attention"] == name
        check_close(f"{family} {name}", got, ref32, plain, torch.bfloat16)


def test_a_layer_with_no_head_left(tmp_path):
    """Every query head of layer 1 pruned: the layer adds its residual only (no o_proj bias here); generation,
    compaction (no q/k/v rows, no cache slot), save/load and unpatch (a zero-weight head) keep the oracle's
    outputs and tokens."""
    heads = torch.ones(L, H, dtype=torch.bool)
    heads[1] = False
    heads[2, 1:] = False  # one head, one KV head
    ffn = torch.ones(L, I, dtype=torch.bool)
    inputs = left_padded()
    oracle_model = oracle(tiny_model("llama"), heads, ffn, head_dim("llama"))
    want, tokens = outputs(oracle_model, inputs), greedy(oracle_model, inputs)
    model = sp.patch(tiny_model("llama"))
    sp.set_masks(model, heads=heads)
    assert sp.get_masks(model).kv_heads[1].sum() == 0 and sp.get_masks(model).kv_heads[2].tolist() == [True] + [False] * 3
    sp.compact(model)
    assert [a.self_attn.num_kv_heads for a in model.model.layers] == [KV, 0, 1]
    torch.testing.assert_close(outputs(model, inputs), want, atol=1e-5, rtol=0)
    assert torch.equal(greedy(model, inputs), tokens)
    sp.save_pretrained(model, tmp_path / "m")
    loaded = sp.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(outputs(loaded, inputs), want, atol=1e-5, rtol=0)
    plain = sp.unpatch(loaded)
    torch.testing.assert_close(outputs(plain, inputs), want, atol=1e-5, rtol=0)
    assert torch.equal(greedy(plain, inputs), tokens)
