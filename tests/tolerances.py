"""Tolerances written once: fp32 tight; half precision by the flash-attention rule (a kernel passes when its
error against the fp32 reference is at most twice that of the plain PyTorch computation in the same dtype)."""
import torch


def check_close(name, got, ref32, plain, dtype):
    got, ref32 = got.detach().float(), ref32.detach().float()
    assert got.shape == ref32.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref32, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    err = (got - ref32).abs().max().item()
    base = (plain.detach().float() - ref32).abs().max().item()
    eps = torch.finfo(dtype).eps * max(1.0, ref32.abs().max().item())
    assert err <= 2 * base + eps, f"{name}: kernel error {err:.3g} > 2 x plain {dtype} error {base:.3g} + {eps:.2g}"
