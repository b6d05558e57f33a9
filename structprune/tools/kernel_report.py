"""``structprune kernels``: compile every Triton kernel variant the library would launch, for GPU targets that
need not be present, and report each one's launch config and resource use.

For a model shape, dtypes and kept fractions, the Triton ops' implementations are run on ``meta`` tensors with the
launch configs chosen for each ``--arch`` (:func:`structprune._kernels._configs.target`); every kernel launch they
make is recorded instead of run (:mod:`structprune.tools.kernel_launches`: forward with and without saved intermediates,
backward for the gradient sets training uses, with and without a padding mask and attention dropout, hard-concrete
sampling), and each distinct launch is compiled by the Triton compiler for that target (Triton's specialization of
the real launch: dtypes, 16-byte divisibility of sizes and strides). Registers and spill bytes per thread (stack
frame + local memory) come from ``cuobjdump -res-usage`` on the cubin. The run fails (exit 1) on a compile error,
shared memory above the target's per-block limit, or a grid axis above CUDA's limits. Uses Triton internals
(``JITFunction._pack_args``, the binder), checked against triton 3.x.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from structprune.tools.kernel_launches import DTYPES, OPS, Launch, Shape, collect_launches

SHAPES = {  # hidden size, attention heads, FFN size, activation
    "bert-base": (768, 12, 3072, "gelu"),
    "minilm": (384, 12, 1536, "gelu"),
    "modernbert-base": (768, 12, 1152, "gelu"),  # GLU FFN of 1152 units (Wi: 2304 rows)
}
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# Constexprs shown as the variant of a kernel (the block sizes have their own columns).
_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK")


def shape_from_model(path: str) -> Shape:
    """The layer shape of the HF model in directory ``path`` (its ``config.json``)."""
    from transformers import AutoConfig

    from structprune.model.families import family_for_type

    cfg = AutoConfig.from_pretrained(path)
    try:
        sizes = family_for_type(cfg.model_type).sizes(cfg)
        activation = sizes.kernel_activation
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return Shape(sizes.hidden, sizes.heads, sizes.intermediate, activation)


def parse_shape(text: str) -> Shape:
    """A preset name (``bert-base``, ``minilm``) or ``HIDDEN:HEADS:FFN`` (GELU), e.g. ``1536:12:6144``."""
    if text in SHAPES:
        return Shape(*SHAPES[text])
    m = re.fullmatch(r"(\d+):(\d+):(\d+)", text.strip())
    if not m or int(m.group(2)) == 0 or int(m.group(1)) % int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected one of {sorted(SHAPES)} or HIDDEN:HEADS:FFN with HEADS dividing "
                                         f"HIDDEN (e.g. 1536:12:6144), got {text!r}")
    return Shape(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def _shape_name(text: str) -> str:
    parse_shape(text)  # argparse type: validate, keep the name
    return text


def parse_arch(text: str) -> tuple[int, int]:
    """``sm_90``, ``sm_90a``, ``90`` or ``9.0`` -> ``(9, 0)``."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?a?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected an architecture like sm_80 or sm_90, got {text!r}")
    if m.group(2) is not None:
        return int(m.group(1)), int(m.group(2))
    num = int(m.group(1))
    if num < 10:
        raise argparse.ArgumentTypeError(f"expected an architecture like sm_80 or sm_90, got {text!r}")
    return num // 10, num % 10


def arch_name(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


# ------------------------------------------------------------------------------------------ compiling
@dataclass
class KernelRow:
    arch: str
    shape: str
    kernel: str
    dtype: str
    variant: dict
    blocks: dict
    num_warps: int
    num_stages: int
    shared_bytes: int | None = None
    shared_limit: int = 0
    shared_estimate: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    grid: list = field(default_factory=list)
    compile_seconds: float = 0.0
    ops: list = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _specialize(launch: Launch, backend):
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return options, signature, constexprs, attrs, bound


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, spill bytes per thread) of the cubin's kernel, from ``cuobjdump -res-usage``: the spill bytes
    are the stack frame plus local memory (ptxas puts register spills in the stack frame; these kernels keep no
    local arrays of their own)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    if reg is None or stack is None or local is None:
        return (int(reg.group(1)) if reg else None), None
    return int(reg.group(1)), int(stack.group(1)) + int(local.group(1))


