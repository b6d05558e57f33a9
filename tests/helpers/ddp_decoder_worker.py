"""Worker for tests/training/test_ddp_decoder.py, launched with ``python -m torch.distributed.run --nproc_per_node 2``.

A tiny random Llama (grouped-query attention) trains its L0 gates toward a KV-group and FFN target with
PruningTrainer on 2 CPU processes (gloo), each rank on different data, then decides its masks; each rank writes its
masks, gates, lambdas and weights to ``<out>/rank<r>.safetensors`` for the test to compare.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainingArguments  # noqa: E402

import structprune as sp  # noqa: E402
from helpers.decoders import VOCAB, tiny_model  # noqa: E402
from structprune.strategies import L0Controller, PruneTarget  # noqa: E402
from structprune.training.trainer import PruningTrainer  # noqa: E402

STEPS, SEQ = 4, 8


def rows(n):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * SEQ, "labels": r.tolist()} for r in ids]


def main():
    out_dir = sys.argv[1]
    sp.set_backend("torch")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = sp.patch(tiny_model("llama", seed=0))  # same initial weights on every rank
    ctl = L0Controller(model, PruneTarget(kv_heads=0.5, ffn=0.5), warmup_steps=2, init_log_alpha=0.5)
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), max_steps=STEPS, report_to=[], use_cpu=True,
                             per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no", logging_steps=1,
                             disable_tqdm=True, ddp_backend="gloo", seed=0)
    torch.manual_seed(100 + rank)  # different gate samples per rank
    trainer = PruningTrainer(model=model, args=args, train_dataset=rows(32), controller=ctl, gate_lr=0.1,
                             lambda_lr=0.1)
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    masks = ctl.finalize(keep_dead=True)
    tensors = {"heads": masks.heads.float(), "kv_heads": masks.kv_heads.float(),
               "ffn": torch.stack(masks.ffn).float()}
    tensors.update({f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    tensors.update({f"lagrangian.{k}": v for k, v in ctl.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
