"""The one extractive-QA loss (structprune.training.losses.qa_task_loss), used by the training loop and the Trainer:
Hugging Face's convention for positions outside the sequence (clamped to its length, then ignored)."""
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from structprune.training.losses import qa_task_loss

SEQ = 12


def _logits(batch=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SEQ, generator=g).to(dtype), torch.randn(batch, SEQ, generator=g).to(dtype)


def _ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def test_in_range_is_the_mean_of_start_and_end_cross_entropy():
    start, end = _logits()
    s, e = torch.tensor([0, 3, 11, 5, 2, 7]), torch.tensor([1, 4, 11, 6, 2, 9])
    assert qa_task_loss(start, end, s, e) == pytest.approx(float((_ce(start, s) + _ce(end, e)) / 2), rel=1e-6)


def test_out_of_range_positions_are_ignored_one_way():
    """Positions >= seq_len and negative ones are clamped into [0, seq_len]: seq_len and beyond are ignored;
    negative ones become 0 (the [CLS] "no answer" position), as in BertForQuestionAnswering."""
    start, end = _logits()
    s = torch.tensor([0, 3, SEQ, SEQ + 40, -1, 7])
    e = torch.tensor([1, SEQ + 1, 11, 6, -5, 9])
    keep_s, keep_e = torch.tensor([0, 1, 4, 5]), torch.tensor([0, 2, 3, 4, 5])
    expected = (_ce(start[keep_s], s.clamp(0, SEQ)[keep_s]) + _ce(end[keep_e], e.clamp(0, SEQ)[keep_e])) / 2
    assert qa_task_loss(start, end, s, e) == pytest.approx(float(expected), rel=1e-6)
    # an ignored position contributes no gradient to its row
    start.requires_grad_(True)
    qa_task_loss(start, end, s, e).backward()
    assert torch.all(start.grad[[2, 3]] == 0) and torch.all(start.grad[[0, 1, 4, 5]].abs().sum(-1) > 0)


def test_matches_bert_for_question_answering_loss():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2,
                                                num_hidden_layers=1, intermediate_size=64,
                                                max_position_embeddings=32)).eval()
    ids = torch.randint(0, 50, (5, SEQ))
    s = torch.tensor([[0], [4], [SEQ], [SEQ + 3], [2]])  # (batch, 1), as HF accepts
    e = torch.tensor([[0], [6], [SEQ + 7], [1], [-2]])
    with torch.no_grad():
        out = model(input_ids=ids, start_positions=s, end_positions=e)
    assert qa_task_loss(out.start_logits, out.end_logits, s, e) == pytest.approx(float(out.loss), rel=1e-6)


def test_half_precision_logits_give_an_fp32_loss():
    start, end = _logits(dtype=torch.bfloat16)
    s, e = torch.tensor([0, 3, 11, 5, 2, SEQ]), torch.tensor([1, 4, 11, 6, 2, 9])
    loss = qa_task_loss(start, end, s, e)
    assert loss.dtype == torch.float32
    assert loss == pytest.approx(float(qa_task_loss(start.float(), end.float(), s, e)), rel=1e-6)


def test_training_loop_and_trainer_share_it():
    import structprune.qa.train as train
    import structprune.training.trainer as trainer

    assert train.qa_task_loss is qa_task_loss and trainer.qa_task_loss is qa_task_loss
