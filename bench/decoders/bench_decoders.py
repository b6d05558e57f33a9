"""Speed of a pruned Llama-3.2-1B-shaped decoder (random weights) against dense HF: prefill and decode with the KV
cache, fp32 and bf16 autocast, the LM head timed (issue 24, part 6).

    python bench/decoders/bench_decoders.py --layers 4 --threads 2 --out bench/results/decoders   # the benchmark
    python bench/decoders/bench_decoders.py --layers 1 --new-tokens 4 --prompt 32 --prefill 1x32 --repeats 2  # smoke

Models: the dense HF ``LlamaForCausalLM`` (hidden 2048, 32 query heads, 8 KV heads, head_dim 64, FFN 8192, vocab
32000, untied LM head, ``--layers`` layers); the same model patched with masks (``masked``: 50% of the query heads
kept as whole KV groups, so 50% of the KV heads; 30% of the FFN units, random per layer); and that model compacted
(``compacted``). Every side runs in one process, alternated call by call (``structprune.tools.timing.compare``):

- prefill: ``model(input_ids, attention_mask, use_cache=True, logits_to_keep=1)``, what ``generate`` runs first
  (the LM head on the last position); ``--prefill-logits all`` puts it on every position (a scoring forward);
- decode: after a ``--prompt``-token prefill, ``--new-tokens`` greedy steps per model (one token against the KV
  cache); each timed round is the next step of every model, so the caches grow alike and every step is a pair.

Reports the median per-call time with its IQR, the median of the per-round ratios (dense / side, masked vs
compacted), the KV-cache bytes, and for decode the bytes each step must read (weights it touches + the KV cache)
against the measured time: the achieved GB/s and the byte-ideal ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers

import structprune as sp
from structprune.tools.machine import machine_info
from structprune.tools.timing import compare


def build(layers: int, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    torch.manual_seed(seed)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    heads = torch.zeros(layers, 32, dtype=torch.bool)
    ffn = torch.zeros(layers, 8192, dtype=torch.bool)
    for layer in range(layers):
        for kv in torch.randperm(8, generator=g)[:4].tolist():  # 4 of the 8 KV groups, each with its 4 query heads
            heads[layer, kv * 4:(kv + 1) * 4] = True
        ffn[layer, torch.randperm(8192, generator=g)[:round(0.3 * 8192)]] = True
    masked = sp.patch(copy.deepcopy(dense))
    sp.set_masks(masked, heads=heads, ffn=ffn)
    compacted = sp.compact(sp.set_masks(sp.patch(copy.deepcopy(dense)), heads=heads, ffn=ffn))
    for m in (dense, masked, compacted):
        m.requires_grad_(False)
    return {"dense": dense, "masked": masked, "compacted": compacted}


def touched_params(model) -> int:
    """Parameters one decode step reads: all but the input embedding (of which one row is read)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb) + emb.shape[1]


def bytes_per_param(name: str, dtype: str) -> int:
    """What a decode step moves per weight: fp32 reads 4 bytes; under bf16 autocast HF's linears cast the fp32
    weight at every call (read 4, write 2, read 2), the patched models' cached bf16 copies read 2."""
    if dtype == "fp32":
        return 4
    return 8 if name == "dense" else 2


def kv_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def prefill(models, dtype, batch, seq, repeats, logits, vocab=32000):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    keep = 0 if logits == "all" else 1

    def call(m):
        def run():
            with torch.no_grad(), autocast(dtype):
                return m(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=keep)
        return run
    t = compare({n: call(m) for n, m in models.items()}, warmup=1, repeats=repeats,
                shapes=f"prefill B{batch}xL{seq} {dtype}")
    return t


