"""Export a (compacted) question-answering model to ONNX or ``torch.export``, without structprune's custom ops.

A structprune save is compacted if it still has masked or fractional gates, then rebuilt as the plain-PyTorch
model of ``structprune/model/templates/modeling_structprune.py`` (the code ``save_pretrained`` ships with a compacted
checkpoint), so the exported graph holds only standard operators. A plain Hugging Face directory (a dense
teacher) is exported as it is.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
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
    from structprune.model.io import _structure, is_standalone_exportable

    if not is_standalone_exportable(model):
        log("note: the model still has masked or fractional gates; compacting a copy before export")
        model = compact(copy.deepcopy(model))
    structure = _structure(model)
    config = copy.deepcopy(model.config)
    config.structprune_heads_per_layer = structure["heads_per_layer"]
    config.structprune_ffn_units_per_layer = structure["ffn_units_per_layer"]
    cls = getattr(_template(), f"Pruned{type(model).__name__}", None)
    if cls is None:
        raise TypeError(f"no plain-PyTorch class for {type(model).__name__} in the modeling template")
    plain = cls(config)
    state = {k: v for k, v in model.state_dict().items() if ".head_gate." not in k and ".unit_gate." not in k}
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).dtype).eval()


def load_plain_qa(path: str | Path, log=print) -> tuple[nn.Module, nn.Module]:
    """``(plain, source)``: the QA model at ``path`` (structprune save or Hugging Face directory) as plain
    PyTorch, and as loaded (``structprune.from_pretrained`` for a structprune save), both in eval mode."""
    from structprune.model.io import STRUCTPRUNE_CONFIG, from_pretrained

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: expected a model directory (a structprune save or a Hugging Face "
                                "model folder)")
    if (path / STRUCTPRUNE_CONFIG).is_file():
        source = from_pretrained(path)
        return to_plain(source, log=log), source
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()
    return model, model


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


def squad_windows(tokenizer, data: str | Path, examples: int = 16, max_length: int = 384):
    """Padded batch of real SQuAD windows (``build_eval_features`` on the first ``examples`` questions)."""
    from structprune.qa.data import load_squad
    from structprune.qa.features import build_eval_features, collate

    dataset = load_squad(str(data), limit=examples)
    features = build_eval_features(dataset, tokenizer, max_length=max_length)
    names = [n for n in tokenizer.model_input_names if n in features.column_names]
    return collate(features.select_columns(names)[:], tokenizer, names)


def parity(reference: nn.Module, run, batch: dict) -> float:
    """Max abs difference of start/end logits between ``reference`` and ``run`` (any callable model)."""
    with torch.no_grad():
        want = reference(**batch)
        got = run(**batch)
    return max(float((got.start_logits.float() - want.start_logits.float()).abs().max()),
               float((got.end_logits.float() - want.end_logits.float()).abs().max()))


def run_export(model_dir: str, fmt: str, out: str, opset: int = DEFAULT_OPSET, quantize: str | None = None,
               tokenizer_dir: str | None = None, data: str | None = None, parity_examples: int = 16,
               log=print) -> dict:
    """Export ``model_dir`` to ``out``; writes the tokenizer beside it and prints a parity check."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; use one of {FORMATS}")
    if quantize is not None and (quantize not in QUANTIZE or fmt != "onnx"):
        raise ValueError(f"--quantize {quantize!r} is supported only as one of {QUANTIZE} with --format onnx")
    out_path = Path(out)
    want_suffix = SUFFIXES[fmt]
    if out_path.suffix != want_suffix:
        raise ValueError(f"--out {out}: a {fmt} export is written to a file ending in {want_suffix}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    model, source = load_plain_qa(model_dir, log=log)
    names = input_names(model, tokenizer)
    example = example_batch(model.config.vocab_size, names)
    result = {"format": fmt, "out": str(out_path), "inputs": names}
    if fmt == "onnx":
        export_onnx(model, names, example, out_path, opset)
        result["opset"] = opset
        log(f"wrote {out_path} (ONNX opset {opset}, inputs {names}, dynamic batch and sequence axes)")
        if quantize:
            fp32 = out_path.with_name(out_path.stem + ".fp32.onnx")
            shutil.move(out_path, fp32)
            quantize_int8(fp32, out_path)
            result["quantize"] = quantize
            log(f"quantized to {quantize} (ONNX Runtime dynamic quantization); fp32 graph kept at {fp32}")
        runner = OrtQAModel(out_path, threads=1)
    elif fmt == "openvino":
        import tempfile

        from structprune.export.openvino_export import OvQAModel, onnx_to_ir

        with tempfile.TemporaryDirectory() as tmp:  # the IR is converted from the ONNX graph
            onnx_to_ir(export_onnx(model, names, example, Path(tmp) / "model.onnx", opset), out_path)
        log(f"wrote {out_path} and {out_path.with_suffix('.bin').name} (OpenVINO IR from ONNX opset {opset}, "
            f"inputs {names}, dynamic batch and sequence axes, fp32 weights)")
        runner = OvQAModel(out_path, threads=1)
    else:
        export_torch(model, names, example, out_path)
        log(f"wrote {out_path} (torch.export program, inputs {names}, dynamic batch and sequence)")
        program = torch.export.load(str(out_path)).module()

        def runner(**batch):
            start, end = program(**{n: batch[n] for n in names})
            return transformers.modeling_outputs.QuestionAnsweringModelOutput(start_logits=start, end_logits=end)
    tokenizer.save_pretrained(out_path.parent)
    from structprune.qa.commands import THRESHOLD_FILE

    if (Path(model_dir) / THRESHOLD_FILE).is_file():
        shutil.copyfile(Path(model_dir) / THRESHOLD_FILE, out_path.parent / THRESHOLD_FILE)
    if data is not None:
        batch = squad_windows(tokenizer, data, parity_examples)
        batch = {n: batch[n] for n in names}
        what = f"{batch['input_ids'].shape[0]} SQuAD windows from {data}"
    else:
        batch, what = example, "a random padded batch (pass --data for SQuAD windows)"
    from structprune.ops.dispatch import get_backend, set_backend

    backend = get_backend()
    set_backend("torch")  # the pure-PyTorch reference, for a structprune model
    try:
        result["max_abs_diff"] = parity(source, runner, batch)
    finally:
        set_backend(backend)
    result["parity_batch"] = what
    log(f"parity vs the PyTorch model ({type(source).__name__}) on {what}: max |diff| of start/end logits = "
        f"{result['max_abs_diff']:.3g}")
    return result


def _default_data() -> str | None:
    path = Path("/work/shared/data/squad2/dev.json")
    return str(path) if path.is_file() else None


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a QA model to ONNX, torch.export or OpenVINO IR (plain operators)",
                              description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="structprune save or Hugging Face QA model directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True,
                   help="output file (.onnx, .pt2 or .xml for OpenVINO); the tokenizer is saved beside it")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="ONNX Runtime dynamic int8 quantization of the ONNX graph")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--data", default=None, help="SQuAD JSON for the parity check (default: SQuAD 2.0 dev if found)")
    p.add_argument("--parity-examples", type=int, default=16, help="questions used by the parity check")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    run_export(args.model, args.format, args.out, args.opset, args.quantize, args.tokenizer,
               args.data or _default_data(), args.parity_examples)
    return 0
