"""The ``structprune bench`` command: its options, the config they make, and the files it writes."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from structprune import atomic
from structprune.ops import dispatch as ops
from structprune.benchmark.config import (DEFAULT_FFN_FRACS, DEFAULT_HEAD_FRACS, DTYPES, MODERNBERT_SHAPES, MODES,
                                          QUICK_FRACS, SHAPES, VARIANT_KINDS, BenchConfig)
from structprune.benchmark.results import BenchResult
from structprune.benchmark.runner import run_benchmark


def _fracs(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in [0, 1], got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", nargs="+", default=None, metavar="SHAPE",
                   help=f"layer shapes: {', '.join(SHAPES)} or HIDDENxHEADSxFFN (default bert-base; tiny with --quick); "
                        f"or one ModernBERT shape ({', '.join(MODERNBERT_SHAPES)}): its global and local layer, "
                        "masked vs compacted vs dense HF, paired interleaved ratios")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="sequence length (default 128 on CPU, 384 on CUDA); several only for a ModernBERT shape")
    p.add_argument("--local-attention", type=int, default=128,
                   help="ModernBERT shapes: the local layers' attention width (default 128, ModernBERT-base's: keys "
                        "within |q - k| <= 64)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch.set_num_threads (default: the cores this process may use)")
    p.add_argument("--heads-kept", type=_fracs, default=None, metavar="F,F,..",
                   help="kept fractions of attention heads (default 1,0.75,0.5,0.25)")
    p.add_argument("--ffn-kept", type=_fracs, default=None, metavar="F,F,..",
                   help="kept fractions of FFN units (default 1,0.5,0.3,0.1)")
    p.add_argument("--variants", nargs="+", choices=VARIANT_KINDS, default=None,
                   help="variant kinds to run (default all; speedups need dense-sdpa, 'vs compacted' needs compacted)")
    p.add_argument("--backend", nargs="+", choices=ops.BACKENDS, default=None,
                   help="backends for the pruned[...] variants (default: every one available; triton on CPU only when named)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=None, help="inference and/or training (default both)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile of compacted and pruned layers (default on, off with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not time torch.compile")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3 on CPU, 10 on CUDA events)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples (default 10 on CPU, 100 on CUDA events)")
    p.add_argument("--min-time", type=float, default=0.0,
                   help="CPU: seconds per sample; short calls are repeated within a sample to reach it (default 0)")
    p.add_argument("--cuda-timer", choices=("auto", "do_bench", "events"), default="auto",
                   help="CUDA timing: triton.testing.do_bench or CUDA events, both flushing L2 (auto: do_bench if triton)")
    p.add_argument("--padding", type=float, default=0.0,
                   help="fraction of key positions masked as padding (default 0: no attention mask)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and the random masks")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing outputs with the compacted layer")
    p.add_argument("--out", default=None,
                   help="write results.json, results.csv, table.txt and PNG plots here (default: print the table only)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="with --out: skip the PNG plots")
    p.add_argument("--profile", action="store_true",
                   help="with --out: torch.profiler Chrome traces of each case (traces/*.json, merged trace.json, profile.txt)")
    p.add_argument("--profile-iters", type=int, default=2, help="calls recorded per case with --profile")
    p.add_argument("--nvtx", action="store_true", help="CUDA: NVTX ranges per op (attention/ffn) while timing, for nsys")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: tiny shape, batch 2, seq 16, fractions {1,0.5}, one warm-up and one repeat, no compile")
    p.add_argument("--strict", action="store_true", help="stop at the first failing case instead of recording it")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    if args.profile and not args.out:
        raise SystemExit("structprune bench: --profile needs --out DIR")
    if args.seq and len(args.seq) > 1:
        raise SystemExit(f"structprune bench: one --seq for BERT-layer shapes, got {args.seq}")
    return BenchConfig(
        shapes=args.shape or (["tiny"] if quick else ["bert-base"]),
        batch=args.batch or (2 if quick else None),
        seq=args.seq[0] if args.seq else (16 if quick else None),
        dtypes=args.dtype,
        device=args.device,
        threads=args.threads,
        head_fracs=args.heads_kept or (QUICK_FRACS if quick else DEFAULT_HEAD_FRACS),
        ffn_fracs=args.ffn_kept or (QUICK_FRACS if quick else DEFAULT_FFN_FRACS),
        variants=tuple(args.variants or VARIANT_KINDS),
        backends=tuple(args.backend) if args.backend else None,
        compile=(not quick) if args.compile is None else args.compile,
        modes=tuple(args.mode or MODES),
        warmup=args.warmup if args.warmup is not None else (1 if quick else None),
        repeats=args.repeats or (1 if quick else None),
        min_time=args.min_time,
        cuda_timer=args.cuda_timer,
        seed=args.seed,
        padding=args.padding,
        check=args.check,
        profile_dir=args.out if args.profile else None,
        profile_iters=args.profile_iters,
        nvtx=args.nvtx,
        strict=args.strict,
        quiet=args.quiet,
    )


def command(args: argparse.Namespace) -> int:
    os.environ.setdefault("STRUCTPRUNE_QUIET", "1")  # the auto-backend warning is noise here: backends are explicit
    if args.shape and any(s in MODERNBERT_SHAPES for s in args.shape):
        return modernbert_command(args)
    cfg = config_from_args(args)
    if cfg.backends and "triton" in cfg.backends and cfg.resolved_device().type == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton runs CPU tensors only in its interpreter
    if cfg.profile_dir:
        prof_txt = Path(cfg.profile_dir) / "profile.txt"
        if prof_txt.exists():
            prof_txt.unlink()
    def checkpoint(partial: BenchResult) -> None:  # results so far, replaced by the full files at the end
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic.write_json(Path(args.out) / "results.partial.json", {**partial.to_json(), "partial": True}, indent=1)

    result = run_benchmark(cfg, checkpoint if args.out else None)
    if args.out and (Path(args.out) / "results.partial.json").exists():
        (Path(args.out) / "results.partial.json").unlink()
    print(result.table())
    if args.out:
        files = result.write(args.out, plots=args.plot)
        if cfg.profile_dir and (Path(cfg.profile_dir) / "trace.json").exists():
            files.append(str(Path(cfg.profile_dir) / "trace.json"))
        print(f"\nwrote {', '.join(files)}")
    failed = [s for s in result.skipped if s.get("error")]
    print(f"\n{len(result.rows)} rows in {result.elapsed_s:.0f}s" + (f"; {len(failed)} cases failed" if failed else ""))
    return 1 if failed and not result.rows else 0


def modernbert_command(args: argparse.Namespace) -> int:
    """``--shape modernbert-*``: the paired benchmark of :mod:`structprune.benchmark.modernbert`."""
    from structprune.benchmark import modernbert

    if len(args.shape) != 1:
        raise SystemExit(f"structprune bench: a ModernBERT shape runs alone, got {args.shape}")
    fracs = [f for f in (args.heads_kept, args.ffn_kept) if f is not None]
    if any(len(f) != 1 for f in fracs):
        raise SystemExit("structprune bench: a ModernBERT shape takes one --heads-kept and one --ffn-kept fraction")
    backend = args.backend[0] if args.backend else "cpp"
    result = modernbert.run(MODERNBERT_SHAPES[args.shape[0]], args.seq or [512], args.batch or 8,
                            args.heads_kept[0] if args.heads_kept else 0.5, args.ffn_kept[0] if args.ffn_kept else 0.3,
                            backend=backend, local_attention=args.local_attention,
                            warmup=3 if args.warmup is None else args.warmup, repeats=args.repeats or 10,
                            threads=args.threads, seed=args.seed, quiet=args.quiet)
    result["command"] = " ".join(["structprune", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None
    table = modernbert.format_rows(result)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic.write_json(Path(args.out) / "results.json", result, indent=1)
        (Path(args.out) / "table.txt").write_text(table + "\n")
        print(f"\nwrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'table.txt'}")
    return 0


_DESCRIPTION = ("Time one BERT encoder layer dense, compacted and pruned (per kernel backend, eager and compiled) "
                "over kept fractions of heads and FFN units; see bench/README.md.")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time dense, compacted and pruned BERT layers per backend",
                              description=_DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="structprune bench", description=_DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_args(argv))

