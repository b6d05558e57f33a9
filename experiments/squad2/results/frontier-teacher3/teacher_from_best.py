"""Finish runs/qa2/teacher from its best evaluation so far, for a finetune run stopped by hand after an evaluation:
``finetune``'s own ending (structprune.qa.commands.finish_finetune: best weights -> model/, dev evaluation, null
threshold) with the run's recorded settings, plus ``best_eval.json`` for report.py. Run from the repository root:
python experiments/squad2/results/frontier-teacher3/teacher_from_best.py"""
import argparse
import json
from pathlib import Path

import torch
import transformers

from structprune.qa.commands import finish_finetune
from structprune.qa.runs import _default_model

out = Path("runs/qa2/teacher")
args = argparse.Namespace(**json.loads((out / "config.json").read_text()))  # the settings finetune ran with
torch.set_num_threads(args.threads)
base = args.model or _default_model()
model = transformers.AutoModelForQuestionAnswering.from_pretrained(base)  # the head is replaced by the best weights
best = finish_finetune(model, transformers.AutoTokenizer.from_pretrained(base), args, out)
(out / "best_eval.json").write_text(json.dumps(best) + "\n")
