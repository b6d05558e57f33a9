"""structprune.model.families.kv_cache: a patched decoder appends to a DynamicCache in a growing buffer; the layer's
keys and values are what HF's concatenation gives (greedy tokens, logits), earlier views never change, and crop,
reorder and dtype changes fall back to fresh buffers or to HF's own update."""
import torch
from transformers.cache_utils import DynamicCache

import structprune as sp
from helpers import models as _models
from helpers.decoders import masks, tiny_model
import structprune.model.families.decoder as decoder_family
from structprune.model.families import kv_cache

one_thread_reference_backend = _models.one_thread_reference_backend  # the autouse fixture


def _layer_cache(b=2, h=3, s=5, d=4, dtype=torch.float32):
    cache = DynamicCache()
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(b, h, s, d, generator=g, dtype=dtype), torch.randn(b, h, s, d, generator=g, dtype=dtype)
    kv_cache.update(cache, k, v, 0)  # the first update: HF's own
    return cache, k, v


def test_appends_equal_hfs_concatenation_and_old_views_stay():
    cache, k, v = _layer_cache()
    ref = DynamicCache()
    ref.update(k, v, 0)
    views = []
    for step in range(300):  # past the first buffer's headroom: one regrowth
        nk, nv = torch.full((2, 3, 1, 4), float(step)), torch.full((2, 3, 1, 4), -float(step))
        got = kv_cache.update(cache, nk, nv, 0)
        want = ref.update(nk, nv, 0)
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
        views.append((got[0], want[0].clone()))
    assert "_structprune_kv" in cache.layers[0].__dict__
    for view, snapshot in views:
        torch.testing.assert_close(view, snapshot, atol=0, rtol=0)
    assert cache.get_seq_length() == 305


def test_crop_and_reorder_never_overwrite_what_was_written():
    cache, k, v = _layer_cache()
    kv_cache.update(cache, torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), 0)
    before = cache.layers[0].keys
    kept = before.clone()
    cache.crop(-2)
    kv_cache.update(cache, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4), 0)
    torch.testing.assert_close(before, kept, atol=0, rtol=0)  # a new buffer, not a write into the old one
    assert cache.get_seq_length() == 5
    cache.reorder_cache(torch.tensor([1, 0]))
    out = kv_cache.update(cache, torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), 0)
    torch.testing.assert_close(out[0][0, :, :5], torch.cat([k[1, :, :4], torch.zeros(3, 1, 4)], 1))


def test_other_dtypes_and_gradients_take_hfs_update():
    cache, k, v = _layer_cache()
    out = kv_cache.update(cache, torch.ones(2, 3, 1, 4, dtype=torch.bfloat16), torch.ones(2, 3, 1, 4), 0)
    assert out[0].dtype == torch.float32 and "_structprune_kv" not in cache.layers[0].__dict__
    g = torch.ones(2, 3, 1, 4, requires_grad=True)
    out = kv_cache.update(cache, g, g, 0)
    assert out[0].requires_grad and "_structprune_kv" not in cache.layers[0].__dict__


def test_generation_with_the_buffer_equals_hfs_cache(monkeypatch):
    """Per-step logits of greedy decoding with a masked patched Llama: kv_cache.update vs HF's cache.update."""
    heads, ffn = masks()
    model = sp.set_masks(sp.patch(tiny_model("llama")), heads=heads, ffn=ffn)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(2))

    def run():
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            cache, logits = out.past_key_values, [out.logits[:, -1]]
            for _ in range(6):
                out = model(input_ids=logits[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
        return torch.stack(logits), "_structprune_kv" in cache.layers[0].__dict__

    got, buffered = run()
    monkeypatch.setattr(decoder_family, "cache_update", lambda cache, k, v, i, **kw: cache.update(k, v, i, **kw))
    want, hf_buffered = run()
    assert buffered and not hf_buffered
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
