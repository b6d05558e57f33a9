"""structprune export: ONNX / torch.export graphs of compacted models, with plain operators only."""
import json

import pytest
import torch
import transformers

import structprune as sp
from helpers.models import FAMILIES, pruned_model as pruned, qa_logits as logits, tiny_batch
from structprune.export import onnx as spx
from structprune.export.command import run_export

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

L, H, I = 3, 4, 96


def names_for(family):
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if family in ("bert", "electra") else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_matches_pytorch_with_dynamic_shapes_and_padding(tmp_path, family):
    model = pruned(family)
    plain = spx.to_plain(model)
    names = names_for(family)
    path = spx.export_onnx(plain, names, {k: v for k, v in tiny_batch(2, 9).items()} | {
        "token_type_ids": torch.zeros(2, 9, dtype=torch.long)}, tmp_path / "m.onnx", opset=17)
    import onnx

    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}  # standard operators only
    runner = spx.OrtQAModel(path, threads=1)
    for batch, seq in ((3, 11), (1, 5), (5, 23)):  # none of them the traced shape
        inputs = tiny_batch(batch, seq, pad_from=3)
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
        with torch.no_grad():
            want = logits(model(**{k: inputs[k] for k in names}))
        got = logits(runner(**inputs))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_uncompacted_model_is_compacted_first(tmp_path):
    model = pruned(compact=False)
    notes = []
    plain = spx.to_plain(model, log=notes.append)
    assert notes and "compacting a copy" in notes[0]
    assert model.base_model.encoder.layer[1].attention.self.num_heads == H  # the caller's model is untouched
    assert plain.base_model.encoder.layer[1].attention.self.num_heads == 0
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(plain(**batch)), logits(model(**batch)), atol=1e-5, rtol=0)


def test_torch_export_matches(tmp_path):
    model = pruned()
    names = names_for("bert")
    example = tiny_batch(2, 9) | {"token_type_ids": torch.zeros(2, 9, dtype=torch.long)}
    path = spx.export_torch(spx.to_plain(model), names, example, tmp_path / "m.pt2")
    program = torch.export.load(str(path)).module()
    inputs = tiny_batch(3, 13, pad_from=4) | {"token_type_ids": torch.zeros(3, 13, dtype=torch.long)}
    start, end = program(**inputs)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([start, end], -1), logits(model(**inputs)), atol=1e-5, rtol=0)


def _pruned_onnx(path):
    """A pruned tiny BERT and its fp32 ONNX export at ``path``."""
    model = pruned()
    example = tiny_batch(2, 9) | {"token_type_ids": torch.zeros(2, 9, dtype=torch.long)}
    return model, spx.export_onnx(spx.to_plain(model), names_for("bert"), example, path)


def test_int8_quantized_graph_runs_close(tmp_path):
    model, fp32 = _pruned_onnx(tmp_path / "m.onnx")
    int8 = spx.quantize_int8(fp32, tmp_path / "m.int8.onnx")
    assert int8.stat().st_size < fp32.stat().st_size
    inputs = tiny_batch() | {"token_type_ids": torch.zeros(3, 11, dtype=torch.long)}
    got = logits(spx.OrtQAModel(int8, threads=1)(**inputs))
    with torch.no_grad():
        want = logits(model(**inputs))
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.5 * want.abs().max() + 0.1  # quantized: close, not exact


def test_optimized_graph_keeps_outputs(tmp_path):
    """ORT transformer fusions read per-layer head counts from the graph: outputs unchanged."""
    model, fp32 = _pruned_onnx(tmp_path / "m.onnx")
    opt = spx.optimize_onnx(fp32, tmp_path / "m.opt.onnx")
    inputs = tiny_batch() | {"token_type_ids": torch.zeros(3, 11, dtype=torch.long)}
    with torch.no_grad():
        want = logits(model(**inputs))
    torch.testing.assert_close(logits(spx.OrtQAModel(opt, threads=1)(**inputs)), want, atol=1e-4, rtol=0)


