"""The ModernBERT layer benchmark of ``structprune bench --shape modernbert-base``: paired, interleaved ratios.

One global and one local ``ModernBertEncoderLayer`` (HF's, of a 4-layer ModernBERT: layer 3 global, layer 1 local,
both with their pre-attention LayerNorm) are timed in three variants built on the same weights and inputs:

    masked      patched and masked (not compacted), on a kernel backend (``--backend``, default "cpp"): the
                kernels skip the pruned heads and units, and a local layer's attention only its band's keys
    compacted   patched, masked and ``sp.compact``-ed, on the "torch" reference: a physically smaller dense layer
                (the model's own SDPA attention with HF's masks)
    dense       the unpatched HF layer (``attn_implementation="sdpa"``)

The three run alternated call by call (:func:`structprune.tools.timing.compare`: the order flips every round), so
every round gives one ratio ``compacted / masked`` and one ``dense / masked`` measured moments apart; the medians and
quartiles of those per-round ratios are what a shared, loaded machine can still say. Inference (``no_grad``),
fp32. Inputs: random hidden states, the rotary tables and HF's masks (a banded [B, 1, S, S] mask for the local
layer, none for the global one) built by the model's own code. Each case also checks the masked and compacted
outputs against each other (max abs difference).
"""
from __future__ import annotations

import sys
import time

import torch

from structprune.model.compaction import compact
from structprune.model.masks import set_masks
from structprune.model.patching import patch
from structprune.ops import dispatch as ops
from structprune.tools import timing
from structprune.tools.machine import machine_info
from structprune.benchmark.config import Shape
from structprune.benchmark.layers import keep_count, random_mask

LAYERS = {"global": 3, "local": 1}  # layer index of each kind in the 4-layer model (global every 3rd layer)


def modernbert_config(shape: Shape, local_attention: int):
    from transformers import ModernBertConfig

    return ModernBertConfig(vocab_size=64, hidden_size=shape.hidden, num_hidden_layers=4,
                            num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                            local_attention=local_attention,
                            global_attn_every_n_layers=3, attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0,
                            max_position_embeddings=8192, attn_implementation="sdpa", pad_token_id=0)


def build_models(shape: Shape, head_frac: float, ffn_frac: float, local_attention: int, seed: int) -> dict:
    """{"dense", "masked", "compacted"}: three ``ModernBertModel`` with the same weights (eval mode, fp32)."""
    from transformers import ModernBertModel

    cfg = modernbert_config(shape, local_attention)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = ModernBertModel(cfg).eval()
    state = dense.state_dict()
    n = cfg.num_hidden_layers
    heads = torch.stack([random_mask(shape.heads, head_frac, seed + 11 * i) for i in range(n)])
    ffn = torch.stack([random_mask(shape.ffn, ffn_frac, seed + 11 * i + 1) for i in range(n)])
    models = {"dense": dense}
    for kind in ("masked", "compacted"):
        model = ModernBertModel(cfg).eval()
        model.load_state_dict(state)
        patch(model)
        set_masks(model, heads=heads, ffn=ffn)
        if kind == "compacted":
            compact(model)
        models[kind] = model.eval()
    return models


def layer_inputs(model, batch: int, seq: int, layer_kind: str, seed: int) -> tuple:
    """(hidden states [B, S, E], HF's attention mask for the layer kind, (cos, sin)) as the model makes them."""
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(batch, seq, model.config.hidden_size, generator=gen)
    make = create_bidirectional_sliding_window_mask if layer_kind == "local" else create_bidirectional_mask
    mask = make(config=model.config, inputs_embeds=x, attention_mask=None)
    layer_type = model.config.layer_types[LAYERS[layer_kind]]
    pos = torch.arange(seq)[None]
    return x, mask, model.rotary_emb(x, pos, layer_type)


