"""sp.optimize: the served module computes the model's outputs (fp32 to 1e-5, bf16 by the flash-attention rule),
on padded batches, split over threads or not, from a compacted, masked, dense or reloaded model; bad input errs."""
import warnings

import pytest
import torch

import structprune as sp
from helpers.models import pruned_model as pruned, qa_logits as logits, tiny_batch, tiny_model
from helpers.tolerances import check_close

L, H, I = 3, 4, 96
FAMILIES = ("bert", "roberta", "electra")


def inputs(batch=4, seq=13):
    x = tiny_batch(batch, seq, pad_from=5)
    x["attention_mask"][0, 9:] = 0  # two padded rows, in different chunks of a split batch
    x["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    x["token_type_ids"][:, seq // 2:] = 1
    return x


def cpp_attention_expected(dtype=torch.float32) -> bool:
    """Whether attention should run the cpp kernel here (extension built, AVX-512F, AVX512-BF16 for bf16, backend
    auto or cpp)."""
    from structprune.backends.cpp.serving_attention import supported_bf16, supported_cpu

    supported = supported_cpu() if dtype == torch.float32 else supported_bf16()
    return "cpp" in sp.available_backends("cpu") and sp.get_backend() in ("auto", "cpp") and supported


def cpp_expected() -> bool:
    """Whether the cpp backend's kernels should run (extension built, backend auto or cpp)."""
    return "cpp" in sp.available_backends("cpu") and sp.get_backend() in ("auto", "cpp")


def attention_kernels(fast) -> set:
    """What ran the attention of the layers with heads at the last call."""
    return {layer.attention_kernel for layer in fast.layers if layer.heads > 0}


def reference(model, x, dtype=torch.float32):
    import copy

    m = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return logits(m(**x)).float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_parallel", [True, False])
def test_fp32_matches_within_1e5_on_padded_batches(family, batch_parallel):
    model = pruned(family)
    fast = sp.optimize(model, torch.float32)
    fast.batch_parallel, fast.threads = batch_parallel, 2
    for batch, seq in ((4, 13), (3, 7), (1, 20), (1, 45)):  # (1, 45): one sequence's rows split over 2 threads
        x = inputs(batch, seq)
        got, want = logits(fast(**x)), reference(model, x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert attention_kernels(fast) == ({"cpp"} if cpp_attention_expected() else {"sdpa"})
        assert fast.embeddings.kernel == ("cpp" if cpp_expected() else "module")  # the fused embedding block


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_within_twice_the_plain_bf16_error(family):
    model = pruned(family)
    x = inputs()
    fast = sp.optimize(model, torch.bfloat16)
    got = logits(fast(**x))
    assert attention_kernels(fast) == ({"cpp"} if cpp_attention_expected(torch.bfloat16) else {"sdpa"})
    assert fast.embeddings.kernel == ("cpp" if cpp_expected() else "module")
    check_close(f"{family} bf16", got, reference(model, x), reference(model, x, torch.bfloat16), torch.bfloat16)
    if "cpp" in sp.available_backends("cpu") and sp.get_backend() in ("auto", "cpp"):
        assert sp.last_backends()["norm"] == "cpp"  # the LayerNorms ran the cpp kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sequence_split_by_rows_matches_unsplit(dtype):
    model = pruned("roberta")  # RoBERTa: position ids from the whole row, computed once before the split
    fast = sp.optimize(model, dtype)
    x = {k: v[:1] for k, v in inputs(2, 50).items()}
    x["attention_mask"][0, 41:] = 0
    fast.threads = 3
    rows = logits(fast(**x))
    expected = "cpp" if cpp_attention_expected(dtype) else "sdpa"
    assert attention_kernels(fast) == {expected}  # forward_rows: this thread's query rows against every key
    assert f"attention_kernel={expected}" in repr(fast)
    fast.batch_parallel = False
    whole = logits(fast(**x))
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(rows, whole, atol=tol, rtol=tol)


def test_split_and_unsplit_agree_and_threads_are_kept():
    model = pruned()
    fast = sp.optimize(model, torch.float32)
    x = inputs(5, 11)
    before = torch.get_num_threads()
    fast.threads = 2
    split = logits(fast(**x))
    fast.batch_parallel = False
    whole = logits(fast(**x))
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)
    assert torch.get_num_threads() == before  # the workers' single thread does not leak into the caller


def test_from_pretrained_compacted_model(tmp_path):
    model = pruned()
    sp.save_pretrained(model, tmp_path / "m")
    back = sp.from_pretrained(tmp_path / "m")
    x = inputs()
    torch.testing.assert_close(logits(sp.optimize(back)(**x)), reference(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skipped_sublayers_and_hidden_dimensions(dtype):
    """An l0-full (CoFi) model: a skipped sublayer is the identity, LayerNorm included, in every serving path (batch
    chunks, one sequence split by rows) and in bf16 (issue 27: served with the LayerNorm it had lost, it was wrong)."""
    from model.test_cofi import masks

    model = sp.patch(tiny_model("bert", "qa"), sublayers=True, hidden=True)
    sp.set_masks(model, **masks())
    sp.compact(model)
    fast = sp.optimize(model, dtype)
    fast.threads = 2
    assert [(layer.skip_attention, layer.skip_ffn) for layer in fast.layers] == [(False, False), (True, False),
                                                                                 (False, True)]
    for batch, seq in ((4, 13), (1, 45)):
        x = inputs(batch, seq)
        if dtype == torch.float32:
            torch.testing.assert_close(logits(fast(**x)), reference(model, x), atol=1e-5, rtol=1e-5)
        else:
            check_close("cofi bf16", logits(fast(**x)), reference(model, x), reference(model, x, dtype), dtype)


def test_masked_model_is_served_compacted_on_a_copy():
    model = pruned(compact=False)
    x = inputs()
    want = reference(model, x)
    with pytest.warns(UserWarning, match="compacted copy"):
        fast = sp.optimize(model)
    torch.testing.assert_close(logits(fast(**x)), want, atol=1e-5, rtol=1e-5)
    assert not sp.summary(model) is None and model.bert.encoder.layer[0].intermediate.dense.out_features == I


def test_dense_unpatched_model_and_bare_encoder():
    dense = tiny_model("bert", "qa")
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note for a plain model
        fast = sp.optimize(dense)
    torch.testing.assert_close(logits(fast(**x)), reference(dense, x), atol=1e-5, rtol=1e-5)
    bare = pruned(head="bare")
    with torch.no_grad():
        want = bare(**x).last_hidden_state
    torch.testing.assert_close(sp.optimize(bare)(**x).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_weights_are_copied():
    model = pruned()
    fast = sp.optimize(model)
    x = inputs()
    before = logits(fast(**x))
    with torch.no_grad():
        model.qa_outputs.weight.add_(1.0)
    torch.testing.assert_close(logits(fast(**x)), before)


def test_bad_input_is_a_clear_error():
    model = pruned()
    with pytest.raises(ValueError, match="dtype must be one of"):
        sp.optimize(model, torch.float16)
    with pytest.raises(ValueError, match="int8 is not supported"):
        sp.optimize(model, torch.int8)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        sp.optimize("model")
    with pytest.raises(TypeError, match="model_type"):
        sp.optimize(tiny_model("distilbert", "qa"))
    with pytest.raises(TypeError, match="question-answering head"):
        sp.optimize(tiny_model("bert", "cls"))
    fast = sp.optimize(model)
    with pytest.raises(ValueError, match=r"input_ids: expected a \[batch, sequence\]"):
        fast(input_ids=torch.ones(5, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids"):
        fast(input_ids=torch.ones(2, 5, dtype=torch.long), position_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        fast(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))
