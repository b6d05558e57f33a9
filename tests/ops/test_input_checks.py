"""Input checks: the same bad input gets the same error, saying what was expected and what came, from the
dispatcher and from every backend's own op entry (structprune/_input_checks.py is the one copy they all call)."""
from __future__ import annotations

import re

import pytest
import torch

from structprune.ops import dispatch as ops
from structprune.ops import registry as backends
from structprune.ops.activations import ACTIVATIONS

BACKENDS = [b for b in ops.BACKENDS if ops.availability(b, "cpu") is None]


def _attention_args(B=2, S=5, E=8, H=2, D=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, E, generator=g)
    w = [torch.randn(*s, generator=g) for s in ((H * D, E), (H * D,), (H * D, E), (H * D,), (H * D, E), (H * D,),
                                               (E, H * D), (E,))]
    return dict(x=x, wq=w[0], bq=w[1], wk=w[2], bk=w[3], wv=w[4], bv=w[5], wo=w[6], bo=w[7],
                head_gates=torch.ones(H), active_heads=torch.arange(H), num_heads=H)


def _ffn_args(B=2, S=5, E=8, n=6):
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(B, S, E, generator=g), w1=torch.randn(n, E, generator=g), b1=torch.randn(n, generator=g),
                w2=torch.randn(E, n, generator=g), b2=torch.randn(E, generator=g), unit_gates=torch.ones(n),
                kept_units=torch.arange(n), activation="gelu")


ATTENTION_CASES = {
    "x 2-D": (dict(x=torch.randn(5, 8)), "x must be a float32, float16 or bfloat16 tensor \\[B, S, E\\]"),
    "x int": (dict(x=torch.ones(2, 5, 8, dtype=torch.int64)), "x must be a float32"),
    "wk shape": (dict(wk=torch.randn(8, 9)), "wk must have shape \\[8, 8\\], got \\[8, 9\\]"),
    "bo dtype": (dict(bo=torch.randn(8, dtype=torch.float64)), "bo must be float32, float16 or bfloat16"),
    "wv half": (dict(wv=torch.randn(8, 8).half()), "wv must have the dtype of x"),
    "heads": (dict(num_heads=3), "wq has 8 rows, not num_heads \\* head_dim with num_heads = 3"),
    "gates shape": (dict(head_gates=torch.ones(3)), "head_gates must have shape \\[2\\]"),
    "index dtype": (dict(active_heads=torch.tensor([0, 1], dtype=torch.int32)), "active_heads must be a 1-D int64"),
    "index range": (dict(active_heads=torch.tensor([0, 2])),
                    "active_heads must hold sorted unique indices in \\[0, 2\\)"),
    "index order": (dict(active_heads=torch.tensor([1, 0])), "active_heads must hold sorted unique"),
    "mask shape": (dict(attn_mask=torch.ones(2, 4, dtype=torch.bool)), "attention mask must be \\[B, K\\]"),
    "dropout": (dict(dropout_p=1.0), "dropout_p must be in \\[0, 1\\)"),
}
# What only the backends' entries take: the kernels' [B, S] fp32 key mask and the dropout seed.
ENTRY_ATTENTION_CASES = {
    **{k: v for k, v in ATTENTION_CASES.items() if k != "mask shape"},
    "key_bias shape": (dict(key_bias=torch.zeros(2, 4)),
                       "key_bias must be a float32 tensor of shape \\[2, 5\\] on cpu, got torch.float32 of shape "
                       "\\[2, 4\\]"),
    "key_bias dtype": (dict(key_bias=torch.zeros(2, 5, dtype=torch.float16)), "key_bias must be a float32 tensor"),
    "seed": (dict(seed=-1, dropout_p=0.1), "dropout seed must be an int in \\[0, 2\\*\\*63\\), got -1"),
}

