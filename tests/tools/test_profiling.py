"""profiling.annotate_layer names both halves of a layer of every family, plain and patched, and removes cleanly;
the FFN half it wraps is the one the family adapter names."""
import pytest
import torch
import transformers

import structprune as sp
from structprune.model.families import family_of, family_of_layer
from structprune.tools import profiling

CONFIGS = {
    "bert": lambda: transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37,
                                            num_hidden_layers=1, vocab_size=50),
    "distilbert": lambda: transformers.DistilBertConfig(dim=32, n_heads=4, hidden_dim=37, n_layers=1,
                                                        vocab_size=50),
}


@pytest.mark.parametrize("patched", [False, True])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_annotate_layer_ranges(family, patched):
    model = transformers.AutoModel.from_config(CONFIGS[family]()).eval()
    if patched:
        sp.patch(model)
    layer = family_of(model).layers(model)[0]
    assert family_of_layer(layer).name == family
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        before = model(ids).last_hidden_state
        handle = profiling.annotate_layer(layer, "probe")
        with torch.profiler.profile() as prof:
            during = model(ids).last_hidden_state
        handle.remove()
        after = model(ids).last_hidden_state
    names = {e.name for e in prof.events() if e.name.startswith("probe/")}
    assert names == {"probe/attention", "probe/ffn"}
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert family_of_layer(layer).ffn_block_name not in layer.__dict__ or isinstance(
        layer.__dict__[family_of_layer(layer).ffn_block_name], torch.nn.Module)


def test_family_of_layer_refuses_other_modules():
    with pytest.raises(TypeError, match="not a layer of a supported family"):
        family_of_layer(torch.nn.Linear(2, 2))
