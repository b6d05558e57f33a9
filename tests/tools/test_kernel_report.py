"""``structprune kernels`` and the per-target launch-config chooser (``kernels/_configs.py``).

The chooser is tested in process (no compiler). The report itself needs Triton's GPU compiler, which the
interpreter mode of this test session (``TRITON_INTERPRET=1``) excludes, so it runs in a subprocess: a listing
without compiling (fast), and one compile of a small layer for sm_86 in fp32 (marked slow).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from structprune.tools import kernel_report as kr

_configs = pytest.importorskip("structprune._kernels._configs")
ARCHS = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0)]


def test_parse_arch_and_shape():
    assert kr.parse_arch("sm_90") == (9, 0) and kr.parse_arch("sm_90a") == (9, 0)
    assert kr.parse_arch("86") == (8, 6) and kr.parse_arch("8.9") == (8, 9)
    assert kr.parse_shape("minilm") == kr.Shape(384, 12, 1536)
    assert kr.parse_shape("1536:12:6144").head_dim == 128
    for bad in ("sm_x", "9", ""):
        with pytest.raises(Exception, match="architecture"):
            kr.parse_arch(bad)
    with pytest.raises(Exception, match="HIDDEN:HEADS:FFN"):
        kr.parse_shape("100:12:10")


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
def test_chosen_configs_fit_the_target(cc, dtype, D):
    limit = _configs.smem_limit(cc)
    for backward in (False, True):
        cfg = _configs.flash_config(cc, D, dtype, backward)
        assert _configs.flash_smem(cfg, dtype, backward) <= limit
        assert cfg["BLOCK_D"] >= D
    for M, N in ((12288, 3072), (100, 40), (12288, 922)):
        cfg = _configs.gemm_config(cc, M, N, dtype)
        assert _configs.gemm_smem(cfg, dtype) <= limit


def test_configs_shrink_where_the_target_has_less_shared_memory():
    """fp32 head_dim 128: the sm_80 backward tile does not fit sm_86's 99 KB, so sm_86 gets a smaller one;
    the preferred (first) candidate is taken wherever it fits."""
    big, small = (_configs.flash_config(cc, 128, torch.float32, True) for cc in ((8, 0), (8, 6)))
    assert _configs.flash_smem(big, torch.float32, True) > _configs.smem_limit((8, 6))
    area = lambda c: c["BLOCK_M"] * c["BLOCK_N"] * max(c["num_stages"], 1)  # noqa: E731
    assert area(small) < area(big)
    first = _configs.flash_candidates(64)[0]
    assert _configs.flash_config((9, 0), 64, torch.float16, True) == first


def test_unknown_arch_gets_the_smallest_limit_of_its_major():
    assert _configs.smem_limit((8, 8)) == min(_configs.SMEM_LIMITS[(8, 0)], _configs.SMEM_LIMITS[(8, 6)])
    assert _configs.smem_limit((13, 0)) == min(_configs.SMEM_LIMITS.values())


def test_target_override_reaches_the_launch_wrappers():
    from structprune._kernels import _common as C

    cpu = torch.device("cpu")
    interp = C.gemm_config(cpu, 4096, 3072, 768, torch.float16)
    with _configs.target((9, 0)):
        gpu = C.gemm_config(cpu, 4096, 3072, 768, torch.float16)
        flash = C.flash_config(cpu, 64, torch.float16, backward=True)
    assert gpu == _configs.gemm_config((9, 0), 4096, 3072, torch.float16) != interp
    assert flash == _configs.flash_config((9, 0), 64, torch.float16, True)
    assert C.gemm_config(cpu, 4096, 3072, 768, torch.float16) == interp  # override gone after the block


def test_limit_check_flags_shared_memory_and_grid():
    row = kr.KernelRow(arch="sm_86", shape="x", kernel="k", dtype="fp32", variant={}, blocks={}, num_warps=4,
                       num_stages=2, shared_bytes=120 * 1024, shared_limit=99 * 1024, grid=[1, 1, 1])
    assert "above" in kr.check_limits(row).error
    row = kr.KernelRow(arch="sm_90", shape="x", kernel="k", dtype="fp32", variant={}, blocks={}, num_warps=4,
                       num_stages=2, shared_bytes=1024, shared_limit=227 * 1024, grid=[6, 70000])
    assert "grid axis 1" in kr.check_limits(row).error


def _run_cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "structprune.cli", "kernels", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _kernel_functions() -> set[str]:
    """Names of the launchable Triton kernels in kernels/ (top-level ``*_kernel`` JIT functions of every module)."""
    import importlib
    import pkgutil

    import structprune._kernels as K

    names = set()
    for mod in (info.name for info in pkgutil.iter_modules(K.__path__)):
        m = importlib.import_module(f"structprune._kernels.{mod}")
        names |= {n for n in vars(m) if n.endswith("_kernel") and hasattr(getattr(m, n), "fn")}
    return names


def test_dry_run_lists_every_kernel_in_kernels():
    out = _run_cli("--shape", "64:4:96", "--arch", "sm_90", "--dtype", "bf16", "--batch", "2", "--seq", "40",
                   "--dry-run", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    launched = {r["kernel"] for r in report["kernels"]}
    assert launched == _kernel_functions()
    assert all(r["shared_bytes"] is None for r in report["kernels"])  # nothing compiled


def test_interpreter_mode_is_refused_with_a_clear_error():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "structprune.cli", "kernels", "--dry-run"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and "unset TRITON_INTERPRET" in out.stderr


@pytest.mark.slow
def test_compiles_for_sm86_fp32_head_dim_128_within_limits():
    """A head_dim-128 layer in fp32 for sm_86 (99 KB): every sampled kernel compiles, fits, and the chooser's
    estimate bounds what the compiler allocates."""
    out = _run_cli("--shape", "256:2:96", "--arch", "sm_86", "--dtype", "fp32", "--batch", "2", "--seq", "70",
                   "--heads", "1.0", "--ffn", "1.0", "--ops", "attention", "--sample", "--json", timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["ok"]
    assert {r["kernel"] for r in report["kernels"]} >= {"_attn_fwd_kernel", "_attn_bwd_dq_kernel",
                                                       "_attn_bwd_dkdv_kernel"}
    for r in report["kernels"]:
        assert r["shared_bytes"] is not None and r["shared_bytes"] <= r["shared_limit"]
        if r["shared_estimate"] is not None:
            assert r["shared_bytes"] <= r["shared_estimate"], r
        assert r["registers"] is None or r["registers"] > 0


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotary_and_glu_configs_fit_the_target(cc, dtype):
    """The rotary flash kernels (cos / sin tiles too) and the GLU forward (two weight tiles) get configs whose own
    shared-memory bounds fit the target."""
    limit = _configs.smem_limit(cc)
    for D in (32, 64, 128):
        for backward in (False, True):
            cfg = _configs.rotary_flash_config(cc, D, dtype, backward)
            assert _configs.rotary_flash_smem(cfg, dtype, backward) <= limit
            assert _configs.rotary_flash_smem(cfg, dtype, backward) > _configs.flash_smem(cfg, dtype, backward)
    for M, N in ((12288, 346), (100, 40)):
        cfg = _configs.glu_config(cc, M, N, dtype)
        assert _configs.glu_smem(cfg, dtype) <= limit


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_modernbert_kernels_compile_within_limits(arch):
    """The rotary attention and GLU FFN kernels (global and banded, padded or not, with and without biases) compile
    for sm_80 and sm_90 in bf16, fit, and stay within their shared-memory bounds."""
    out = _run_cli("--shape", "modernbert-base", "--arch", arch, "--dtype", "bf16", "--batch", "2", "--seq", "256",
                   "--heads", "0.5", "--ffn", "0.3", "--ops", "rotary_attention", "glu_ffn", "--sample", "--json",
                   timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["ok"]
    assert {r["kernel"] for r in report["kernels"]} >= {"_rot_fwd_kernel", "_rot_bwd_dq_kernel", "_rot_bwd_dkdv_kernel",
                                                       "_glu_fwd_kernel", "_glu_bwd_kernel"}
    for r in report["kernels"]:
        assert r["shared_bytes"] is not None and r["shared_bytes"] <= r["shared_limit"]
        if r["shared_estimate"] is not None:
            assert r["shared_bytes"] <= r["shared_estimate"], r
