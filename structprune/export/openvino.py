"""OpenVINO IR export (``structprune export --format openvino``) and an OpenVINO QA model called like a Hugging Face
one (``structprune eval/predict --model x.xml``).

The IR is converted (:func:`onnx_to_ir`) from the ONNX graph :func:`structprune.export.onnx.export_onnx` writes
(plain operators, dynamic batch and sequence axes), so both formats hold the same computation; weights stay fp32 in
the IR
(``compress_to_fp16=False``); the precision used at run time is a compile-time hint (``INFERENCE_PRECISION_HINT``:
``f32`` or ``bf16``). Needs the ``openvino`` extra (``pip install "structprune[openvino]"``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

PRECISIONS = ("f32", "bf16")


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise ImportError("OpenVINO is not installed: pip install \"structprune[openvino]\" (or pip install "
                          "openvino)") from exc
    return openvino


def onnx_to_ir(onnx_path: str | Path, out: str | Path) -> Path:
    """Convert an ONNX graph to an OpenVINO IR (``out``: the ``.xml``; the ``.bin`` is written beside it)."""
    ov = _openvino()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(out), compress_to_fp16=False)
    return out


def compile_ir(path: str | Path, threads: int | None = None, precision: str = "f32"):
    """An OpenVINO ``CompiledModel`` on the CPU: latency hint, one stream, ``threads`` inference threads."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {PRECISIONS}")
    ov = _openvino()
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", config)


class OvQAModel:
    """An OpenVINO compiled IR called like a Hugging Face QA model: ``model(**batch).start_logits`` etc.

    The same duck-typed ``nn.Module`` interface as :class:`structprune.export.onnx.OrtQAModel`
    (``eval``, ``train``, ``to('cpu')``, an empty ``parameters()``), so ``structprune eval``/``predict`` run it.
    """

    training = False

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "f32"):
        self.path = Path(path)
        self.compiled = compile_ir(path, threads, precision)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]

    def run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer(feed)
        return (result[self.compiled.output("start_logits")], result[self.compiled.output("end_logits")])

    def __call__(self, **batch):
        feed = {n: np.ascontiguousarray(batch[n].detach().cpu().numpy().astype(np.int64)) for n in self.input_names}
        start, end = self.run(feed)
        return transformers.modeling_outputs.QuestionAnsweringModelOutput(
            start_logits=torch.from_numpy(np.array(start)), end_logits=torch.from_numpy(np.array(end)))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{self.path} is an OpenVINO model: it runs inference only")
        return self

    def to(self, device=None, *args, **kwargs):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"{self.path} runs on OpenVINO's CPU plugin; got device {device}")
        return self

    def parameters(self):
        return iter(())
