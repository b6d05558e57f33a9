"""structprune export --format openvino: an OpenVINO IR with the PyTorch model's outputs, loadable by eval/predict."""
import json

import pytest
import torch
import transformers

import structprune as sp
from helpers.models import tiny_batch, tiny_model

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from structprune.export import onnx as spx  # noqa: E402
from structprune.export.command import run_export  # noqa: E402
from structprune.export import openvino as spov  # noqa: E402

L, H, I = 3, 4, 96


def pruned(compact=True):
    """A tiny BERT QA model with a layer at 0 heads and a layer at 0 FFN units (compacted unless told)."""
    model = sp.patch(tiny_model("bert", "qa"))
    g = torch.Generator().manual_seed(5)
    heads, ffn = torch.rand(L, H, generator=g) < 0.5, torch.rand(L, I, generator=g) < 0.3
    heads[0], heads[1] = True, False
    ffn[0, :2], ffn[2] = True, False
    sp.set_masks(model, heads=heads, ffn=ffn)
    return sp.compact(model) if compact else model


def logits(out):
    return torch.cat([out.start_logits, out.end_logits], dim=-1)


def _tokenizer():
    """A tiny WordPiece tokenizer matching the tiny models' vocabulary of 120."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + \
        [f"w{i}" for i in range(120 - 31)]
    return transformers.BertTokenizerFast(vocab={v: i for i, v in enumerate(vocab)})


def test_ir_matches_pytorch_with_dynamic_shapes_and_padding(tmp_path):
    model = pruned()
    plain = spx.to_plain(model)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tiny_batch(2, 9) | {"token_type_ids": torch.zeros(2, 9, dtype=torch.long)}
    path = spov.onnx_to_ir(spx.export_onnx(plain, names, example, tmp_path / "m.onnx"), tmp_path / "m.xml")
    assert path.is_file() and path.with_suffix(".bin").is_file()
    runner = spov.OvQAModel(path, threads=1)
    for batch, seq in ((3, 11), (1, 5), (5, 23)):
        inputs = tiny_batch(batch, seq, pad_from=3) | {"token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
        with torch.no_grad():
            want = logits(model(**inputs))
        torch.testing.assert_close(logits(runner(**inputs)), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="precision"):
        spov.compile_ir(path, precision="f16")
    with pytest.raises(RuntimeError, match="inference only"):
        runner.train()


def test_cli_export_openvino_and_load_for_eval(tmp_path):
    from structprune.cli import main
    from structprune.qa.commands import _tokenizer as load_tokenizer
    from structprune.qa.commands import load_qa_model

    tokenizer = _tokenizer()
    model = pruned(compact=False)
    sp.save_pretrained(model, tmp_path / "model", tokenizer=tokenizer)
    out = tmp_path / "served" / "model.xml"
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "a b c d e f", "qas": [
        {"id": "q1", "question": "a b", "answers": [{"text": "c", "answer_start": 4}], "is_impossible": False}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(squad))
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "openvino", "--out", str(out),
                 "--data", str(tmp_path / "dev.json")]) in (0, None)
    assert (out.parent / "tokenizer_config.json").is_file() and out.with_suffix(".bin").is_file()
    assert load_tokenizer(str(out)).vocab_size == tokenizer.vocab_size
    ov_model = load_qa_model(str(out))
    assert isinstance(ov_model, spov.OvQAModel)
    x = tiny_batch(2, 8) | {"token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    with torch.no_grad():
        want = logits(sp.from_pretrained(tmp_path / "model")(**x))
    torch.testing.assert_close(logits(ov_model(**x)), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\.xml"):
        run_export(str(tmp_path / "model"), "openvino", str(tmp_path / "x.onnx"))
