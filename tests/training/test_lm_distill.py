"""Causal-LM distillation on next-token logits (KL with a temperature, T^2 scaling, padding left out), the pruning
loss and the HF Trainer on a tiny random Llama with L0 gates over KV groups and FFN units."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

import structprune as sp
from helpers.decoders import VOCAB, left_padded, tiny_model
from helpers import models as _models
from structprune.strategies import L0Controller, PruneTarget
from structprune.training.distill import lm_distillation_loss
from structprune.training.trainer import PruningLoss, PruningTrainer

one_thread_reference_backend = _models.one_thread_reference_backend  # the autouse fixture: reference ops, one thread


def _manual(student, teacher, t, mask):
    """Per position KL(p_t || p_s) at temperature t, one position at a time, averaged over the real tokens."""
    total, n = 0.0, 0
    for b in range(student.shape[0]):
        for s in range(student.shape[1]):
            if mask[b, s]:
                p = F.softmax(teacher[b, s].double() / t, -1)
                q = F.softmax(student[b, s].double() / t, -1)
                total += float((p * (p.log() - q.log())).sum())
                n += 1
    return total / n * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_with_temperature_over_real_tokens(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g) * 2
    mask = left_padded(3, 5)["attention_mask"]
    got = lm_distillation_loss(student, teacher, temperature, mask)
    assert float(got) == pytest.approx(_manual(student, teacher, temperature, mask), rel=1e-5)
    changed = student.clone()
    changed[mask == 0] = 100.0  # padding positions do not count
    assert float(lm_distillation_loss(changed, teacher, temperature, mask)) == pytest.approx(float(got), rel=1e-6)
    assert float(lm_distillation_loss(teacher, teacher, temperature, mask)) == pytest.approx(0.0, abs=1e-6)
    full = lm_distillation_loss(student, teacher, temperature)  # no mask: every position
    assert float(full) == pytest.approx(_manual(student, teacher, temperature, torch.ones(3, 5)), rel=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[batch, seq, vocab\]"):
        lm_distillation_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="mask must be"):
        lm_distillation_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        lm_distillation_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), temperature=0)


def _lm_batch():
    batch = left_padded()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def test_pruning_loss_mixes_lm_task_and_distillation():
    teacher = tiny_model("llama")
    student = sp.patch(copy.deepcopy(teacher))
    with torch.no_grad():
        student.lm_head.weight.mul_(0.5)  # a student that differs from its teacher
    batch = _lm_batch()
    out = student(**batch)
    loss = PruningLoss(teacher=teacher, alpha=0.25, temperature=2.0)(out, batch, step=0)
    with torch.no_grad():
        kd = lm_distillation_loss(out.logits, teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                  2.0, batch["attention_mask"])
    assert float(kd) > 1e-3
    assert float(loss.detach()) == pytest.approx(0.25 * float(kd) + 0.75 * float(out.loss.detach()), rel=1e-5)
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, s=8):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(3, VOCAB, (n, s), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_trainer_prunes_a_decoder_with_l0_and_distillation(tmp_path):
    teacher = tiny_model("llama")
    model = sp.patch(copy.deepcopy(teacher))
    ctl = L0Controller(model, PruneTarget(kv_heads=0.5, ffn=0.5), warmup_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, logging_steps=2,
                             disable_tqdm=True, seed=0)
    trainer = PruningTrainer(model=model, args=args, train_dataset=_Rows(), controller=ctl, teacher=teacher,
                             gate_lr=0.1, lambda_lr=0.1)
    before = [g.log_alpha.detach().clone() for g in sp.iter_gates(model)]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(k in logs[-1] for k in ("kd_loss", "task_loss", "l0_penalty", "expected_kv_heads"))
    assert any(not torch.equal(b, g.log_alpha) for b, g in zip(before, sp.iter_gates(model)))
    assert (tmp_path / "checkpoint-2" / "structprune_lagrangian.safetensors").is_file()
    masks = ctl.finalize(keep_dead=True)
    assert int(masks.kv_heads.sum()) == 6 and masks.num_ffn_kept == 72
    sp.compact(model)
    assert sum(layer.self_attn.num_kv_heads for layer in model.model.layers) == 6
