"""``structprune export``: a saved model to ONNX or ``torch.export`` (:mod:`structprune.export.onnx`), with its
parity against PyTorch on SQuAD windows (or a random batch)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import transformers
from torch import nn

from structprune.export.onnx import (DEFAULT_OPSET, FORMATS, MAX_OPSET, MIN_OPSET, QUANTIZE, SUFFIXES, OrtQAModel,
                                     example_batch, export_onnx, export_torch, input_names, parity, quantize_int8,
                                     to_plain)


def load_plain_qa(path: str | Path, log=print) -> tuple[nn.Module, nn.Module]:
    """``(plain, source)``: the QA model at ``path`` (structprune save or Hugging Face directory) as plain
    PyTorch, and as loaded (``structprune.from_pretrained`` for a structprune save), both in eval mode."""
    from structprune.model.io import STRUCTPRUNE_CONFIG, from_pretrained
    from structprune.qa.runs import load_hf_qa_model

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such directory (the folder does not exist); expected a model "
                                "directory (a structprune save or a Hugging Face model folder)")
    if (path / STRUCTPRUNE_CONFIG).is_file():
        source = from_pretrained(path)
        return to_plain(source, log=log), source
    model = load_hf_qa_model(path).eval()
    return model, model


def squad_windows(tokenizer, data: str | Path, examples: int = 16, max_length: int = 384):
    """Padded batch of real SQuAD windows (``build_eval_features`` on the first ``examples`` questions)."""
    from structprune.qa.data import load_squad
    from structprune.qa.features import build_eval_features, collate

    dataset = load_squad(str(data), limit=examples)
    features = build_eval_features(dataset, tokenizer, max_length=max_length)
    names = [n for n in tokenizer.model_input_names if n in features.column_names]
    return collate(features.select_columns(names)[:], tokenizer, names)


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
    model, source = load_plain_qa(model_dir, log=log)  # first: it says when the folder does not exist
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
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

        from structprune.export.openvino import OvQAModel, onnx_to_ir

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
    from structprune.qa.runs import THRESHOLD_FILE

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
    """SQuAD 2.0 dev in the data folder the QA commands read by default (``qa.runs.DEFAULT_DATA``), if it is there."""
    from structprune.qa.runs import DEFAULT_DATA

    path = DEFAULT_DATA / "dev.json"
    return str(path) if path.is_file() else None


def register(subparsers) -> None:
    from structprune.qa.runs import DEFAULT_DATA

    p = subparsers.add_parser("export", help="export a QA model to ONNX, torch.export or OpenVINO IR (plain operators)",
                              description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="structprune save or Hugging Face QA model directory")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (an ONNX graph), torch-export (a torch.export program, .pt2) or openvino (an OpenVINO IR, .xml)")
    p.add_argument("--out", required=True,
                   help="output file (.onnx, .pt2, or .xml for OpenVINO); the tokenizer is saved beside it")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="ONNX Runtime dynamic int8 quantization of the ONNX graph (default: none, fp32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--data", default=None,
                   help=f"SQuAD JSON for the parity check (default: {DEFAULT_DATA}/dev.json if it exists, else a "
                        "random padded batch)")
    p.add_argument("--parity-examples", type=int, default=16, help="questions used by the parity check")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from structprune.cli import check_model_dir

    check_model_dir(args.model)
    run_export(args.model, args.format, args.out, args.opset, args.quantize, args.tokenizer,
               args.data or _default_data(), args.parity_examples)
    return 0