def run_case(models: dict, batch: int, seq: int, layer_kind: str, backend: str, warmup: int, repeats: int,
             seed: int) -> dict:
    """Time the three variants of one layer alternated; returns the row (per-round ratios summarised)."""
    idx = LAYERS[layer_kind]
    x, mask, pos = layer_inputs(models["dense"], batch, seq, layer_kind, seed)
    layers = {k: m.layers[idx] for k, m in models.items()}
    backends = {"masked": backend, "compacted": "torch", "dense": "torch"}

    def step(kind):
        def call():
            with torch.no_grad(), ops.use_backend(backends[kind]):
                return layers[kind](x, attention_mask=mask, position_embeddings=pos)
        return call

    fns = {k: step(k) for k in ("masked", "compacted", "dense")}
    outs, ran = {}, ""
    for k, fn in fns.items():
        ops.reset_last_backends()
        outs[k] = fn()
        if k == "masked":  # which backends the masked layer's ops ran on
            ran = ",".join(f"{op}={b}" for op, b in sorted(ops.last_backends().items()))
    t = timing.compare(fns, warmup=warmup, repeats=repeats, baseline="masked",
                       shapes=f"batch {batch} x seq {seq}, {layer_kind} layer")
    masked, compacted, dense = (t.seconds[k] for k in ("masked", "compacted", "dense"))
    vs_compacted = timing.Spread.of([c / m for c, m in zip(compacted, masked)])
    vs_dense = timing.Spread.of([d / m for d, m in zip(dense, masked)])
    row = dict(layer=layer_kind, layer_index=idx, batch=batch, seq=seq, backend=backend, ran_backends=ran,
               window=models["dense"].config.sliding_window if layer_kind == "local" else -1,
               max_abs_diff_masked_vs_compacted=float((outs["masked"] - outs["compacted"]).abs().max()))
    for k in ("masked", "compacted", "dense"):
        s = t.time(k)
        row[f"{k}_ms"] = dict(median=s.median * 1e3, q1=s.q1 * 1e3, q3=s.q3 * 1e3)
    row["masked_vs_compacted"] = dict(median=vs_compacted.median, q1=vs_compacted.q1, q3=vs_compacted.q3,
                                      samples=[c / m for c, m in zip(compacted, masked)])
    row["masked_vs_dense"] = dict(median=vs_dense.median, q1=vs_dense.q1, q3=vs_dense.q3,
                                  samples=[d / m for d, m in zip(dense, masked)])
    return row


def run(shape: Shape, seqs, batch: int, head_frac: float, ffn_frac: float, backend: str = "cpp",
        local_attention: int = 128, warmup: int = 3, repeats: int = 10, threads: int | None = None, seed: int = 0,
        quiet: bool = False) -> dict:
    """Every (sequence length, layer kind) case; returns the JSON-ready result with the machine."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        models = build_models(shape, head_frac, ffn_frac, local_attention, seed)
        heads_kept, units_kept = keep_count(shape.heads, head_frac), keep_count(shape.ffn, ffn_frac)
        rows = []
        for seq in seqs:
            for kind in ("global", "local"):
                row = run_case(models, batch, seq, kind, backend, warmup, repeats, seed)
                rows.append(row)
                if not quiet:
                    print(f"{kind:<6} L {seq:>5}: masked {row['masked_ms']['median']:8.1f} ms, compacted "
                          f"{row['compacted_ms']['median']:8.1f} ms, dense {row['dense_ms']['median']:8.1f} ms; "
                          f"masked vs compacted {row['masked_vs_compacted']['median']:.3f}x, vs dense "
                          f"{row['masked_vs_dense']['median']:.3f}x", file=sys.stderr, flush=True)
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)
    return {"schema": 1, "benchmark": "modernbert-layer-paired", "machine": machine_info(torch.device("cpu")),
            "config": dict(shape=vars(shape), batch=batch, seqs=list(seqs), head_frac=head_frac, ffn_frac=ffn_frac,
                           heads_kept=heads_kept, units_kept=units_kept, backend=backend,
                           local_attention=local_attention, warmup=warmup, repeats=repeats, threads=threads_used,
                           seed=seed, dtype="fp32", mode="inference"),
            "rows": rows, "elapsed_s": round(time.perf_counter() - t0, 1)}


def format_rows(result: dict) -> str:
    head = ("layer", "L", "masked ms", "compacted ms", "dense ms", "compacted/masked (IQR)", "dense/masked (IQR)")
    lines = [head]
    for r in result["rows"]:
        c, d = r["masked_vs_compacted"], r["masked_vs_dense"]
        lines.append((r["layer"], str(r["seq"]), f"{r['masked_ms']['median']:.1f}",
                      f"{r['compacted_ms']['median']:.1f}", f"{r['dense_ms']['median']:.1f}",
                      f"{c['median']:.3f} ({c['q1']:.3f}-{c['q3']:.3f})",
                      f"{d['median']:.3f} ({d['q1']:.3f}-{d['q3']:.3f})"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)
