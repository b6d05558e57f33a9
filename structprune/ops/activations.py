"""The FFN activations structprune supports: the one table of their names.

Read by the reference (:func:`structprune.ops.reference.activation_fn`), the input checks every backend runs
(:mod:`structprune.ops.checks`), the Triton kernels' dispatch (``kernels/_common.py``) and the model families
(Hugging Face's ``hidden_act`` names, :data:`HF_ACTIVATIONS`). The C++ extension switches over the same names
(``csrc/ffn.cpp``, ``csrc/glu_ffn.cpp``, ``csrc/cpu/ops_cpu.cpp``, ``csrc/cuda/``); ``tests/test_cpp_ops.py`` holds it to exactly this table.
"""
from __future__ import annotations

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")  # exact gelu, tanh-approximated gelu, relu, silu (swish)

# Hugging Face's ``config.hidden_act`` names -> ours.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
assert set(HF_ACTIVATIONS.values()) <= set(ACTIVATIONS)


def check_activation(name) -> None:
    """Raise a ValueError saying what was expected unless ``name`` is one of :data:`ACTIVATIONS`."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
