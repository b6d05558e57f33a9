"""Distillation loss, teacher logits on the fly and cached, and the combined PruningLoss."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForQuestionAnswering

import structprune as sp
from structprune.training.distill import TeacherCache, distillation_loss, qa_distill_loss, teacher_logits
from structprune.strategies import L0Controller, PruneTarget
from structprune.training.trainer import PruningLoss
from helpers.models import one_thread_reference_backend  # noqa: F401  (autouse fixture)

SEQ, VOCAB = 12, 50




def tiny_model(seed=0, patch=True):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                     intermediate_size=48, max_position_embeddings=32)
    model = BertForQuestionAnswering(cfg)
    return sp.patch(model) if patch else model


def batch(bs=4, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(bs, SEQ, dtype=torch.long)
    if padded:
        for i in range(bs):
            mask[i, SEQ - i:] = 0  # rows of different lengths
    return {"input_ids": torch.randint(1, VOCAB, (bs, SEQ), generator=g) * mask, "attention_mask": mask,
            "start_positions": torch.randint(0, SEQ - bs, (bs,), generator=g),
            "end_positions": torch.randint(0, SEQ - bs, (bs,), generator=g),
            "feature_index": torch.arange(seed * bs, seed * bs + bs)}


def test_zero_when_equal_positive_otherwise_and_gradient_flows():
    torch.manual_seed(0)
    t_s, t_e = torch.randn(3, 10), torch.randn(3, 10)
    assert distillation_loss(t_s.clone(), t_e.clone(), t_s, t_e).item() == pytest.approx(0.0, abs=1e-6)
    s_s = torch.randn(3, 10, requires_grad=True)
    s_e = torch.randn(3, 10, requires_grad=True)
    kd = distillation_loss(s_s, s_e, t_s, t_e, temperature=2.0)
    assert kd.item() > 0
    kd.backward()
    assert s_s.grad is not None and s_s.grad.abs().sum() > 0 and s_e.grad.abs().sum() > 0


def test_matches_kl_definition():
    torch.manual_seed(1)
    s_s, s_e, t_s, t_e = (torch.randn(2, 7) for _ in range(4))
    T = 3.0

    def kl(s, t):
        p = F.softmax(t / T, -1)
        return (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean()

    expected = (kl(s_s, t_s) + kl(s_e, t_e)) / 2 * T * T
    torch.testing.assert_close(distillation_loss(s_s, s_e, t_s, t_e, temperature=T), expected)
    task = torch.tensor(1.5)
    torch.testing.assert_close(qa_distill_loss(task, s_s, s_e, t_s, t_e, alpha=0.25, temperature=T),
                               0.25 * expected + 0.75 * task)
    torch.testing.assert_close(qa_distill_loss(None, s_s, s_e, t_s, t_e, temperature=T), expected)


def test_mask_drops_padding_positions():
    torch.manual_seed(2)
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    s2, t2 = s.clone(), t.clone()
    s2[0, 4:] = 100.0  # changes only at masked positions
    t2[0, 4:] = -100.0
    a = distillation_loss(s, s, t, t, mask=mask)
    b = distillation_loss(s2, s2, t2, t2, mask=mask)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a)


def test_errors():
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)


def test_teacher_cache_roundtrip_matches_on_the_fly(tmp_path):
    teacher = tiny_model(seed=1, patch=False).train()  # teacher_logits must switch it to eval
    student = tiny_model(seed=2)
    batches = [batch(seed=i) for i in range(2)]
    cache = TeacherCache.build(teacher, batches)
    assert len(cache) == 8 and 0 in cache and 99 not in cache
    assert not teacher.training
    path = cache.save(tmp_path / "teacher.safetensors")
    loaded = TeacherCache.load(path)
    b = batches[1]
    start, end = teacher_logits(teacher, b, drop=("feature_index",))
    c_start, c_end = loaded.get(b["feature_index"], SEQ)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(c_start[real], start[real])
    torch.testing.assert_close(c_end[real], end[real])
    with pytest.raises(KeyError):
        loaded.get([1234], SEQ)

    out = student(**{k: v for k, v in b.items() if k != "feature_index"})
    live = PruningLoss(teacher=teacher)(out, b, step=0)
    cached = PruningLoss(teacher_cache=loaded)(out, b, step=0)
    torch.testing.assert_close(live, cached)


def test_pruning_loss_combines_task_kd_and_l0():
    student, teacher = tiny_model(seed=2), tiny_model(seed=1, patch=False)
    ctl = L0Controller(student, PruneTarget(heads=0.5, ffn=0.5), warmup_steps=0)
    b = batch()
    student.train()
    torch.manual_seed(0)
    out = student(**{k: v for k, v in b.items() if k != "feature_index"})
    fn = PruningLoss(controller=ctl, teacher=teacher, alpha=0.3, temperature=2.0)
    loss = fn(out, b, step=5)
    parts = fn.last
    assert set(parts) == {"task_loss", "kd_loss", "l0_penalty"}
    assert parts["kd_loss"] > 0
    assert loss.item() == pytest.approx(0.3 * parts["kd_loss"] + 0.7 * parts["task_loss"] + parts["l0_penalty"],
                                        rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(g.log_alpha.grad is not None for g in sp.iter_gates(student))
    assert student.qa_outputs.weight.grad.abs().sum() > 0
    # without labels in the call, the task loss comes from the batch's positions (HF's formula)
    no_labels = type(out)(start_logits=out.start_logits, end_logits=out.end_logits)
    assert fn(no_labels, b, step=5).item() == pytest.approx(loss.item(), rel=1e-5)
    # the adapter for structprune.qa.train (which calls the model without labels and adds extra to its QA loss)
    extra = PruningLoss(controller=ctl, teacher=teacher, alpha=0.3).extra_loss_fn(start_step=5)
    total = out.loss + extra(student, b, no_labels)
    assert total.item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError):
        PruningLoss(teacher=teacher, teacher_cache=TeacherCache())