def _estimate(name: str, blocks: dict, num_stages: int, dtype) -> int | None:
    from structprune._kernels import _configs

    cfg = dict(blocks, num_stages=num_stages)
    if name in ("gemm_kernel", "_ffn_bwd_act_kernel", "_glu_bwd_kernel"):
        return _configs.gemm_smem(cfg, dtype)
    if name == "_glu_fwd_kernel":
        return _configs.glu_smem(cfg, dtype)
    if name == "_rot_fwd_kernel":
        return _configs.rotary_flash_smem(cfg, dtype, backward=False)
    if name in ("_rot_bwd_dq_kernel", "_rot_bwd_dkdv_kernel"):
        return _configs.rotary_flash_smem(cfg, dtype, backward=True)
    if name == "_attn_fwd_kernel":
        return _configs.flash_smem(cfg, dtype, backward=False)
    if name in ("_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        return _configs.flash_smem(cfg, dtype, backward=True)
    return None


def _score(launch: Launch) -> int:
    """How many features a launch switches on (stores, bias, gate, padding mask...): the heaviest variant of a
    config is the one a sample keeps."""
    return sum(bool(v) for k, v in launch.kwargs.items() if k in launch.fn.arg_names and k not in _BLOCKS)


def sample_launches(launches: list[Launch]) -> list[Launch]:
    """One launch per kernel and launch config (block sizes, warps, stages): the one with the most features on.
    Every config the chooser picks is still compiled; variants differing only in epilogue flags are not."""
    best: dict = {}
    for launch in launches:
        blocks = tuple((k, v) for k, v in launch.kwargs.items() if k in _BLOCKS)
        key = (launch.fn.fn.__name__, blocks, launch.kwargs.get("num_warps"), launch.kwargs.get("num_stages"))
        if key not in best or _score(launch) > _score(best[key]):
            best[key] = launch
    return list(best.values())


_compiled: dict = {}  # compile key -> (shared, registers, local bytes, error, seconds): a kernel is compiled once


def compile_report(launches: list[Launch], cc: tuple[int, int], dtype_name: str, shape_name: str = "",
                   compile: bool = True) -> list[KernelRow]:
    """Compile each distinct launch in ``launches`` for ``cc``; one :class:`KernelRow` per distinct kernel
    (``compile=False``: the rows without compiling, for listing what would be compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from structprune._kernels import _configs

    target = GPUTarget("cuda", cc[0] * 10 + cc[1], 32)
    backend = make_backend(target)
    limit = _configs.smem_limit(cc)
    rows: dict[str, KernelRow] = {}
    for launch in launches:
        name = launch.fn.fn.__name__
        options, signature, constexprs, attrs, bound = _specialize(launch, backend)
        consts = {k: v for k, v in launch.kwargs.items() if k in launch.fn.arg_names}
        key = json.dumps([name, signature, sorted((str(k), str(v)) for k, v in constexprs.items()),
                          sorted((str(k), str(v)) for k, v in attrs.items()), launch.kwargs.get("num_warps"),
                          launch.kwargs.get("num_stages")], default=str)
        grid = list(launch.grid) if not callable(launch.grid) else []
        if key in rows:
            row = rows[key]
            if launch.op not in row.ops:
                row.ops.append(launch.op)
            row.grid = [max(a, b) for a, b in zip(row.grid, grid)] if row.grid else grid
            continue
        blocks = {k: v for k, v in consts.items() if k in _BLOCKS}
        row = KernelRow(arch=arch_name(cc), shape=shape_name, kernel=name, dtype=dtype_name,
                        variant={k: v for k, v in consts.items() if k not in _BLOCKS}, blocks=blocks,
                        num_warps=options.num_warps, num_stages=options.num_stages, shared_limit=limit,
                        shared_estimate=_estimate(name, blocks, options.num_stages, DTYPES[dtype_name]),
                        grid=grid, ops=[launch.op])
        rows[key] = row
        memo_key = (cc, key)
        if not compile:
            continue
        if memo_key not in _compiled:
            t0 = time.perf_counter()
            result = [None, None, None, None]
            try:
                kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
                result[0] = int(kernel.metadata.shared)
                result[1], result[2] = _resource_usage(kernel.asm["cubin"])
            except Exception as exc:  # a compile error is a finding of the report, not a crash of it
                result[3] = f"compile error: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
            _compiled[memo_key] = (*result, time.perf_counter() - t0)
        row.shared_bytes, row.registers, row.spill_bytes, row.error, row.compile_seconds = _compiled[memo_key]
    for row in rows.values():
        check_limits(row)
    return list(rows.values())


def check_limits(row: KernelRow) -> KernelRow:
    """Set ``row.error`` when the kernel needs more shared memory than its target has or its grid exceeds
    CUDA's limits (a compile error already set stays)."""
    if row.error is None and row.shared_bytes is not None and row.shared_bytes > row.shared_limit:
        row.error = f"shared memory {row.shared_bytes} B above the {row.shared_limit} B limit of {row.arch}"
    for axis, (n, cap) in enumerate(zip(row.grid, GRID_LIMITS)):
        if row.error is None and n > cap:
            row.error = f"grid axis {axis} has {n} blocks, above CUDA's limit of {cap}"
    return row


def run_report(shapes: dict, archs, dtypes, heads_kept, ffn_kept, batch: int, seq: int, sample: bool = False,
               compile: bool = True, ops=OPS, progress=None) -> list[KernelRow]:
    """Rows for every (shape, arch, dtype), over every pair of kept fractions; a kernel launched by several cases
    appears once per (shape, arch, dtype) with every op that launches it, and is compiled once per arch.
    ``shapes``: name -> :class:`Shape`. ``sample``: see :func:`sample_launches`."""
    out = []
    for name, shape in shapes.items():
        for cc in archs:
            for dt in dtypes:
                t0 = time.perf_counter()
                launches = []
                for h in heads_kept:
                    for f in ffn_kept:
                        launches += collect_launches(shape, cc, dt, h, f, batch, seq, ops)
                if sample:
                    launches = sample_launches(launches)
                rows = compile_report(launches, cc, dt, name, compile=compile)
                if progress:
                    progress(f"{name} {arch_name(cc)} {dt}: {len(rows)} kernels, {sum(not r.ok for r in rows)} "
                             f"failing, {time.perf_counter() - t0:.1f} s")
                out += rows
    return out


# ------------------------------------------------------------------------------------------- printing
def _kb(n):
    return "-" if n is None else f"{n / 1024:.1f}"


def format_table(rows: list[KernelRow]) -> str:
    head = ("shape", "arch", "dtype", "kernel", "variant", "blocks", "warps", "stages", "smem KB", "limit", "est KB",
            "regs", "spill B", "status")
    lines = [head]
    for r in rows:
        variant = " ".join(f"{k}={v}" for k, v in r.variant.items())
        blocks = "x".join(str(v) for v in r.blocks.values())
        lines.append((r.shape, r.arch, r.dtype, r.kernel, variant, blocks, str(r.num_warps), str(r.num_stages),
                      _kb(r.shared_bytes), _kb(r.shared_limit), _kb(r.shared_estimate),
                      "-" if r.registers is None else str(r.registers),
                      "-" if r.spill_bytes is None else str(r.spill_bytes), "ok" if r.ok else "FAIL: " + r.error))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


# ------------------------------------------------------------------------------------------------ CLI
def _kernels_importable() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("structprune kernels compiles for GPUs: unset TRITON_INTERPRET (it builds the kernels "
                         "for the CPU interpreter)")
    from structprune.backends import triton as _triton_backend

    if _triton_backend._IMPORT_ERROR:
        raise RuntimeError(f"the Triton kernels cannot be imported: {_triton_backend._IMPORT_ERROR}")


def run(args) -> int:
    if args.model:
        from structprune.cli import check_model_dir

        check_model_dir(args.model)
    _kernels_importable()
    if args.model:
        label = "/".join(os.path.normpath(args.model).split(os.sep)[-2:])
        shapes = {label: shape_from_model(args.model)}
    else:
        shapes = {n: parse_shape(n) for n in args.shape}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    rows = run_report(shapes, args.arch, args.dtype, args.heads, args.ffn, args.batch, args.seq,
                      sample=args.sample, compile=not args.dry_run, ops=args.ops, progress=log)
    failing = [r for r in rows if not r.ok]
    spilling = [r for r in rows if r.ok and r.spill_bytes]
    if args.json:
        print(json.dumps({"shapes": {n: asdict(s) for n, s in shapes.items()}, "batch": args.batch, "seq": args.seq,
                          "heads_kept": args.heads, "ffn_kept": args.ffn, "sample": args.sample, "ok": not failing,
                          "seconds": round(time.perf_counter() - t0, 1),
                          "kernels": [asdict(r) | {"ok": r.ok} for r in rows]}, indent=1))
    else:
        for n, shape in shapes.items():
            print(f"{n}: hidden {shape.hidden}, {shape.heads} heads of {shape.head_dim}, FFN {shape.intermediate} "
                  f"({shape.activation})")
        print(f"batch {args.batch} x seq {args.seq}; kept heads {args.heads}, FFN {args.ffn}"
              + ("; sampled: one variant per kernel and config" if args.sample else ""))
        print(format_table(rows))
        verb = "listed (not compiled)" if args.dry_run else "compiled"
        print(f"{len(rows)} kernels {verb} in {time.perf_counter() - t0:.1f} s; {len(failing)} failing; "
              f"{len(spilling)} spilling to local memory")
    return 1 if failing else 0


def register(subparsers) -> None:
    from structprune.cli import fraction, positive_int

    p = subparsers.add_parser("kernels", help="compile every Triton kernel variant for GPU targets (no GPU needed) "
                                              "and report block sizes, shared memory, registers and spills")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="directory of an HF model whose layer shape to use (default: --shape)")
    src.add_argument("--shape", nargs="+", type=_shape_name, default=["bert-base"],
                     help=f"presets ({', '.join(SHAPES)}; default bert-base) or HIDDEN:HEADS:FFN")
    p.add_argument("--arch", nargs="+", type=parse_arch, default=[(8, 0), (9, 0)],
                   help="targets, e.g. sm_80 sm_86 sm_90 (default: sm_80 sm_90)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16", "fp32"],
                   help="fp32 in full precision; tf32 = fp32 with torch.set_float32_matmul_precision('high')")
    p.add_argument("--heads", nargs="+", type=fraction, default=[1.0, 0.5], help="fractions of heads kept")
    p.add_argument("--ffn", nargs="+", type=fraction, default=[1.0, 0.3], help="fractions of FFN units kept")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops' kernels (default all)")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size of the launches")
    p.add_argument("--seq", type=positive_int, default=384, help="sequence length of the launches")
    p.add_argument("--sample", action="store_true",
                   help="compile one variant per kernel and launch config (CI); default: every variant")
    p.add_argument("--dry-run", action="store_true", help="list the launches and their configs without compiling")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)
