"""``structprune prune --task causal-lm`` and ``structprune eval --task causal-lm``: a causal LM pruned on a plain text
file and saved with ``sp.save_pretrained``; its perplexity on a text file. The two QA commands get ``--task``,
``--data``, ``--block-size`` and ``--kv-heads``; ``--task qa`` (the default) runs them as before."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from structprune import atomic

TASKS = ("qa", "causal-lm")
_LM_ONLY = ("data", "kv_heads")
_UNSUPPORTED = {"teacher_logits": "--teacher-logits", "distill_layers": "--distill-layers",
                "keep_layers": "--keep-layers", "stop_after_seconds": "--stop-after-seconds (no resuming yet)",
                "eval_every": "--eval-every"}
_UNSUPPORTED_FLAGS = {"full": "--full", "bf16": "--bf16", "l0_steps": "--l0-steps", "l0_until_target":
                      "--l0-until-target", "l0_train_weights": "--l0-train-weights"}


def load_lm(path: str):
    """A causal LM and its tokenizer from a local directory: a structprune save (pruned shapes kept) or a HF one."""
    import transformers

    import structprune as sp

    if (Path(path) / "structprune_config.json").is_file():
        model = sp.from_pretrained(path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


def _check(args, command: str) -> None:
    from structprune.cli import UsageError

    if args.model is None:
        raise UsageError(f"{command} --task causal-lm needs --model DIR (a HF causal LM with its tokenizer)")
    if args.data is None:
        raise UsageError(f"{command} --task causal-lm needs --data FILE.txt (plain text, one passage per line)")
    for path in (args.data, getattr(args, "dev", None)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{path}: no such file; pass a plain text file")
    if command == "prune":
        given = [flag for key, flag in _UNSUPPORTED.items() if getattr(args, key, None) is not None]
        given += [flag for key, flag in _UNSUPPORTED_FLAGS.items() if getattr(args, key, None)]
        if args.method == "layerdrop":
            given.append("--method layerdrop")
        if given:
            raise UsageError(f"{', '.join(given)}: not available with --task causal-lm (fractions of heads, KV heads "
                             "and FFN units, --speedup / --latency-ms, or --max-params; methods random, gain, l0)")
        if args.kv_heads is not None and (args.speedup is not None or args.latency_ms is not None):
            raise UsageError("--kv-heads with --speedup / --latency-ms: a speed target chooses the KV groups itself "
                             "(a KV head goes with its last query head); give one of them")


def lm_target(args, model):
    """The :class:`PruneTarget` of ``prune --task causal-lm``: fractions kept, ``--max-params``, or a speed target
    (``--speedup`` / ``--latency-ms``) on ``--latency-table`` or the machine's cached table at ``--at BxL``
    (measured when missing: :func:`structprune.latency.get_table`, at ``generate()``'s prefill)."""
    from structprune.cli import UsageError
    from structprune.latency import LatencyTable, get_table
    from structprune.strategies import PruneTarget
    from structprune.strategies.targets import parse_at

    table, at = None, None
    if args.speedup is not None or args.latency_ms is not None:
        if args.latency_table:
            table = LatencyTable.load(args.latency_table)
            at = (table.key.batch, table.key.seq_len)
        elif args.at is None:
            raise UsageError("--speedup / --latency-ms need --at BATCHxSEQ_LEN (the prefill shape the latency refers "
                             "to) or --latency-table")
        else:
            at = parse_at(args.at)
            table = get_table(model, *at, backend=args.latency_backend, cache_dir=args.latency_cache,
                              refresh=args.refresh_latency)
    return PruneTarget(heads=args.heads or 1.0, ffn=args.ffn or 1.0, kv_heads=args.kv_heads, params=args.max_params,
                       per_layer=args.per_layer, speedup=args.speedup, latency_ms=args.latency_ms, at=at,
                       backend=args.latency_backend, table=table, multiple_of=args.multiple_of)


def prune_cmd(args) -> int:
    """Prune a causal LM on ``--data`` and save it compacted; perplexities of the dense and the pruned model."""
    from structprune.lm.data import batches, text_blocks
    from structprune.lm.perplexity import perplexity
    from structprune.lm.prune import prune_lm
    from structprune.model.io import save_pretrained
    from structprune.model.summary import summary
    from structprune.qa.runs import _start_run

    _check(args, "prune")
    out = _start_run(args)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(args.model)
    blocks = text_blocks(tokenizer, args.data, args.block_size)
    dev = text_blocks(tokenizer, args.dev, args.block_size) if args.dev else blocks
    dense = perplexity(model, batches(dev, args.eval_batch_size))
    n_batches = math.ceil(blocks["input_ids"].shape[0] / args.batch_size)
    steps = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * n_batches)
    target = lm_target(args, model)
    log_path = out / "log.jsonl"
    log_path.write_text("")

    def log(entry: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    model, masks = prune_lm(model, blocks, args.method, target, steps, batch_size=args.batch_size, lr=args.lr,
                            distill=args.distill, alpha=args.distill_alpha, temperature=args.temperature,
                            gate_lr=args.gate_lr, lambda_lr=args.gate_lr if args.lambda_lr is None else args.lambda_lr,
                            warmup_steps=min(args.l0_warmup_steps, steps), gain_batches=max(1, args.gain_examples
                                                                                            // args.batch_size),
                            gain_steps=args.gain_steps, keep_dead=args.l0_keep_dead, seed=args.seed, log=log)
    save_pretrained(model, out / "model", overwrite=True, tokenizer=tokenizer)
    pruned = perplexity(model, batches(dev, args.eval_batch_size))
    s = summary(model)
    metrics = {"task": "causal-lm", "method": args.method, "steps": steps, "data": "dev" if args.dev else "train",
               **pruned, "dense_perplexity": dense["perplexity"], "heads_kept": masks.num_heads_kept,
               "kv_heads_kept": [r.kv_heads_kept for r in s.layers], "ffn_kept": masks.num_ffn_kept,
               "heads_per_layer": [r.heads_kept for r in s.layers], "ffn_per_layer": [r.ffn_kept for r in s.layers]}
    if target.table is not None:  # the table's prediction for what was kept, at its prefill shape
        metrics["predicted_speedup"] = target.table.speedup(metrics["heads_per_layer"], metrics["ffn_per_layer"],
                                                            kv_heads=metrics["kv_heads_kept"])
        metrics["latency_at"] = target.table.at
        print(f"predicted speed-up {metrics['predicted_speedup']:.2f}x at {target.table.at} ({target.table.describe()})")
    atomic.write_json(out / "metrics.json", metrics)
    print(f"perplexity {dense['perplexity']:.3f} dense -> {pruned['perplexity']:.3f} pruned; model in {out / 'model'}")
    return 0


def eval_cmd(args) -> int:
    """Perplexity of ``--model`` on ``--data`` (exp of the mean next-token NLL, padding left out) to metrics.json."""
    from structprune.lm.data import batches, text_blocks
    from structprune.lm.perplexity import perplexity
    from structprune.qa.runs import _start_run

    _check(args, "eval")
    out = _start_run(args)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(args.model)
    metrics = {"task": "causal-lm", **perplexity(model, batches(text_blocks(tokenizer, args.data, args.block_size),
                                                                 args.eval_batch_size))}
    atomic.write_json(out / "metrics.json", metrics)
    print(f"perplexity {metrics['perplexity']:.3f} over {metrics['tokens']} tokens")
    return 0


def _dispatch(qa_func, lm_func):
    def run(args) -> int | None:
        if args.task == "causal-lm":
            return lm_func(args)
        given = [k for k in _LM_ONLY if getattr(args, k, None) is not None]
        if given:
            from structprune.cli import UsageError

            raise UsageError(f"--{given[0].replace('_', '-')} is for --task causal-lm")
        return qa_func(args)

    return run


def register(subparsers) -> None:
    from structprune.cli import fraction, positive_int

    for name, lm_func in (("prune", prune_cmd), ("eval", eval_cmd)):
        p = subparsers.choices.get(name)
        if p is None:
            continue
        p.add_argument("--task", choices=TASKS, default="qa",
                       help="qa (SQuAD 2.0, the default) or causal-lm: a decoder (Llama, Mistral, Qwen2, Qwen3) on a "
                            "plain text --data, blocks of --block-size tokens; --dev then names a text file too")
        p.add_argument("--data", default=None, metavar="FILE.txt",
                       help="--task causal-lm: plain text, one passage per line (tokenized, concatenated, cut into "
                            "blocks); required there (default: none, for --task qa)")
        p.add_argument("--block-size", type=positive_int, default=128, help="--task causal-lm: tokens per block")
        if name == "prune":
            p.add_argument("--kv-heads", type=fraction, default=None,
                           help="--task causal-lm: fraction of KV heads KEPT, whole groups with their query heads "
                                "(default: KV heads go only when all their query heads do)")
        p.set_defaults(func=_dispatch(p.get_default("func"), lm_func))
