"""Tokenising SQuAD examples into model features (the Hugging Face ``run_qa`` recipe).

Each example becomes one or more *features*: the question first, then a window of the context
(``truncation="only_second"``); a context longer than ``max_length`` is split into overlapping windows that
share ``doc_stride`` tokens. Questions longer than ``max_query_length`` tokens are cut to that length first
(as in the original BERT ``run_squad.py``), so the windows always have room for the stride.

* train features carry ``start_positions`` / ``end_positions``: the token indices of the first gold answer,
  or the CLS index when the question is unanswerable or the answer is not wholly inside this window;
* eval features carry ``example_id``, ``cls_index`` and ``offset_mapping`` with ``None`` for every token
  that is not context (question, special tokens), which the post-processing relies on.

Features are not padded; :func:`collate` pads a batch on the right. Tokenizers with and without
``token_type_ids`` (BERT vs RoBERTa) both work: the columns follow ``tokenizer.model_input_names``.
The tokenizer's own ``padding_side`` is ignored (nothing here pads on the left).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from structprune.qa.data import require_datasets

if TYPE_CHECKING:
    import datasets

CHUNK = 1000  # examples tokenised per call (bounds Python-side memory on the full SQuAD train set)


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"SQuAD features need a fast (Rust) tokenizer for offset mappings; got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(path) (use_fast is the default)."
        )


def question_budget(tokenizer, max_length: int, doc_stride: int, max_query_length: int = 64) -> int:
    """The most question tokens a feature may hold so that the context window still exceeds ``doc_stride``."""
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_length - doc_stride - n_special - 1
    if doc_stride < 0 or room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for a question: it must exceed doc_stride={doc_stride} "
            f"+ {n_special} special tokens + 1 by at least one token"
        )
    return min(max_query_length, room)


def _clip_questions(questions: Sequence[str], tokenizer, budget: int) -> list[str]:
    """Strip leading whitespace (as ``run_qa`` does) and cut questions longer than ``budget`` tokens."""
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"]):
        out.append(q[: offsets[budget - 1][1]] if len(ids) > budget else q)
    return out


def _tokenize(examples: dict[str, list], tokenizer, max_length: int, doc_stride: int, max_query_length: int):
    _check_tokenizer(tokenizer)
    budget = question_budget(tokenizer, max_length, doc_stride, max_query_length)
    questions = _clip_questions(examples["question"], tokenizer, budget)
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def _cls_index(input_ids: list[int], tokenizer) -> int:
    for special in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        if special is not None and special in input_ids:
            return input_ids.index(special)
    return 0


def _model_columns(tokenized, tokenizer) -> dict[str, list]:
    return {name: tokenized[name] for name in tokenizer.model_input_names if name in tokenized}


def prepare_train_features(
    examples: dict[str, list], tokenizer, max_length: int = 384, doc_stride: int = 128, max_query_length: int = 64
) -> dict[str, list]:
    """Batched: columns of examples (squad_v2 schema) -> columns of train features.

    Output columns: the tokenizer's model inputs plus ``start_positions``, ``end_positions``.
    """
    tokenized = _tokenize(examples, tokenizer, max_length, doc_stride, max_query_length)
    sample_mapping = tokenized["overflow_to_sample_mapping"]
    starts, ends = [], []
    for i, offsets in enumerate(tokenized["offset_mapping"]):
        input_ids = tokenized["input_ids"][i]
        cls_index = _cls_index(input_ids, tokenizer)
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        # First and last context tokens of this window.
        token_start = 0
        while sequence_ids[token_start] != 1:
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != 1:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            starts.append(cls_index)  # the answer is not (wholly) inside this window
            ends.append(cls_index)
            continue
        while token_start < len(offsets) and sequence_ids[token_start] == 1 and offsets[token_start][0] <= start_char:
            token_start += 1
        starts.append(token_start - 1)
        while sequence_ids[token_end] == 1 and offsets[token_end][1] >= end_char:
            token_end -= 1
        ends.append(token_end + 1)
    out = _model_columns(tokenized, tokenizer)
    out["start_positions"] = starts
    out["end_positions"] = ends
    return out


def prepare_eval_features(
    examples: dict[str, list], tokenizer, max_length: int = 384, doc_stride: int = 128, max_query_length: int = 64
) -> dict[str, list]:
    """Batched: columns of examples -> columns of eval features.

    Output columns: the tokenizer's model inputs plus ``example_id``, ``cls_index`` and ``offset_mapping``
    (a ``(start_char, end_char)`` pair for context tokens, ``None`` for every other token).
    """
    tokenized = _tokenize(examples, tokenizer, max_length, doc_stride, max_query_length)
    sample_mapping = tokenized["overflow_to_sample_mapping"]
    example_ids, cls_indices, offset_mapping = [], [], []
    for i, offsets in enumerate(tokenized["offset_mapping"]):
        sequence_ids = tokenized.sequence_ids(i)
        example_ids.append(examples["id"][sample_mapping[i]])
        cls_indices.append(_cls_index(tokenized["input_ids"][i], tokenizer))
        offset_mapping.append([list(o) if sequence_ids[k] == 1 else None for k, o in enumerate(offsets)])
    out = _model_columns(tokenized, tokenizer)
    out["example_id"] = example_ids
    out["cls_index"] = cls_indices
    out["offset_mapping"] = offset_mapping
    return out


def _build(dataset: datasets.Dataset, fn, tokenizer, progress: bool, desc: str, **kwargs) -> datasets.Dataset:
    from tqdm.auto import tqdm

    datasets = require_datasets()
    parts = []
    starts = range(0, len(dataset), CHUNK)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="chunk"):
        batch = dataset[start : start + CHUNK]
        parts.append(datasets.Dataset.from_dict(fn(batch, tokenizer, **kwargs)))
    if not parts:
        parts.append(datasets.Dataset.from_dict(fn({c: [] for c in dataset.column_names}, tokenizer, **kwargs)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def build_train_features(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    progress: bool = False,
) -> datasets.Dataset:
    """Train features of a squad_v2-schema dataset (see :func:`prepare_train_features`), held in memory."""
    return _build(
        dataset, prepare_train_features, tokenizer, progress, "train features",
        max_length=max_length, doc_stride=doc_stride, max_query_length=max_query_length,
    )


def build_eval_features(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    progress: bool = False,
) -> datasets.Dataset:
    """Eval features of a squad_v2-schema dataset (see :func:`prepare_eval_features`), held in memory."""
    return _build(
        dataset, prepare_eval_features, tokenizer, progress, "eval features",
        max_length=max_length, doc_stride=doc_stride, max_query_length=max_query_length,
    )


def collate(
    rows: dict[str, list] | Iterable[dict[str, Any]],
    tokenizer,
    columns: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch of features on the right into ``long`` tensors.

    Args:
        rows: a column dict (``features[idx]``) or a list of feature rows.
        columns: which columns to keep; default: the tokenizer's model inputs plus ``start_positions`` /
            ``end_positions`` when present. Sequence columns are padded (``input_ids`` with the pad token,
            ``token_type_ids`` with the tokenizer's pad type id, the rest with 0); scalar columns are stacked.
    """
    if not isinstance(rows, dict):
        rows = list(rows)
        rows = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    if columns is None:
        columns = [c for c in (*tokenizer.model_input_names, "start_positions", "end_positions") if c in rows]
    pad_values = {
        "input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0,
    }
    batch = {}
    for name in columns:
        values = rows[name]
        if values and isinstance(values[0], (list, tuple)):
            width = max(len(v) for v in values)
            pad = pad_values.get(name, 0)
            t = torch.full((len(values), width), pad, dtype=torch.long)
            for i, v in enumerate(values):
                t[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
            batch[name] = t
        else:
            batch[name] = torch.as_tensor(values, dtype=torch.long)
    return batch
