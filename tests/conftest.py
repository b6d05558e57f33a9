import os

import pytest
import torch

# Triton kernels run on CPU tensors only in interpreter mode, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("STRUCTPRUNE_QUIET", "1")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    import structprune.ops.dispatch as ops

    torch.manual_seed(0)
    saved = ops.get_backend()
    yield
    ops.set_backend(saved)
