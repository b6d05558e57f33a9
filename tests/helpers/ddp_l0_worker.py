"""Worker for tests/training/test_ddp.py, launched with ``python -m torch.distributed.run --nproc_per_node 2``.

Runs 3 steps of L0 training on 2 CPU processes (gloo) twice, once with a plain DDP loop and once with
PruningTrainer, each rank on different data, and writes each rank's gates (log_alpha), lambdas and a weight
to ``<out>/<mode>-rank<r>.safetensors`` for the test to compare.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from transformers import BertConfig, BertForQuestionAnswering, TrainingArguments  # noqa: E402

import structprune as sp  # noqa: E402
from structprune.strategies import L0Controller, PruneTarget  # noqa: E402
from structprune.training.trainer import PruningLoss, PruningTrainer  # noqa: E402

SEQ, VOCAB, STEPS = 16, 60, 3


def tiny_model():
    torch.manual_seed(0)  # same initial weights on every rank
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                     intermediate_size=48, max_position_embeddings=32)
    return sp.patch(BertForQuestionAnswering(cfg))


def batch(seed, bs=4):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, (bs, SEQ), generator=g),
            "attention_mask": torch.ones(bs, SEQ, dtype=torch.long),
            "start_positions": torch.randint(0, SEQ, (bs,), generator=g),
            "end_positions": torch.randint(0, SEQ, (bs,), generator=g)}


def dump(out_dir, mode, rank, model, ctl):
    tensors = {f"gate{i}": g.log_alpha.detach().clone() for i, g in enumerate(sp.iter_gates(model))}
    tensors.update({f"lagrangian.{k}": v for k, v in ctl.state_dict().items()})
    tensors["qa_outputs.weight"] = model.qa_outputs.weight.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"{mode}-rank{rank}.safetensors"))


def plain_ddp(out_dir, rank):
    model = tiny_model()
    ctl = L0Controller(model, PruneTarget(heads=0.5, ffn=0.5), warmup_steps=2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ctl.param_groups(model, lr=1e-3, gate_lr=0.05, lambda_lr=0.05))
    loss_fn = PruningLoss(controller=ctl)
    ddp.train()
    torch.manual_seed(100 + rank)  # different gate samples per rank
    for step in range(STEPS):
        b = batch(seed=1000 * rank + step)  # different data per rank
        loss = loss_fn(ddp(**b), b, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
    dump(out_dir, "ddp", rank, model, ctl)


def trainer_ddp(out_dir, rank):
    model = tiny_model()
    ctl = L0Controller(model, PruneTarget(heads=0.5, ffn=0.5), warmup_steps=2)
    data = [{k: v[0].tolist() if v.dim() > 1 else int(v[0]) for k, v in batch(seed=i, bs=1).items()}
            for i in range(32)]
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), max_steps=STEPS, report_to=[],
                             use_cpu=True, per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                             logging_steps=1, disable_tqdm=True, ddp_backend="gloo", seed=0)
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, controller=ctl, gate_lr=0.05, lambda_lr=0.05)
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    dump(out_dir, "trainer", rank, model, ctl)


def main():
    out_dir = sys.argv[1]
    sp.set_backend("torch")  # the reference ops: no dependence on a compiled extension
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plain_ddp(out_dir, rank)
    dist.barrier()
    trainer_ddp(out_dir, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
