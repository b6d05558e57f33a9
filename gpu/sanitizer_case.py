"""Small forward + backward calls of every kernel backend, for ``compute-sanitizer`` (memcheck, racecheck).

    compute-sanitizer --tool memcheck python gpu/sanitizer_case.py
    python gpu/sanitizer_case.py --device cpu        # the same calls on CPU (validate.sh --rehearse)

Shapes are small and odd (tails in every tile loop, a padded and a fully padded sequence, one pruned head,
pruned FFN units) so that the sanitizers see the masked edge paths; fp32, fp16 and bf16 on CUDA. Exits 1 if
a backend's result is not finite; correctness is the tests' job.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when structprune is not installed
from structprune.ops import dispatch as ops  # noqa: E402


def run(device: str, backends, dtypes) -> int:
    gen = torch.Generator().manual_seed(0)
    B, S, H, D, E, I = 2, 37, 3, 40, 96, 131
    bad = 0
    for backend in backends:
        reason = ops.availability(backend, device)
        if reason is not None:
            print(f"{backend}: skipped ({reason})")
            continue
        mod = ops._provider(backend)
        for dtype in dtypes:
            def t(*shape, scale=0.2):
                return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

            x = t(B, S, E, scale=1.0)
            attn_w = [t(H * D, E), t(H * D), t(H * D, E), t(H * D), t(H * D, E), t(H * D), t(E, H * D), t(E)]
            hg = torch.tensor([1.0, 0.0, 0.7], device=device).requires_grad_()
            active = torch.tensor([0, 2], device=device)
            kb = torch.zeros(B, S, device=device)
            kb[0, 30:] = torch.finfo(torch.float32).min
            kb[1, :] = torch.finfo(torch.float32).min  # fully padded
            y = mod.gated_attention(x, *attn_w, hg, active, kb, H)
            ffn_w = [t(I, E), t(I), t(E, I), t(E)]
            ug = (torch.arange(I, device=device) % 3 != 0).float().requires_grad_()
            kept = torch.nonzero(ug.detach()).flatten()
            z = mod.gated_ffn(y, *ffn_w, ug, kept, "gelu")
            z.float().square().mean().backward()
            ok = all(torch.isfinite(v).all() for v in (z, x.grad, hg.grad, ug.grad, attn_w[0].grad, ffn_w[0].grad))
            print(f"{backend} {str(dtype).replace('torch.', '')}: {'ok' if ok else 'NON-FINITE'}", flush=True)
            bad += not ok
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", nargs="+", default=["triton", "cpp"])
    p.add_argument("--dtype", nargs="+", default=None, help="fp32 fp16 bf16 (default: all on CUDA, fp32 bf16 on CPU)")
    args = p.parse_args(argv)
    names = args.dtype or (["fp32", "fp16", "bf16"] if args.device.startswith("cuda") else ["fp32", "bf16"])
    dtypes = [{"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[n] for n in names]
    return run(args.device, args.backend, dtypes)


if __name__ == "__main__":
    sys.exit(main())
