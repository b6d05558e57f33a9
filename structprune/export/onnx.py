"""Export a (compacted) question-answering model to ONNX or ``torch.export``, without structprune's custom ops, and
run it in ONNX Runtime (the ``structprune export`` command is :mod:`structprune.export.command`).

A structprune save is compacted if it still has masked or fractional gates, then rebuilt as the plain-PyTorch
model of ``structprune/model/templates/modeling_structprune.py`` (the code ``save_pretrained`` ships with a compacted
checkpoint), so the exported graph holds only standard operators. A plain Hugging Face directory (a dense
teacher) is exported as it is.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

FORMATS = ("onnx", "torch-export", "openvino")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "openvino": ".xml"}
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 14, 20, 17
QUANTIZE = ("int8",)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _template():
    """The modeling template, imported as a module (the same file save_pretrained writes beside the weights)."""
    from structprune.model.io import _MODELING_TEMPLATE

    name = "structprune._modeling_template"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _MODELING_TEMPLATE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def to_plain(model: nn.Module, log=print) -> nn.Module:
    """A plain-PyTorch copy of a patched model: compacted first when gates are still masked or fractional,
    then rebuilt with per-layer sizes from the modeling template (no structprune op, no gate)."""
    import copy

    from structprune import compact
    from structprune.model.io import _standalone_config, _structure, is_standalone_exportable

    if not is_standalone_exportable(model):
        log("note: the model still has masked or fractional gates; compacting a copy before export")
        model = compact(copy.deepcopy(model))
    config, _ = _standalone_config(model, _structure(model))  # per-layer sizes, hidden width, skipped sublayers
    cls = getattr(_template(), f"Pruned{type(model).__name__}", None)
    if cls is None:
        raise TypeError(f"no plain-PyTorch class for {type(model).__name__} in the modeling template")
    plain = cls(config)
    state = {k: v for k, v in model.state_dict().items() if not re.search(r"\.(head|unit|sublayer|hidden)_gate\.", k)}
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).dtype).eval()


class QAOutputs(nn.Module):
    """``model(input_ids, attention_mask[, token_type_ids]) -> (start_logits, end_logits)``: the traced interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.start_logits, out.end_logits


def input_names(model: nn.Module, tokenizer) -> list[str]:
    """The inputs the exported graph takes: those of the tokenizer, in INPUT_NAMES order."""
    names = [n for n in INPUT_NAMES if n in tokenizer.model_input_names]
    if "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(f"the tokenizer gives {tokenizer.model_input_names}; export needs input_ids and "
                         "attention_mask")
    return names


def example_batch(vocab_size: int, names, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """A small padded batch used for tracing (sizes other than 1 so no axis is specialised)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0
    full = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
    return {n: full[n] for n in names}


def export_onnx(model: nn.Module, names: list[str], example: dict, out: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``out`` (an ONNX graph with dynamic batch and sequence axes) from a plain-PyTorch QA model."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset} is not supported: use an opset in [{MIN_OPSET}, {MAX_OPSET}] "
                         f"(default {DEFAULT_OPSET})")
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({"start_logits": {0: "batch", 1: "sequence"}, "end_logits": {0: "batch", 1: "sequence"}})
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(QAOutputs(model).eval(), tuple(example[n] for n in names), str(out), dynamo=False,
                          input_names=names, output_names=["start_logits", "end_logits"], dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True)
    return out


def export_torch(model: nn.Module, names: list[str], example: dict, out: Path) -> Path:
    """Write ``out`` (a ``torch.export`` program, ``.pt2``) with dynamic batch and sequence dimensions."""
    dynamic = torch.export.Dim.DYNAMIC  # ranges inferred (sequence up to the position embeddings)
    shapes = {n: {0: dynamic, 1: dynamic} for n in names}
    with torch.no_grad():
        program = torch.export.export(QAOutputs(model).eval(), (), kwargs=dict(example), dynamic_shapes=shapes)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
    return out


def optimize_onnx(src: Path, dst: Path) -> Path:
    """``onnxruntime.transformers.optimizer`` fusions for BERT (SkipLayerNormalization, BiasGelu, ...; head
    counts are read per layer from the graph, so layers of different sizes are fine)."""
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    model.save_model_to_file(str(dst))
    return dst


def quantize_int8(src: Path, dst: Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights of MatMul/Gemm, activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # fused ORT-domain ops (BiasGelu, SkipLayerNormalization) defeat shape inference: their outputs are float
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst


class OrtQAModel:
    """An ONNX Runtime session called like a Hugging Face QA model: ``model(**batch).start_logits`` etc.

    Enough of the ``nn.Module`` interface for :func:`structprune.qa.evaluate.evaluate_qa` (``eval``,
    ``train``, ``to('cpu')``, an empty ``parameters()``, so it runs on the CPU).
    """

    training = False

    def __init__(self, path: str | Path, threads: int | None = None, session_options=None):
        import onnxruntime as ort

        options = session_options or ort.SessionOptions()
        if threads is not None and session_options is None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch):
        feed = {n: np.ascontiguousarray(batch[n].detach().cpu().numpy().astype(np.int64)) for n in self.input_names}
        start, end = self.session.run(["start_logits", "end_logits"], feed)
        return transformers.modeling_outputs.QuestionAnsweringModelOutput(
            start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{self.path} is an ONNX Runtime model: it runs inference only")
        return self

    def to(self, device=None, *args, **kwargs):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"{self.path} runs on ONNX Runtime's CPU provider; got device {device}")
        return self

    def parameters(self):
        return iter(())


def parity(reference: nn.Module, run, batch: dict) -> float:
    """Max abs difference of start/end logits between ``reference`` and ``run`` (any callable model)."""
    with torch.no_grad():
        want = reference(**batch)
        got = run(**batch)
    return max(float((got.start_logits.float() - want.start_logits.float()).abs().max()),
               float((got.end_logits.float() - want.end_logits.float()).abs().max()))
