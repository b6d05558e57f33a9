"""Tolerances written once: fp32 tight; half precision by the flash-attention rule (a kernel passes when its
error against the fp32 reference is at most twice that of the plain PyTorch computation in the same dtype)."""
import torch


def check_close(name, got, ref32, plain, dtype, scale=None):
    """``scale``: the magnitude the absolute tolerance follows, for values that are 0 in exact arithmetic and
    only round-off of larger terms (default: the reference's largest value)."""
    got, ref32 = got.detach().float(), ref32.detach().float()
    assert got.shape == ref32.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel() == 0:
        return
    scale = max(1.0, ref32.abs().max().item(), scale or 0.0)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref32, atol=1e-4 * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    err = (got - ref32).abs().max().item()
    base = (plain.detach().float() - ref32).abs().max().item()
    eps = torch.finfo(dtype).eps * scale
    assert err <= 2 * base + eps, f"{name}: kernel error {err:.3g} > 2 x plain {dtype} error {base:.3g} + {eps:.2g}"
