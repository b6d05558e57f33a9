"""L0 training under DDP (2 CPU processes, gloo): gates and lambdas stay identical across ranks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "ddp_l0_worker.py"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


@pytest.mark.parametrize("mode", ["ddp", "trainer"])
def test_gates_identical_across_ranks(ddp_run, mode):
    r0 = load_file(str(ddp_run / f"{mode}-rank0.safetensors"))
    r1 = load_file(str(ddp_run / f"{mode}-rank1.safetensors"))
    assert r0.keys() == r1.keys()
    gates = [k for k in r0 if k.startswith("gate")]
    assert len(gates) == 4  # 2 layers x (heads, ffn)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs across ranks"
    # training happened: the gates moved away from their (noisy) 2.5 initialisation, the lambdas from 0
    assert any((r0[k] - 2.5).abs().max() > 0.05 for k in gates)
    assert r0["lagrangian.heads_lambda1"].abs().sum() > 0
