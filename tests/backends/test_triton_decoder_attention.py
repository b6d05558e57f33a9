"""The Triton decoder attention (kernels/decoder_attention.py) against the reference: forward and the gradients of
q, k, v, wo, bo and the gates, fp32 and bf16 (the half-precision rule of tests/helpers/tolerances.py), all / equal /
unequal / one head kept (groups of unequal size through the head -> KV map), prefill, a decode step and a chunk
against a longer cache, key padding left and right (rows that see no key), a sliding window. Runs under the
Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1) and on CUDA when present; tiny shapes."""
import pytest
import torch

from helpers.tolerances import check_close
from helpers.triton_cases import triton_devices

DEVICES = triton_devices()

from structprune.ops import dispatch, reference  # noqa: E402
import structprune as sp  # noqa: E402
import structprune.backends.triton as K  # noqa: E402

B, S, E, H, D = 2, 37, 24, 6, 16  # 37 keys: two key tiles of 32, a ragged tail
HEADS = {"all": (0, 1, 2, 3, 4, 5), "equal": (2, 3, 4, 5), "unequal": (0, 1, 3, 5), "one": (4,)}


def case(kept, q_len, padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    active = torch.tensor(HEADS[kept], dtype=torch.long)
    full = active // 2  # 3 KV heads of 2 query heads each
    keep_kv = torch.unique(full)
    q_to_kv = torch.searchsorted(keep_kv, full)
    tensors = [torch.randn(B, active.numel(), q_len, D, generator=g), torch.randn(B, keep_kv.numel(), S, D, generator=g),
               torch.randn(B, keep_kv.numel(), S, D, generator=g), torch.randn(E, H * D, generator=g) * 0.3,
               torch.randn(E, generator=g), torch.rand(H, generator=g) + 0.2]
    key_mask = None
    if padding == "left":
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[1, :S - q_len + 2] = False  # row 1's first queries see no key
    elif padding == "right":
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[0, S - 5:] = False
    return tensors, active, q_to_kv, key_mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [-1, 9])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("q_len,kept", [(S, "all"), (S, "unequal"), (S, "one"), (1, "equal"), (1, "unequal"),
                                        (5, "unequal")])
def test_matches_the_reference(q_len, kept, padding, window, dtype, device):
    tensors, active, q_to_kv, key_mask = case(kept, q_len, padding, seed=q_len + window)
    key_mask = None if key_mask is None else key_mask.to(device)
    grad_out = torch.randn(B, q_len, E, generator=torch.Generator().manual_seed(1)).to(device)

    def run(fn, ts, dt):
        leaves = [t.detach().to(device=device, dtype=dt).requires_grad_(True) for t in ts]
        y = fn(*leaves)
        return y, torch.autograd.grad(y, leaves, grad_out.to(y.dtype))

    def ker(q, k, v, wo, bo, gates):
        return K.gated_decoder_attention(q, k, v, wo, bo, gates, active.to(device), q_to_kv.to(device), key_mask,
                                         window)

    def ref(q, k, v, wo, bo, gates):
        return reference.gated_decoder_attention(q, k, v, wo, bo, gates, active.to(device), q_to_kv.to(device),
                                                 window, key_mask=key_mask)

    rounded = [t.to(dtype).float() for t in tensors]
    got, want32, plain = run(ker, rounded if dtype == torch.float32 else tensors, dtype), run(ref, rounded, torch.float32), \
        run(ref, tensors, dtype)
    check_close("y", got[0], want32[0], plain[0], dtype)
    for name, a, r, p in zip(("q", "k", "v", "wo", "bo", "gates"), got[1], want32[1], plain[1]):
        check_close(f"d{name}", a, r, p, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_the_dispatcher_runs_it_for_a_patched_decoder(device):
    """A masked tiny Llama (a KV group pruned, unequal groups) on a left-padded batch: the Triton backend runs
    attention and its logits equal the reference backend's."""
    from helpers.decoders import left_padded, masks, tiny_model

    heads, ffn = masks()
    model = sp.set_masks(sp.patch(tiny_model("llama")), heads=heads, ffn=ffn).to(device)
    inputs = {k: v.to(device) for k, v in left_padded().items()}
    with torch.no_grad(), sp.use_backend("torch"):
        want = model(**inputs).logits
    with torch.no_grad(), sp.use_backend("triton"):
        got = model(**inputs).logits
        assert dispatch.last_backends()["attention"] == "triton"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
