"""Serving a pruned model on the CPU: :func:`optimize` (``sp.optimize``) builds an inference module with fused,
pre-packed GEMMs and ATen's CPU flash attention, in fp32 or bf16."""
from structprune.serving.optimize import DTYPES, ServingModel, optimize

__all__ = ["optimize", "ServingModel", "DTYPES"]
