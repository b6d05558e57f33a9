"""L0 training of a tiny decoder under torchrun DDP (2 CPU processes, gloo, PruningTrainer, different data per
rank): both ranks end with identical masks, gates, lambdas and weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.decoders import I, KV, L, tiny_model

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "ddp_decoder_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_decoder")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]


def test_ranks_end_identical(ranks):
    r0, r1 = ranks
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs across ranks"


def test_training_happened_and_the_masks_hit_the_target(ranks):
    r0 = ranks[0]
    assert int(r0["kv_heads"].sum()) == L * KV // 2 and int(r0["ffn"].sum()) == round(0.5 * L * I)
    start = tiny_model("llama", seed=0).state_dict()
    moved = [k for k, v in start.items() if not torch.equal(v, r0[f"model.{k}"])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "lm_head.weight" in moved
    assert float(r0["lagrangian.kv_heads_lambda1"].abs().sum()) > 0
