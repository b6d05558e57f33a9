"""The teacher's logits on the train features, computed once and cached on disk for distilled students."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from structprune import atomic
from structprune.qa.runs import DEFAULT_DATA, _progress, _write_json


def cached_teacher_logits(teacher, tokenizer, train, args, path: Path):
    """The teacher's start/end logits on every train feature, computed once and stored at ``path`` (a
    safetensors :class:`~structprune.training.distill.TeacherCache` plus ``<path>.json`` saying what it was built from), so
    that distilled students train without a teacher forward. An existing cache is reused only when it was built
    for the same teacher, data and window settings."""
    from structprune.training.distill import TeacherCache

    from structprune.qa.features import build_train_features, collate

    features = build_train_features(train, tokenizer, args.max_length, args.doc_stride)
    meta = {"teacher": str(Path(args.model).resolve()), "train": str(Path(args.train or DEFAULT_DATA / "train.json").resolve()),
            "train_limit": args.train_limit, "max_length": args.max_length, "doc_stride": args.doc_stride,
            "num_features": len(features)}
    meta_path = path.with_name(path.name + ".json")
    if path.is_file() and meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        if saved != meta:
            differ = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
            raise ValueError(f"{path} holds teacher logits built for other settings ({{name: (cache, now)}}: "
                             f"{differ}); pass another --teacher-logits path or delete it")
        return TeacherCache.load(path)
    names = [n for n in tokenizer.model_input_names if n in features.column_names]
    inputs = features.select_columns(names)

    def batches():
        for begin in tqdm(range(0, len(features), args.eval_batch_size), desc="teacher logits", unit="batch",
                          disable=not _progress()):
            batch = collate(inputs[begin:begin + args.eval_batch_size], tokenizer, names)
            batch["feature_index"] = torch.arange(begin, min(begin + args.eval_batch_size, len(features)))
            yield batch

    t0 = time.perf_counter()
    cache = TeacherCache.build(teacher, batches())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:  # the metadata first: a cache without it is rebuilt, never trusted
        cache.save(tmp)
        _write_json(meta_path, meta)
    print(f"teacher logits of {len(features)} train features cached in {path} ({time.perf_counter() - t0:.0f}s)")
    return cache
