"""The cpp backend's row norms for inference (csrc/cpu/norm_cpu.cpp): ``cpp_rms_norm`` (HF's RMSNorm) and
``cpp_layer_norm`` (LayerNorm with fp32 weight and bias) against their references, every dtype they take, odd
widths (the vector tails), strided inputs and many rows (split over threads); the dispatcher runs them only without
gradients and says so; bad inputs are refused; opcheck."""
import pytest
import torch
import torch.nn.functional as F

import structprune as sp
import structprune.backends.cpp.ops as ext
from structprune.ops import dispatch, reference

if ext.load_error() is not None:
    pytest.skip(f"C++ extension unavailable: {ext.load_error()}", allow_module_level=True)

TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                    (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("width", [1, 7, 16, 33, 130])
def test_rms_norm_kernel_matches_hfs_formula(dtypes, width):
    """``cpp_rms_norm`` against the reference (HF's RMSNorm: fp32 statistics, the normalised value rounded to x's
    dtype, times the weight, in result_type(weight, x)): the same dtype, and values equal up to one rounding of the
    output dtype (the sum of squares is added in another order); odd widths take the vector tail."""
    x_dtype, w_dtype = dtypes
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(3, 5, width, generator=g) * 3 + 1).to(x_dtype)
    w = torch.randn(width, generator=g).to(w_dtype)
    want = reference.rms_norm(x, w, 1e-6)
    got = torch.ops.structprune.cpp_rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1.0)
    assert ((got.float() - want.float()).abs() <= 2 * ulp).all()


def test_rms_norm_kernel_takes_strided_inputs_and_many_rows():
    """A non-contiguous x, and enough rows for the rows to be split over threads."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 300, 40, generator=g).transpose(0, 1)[:, :, :33]
    w = torch.randn(33, generator=g)
    torch.testing.assert_close(torch.ops.structprune.cpp_rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5),
                               atol=1e-5, rtol=1e-5)


def test_rms_norm_dispatch_runs_the_kernel_only_without_gradients():
    """``dispatch.rms_norm`` runs cpp without a gradient (``last_backends()["norm"]``), the reference when a
    gradient is needed (the kernel has no backward), and the gradient is the reference's."""
    x, w = torch.randn(4, 24), torch.randn(24)
    with sp.use_backend("cpp"):
        with torch.no_grad():
            dispatch.rms_norm(x, w, 1e-6)
        assert dispatch.last_backends()["norm"] == "cpp"
        xg = x.clone().requires_grad_(True)
        dispatch.rms_norm(xg, w, 1e-6).sum().backward()
        assert dispatch.last_backends()["norm"] == "torch"
    xr = x.clone().requires_grad_(True)
    reference.rms_norm(xr, w, 1e-6).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    with sp.use_backend("torch"), torch.no_grad():
        dispatch.rms_norm(x, w, 1e-6)
    assert dispatch.last_backends()["norm"] == "torch"


def test_rms_norm_kernel_refuses_bad_inputs():
    with pytest.raises(RuntimeError, match=r"weight must be a CPU tensor of shape \[8\]"):
        torch.ops.structprune.cpp_rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.structprune.cpp_rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        torch.ops.structprune.cpp_rms_norm(torch.randn(2, 8).half(), torch.randn(8).bfloat16(), 1e-6)


def test_rms_norm_kernel_passes_opcheck():
    x = torch.randn(2, 3, 16)
    for w in (torch.randn(16), torch.randn(16).bfloat16()):
        torch.library.opcheck(torch.ops.structprune.cpp_rms_norm.default, (x, w, 1e-6), test_utils=TESTS)
    torch.library.opcheck(torch.ops.structprune.cpp_rms_norm.default, (x.bfloat16(), torch.randn(16), 1e-6),
                          test_utils=TESTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 7, 16, 33, 384])
def test_layer_norm_kernel_matches_aten(dtype, width):
    """``cpp_layer_norm`` against ATen's layer_norm with the same fp32 weight and bias: fp32 within 1e-5; bf16
    within one rounding of the output (both compute in fp32 and round once, the sums in another order)."""
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(4, 9, width, generator=g) * 3 + 2).to(dtype)
    w, b = torch.randn(width, generator=g), torch.randn(width, generator=g)
    want = F.layer_norm(x, (width,), w, b, 1e-12)
    got = torch.ops.structprune.cpp_layer_norm(x, w, b, 1e-12)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
        assert ((got.float() - want.float()).abs() <= 2 * ulp).all()


