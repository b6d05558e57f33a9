"""python experiments/squad2/results/frontier/ab_padding.py RUN   (from the repository root, runs/qa2)

A/B of commit 7b7235a (mask checked once per call, bool masks by int64 words, no torch.where pass on the CPU when
no sequence is fully padded) against the code before it, on a patched student's inference forward: the old
padding module is loaded from 92a60de and swapped into the dispatcher; the two sides alternated call by call."""
import argparse
import json
import subprocess
import sys
import types

import torch
from transformers import AutoTokenizer
from structprune.ops import dispatch
from structprune.qa.pruning import speed_batch
from structprune.qa.runs import load_qa_model
from structprune.tools.timing import compare


run = sys.argv[1]
torch.set_num_threads(1)
old = types.ModuleType("padding_old")  # structprune/ops/padding.py as it was at 92a60de
exec(subprocess.run(["git", "show", "92a60de:structprune/ops/padding.py"], check=True, capture_output=True,
                    text=True).stdout, old.__dict__)
new = (dispatch.mask_row, dispatch.kernel_key_bias, dispatch.padded_sequence_output)
before = (lambda m: m, old.kernel_key_bias, lambda y, args, heads, mask, row, p, impl: old.padded_sequence_output(y, args, heads, mask, p, impl))
tok = AutoTokenizer.from_pretrained("runs/qa2/teacher/model")
cfg = json.load(open(f"runs/qa2/{run}/config.json"))
args = argparse.Namespace(threads=1, dev=cfg["dev"], max_length=cfg["max_length"], doc_stride=cfg["doc_stride"],
                          eval_batch_size=cfg["eval_batch_size"])
batch = speed_batch(tok, args)
m = load_qa_model(f"runs/qa2/{run}/model").eval()


def side(fns):
    def call():
        dispatch.mask_row, dispatch.kernel_key_bias, dispatch.padded_sequence_output = fns
        return m(**batch).start_logits
    return call


with torch.inference_mode():
    a, b = side(before)(), side(new)()
    print("max |logits old - new|:", (a - b).abs().max().item())
    t = compare({"before": side(before), "after": side(new)}, warmup=1, repeats=15, shapes="32x192")
print(t.describe())
