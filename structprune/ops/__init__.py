"""The op stack: one public ``torch.library`` op per computation and everything above the backends.

* :mod:`.schema` -- the public ops ``torch.ops.structprune.gated_attention / gated_ffn / hard_concrete_sample``;
* :mod:`.dispatch` -- backend choice ("auto" or a named backend), padding, fallbacks, what ran;
* :mod:`.registry` -- which backends exist, where they live, the order "auto" tries them;
* :mod:`.support` -- the :class:`~.support.Backend` protocol every backend fills, shared helpers;
* :mod:`.checks` -- the input checks every backend runs (one place);
* :mod:`.padding` -- key-padding masks to the kernels' additive key bias;
* :mod:`.reference` -- the pure-PyTorch reference, the oracle of every kernel.

Nothing here imports the model wing or the user wing (training, QA, tools); the backends live in
:mod:`structprune.ops.registry`.
"""