def test_bad_format_opset_and_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\[14, 20\]"):
        spx.export_onnx(spx.to_plain(pruned()), ["input_ids", "attention_mask"], tiny_batch(), tmp_path / "m.onnx",
                        opset=9)
    with pytest.raises(ValueError, match="onnx"):
        run_export(str(tmp_path), "tflite", str(tmp_path / "m.tflite"))
    with pytest.raises(ValueError, match=r"\.onnx"):
        run_export(str(tmp_path), "onnx", str(tmp_path / "m.pt2"))
    with pytest.raises(ValueError, match="int8"):
        run_export(str(tmp_path), "torch-export", str(tmp_path / "m.pt2"), quantize="int8")


def _tokenizer():
    """A tiny WordPiece tokenizer matching the tiny models' vocabulary of 120."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + \
        [f"w{i}" for i in range(120 - 31)]
    return transformers.BertTokenizerFast(vocab={v: i for i, v in enumerate(vocab)})


def test_cli_export_and_eval_load_onnx(tmp_path):
    """`structprune export` end to end (tokenizer beside the .onnx), and load_qa_model on the .onnx."""
    from structprune.cli import main
    from structprune.qa.runs import _tokenizer as load_tokenizer
    from structprune.qa.runs import load_qa_model
    from structprune.qa.evaluate import predict_logits

    tokenizer = _tokenizer()
    model = pruned(compact=False)
    sp.save_pretrained(model, tmp_path / "model", tokenizer=tokenizer)
    out = tmp_path / "served" / "model.onnx"
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "a b c d e f", "qas": [
        {"id": "q1", "question": "a b", "answers": [{"text": "c", "answer_start": 4}], "is_impossible": False},
        {"id": "q2", "question": "f", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(squad))
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out", str(out),
                 "--opset", "17", "--data", str(tmp_path / "dev.json")]) in (0, None)
    assert (out.parent / "tokenizer_config.json").is_file()
    ort_model = load_qa_model(str(out))
    assert load_tokenizer(str(out)).vocab_size == tokenizer.vocab_size
    import datasets

    texts = {"input_ids": [[2, 5, 6, 3, 7, 8, 9, 3], [2, 5, 3, 10, 3]],
             "attention_mask": [[1] * 8, [1] * 5], "token_type_ids": [[0] * 4 + [1] * 4, [0] * 3 + [1] * 2]}
    features = datasets.Dataset.from_dict(texts)
    starts, ends, _ = predict_logits(ort_model, tokenizer, features, batch_size=2, progress=False)
    ref_starts, ref_ends, _ = predict_logits(sp.from_pretrained(tmp_path / "model"), tokenizer, features,
                                             batch_size=2, progress=False)
    for a, b in zip(starts + ends, ref_starts + ref_ends):
        assert a.shape == b.shape and abs(a - b).max() < 1e-4
    assert json.loads((tmp_path / "model" / "config.json").read_text()).get("auto_map") is None  # still gated


def test_onnx_of_a_model_pruned_in_width_and_sublayers(tmp_path):
    """A compacted model with hidden dimensions and whole sublayers removed exports to plain operators and keeps its
    outputs (issue 27)."""
    from model.test_cofi import masks
    from helpers.models import tiny_model

    model = sp.patch(tiny_model("bert", "qa"), sublayers=True, hidden=True)
    sp.set_masks(model, **masks())
    sp.compact(model)
    names = names_for("bert")
    example = tiny_batch(2, 9) | {"token_type_ids": torch.zeros(2, 9, dtype=torch.long)}
    path = spx.export_onnx(spx.to_plain(model), names, example, tmp_path / "m.onnx", opset=17)
    runner = spx.OrtQAModel(path, threads=1)
    inputs = tiny_batch(3, 11, pad_from=3) | {"token_type_ids": torch.zeros(3, 11, dtype=torch.long)}
    with torch.no_grad():
        want = logits(model(**{k: inputs[k] for k in names}))
    torch.testing.assert_close(logits(runner(**inputs)), want, atol=1e-4, rtol=0)
