"""GPU checks (``-m gpu``; skipped without CUDA): both kernel backends against the pure-PyTorch reference on
CUDA tensors, forward and every gradient, fp32 / fp16 / bf16 (tolerances of ``tolerances.py``), odd shapes,
padding (fully padded sequences included), non-contiguous inputs, 0 and all units kept; ``opcheck`` of the
custom ops on CUDA; a bf16 autocast training step of a patched model; a device guard check on a second GPU.
``gpu/validate.sh`` runs these. ``STRUCTPRUNE_GPU_TESTS_ON=cpu`` runs the backend comparisons on
CPU tensors instead (CPU kernels cover fp32 and bf16).
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers.tolerances import check_close

from structprune.ops import dispatch as ops
from structprune.ops import reference

DEVICE = os.environ.get("STRUCTPRUNE_GPU_TESTS_ON", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("triton", "cpp")
# (B, S, H, D, E, I): odd sequence lengths, a head_dim that is not a power of two, a large case
SHAPES = [(2, 37, 4, 32, 96, 200), (1, 1, 2, 16, 32, 48), (3, 129, 6, 40, 240, 333), (4, 384, 12, 64, 768, 3072)]
KEPT = ("all", "some", "none")


def _need(backend):  # on CUDA for the CUDA-only tests below; DEVICE for the comparisons
    reason = ops.availability(backend, DEVICE)
    if reason is not None:
        pytest.skip(f"{backend} on {DEVICE}: {reason}")
    return ops._provider(backend)


def _index(n, kept, gen):
    if kept == "all":
        return torch.arange(n)
    if kept == "none":
        return torch.zeros(0, dtype=torch.long)
    return torch.randperm(n, generator=gen)[: max(1, n // 2)].sort().values


def _gates(n, idx, gen):
    g = torch.zeros(n)
    g[idx] = 0.5 + torch.rand(idx.numel(), generator=gen)
    return g


def _key_bias(B, S, gen):
    kb = torch.zeros(B, S)
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    for b in range(B):
        kb[b, lengths[b]:] = torch.finfo(torch.float32).min
    if B > 1:
        kb[-1] = torch.finfo(torch.float32).min  # a fully padded sequence
    return kb


def _leaves(specs, gen, dtype, transpose_x):
    """fp32 leaves on DEVICE (the reference's) and their dtype copies (the kernel's and the plain computation's)."""
    ref = [(torch.randn(*shape, generator=gen) * scale).to(DEVICE).requires_grad_() for shape, scale in specs]
    low = []
    for i, t in enumerate(ref):
        c = t.detach().to(dtype)
        if i == 0 and transpose_x:  # a non-contiguous x with the same values
            c = c.transpose(0, 1).contiguous().transpose(0, 1)
        low.append(c.requires_grad_())
    return ref, low


def _grads(out, leaves, dy):
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _compare(name, kernel, ref_fn, ref, low, dtype, dy, gate_idx, zero_in_exact=None):
    """``zero_in_exact``: {index of a gradient that is 0 in exact arithmetic: indices of the gradients whose
    size its round-off follows} (attention: bk, shifted out by the softmax; its terms are wk's and bq's)."""
    y_ref = ref_fn(*ref)
    g_ref = _grads(y_ref, ref, dy)
    y_plain = ref_fn(*low)
    g_plain = _grads(y_plain, low, dy)
    low2 = [t.detach().clone().requires_grad_() for t in low]
    y = kernel(*low2)
    g = _grads(y, low2, dy)
    check_close(f"{name} y", y, y_ref, y_plain, dtype)
    zero_in_exact = zero_in_exact or {}
    for i, (a, b, c) in enumerate(zip(g, g_ref, g_plain)):
        scale = max((g_ref[j].abs().max().item() for j in zero_in_exact.get(i, ())), default=None)
        if i == len(g) - 1:  # gate gradient: the kernels give 0 to pruned units, compare the kept ones
            if gate_idx.numel() == 0:
                continue
            idx = gate_idx.to(DEVICE)
            a, b, c = a[idx], b[idx], c[idx]
        check_close(f"{name} grad[{i}]", a, b, c, dtype, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kept", KEPT)
def test_attention_matches_reference(backend, dtype, shape, kept):
    """Through the op boundary (``ops.gated_attention``, as the modules call it) with an HF boolean padding
    mask, so that fully padded sequences get the op's handling."""
    _need(backend)
    B, S, H, D, E, _ = shape
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(sum(shape) * 3 + KEPT.index(kept))
    HD = H * D
    specs = [((B, S, E), 1.0), ((HD, E), E ** -0.5), ((HD,), 0.1), ((HD, E), E ** -0.5), ((HD,), 0.1),
             ((HD, E), E ** -0.5), ((HD,), 0.1), ((E, HD), HD ** -0.5), ((E,), 0.1)]
    ref, low = _leaves(specs, gen, dt, transpose_x=S > 1)
    idx = _index(H, kept, gen)
    g32 = _gates(H, idx, gen).to(DEVICE).requires_grad_()
    ref.append(g32)
    low.append(g32.detach().clone().requires_grad_())
    mask = (_key_bias(B, S, gen) == 0).to(DEVICE)[:, None, None, :]  # [B, 1, 1, S] bool, True = attend
    active = idx.to(DEVICE)
    dy = torch.randn(B, S, E, generator=gen).to(DEVICE)

    def kernel(*t):
        ops.set_backend(backend)
        try:
            out = ops.gated_attention(*t, active, H, attn_mask=mask)
            assert ops.last_backends()["attention"] == backend
            return out
        finally:
            ops.set_backend("auto")

    def ref_fn(*t):
        return reference.gated_attention(*t, H, attn_mask=mask)

    # bk's gradient is 0 in exact arithmetic (the softmax drops a per-query shift): round-off of wk's and bq's
    # terms; with one key the softmax is constant and every q/k gradient is round-off of the value path's size.
    zero = {4: (3, 2)} if S > 1 else {i: (5, 6) for i in (1, 2, 3, 4)}
    _compare(f"{backend} attention {dtype}", kernel, ref_fn, ref, low, dt, dy, idx, zero_in_exact=zero)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kept", KEPT)
def test_ffn_matches_reference(backend, dtype, shape, kept):
    mod = _need(backend)
    B, S, _, _, E, I = shape
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(sum(shape) * 3 + KEPT.index(kept) + 1000)
    specs = [((B, S, E), 1.0), ((I, E), E ** -0.5), ((I,), 0.1), ((E, I), I ** -0.5), ((E,), 0.1)]
    ref, low = _leaves(specs, gen, dt, transpose_x=S > 1)
    idx = _index(I, kept, gen)
    g32 = _gates(I, idx, gen).to(DEVICE).requires_grad_()
    ref.append(g32)
    low.append(g32.detach().clone().requires_grad_())
    kept_units = idx.to(DEVICE)
    dy = torch.randn(B, S, E, generator=gen).to(DEVICE)

    def kernel(*t):
        return mod.gated_ffn(*t, kept_units, "gelu")

    def ref_fn(*t):
        return reference.gated_ffn(*t, "gelu")

    _compare(f"{backend} ffn {dtype}", kernel, ref_fn, ref, low, dt, dy, idx)


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA_ONLY
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_on_cuda(backend):
    _need(backend)
    gen = torch.Generator().manual_seed(0)
    B, S, H, D, E, I = 2, 19, 4, 32, 64, 96

    def t(*shape, grad=True):
        return (torch.randn(*shape, generator=gen) * 0.2).cuda().requires_grad_(grad)

    active = torch.tensor([0, 2, 3]).cuda()
    kept = torch.arange(0, I, 3).cuda()
    kb = _key_bias(B, S, gen).cuda()
    if backend == "triton":
        attn = torch.ops.structprune.triton_gated_attention
        ffn = torch.ops.structprune.triton_gated_ffn
    else:
        attn = torch.ops.structprune.cpp_gated_attention
        ffn = torch.ops.structprune.cpp_gated_ffn
    attn_args = (t(B, S, E), t(H * D, E), t(H * D), t(H * D, E), t(H * D), t(H * D, E), t(H * D), t(E, H * D),
                 t(E), t(H), active, kb, H, True)
    ffn_args = (t(B, S, E), t(I, E), t(I), t(E, I), t(E), t(I), kept, "gelu", True)
    torch.library.opcheck(attn, attn_args)
    torch.library.opcheck(ffn, ffn_args)


@CUDA_ONLY
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_training_step_on_cuda(backend):
    _need(backend)
    import transformers

    import structprune as sp

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=100, max_position_embeddings=64, attn_implementation="sdpa",
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForQuestionAnswering(cfg).cuda().train()
    sp.patch(model)
    sp.set_masks(model, heads=torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]]))
    ids = torch.randint(0, 100, (2, 33)).cuda()
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    pos = torch.tensor([3, 5]).cuda()
    grads = {}
    for name in (backend, "torch"):
        sp.set_backend(name)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, start_positions=pos, end_positions=pos).loss
        loss.backward()
        grads[name] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        if name == backend:
            assert sp.last_backends()["attention"] == backend
    sp.set_backend("auto")
    for n, g in grads["torch"].items():
        got = grads[backend][n]
        assert torch.isfinite(got).all(), n
        scale = g.abs().max().item() + 1e-6
        assert (got - g).abs().max().item() <= 0.05 * scale, n  # bf16: loose, the two paths round differently


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_second_gpu_run_there(backend):
    mod = _need(backend)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda:1")
    x = torch.randn(2, 9, 32, generator=gen).to(dev)
    w1, b1 = torch.randn(64, 32, generator=gen).to(dev), torch.randn(64, generator=gen).to(dev)
    w2, b2 = torch.randn(32, 64, generator=gen).to(dev), torch.randn(32, generator=gen).to(dev)
    g = torch.ones(64, device=dev)
    with torch.cuda.device(0):
        y = mod.gated_ffn(x, w1, b1, w2, b2, g, torch.arange(64, device=dev), "gelu")
    assert y.device == dev
    torch.testing.assert_close(y, reference.gated_ffn(x, w1, b1, w2, b2, g, "gelu"), rtol=1e-4, atol=1e-4)
