"""The "triton" backend: the Triton kernels of ``kernels/`` (installed as ``structprune._kernels``) behind the op
contract.

``kernels/`` has no ``__init__.py`` on purpose: from the repository root it must never be importable as a package
named ``kernels`` (it would shadow Hugging Face's ``kernels`` package, which transformers imports). It is the
namespace subpackage ``structprune._kernels``, mapped by ``setup.py``. One file per op, each holding its Triton kernels, its ``torch.library`` custom ops (``structprune::triton_*``,
with fake and autograd registrations; the backwards are custom ops too) and its input checks:

* :mod:`.attention` -- ``gated_attention``: gathered QKV GEMMs over active heads, flash attention with the
  gate in the epilogue, gathered output projection; flash backward for dq/dk/dv.
* :mod:`.ffn` -- ``gated_ffn``: gathered GEMM1 with bias/activation/gate epilogue, gathered GEMM2.
* :mod:`.glu_ffn` -- ``gated_glu_ffn``: the GLU FFN over packed kept units (both halves of a unit in one tile).
* :mod:`.rotary_attention` -- ``gated_rotary_attention``: :mod:`.attention` with rotary positions in the flash
  kernels' prologue and a sliding-window band that bounds the key (and, backward, query) blocks visited.
* :mod:`.decoder_attention` -- ``gated_decoder_attention``: flash attention through the head -> KV-head map
  (causal, sliding window, key padding; forward and backward), gates and ``wo`` as torch ops;
  ``gated_decoder_qkv`` as torch ops on the kept heads' rows.
* :mod:`.hard_concrete` -- ``hard_concrete_sample`` / ``hard_concrete_uniform``: fused Philox sampling.
* :mod:`._common` -- the gathered GEMM shared by both, launch configs, checks.

``BACKEND`` is the :class:`structprune.ops.support.Backend` the dispatcher runs (registered in
:mod:`structprune.ops.registry`). Importing this package never fails because triton is missing or broken:
:func:`availability` then reports the reason and the op functions raise it. Triton builds its kernels for the
interpreter when ``TRITON_INTERPRET=1`` is set at import time; only then can CPU tensors be used.
"""
from __future__ import annotations

import os
import sys

import torch

from structprune.ops.support import Backend

__all__ = ["BACKEND", "availability", "gated_attention", "gated_decoder_attention", "gated_decoder_qkv", "gated_ffn",
           "gated_glu_ffn", "gated_rotary_attention", "hard_concrete_sample", "hard_concrete_uniform",
           "supports_attention_dropout", "attention_dropout_scale"]

try:
    from structprune._kernels import _common
    from structprune._kernels.attention import attention_dropout_scale, gated_attention, supports_attention_dropout
    from structprune._kernels.attention_seeded import TAKES_TENSOR_SEED
    from structprune._kernels.decoder_attention import gated_decoder_attention, gated_decoder_qkv
    from structprune._kernels.ffn import gated_ffn
    from structprune._kernels.glu_ffn import gated_glu_ffn
    from structprune._kernels.rotary_attention import gated_rotary_attention
    from structprune._kernels.hard_concrete import hard_concrete_sample, hard_concrete_uniform
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing, or an incompatible version
    _IMPORT_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"structprune Triton backend unavailable: {_IMPORT_ERROR}")

    gated_attention = gated_ffn = hard_concrete_sample = hard_concrete_uniform = _unavailable
    gated_glu_ffn = gated_rotary_attention = _unavailable
    gated_decoder_attention = gated_decoder_qkv = _unavailable
    attention_dropout_scale = _unavailable

    def supports_attention_dropout(device) -> bool:
        return False

    TAKES_TENSOR_SEED = False


def availability(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of ``device``, else the reason they cannot."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if _common.INTERPRET:
            return None  # the interpreter runs CUDA tensors too (slowly)
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton runs on CPU tensors only in interpreter mode: set TRITON_INTERPRET=1 before "
                    "importing triton")
        if not _common.INTERPRET:
            return ("TRITON_INTERPRET=1 was set after structprune._kernels was imported, so its kernels were "
                    "built for the GPU: set it before importing structprune")
        return None
    return f"Triton kernels do not support {device.type} tensors"


BACKEND = Backend(name="triton", availability=availability, supports_attention_dropout=supports_attention_dropout,
                  gated_attention=gated_attention, gated_ffn=gated_ffn, hard_concrete_sample=hard_concrete_sample,
                  hard_concrete_uniform=hard_concrete_uniform, gated_glu_ffn=gated_glu_ffn,
                  gated_rotary_attention=gated_rotary_attention, takes_tensor_seed=TAKES_TENSOR_SEED,
                  gated_decoder_qkv=gated_decoder_qkv, gated_decoder_attention=gated_decoder_attention,
                  module=sys.modules[__name__])