def decode(models, dtype, prompt, new_tokens, vocab=32000):
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, vocab, (1, prompt), generator=g)
    state, tokens = {}, {n: [] for n in models}
    with torch.no_grad(), autocast(dtype):
        for n, m in models.items():
            for _ in range(2):  # warm-up: a prefill and two steps (weights packed, caches allocated)
                out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
                for _ in range(2):
                    out = m(input_ids=out.logits[:, -1:].argmax(-1), cache=out.past_key_values, use_cache=True)
            out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
            state[n] = [out.past_key_values, out.logits[:, -1:].argmax(-1)]
    kv_prompt = {n: kv_bytes(s[0]) for n, s in state.items()}

    def step(n):
        m = models[n]

        def run():
            cache, tok = state[n]
            with torch.no_grad(), autocast(dtype):
                out = m(input_ids=tok, cache=cache, use_cache=True)
            state[n][1] = out.logits[:, -1:].argmax(-1)
            tokens[n].append(int(state[n][1]))
        return run
    t = compare({n: step(n) for n in models}, warmup=0, repeats=new_tokens,
                shapes=f"decode B1, {new_tokens} tokens after {prompt}, {dtype}")
    kv_end = {n: kv_bytes(s[0]) for n, s in state.items()}
    t.notes.update(kv_bytes_after_prompt=kv_prompt, kv_bytes_at_end=kv_end,
                   kv_bytes_per_token={n: kv_end[n] // (prompt + new_tokens) for n in models},
                   same_tokens_masked_compacted=tokens["masked"] == tokens["compacted"])
    return t


def summarise(t, models, dtype=None, decode_step=False, prompt=0, new_tokens=0) -> dict:
    out = {"shapes": t.shapes, "repeats": t.repeats, "threads": t.threads, "sides": {}}
    for n in t.names:
        s = t.time(n)
        side = {"median_ms": s.median * 1e3, "q1_ms": s.q1 * 1e3, "q3_ms": s.q3 * 1e3}
        if n != t.baseline:
            r = t.speedup(n)
            side["dense_over_side"] = {"median": r.median, "q1": r.q1, "q3": r.q3}
        out["sides"][n] = side
    m, c = t.seconds["masked"], t.seconds["compacted"]
    ratio = sorted(b / a for a, b in zip(m, c))
    out["masked_vs_compacted"] = {"median": ratio[len(ratio) // 2], "q1": ratio[len(ratio) // 4],
                                  "q3": ratio[(3 * len(ratio)) // 4], "meaning": "compacted time / masked time"}
    if decode_step:
        params = {"dense": touched_params(models["dense"])}
        params["masked"] = params["compacted"] = touched_params(models["compacted"])  # the packed kept weights
        for n in t.names:
            weights = params[n] * bytes_per_param(n, dtype)
            kv_mid = (t.notes["kv_bytes_after_prompt"][n] + t.notes["kv_bytes_at_end"][n]) // 2
            read = weights + kv_mid
            secs = out["sides"][n]["median_ms"] / 1e3
            out["sides"][n].update(params_read=params[n], weight_bytes_read=weights, kv_bytes_mid=kv_mid,
                                   bytes_read_per_step=read, achieved_gb_s=read / secs / 1e9)
        d = out["sides"]["dense"]["bytes_read_per_step"]
        out["byte_ideal_dense_over"] = {n: d / out["sides"][n]["bytes_read_per_step"] for n in t.names}
        out.update({k: v for k, v in t.notes.items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--prefill", default="1x512,4x256", help="BxL shapes, comma-separated ('' for none)")
    p.add_argument("--prefill-logits", choices=("last", "all"), default="last")
    p.add_argument("--repeats", type=int, default=5, help="prefill rounds")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sp.set_backend(args.backend)
    start = time.time()
    models = build(args.layers)
    results = {"machine": machine_info(torch.device("cpu")), "layers": args.layers,
               "note": "random weights; the CPU was shared with other jobs (a training run, other agents)",
               "prefill": [], "decode": []}
    lines = []
    for dtype in args.dtypes.split(","):
        for shape in filter(None, args.prefill.split(",")):
            b, s = map(int, shape.split("x"))
            t = prefill(models, dtype, b, s, args.repeats, args.prefill_logits)
            results["prefill"].append(dict(summarise(t, models), dtype=dtype, logits=args.prefill_logits))
            lines += [t.describe(), f"masked vs compacted: {results['prefill'][-1]['masked_vs_compacted']}", ""]
            print(lines[-3], lines[-2], sep="\n", flush=True)
        if args.new_tokens:
            t = decode(models, dtype, args.prompt, args.new_tokens)
            r = dict(summarise(t, models, dtype, True, args.prompt, args.new_tokens), dtype=dtype)
            results["decode"].append(r)
            extra = {n: (r["sides"][n]["bytes_read_per_step"] / 1e6, r["sides"][n]["achieved_gb_s"])
                     for n in t.names}
            lines += [t.describe(), f"masked vs compacted: {r['masked_vs_compacted']}",
                      "MB read per step, GB/s: " + ", ".join(f"{n} {mb:.0f} MB {gbs:.1f} GB/s"
                                                            for n, (mb, gbs) in extra.items()),
                      f"byte ideal dense/side: {r['byte_ideal_dense_over']}; KV bytes/token: "
                      f"{r['kv_bytes_per_token']}; same tokens: {r['same_tokens_masked_compacted']}", ""]
            print("\n".join(lines[-6:]), flush=True)
    results["wall_s"] = time.time() - start
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
