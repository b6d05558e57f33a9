"""The kernel backends, built alike: each module defines ``BACKEND``, a :class:`structprune.ops.support.Backend`.

* :mod:`.pytorch` -- "torch", the pure-PyTorch reference in the kernels' calling convention;
* :mod:`.cpp` -- "cpp", the C++/CUDA extension of ``csrc/`` (prebuilt or JIT-built);
* :mod:`.triton` -- "triton", the Triton kernels of ``kernels/`` (``structprune._kernels``).

They are registered, and imported on first use, by :mod:`structprune.ops.registry`.
"""
