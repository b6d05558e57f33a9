"""Two threads running the same patched model at once get the reference's results (``cpp`` backend: shared
packed-weight cache, mask changes seen by both)."""
from __future__ import annotations

import threading

import pytest
import torch
from helpers.models import tiny_batch, tiny_model

import structprune as sp
import structprune.backends.cpp.ops as ext

if ext.load_error() is not None:
    pytest.skip(f"C++ extension unavailable: {ext.load_error()}", allow_module_level=True)

TOL = dict(rtol=1e-4, atol=2e-5)


def _run_threads(fn, n=2):
    errors = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait()
            fn(i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("clear_between", [False, True])
def test_two_threads_same_model_match_reference(clear_between):
    model = tiny_model("bert", "qa", layers=2, hidden=64, heads=4, ffn=96)
    sp.patch(model)
    sp.set_masks(model, heads=torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1]]),
                 ffn=(torch.arange(96) % 4 != 1).float().expand(2, 96))
    batches = [tiny_batch(batch=2, seq=9 + i, pad_from=5 + i, seed=i) for i in range(4)]
    sp.set_backend("torch")
    with torch.no_grad():
        want = [model(**b).start_logits for b in batches]
    sp.set_backend("cpp")
    sp.clear_cache()

    def work(i):
        for step in range(25):
            j = (i + step) % len(batches)
            with torch.no_grad():
                got = model(**batches[j]).start_logits
            torch.testing.assert_close(got, want[j], **TOL)
            if clear_between and step % 5 == i:
                sp.clear_cache()  # entries vanish under the other thread

    _run_threads(work)
    assert sp.last_backends()["attention"] == "cpp"


def test_two_threads_training_steps_on_separate_copies_share_the_cache():
    """Forward + backward in two threads (separate model copies, so the gradients are each thread's own)."""
    models = []
    for _ in range(2):
        m = tiny_model("bert", "bare", layers=2, hidden=64, heads=4, ffn=96).train()
        m.config.attention_probs_dropout_prob = 0.0
        sp.patch(m)
        sp.set_masks(m, heads=torch.tensor([[1.0, 1, 0, 1], [1, 0, 0, 1]]))
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        models.append(m)
    batch = tiny_batch(batch=2, seq=10, pad_from=6)

    def grads(model):
        model.zero_grad(set_to_none=True)
        model(**batch).last_hidden_state.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    sp.set_backend("torch")
    want = grads(models[0])
    sp.set_backend("cpp")

    def work(i):
        for _ in range(5):
            got = grads(models[i])
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    _run_threads(work)