def test_layer_norm_kernel_strided_many_rows_and_nan():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 300, 40, generator=g).transpose(0, 1)[:, :, :35]
    w, b = torch.randn(35, generator=g), torch.randn(35, generator=g)
    torch.testing.assert_close(torch.ops.structprune.cpp_layer_norm(x, w, b, 1e-5),
                               F.layer_norm(x, (35,), w, b, 1e-5), atol=1e-5, rtol=1e-5)
    bad = x[:2, :2].bfloat16().clone()
    bad[0, 0, 3] = float("nan")
    out = torch.ops.structprune.cpp_layer_norm(bad, w, b, 1e-5)
    assert out[0, 0].isnan().all() and not out[1].isnan().any()


def test_layer_norm_dispatch_and_refusals():
    x, w, b = torch.randn(3, 16).bfloat16(), torch.randn(16), torch.randn(16)
    with sp.use_backend("cpp"), torch.no_grad():
        dispatch.layer_norm(x, w, b, 1e-5)
        assert dispatch.last_backends()["norm"] == "cpp"
        dispatch.layer_norm(x, w.bfloat16(), b.bfloat16(), 1e-5)  # the kernel takes fp32 parameters only
        assert dispatch.last_backends()["norm"] == "torch"
    with pytest.raises(RuntimeError, match=r"weight and bias must be float32 CPU tensors of shape \[16\]"):
        torch.ops.structprune.cpp_layer_norm(x, w[:8], b, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.structprune.cpp_layer_norm(x.half(), w, b, 1e-5)
    torch.library.opcheck(torch.ops.structprune.cpp_layer_norm.default, (x, w, b, 1e-5), test_utils=TESTS)


def _embedding_case(width, typed=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, V, P, T = 37, 50, 40, 2
    tensors = dict(ids=torch.randint(0, V, (N,), generator=g),
                   type_ids=torch.randint(0, T, (N,), generator=g) if typed else None,
                   position_ids=torch.randint(0, P, (N,), generator=g), word=torch.randn(V, width, generator=g),
                   types=torch.randn(T, width, generator=g) if typed else None,
                   positions=torch.randn(P, width, generator=g), weight=torch.rand(width, generator=g) + 0.5,
                   bias=torch.randn(width, generator=g))
    x = tensors["word"][tensors["ids"]]
    if typed:
        x = x + tensors["types"][tensors["type_ids"]]
    x = x + tensors["positions"][tensors["position_ids"]]  # HF's order: (word + type) + position
    return tensors, F.layer_norm(x, (width,), tensors["weight"], tensors["bias"], 1e-12)


@pytest.mark.parametrize("typed", [True, False])
@pytest.mark.parametrize("width", [384, 40, 7])
def test_embedding_layer_norm_matches_the_composition(width, typed):
    """The serving module's embedding block in one pass: equal to HF's lookups, adds and LayerNorm in fp32, and
    to that rounded once in bf16; dispatch runs it and says so."""
    t, want = _embedding_case(width, typed)
    got = torch.ops.structprune.cpp_embedding_layer_norm(*t.values(), 1e-12, False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got16 = torch.ops.structprune.cpp_embedding_layer_norm(*t.values(), 1e-12, True)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), want.bfloat16().float(), atol=0, rtol=2 ** -7)
    with sp.use_backend("cpp"):
        torch.testing.assert_close(dispatch.embedding_layer_norm(*t.values(), 1e-12), want, atol=1e-5, rtol=1e-5)
        assert sp.last_backends()["embeddings"] == "cpp"
    with sp.use_backend("torch"):
        assert dispatch.embedding_layer_norm(*t.values(), 1e-12) is None  # the caller runs the model's module
        assert sp.last_backends()["embeddings"] == "torch"


def test_embedding_layer_norm_refusals_and_opcheck():
    t, _ = _embedding_case(16)
    op = torch.ops.structprune.cpp_embedding_layer_norm
    with pytest.raises(RuntimeError, match="index 50 out of range for a table of 50 rows"):
        op(*{**t, "ids": torch.full((37,), 50)}.values(), 1e-12, False)
    with pytest.raises(RuntimeError, match="must be int64 CPU tensors of one size"):
        op(*{**t, "position_ids": t["position_ids"][:5]}.values(), 1e-12, False)
    with pytest.raises(RuntimeError, match="the tables must be float32"):
        op(*{**t, "word": t["word"].double()}.values(), 1e-12, False)
    with pytest.raises(RuntimeError, match="come together or not at all"):
        op(*{**t, "types": None}.values(), 1e-12, False)
    torch.library.opcheck(op.default, (*t.values(), 1e-12, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
