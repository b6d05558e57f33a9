"""PruningTrainer: L0 + distillation through the HF Trainer, sparsity logs, checkpoint and resume."""

import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForQuestionAnswering, TrainerCallback, TrainingArguments

import structprune as sp
from structprune.training.distill import TeacherCache
from structprune.strategies import LAGRANGIAN_FILE, L0Controller, PruneTarget, apply_masks, random_masks
from structprune.training.trainer import PruningTrainer
from helpers.models import one_thread_reference_backend  # noqa: F401  (autouse fixture)

SEQ, VOCAB = 16, 60




def tiny_model(seed=0, patch=True):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                     intermediate_size=48, max_position_embeddings=32)
    model = BertForQuestionAnswering(cfg)
    return sp.patch(model) if patch else model


def dataset(n=16, with_index=False):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        row = {"input_ids": torch.randint(1, VOCAB, (SEQ,), generator=g).tolist(), "attention_mask": [1] * SEQ,
               "start_positions": int(torch.randint(0, SEQ, (1,), generator=g)),
               "end_positions": int(torch.randint(0, SEQ, (1,), generator=g))}
        if with_index:
            row["feature_index"] = i
        rows.append(row)
    return rows


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                per_device_train_batch_size=4, learning_rate=1e-3, seed=0, save_strategy="steps",
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class Record(TrainerCallback):
    def __init__(self, controller):
        self.controller, self.at_begin = controller, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = {k: v.clone() for k, v in self.controller.state_dict().items()}


def make_trainer(tmp_path, **kw):
    model = tiny_model()
    ctl = L0Controller(model, PruneTarget(heads=0.5, ffn=0.5), warmup_steps=2)
    trainer = PruningTrainer(model=model, args=args(tmp_path, **kw), train_dataset=dataset(), controller=ctl,
                             teacher=tiny_model(seed=1, patch=False), gate_lr=0.05, lambda_lr=0.05)
    return trainer, ctl


def test_trains_logs_saves_and_resumes(tmp_path):
    trainer, ctl = make_trainer(tmp_path)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for key in ("expected_heads", "expected_ffn", "kept_heads", "heads_sparsity", "ffn_sparsity", "target_heads",
                "task_loss", "kd_loss", "l0_penalty", "lambda1_heads"):
        assert key in logs[-1], key
    assert logs[-1]["target_heads"] == 4.0  # 0.5 of 8 heads after the 2 warm-up steps

    names = [g.get("name") for g in trainer.optimizer.param_groups]
    assert names[-2:] == ["gates", "lagrangian"]
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["gates"] == 0.05 and lrs["lagrangian"] == 0.05  # constant, not decayed by the schedule

    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert (ckpt / LAGRANGIAN_FILE).is_file()
    saved2 = load_file(str(tmp_path / "checkpoint-2" / LAGRANGIAN_FILE))
    saved4 = load_file(str(tmp_path / "checkpoint-4" / LAGRANGIAN_FILE))
    assert saved2["heads_lambda1"].abs().sum() > 0
    final_lambdas = {k: v.clone() for k, v in ctl.state_dict().items()}
    final_gates = [g.log_alpha.detach().clone() for g in sp.iter_gates(trainer.model)]
    torch.testing.assert_close(saved4["heads_lambda1"], final_lambdas["heads_lambda1"])

    # resume from checkpoint-2 in a fresh trainer: lambdas and gates come back, training continues to step 4
    resumed, ctl2 = make_trainer(tmp_path)
    rec = Record(ctl2)
    resumed.add_callback(rec)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for k in ("heads_lambda1", "heads_lambda2", "ffn_lambda1", "ffn_lambda2"):
        torch.testing.assert_close(rec.at_begin[k], saved2[k])
    assert resumed.state.global_step == 4
    # same data order, RNG and optimizer state: the resumed run ends where the uninterrupted one did
    for k in final_lambdas:
        torch.testing.assert_close(ctl2.state_dict()[k], final_lambdas[k], atol=1e-5, rtol=1e-4)
    for a, g in zip(final_gates, sp.iter_gates(resumed.model)):
        torch.testing.assert_close(g.log_alpha.detach(), a, atol=1e-4, rtol=1e-4)

    masks = ctl2.finalize()
    assert masks.num_heads_kept == 4 and masks.num_ffn_kept == 48


def test_resume_true_finds_last_checkpoint(tmp_path):
    trainer, _ = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    again, ctl = make_trainer(tmp_path, max_steps=3)
    rec = Record(ctl)
    again.add_callback(rec)
    again.train(resume_from_checkpoint=True)
    saved = load_file(str(tmp_path / "checkpoint-2" / LAGRANGIAN_FILE))
    torch.testing.assert_close(rec.at_begin["heads_lambda1"], saved["heads_lambda1"])
    assert again.state.global_step == 3


def test_continued_training_with_teacher_cache_and_frozen_gates(tmp_path):
    """Random pruning, then distillation of the survivors from cached teacher logits; gates stay fixed."""
    model = tiny_model()
    apply_masks(model, random_masks(model, PruneTarget(heads=0.5, ffn=0.5), seed=0))
    before = sp.get_masks(model)
    data = dataset(with_index=True)
    teacher = tiny_model(seed=1, patch=False)
    batches = [{k: torch.tensor([r[k] for r in data[i:i + 4]]) for k in data[0]} for i in range(0, 16, 4)]
    cache = TeacherCache.build(teacher, batches)
    trainer = PruningTrainer(model=model, args=args(tmp_path, max_steps=3, save_steps=10), train_dataset=data,
                             teacher_cache=cache, distill_alpha=1.0)
    w0 = model.qa_outputs.weight.detach().clone()
    gates0 = [g.log_alpha.detach().clone() for g in sp.iter_gates(model)]
    trainer.train()
    assert not any(id(p) in {id(q) for q in sp.gate_parameters(model)}
                   for g in trainer.optimizer.param_groups for p in g["params"])
    assert all(torch.equal(a, g.log_alpha) for a, g in zip(gates0, sp.iter_gates(model)))
    assert not torch.equal(w0, model.qa_outputs.weight)
    after = sp.get_masks(model)
    assert torch.equal(before.heads, after.heads)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "kd_loss" in logs[-1] and "expected_heads" not in logs[-1]