FFN_CASES = {
    "w2 shape": (dict(w2=torch.randn(6, 8)), "w2 must have shape \\[8, 6\\], got \\[6, 8\\]"),
    "b1 dtype": (dict(b1=torch.randn(6).bfloat16()), "b1 must have the dtype of x"),
    "gates": (dict(unit_gates=torch.ones(5)), "unit_gates must have shape \\[6\\]"),
    "kept": (dict(kept_units=torch.tensor([0, 6])), "kept_units must hold sorted unique indices in \\[0, 6\\)"),
    "activation": (dict(activation="swiglu"),
                   "activation must be one of " + re.escape(str(ACTIVATIONS)) + ", got 'swiglu'"),
    "x int": (dict(x=torch.ones(2, 5, 8, dtype=torch.int64)),
              "x must be a float32, float16 or bfloat16 tensor \\[\\.\\.\\., E\\], got torch.int64"),
    "kept order": (dict(kept_units=torch.tensor([3, 1])), "kept_units must hold sorted unique indices in \\[0, 6\\), "
                   "got \\[3, 1\\]"),
    "kept count": (dict(kept_units=torch.arange(7)),
                   "kept_units must have at most 6 entries \\(one per gate\\), got 7"),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bad_input_same_error_on_every_backend(backend, case):
    change, message = ATTENTION_CASES[case]
    ops.set_backend(backend)
    args = {**_attention_args(), **change}
    with pytest.raises((ValueError, TypeError), match=message):
        ops.gated_attention(**args)


@pytest.mark.parametrize("case", list(FFN_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_bad_input_same_error_on_every_backend(backend, case):
    change, message = FFN_CASES[case]
    ops.set_backend(backend)
    args = {**_ffn_args(), **change}
    with pytest.raises((ValueError, TypeError), match=message):
        ops.gated_ffn(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_inputs_pass_the_checks(backend):
    ops.set_backend(backend)
    mask = torch.ones(1, 5, dtype=torch.bool)  # one mask row broadcast over the batch
    y = ops.gated_attention(**_attention_args(), attn_mask=mask)
    assert y.shape == (2, 5, 8) and ops.last_backends()["attention"] == backend
    assert ops.gated_ffn(**_ffn_args()).shape == (2, 5, 8)


def test_an_index_changed_in_place_is_checked_again():
    """Valid indices are remembered (the gates cache theirs) until the tensor changes."""
    ops.set_backend("torch")
    args = _attention_args()
    ops.gated_attention(**args)
    args["active_heads"][1] = 5
    with pytest.raises(ValueError, match="active_heads must hold sorted unique indices"):
        ops.gated_attention(**args)


def _entry_attention_args(args: dict) -> dict:
    """The dispatcher's arguments as a backend entry takes them (key_bias instead of attn_mask)."""
    args = dict(args)
    args.setdefault("key_bias", None)
    args.pop("attn_mask", None)
    return args


@pytest.mark.parametrize("case", list(ENTRY_ATTENTION_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bad_input_same_error_from_every_backend_entry(backend, case):
    """Called directly, as torch.ops.structprune.gated_attention(..., backend) calls it, each backend's entry
    checks like the dispatcher: the Triton entry included (it used to skip the order of active_heads)."""
    change, message = ENTRY_ATTENTION_CASES[case]
    args = _entry_attention_args({**_attention_args(), **change})
    with pytest.raises((ValueError, TypeError), match=message):
        backends.load(backend).gated_attention(**args)


@pytest.mark.parametrize("case", list(FFN_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_bad_input_same_error_from_every_backend_entry(backend, case):
    change, message = FFN_CASES[case]
    args = {**_ffn_args(), **change}
    with pytest.raises((ValueError, TypeError), match=message):
        backends.load(backend).gated_ffn(**args)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_kernel_entries_need_the_index_and_a_head(backend):
    """The reference computes every head / unit (the index may be None) and a layer with no head left; a kernel
    backend's entry says it needs them."""
    entry = backends.load(backend)
    with pytest.raises(ValueError, match="active_heads must be a 1-D int64 tensor, got NoneType"):
        entry.gated_attention(**_entry_attention_args({**_attention_args(), "active_heads": None}))
    with pytest.raises(ValueError, match="kept_units must be a 1-D int64 tensor, got NoneType"):
        entry.gated_ffn(**{**_ffn_args(), "kept_units": None})
    empty = _entry_attention_args(_attention_args(H=0))
    with pytest.raises(ValueError, match="num_heads must be an int >= 1 .*, got 0"):
        entry.gated_attention(**empty)
    backends.load("torch").gated_attention(**empty)  # the reference: the output bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_entry_inputs_pass_the_checks(backend):
    """The checks let through what the contract allows: a [B, S] fp32 key bias, dropout's seed, x of any rank
    for the FFN (position-wise), a CPU index."""
    entry = backends.load(backend)
    args = _entry_attention_args(_attention_args())
    args["key_bias"] = torch.zeros(2, 5)
    assert entry.gated_attention(**args).shape == (2, 5, 8)
    for lead in ((10,), (2, 5), (1, 2, 5)):
        x = torch.randn(*lead, 8)
        assert entry.gated_ffn(**{**_ffn_args(), "x": x}).shape == (*lead, 8)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_the_dispatcher_checks_once_and_the_entry_still_refuses_what_it_cannot_run(backend, monkeypatch):
    """Through the dispatcher the inputs are checked once (its copy; ``run_checked`` skips the entry's), and the
    result is the same; a kernel entry run inside ``run_checked`` without its index still says what it needs."""
    from structprune.ops import checks

    calls = []
    real = checks._check_x
    monkeypatch.setattr(checks, "_check_x", lambda *a: calls.append(a) or real(*a))
    args = _ffn_args()
    with ops.use_backend(backend):
        got = ops.gated_ffn(**args)
    assert ops.last_backends()["ffn"] == backend and len(calls) == 1
    torch.testing.assert_close(got, backends.load("torch").gated_ffn(**args), atol=1e-5, rtol=1e-5)
    entry = backends.load(backend)
    with pytest.raises(ValueError, match="kept_units must be a 1-D int64 tensor, got NoneType"):
        checks.run_checked(entry.gated_ffn, **{**args, "kept_units": None})
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        checks.run_checked(entry.gated_attention, **_entry_attention_args(_attention_args(H=0)))
    assert not checks._checked_upstream()  # the depth is back to 0 after the errors
    with pytest.raises(ValueError, match="x must be a float32"):  # outside run_checked the entry checks again
        entry.gated_ffn(**{**args, "x": torch.ones(2, 5, 8, dtype=torch.int64)})
