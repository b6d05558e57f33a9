"""Small random models of every supported family, shared by the tests."""
from __future__ import annotations

import pytest
import torch
import transformers

import structprune as sp

FAMILIES = ("bert", "roberta", "electra", "xlm-roberta", "distilbert")
HEADS = ("qa", "cls", "bare")
PREFIXES = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra", "xlm-roberta": "XLMRoberta",
            "distilbert": "DistilBert"}
SUFFIXES = {"qa": "ForQuestionAnswering", "cls": "ForSequenceClassification", "bare": "Model"}


def tiny_config(family: str = "bert", attn: str = "sdpa", layers: int = 3, hidden: int = 64, heads: int = 4,
                ffn: int = 96, act: str = "gelu"):
    common = dict(vocab_size=120, max_position_embeddings=80, attn_implementation=attn, pad_token_id=1)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                                             activation=act, **common)
    cls = getattr(transformers, PREFIXES[family] + "Config")
    extra = {"embedding_size": hidden // 2} if family == "electra" else {}  # ELECTRA's projected embeddings
    return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
               hidden_act=act, **extra, **common)


def model_class(family: str, head: str):
    return getattr(transformers, PREFIXES[family] + SUFFIXES.get(head, head))


def tiny_model(family: str = "bert", head: str = "qa", attn: str = "sdpa", seed: int = 0, **kw):
    """``head``: "qa", "cls", "bare" or a transformers class suffix ("ForMaskedLM")."""
    torch.manual_seed(seed)
    return model_class(family, head)(tiny_config(family, attn, **kw)).eval()


def layer_part(model, i: int, role: str):
    """The module in role ``role`` ("query", "attn_out", "ffn_in", "ffn_out", ...) of layer ``i``, patched or not
    (the projections keep their HF names)."""
    import structprune as sp

    family = sp.family_of(model)
    return family.parts(family.layers(model)[i])[role]


def pruning_masks(seed: int = 0, layers: int = 3, heads: int = 4, ffn: int = 96):
    """Random masks for a tiny model with a layer at 0 heads and a layer at 0 FFN units."""
    g = torch.Generator().manual_seed(seed)
    head_mask = torch.rand(layers, heads, generator=g) < 0.5
    head_mask[0], head_mask[1] = True, False
    ffn_mask = torch.rand(layers, ffn, generator=g) < 0.3
    ffn_mask[0, :3], ffn_mask[2] = True, False
    return head_mask, ffn_mask


def save_tiny_qa_model(directory, tokenizer_path):
    """A tiny random BERT QA model with a real (MiniLM) tokenizer, saved to ``directory``; returns the model."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_path))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertForQuestionAnswering(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def tiny_batch(batch: int = 3, seq: int = 11, pad_from: int | None = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None and batch > 1:
        mask[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, batch):
    out = model(**batch)
    if hasattr(out, "start_logits") and out.start_logits is not None:
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state


@pytest.fixture(autouse=True)
def one_thread_reference_backend():
    """Tiny models on one thread (threads only add contention on a 2-core machine) and the reference
    backend (compiled backends are checked separately); conftest restores the backend afterwards."""
    import warnings

    import structprune as sp

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="structprune: no compiled kernel backend")
    sp.set_backend("torch")
    yield
    torch.set_num_threads(n)


def qa_batches(n=3, bs=8, seed=1, vocab=100, seq=16):
    """Random QA training batches (token ids below ``vocab``, ``seq`` tokens, random answer spans)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (bs, seq), generator=g),
             "attention_mask": torch.ones(bs, seq, dtype=torch.long),
             "start_positions": torch.randint(0, seq, (bs,), generator=g),
             "end_positions": torch.randint(0, seq, (bs,), generator=g)} for _ in range(n)]


def pruned_model(family: str = "bert", compact: bool = True, head: str = "qa"):
    """A tiny patched model (3 layers, 4 heads, 96 FFN units) under fixed random masks with a layer at 0 heads and
    a layer at 0 FFN units; compacted unless ``compact=False``."""
    model = sp.patch(tiny_model(family, head))
    layers, heads_n, units = 3, 4, 96
    g = torch.Generator().manual_seed(5)
    heads, ffn = torch.rand(layers, heads_n, generator=g) < 0.5, torch.rand(layers, units, generator=g) < 0.3
    heads[0], heads[1] = True, False  # a layer at 0 heads
    ffn[0, :2], ffn[2] = True, False   # a layer at 0 FFN units
    sp.set_masks(model, heads=heads, ffn=ffn)
    return sp.compact(model) if compact else model


def qa_logits(out):
    """Start and end logits side by side: one tensor to compare."""
    return torch.cat([out.start_logits, out.end_logits], dim=-1)
