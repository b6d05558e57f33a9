"""How large the layerwise distillation loss is before training (identity map), next to the teacher states' own
mean square, for the students issue 27 trains: a patched copy of the teacher under random head/FFN masks, and
layer-drop students keeping every other layer or the top ones. A guide for ``--layer-distill-weight``.

    python bench/layerwise_scale.py                      # bundled MiniLM, 64 dev windows of 192 tokens, 1 thread
    python bench/layerwise_scale.py --model runs/teacher/model --windows 128

Prints, per student: the loss (sum over the matched teacher layers of the per-element MSE over real tokens), the
matching, and the mean over the same layers of the teacher states' mean square (the loss of a student that
outputs zeros, per layer).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import transformers

import structprune as sp
from structprune.qa.data import load_squad
from structprune.qa.features import build_train_features, collate
from structprune.tools.demo import default_model_path
from structprune.training.layerwise import MODEL_KWARGS, LayerwiseDistiller

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad2" / "dev.json"


def layer_drop(model, keep: list[int]):
    """A copy of ``model`` with only the encoder layers ``keep`` (a BERT-layout model)."""
    student = copy.deepcopy(model)
    layers = student.base_model.encoder.layer
    student.base_model.encoder.layer = torch.nn.ModuleList([layers[i] for i in keep])
    student.config.num_hidden_layers = len(keep)
    return student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="teacher directory (default: the bundled MiniLM)")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sp.set_backend("torch")
    path = args.model or default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    teacher = transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()
    feats = build_train_features(load_squad(DEV, limit=args.windows), tokenizer, args.max_length, 64, progress=False)
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in feats.column_names]
    batches = [collate(feats[i:i + args.batch], tokenizer, cols) for i in range(0, min(len(feats), args.windows),
                                                                                 args.batch)]
    n = teacher.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    masked = sp.patch(copy.deepcopy(teacher))
    heads = teacher.config.num_attention_heads
    sp.set_masks(masked, heads=torch.rand(n, heads, generator=g) < 0.5,
                 ffn=torch.rand(n, teacher.config.intermediate_size, generator=g) < 0.3)
    students = {"masked heads 0.5 ffn 0.3": masked.eval(),
                f"every other layer {list(range(1, n, 2))}": layer_drop(teacher, list(range(1, n, 2))).eval(),
                f"top layers {list(range(n - n // 3, n))}": layer_drop(teacher, list(range(n - n // 3, n))).eval(),
                f"bottom layers {list(range(n // 2))}": layer_drop(teacher, list(range(n // 2))).eval()}
    print(f"teacher {path}: {n} layers, {len(batches)} batches of {args.batch} windows x {args.max_length} tokens")
    with torch.no_grad():
        taught = [teacher(**b, output_hidden_states=True).hidden_states for b in batches]
        for name, student in students.items():
            distiller = LayerwiseDistiller.for_models(teacher, student)
            losses, matchings = [], []
            for b, t in zip(batches, taught):
                loss, matching = distiller(student(**b, **MODEL_KWARGS).hidden_states, t, b["attention_mask"])
                losses.append(loss.item())
                matchings.append(tuple(matching))
            zero = sum(distiller(tuple(torch.zeros_like(h) for h in t[:student.config.num_hidden_layers + 1]), t,
                                 b["attention_mask"])[0].item() for b, t in zip(batches, taught)) / len(batches)
            print(f"{name:32s} loss {sum(losses) / len(losses):8.4f}  matchings {sorted(set(matchings))}  "
                  f"(teacher layers {distiller.matched_layers}; mean square of their states "
                  f"{zero / len(distiller.matched_layers):.4f} per layer)")


if __name__ == "__main__":
    main()
