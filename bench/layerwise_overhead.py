"""What layerwise distillation adds to a training step: the student's forward + backward with logit KD from cached
teacher logits (as the SQuAD students train now), with the teacher run live for its logits, and with the live
teacher feeding the logit and the layer loss (``structprune.training.layerwise``, one teacher forward).

    python bench/layerwise_overhead.py                         # bundled MiniLM (6 x 384), B16 x L192, 1 thread
    python bench/layerwise_overhead.py --batch 2 --seq 32 --repeats 2   # smoke

The three cases are alternated call by call (structprune.tools.timing.compare); prints the median and IQR per step
and each case's time relative to the cached-logits step (median of the per-round ratios, with its IQR).
"""
from __future__ import annotations

import argparse
import copy

import torch
import transformers

import structprune as sp
from structprune.tools.demo import default_model_path
from structprune.tools.timing import compare
from structprune.training.distill import distillation_loss
from structprune.training.layerwise import MODEL_KWARGS, LayerwiseDistiller, SharedTeacher
from structprune.training.losses import qa_task_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--backend", default="torch")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sp.set_backend(args.backend)
    teacher = transformers.AutoModelForQuestionAnswering.from_pretrained(default_model_path()).eval()
    student = sp.patch(copy.deepcopy(teacher)).train()
    shared = SharedTeacher(teacher)
    distiller = LayerwiseDistiller.for_models(teacher, student)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (args.batch, args.seq), generator=g),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    inputs["attention_mask"][::2, args.seq * 2 // 3:] = 0  # half the rows padded
    start = torch.randint(0, args.seq // 2, (args.batch,), generator=g)
    with torch.no_grad():
        cached = teacher(**inputs)

    def step(kind: str):
        student.zero_grad(set_to_none=True)
        distiller.zero_grad(set_to_none=True)
        out = student(**inputs, **(MODEL_KWARGS if kind == "layers" else {}))
        loss = qa_task_loss(out.start_logits, out.end_logits, start, start + 1)
        taught = cached if kind == "cached" else shared(**inputs)
        loss = loss + distillation_loss(out.start_logits, out.end_logits, taught.start_logits, taught.end_logits,
                                        mask=inputs["attention_mask"])
        if kind == "layers":
            loss = loss + 0.9 * distiller(out.hidden_states, taught.hidden_states, inputs["attention_mask"])[0]
        loss.backward()
        shared.clear()

    timing = compare({"kd cached logits": lambda: step("cached"), "kd live teacher": lambda: step("live"),
                      "kd + layers (live)": lambda: step("layers")}, warmup=1, repeats=args.repeats,
                     shapes=f"batch {args.batch} x seq {args.seq}, {distiller.matched_layers} matched")
    print(timing.describe())
    for name in timing.names[1:]:
        r = timing.speedup(name)
        print(f"{name}: {1 / r.median:.3f}x the cached-logits step (IQR of the ratio {1 / r.q3:.3f}-{1 / r.q1:.3f})")


if __name__ == "__main__":
    main()
