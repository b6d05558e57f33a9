"""Tiny random decoders with grouped-query attention (Llama, Mistral, Qwen2, Qwen3), a left-padded batch, masks that
prune a whole KV group, one query head and every FFN unit of a layer, and an oracle that zeroes what they prune."""
from __future__ import annotations

import torch
import transformers

L, H, KV, I, HIDDEN, VOCAB, PAD = 3, 8, 4, 48, 64, 100, 0
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
HEADS = {"lm": "ForCausalLM", "cls": "ForSequenceClassification", "tok": "ForTokenClassification",
         "qa": "ForQuestionAnswering", "bare": "Model"}
WINDOW = 4  # Mistral's sliding window: shorter than the batch's sequences


def tiny_config(family: str, attn: str = "sdpa", **kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H,
               num_key_value_heads=KV, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
               initializer_range=0.1, attn_implementation=attn, num_labels=3)
    if family == "mistral":
        cfg["sliding_window"] = WINDOW
    if family == "qwen3":
        cfg["head_dim"] = 16  # its own head_dim, not hidden / heads
    cfg.update(kw)
    return getattr(transformers, PREFIXES[family] + "Config")(**cfg)


def head_dim(family: str) -> int:
    return 16 if family == "qwen3" else HIDDEN // H


def tiny_model(family: str, head: str = "lm", attn: str = "sdpa", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return getattr(transformers, PREFIXES[family] + HEADS[head])(tiny_config(family, attn, **kw)).eval()


def left_padded(b: int = 3, s: int = 12, seed: int = 1):
    """Sequences left-padded by 0, 5 and 2 tokens (pad ids where the mask is 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for row, pad in enumerate((0, 5, 2)[:b]):
        mask[row, :pad] = 0
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


def masks():
    """Layer 0 loses KV group 1 (query heads 2 and 3) and one more query head (6); layer 1 loses query head 5
    (groups end unequal); layer 2 keeps every head and no FFN unit; layers 0 and 1 lose some units."""
    heads = torch.ones(L, H, dtype=torch.bool)
    heads[0, [2, 3, 6]] = False
    heads[1, 5] = False
    g = torch.Generator().manual_seed(3)
    ffn = torch.rand(L, I, generator=g) < 0.6
    ffn[0, :2], ffn[2] = True, False
    return heads, ffn


def oracle(model, heads, ffn, dim: int):
    """The plain HF model with forward pre-hooks zeroing the pruned heads' slices of the ``o_proj`` input and the
    pruned units' columns of the ``down_proj`` input."""
    for i, layer in enumerate(model.base_model.layers):
        col = heads[i].repeat_interleave(dim).float()
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, c=col: (a[0] * c.to(a[0].dtype),))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, c=ffn[i].float(): (a[0] * c.to(a[0].dtype),))
    return model


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "start_logits", None) is not None:
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def greedy(model, inputs, new_tokens: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
