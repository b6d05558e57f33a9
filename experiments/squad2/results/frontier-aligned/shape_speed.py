"""Is it the widths? The patched path's speed-up of student *shapes* over the teacher, each shape at its own odd widths
and rounded to multiples of 16, timed alternated in one session (B32xL192, fp32, cpp backend, 1 thread).

A shape is a student's ``masks.json`` applied to the teacher's weights (speed depends on the shapes, not on the
values): patched with sublayer and hidden gates, masked, compacted, saved and loaded back the way ``speed.py`` loads
a student. The rounded twin keeps the same sublayers and heads, and moves the hidden width and every FFN layer's
units to the nearest multiple of 16 (extra dimensions and units are taken in index order: for timing, which ones is
immaterial). Run from the repository root, with nothing else running:

    python experiments/squad2/results/frontier-aligned/shape_speed.py --teacher runs/qa2/teacher/model \
        --masks experiments/squad2/results/frontier-teacher3/runs/*/masks.json --out shape_speed.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

import structprune as sp
from structprune.qa.pruning import speed_batch
from structprune.qa.runs import load_qa_model
from structprune.tools.timing import compare


def rounded(mask: list[int], multiple: int = 16) -> list[int]:
    """``mask`` with as many ones as the nearest multiple of ``multiple`` (ones added or removed in index order)."""
    ones = [i for i, v in enumerate(mask) if v]
    zeros = [i for i, v in enumerate(mask) if not v]
    want = multiple * int(len(ones) / multiple + 0.5)
    keep = set(ones[:want] + zeros[:max(0, want - len(ones))])
    return [int(i in keep) for i in range(len(mask))]


def shape_model(teacher_dir: str, masks: dict, folder: Path):
    """The teacher at ``masks``' shape, compacted, saved to ``folder`` and loaded back as a student is."""
    model = sp.patch(load_qa_model(teacher_dir), sublayers=True, hidden=True)
    sp.set_masks(model, heads=torch.tensor(masks["heads"]), ffn=torch.tensor(masks["ffn"]),
                 hidden=torch.tensor(masks["hidden"]), attn_sublayers=torch.tensor(masks["attn_sublayers"]),
                 ffn_sublayers=torch.tensor(masks["ffn_sublayers"]))
    sp.save_pretrained(sp.compact(model), folder)
    return load_qa_model(str(folder))


def widths(masks: dict) -> str:
    ffn = [sum(f) if s else 0 for f, s in zip(masks["ffn"], masks["ffn_sublayers"])]
    return f"hidden {sum(masks['hidden'])}, FFN units per layer {ffn}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--masks", nargs="+", required=True, help="students' masks.json files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dev", default=str(Path(__file__).resolve().parents[5] / "shared/data/squad2/dev.json"),
                        help="the batch is the first 32 features of this file (as speed.py's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_qa_model(args.teacher)
    batch = speed_batch(AutoTokenizer.from_pretrained(args.teacher),
                        argparse.Namespace(dev=args.dev, max_length=192, doc_stride=64, eval_batch_size=32))
    models, shapes = {"teacher": teacher}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.masks:
            name = Path(path).parent.name
            masks = json.loads(Path(path).read_text())
            twin = {**masks, "hidden": rounded(masks["hidden"]), "ffn": [rounded(f) for f in masks["ffn"]]}
            for label, m in ((name, masks), (name + " (rounded to 16)", twin)):
                models[label] = shape_model(args.teacher, m, Path(tmp) / f"{len(models)}")
                shapes[label] = widths(m)
        with torch.inference_mode():
            timing = compare({n: (lambda m=m: m(**batch)) for n, m in models.items()}, warmup=1,
                             repeats=args.repeats, shapes=f"batch {batch['input_ids'].shape[0]} x seq "
                                                          f"{batch['input_ids'].shape[1]}")
    print(timing.describe())
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "shapes": shapes,
              "speedup": {n: timing.speedup(n).median for n in models if n != "teacher"},
              "timing": timing.to_dict()}
    for n in result["speedup"]:
        print(f"{n}: {result['speedup'][n]:.2f}x over the teacher ({shapes[n]})")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
