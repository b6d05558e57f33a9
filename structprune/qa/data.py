"""Loading SQuAD-style question answering data into one schema.

Every loader returns a :class:`datasets.Dataset` with the columns of the Hugging Face ``squad_v2`` dataset::

    id: str, title: str, context: str, question: str,
    answers: {"text": [str, ...], "answer_start": [int, ...]}   # both lists empty when unanswerable

Accepted inputs (:func:`load_squad`):

* a path to an official SQuAD JSON file (``{"version": "v2.0", "data": [articles]}``; v1.1 works too), with or
  without answers (a file without them, such as a blind test set, gives empty answer lists);
* a path to a plain JSON list of questions ``[{"id", "question", "context"[, "title"]}, ...]`` (for prediction);
* a :class:`datasets.Dataset` already in that schema, or a :class:`datasets.DatasetDict` plus ``split``;
* a path to a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

SQUAD_COLUMNS = ("id", "title", "context", "question", "answers")


def require_datasets():
    """The ``datasets`` module, imported only where a dataset is made (the CLI and the rest of structprune work
    without it); its absence raises an error that says how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise ModuleNotFoundError("SQuAD data needs the 'datasets' package: pip install 'structprune[qa]' "
                                  f"(or pip install datasets); importing it failed: {exc}", name="datasets") from exc
    return datasets


def squad_features() -> datasets.Features:
    """The ``datasets.Features`` of the squad_v2 schema."""
    datasets = require_datasets()
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": {
                "text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32")),
            },
        }
    )


def __getattr__(name: str):
    if name == "SQUAD_FEATURES":  # was a module constant; now built on first use, so importing needs no datasets
        return squad_features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_EXPECTED = (
    "a path to an official SQuAD JSON file ({'version': ..., 'data': [articles]}) or to a JSON list of "
    "{'id', 'question', 'context'} objects, a path to a directory "
    "saved with Dataset.save_to_disk, a datasets.Dataset with columns "
    f"{list(SQUAD_COLUMNS)}, or a datasets.DatasetDict plus split="
)


def squad_json_to_records(squad: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten an official SQuAD JSON object (articles -> paragraphs -> qas) into one record per question.

    Unanswerable questions (``is_impossible`` true, or no ``answers``) get empty answer lists; their
    ``plausible_answers`` are not gold answers and are dropped, as in the official evaluation.
    """
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        got = sorted(squad) if isinstance(squad, dict) else type(squad).__name__
        raise ValueError(f"expected an official SQuAD JSON object with a 'data' list of articles, got {got}")
    records = []
    for a, article in enumerate(squad["data"]):
        title = article.get("title", "")
        if "paragraphs" not in article:
            raise ValueError(f"SQuAD article {a} ({title!r}) has no 'paragraphs'; keys: {sorted(article)}")
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
                records.append(
                    {
                        "id": str(qa["id"]),
                        "title": title,
                        "context": context,
                        "question": qa["question"],
                        "answers": {
                            "text": [ans["text"] for ans in answers],
                            "answer_start": [int(ans["answer_start"]) for ans in answers],
                        },
                    }
                )
    return records


def question_list_to_records(items: list) -> list[dict[str, Any]]:
    """Records (no answers) from a plain list of ``{"id", "question", "context"[, "title"]}`` objects."""
    records = []
    for i, item in enumerate(items):
        missing = [k for k in ("id", "question", "context") if not isinstance(item, dict) or k not in item]
        if missing:
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"question {i} of the list lacks {missing} (got {got}); expected objects with "
                             "'id', 'question' and 'context'")
        records.append({"id": str(item["id"]), "title": str(item.get("title", "")), "context": item["context"],
                        "question": item["question"], "answers": {"text": [], "answer_start": []}})
    return records


def _check_schema(ds: datasets.Dataset, origin: str) -> datasets.Dataset:
    missing = [c for c in ("id", "context", "question", "answers") if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{origin} lacks the squad_v2 columns {missing}; it has {ds.column_names}. Expected {_EXPECTED}"
        )
    answers_feature = ds.features["answers"]
    inner = getattr(answers_feature, "feature", answers_feature)  # older datasets: Sequence({text, answer_start})
    keys = set(inner) if isinstance(inner, dict) else set()
    if not {"text", "answer_start"} <= keys:
        raise ValueError(
            f"{origin}: column 'answers' must be a struct {{text: [str], answer_start: [int]}} "
            f"(squad_v2 schema); got {answers_feature}"
        )
    if "title" not in ds.column_names:
        ds = ds.add_column("title", [""] * len(ds))
    extra = [c for c in ds.column_names if c not in SQUAD_COLUMNS]
    if extra:
        ds = ds.remove_columns(extra)
    return ds.select_columns(list(SQUAD_COLUMNS))


def _pick_split(dd: datasets.DatasetDict, split: str | None, origin: str) -> datasets.Dataset:
    if split is None:
        if len(dd) == 1:
            return next(iter(dd.values()))
        raise ValueError(f"{origin} is a DatasetDict with splits {list(dd)}; pass split= to choose one")
    if split not in dd:
        raise ValueError(f"{origin} has no split {split!r}; available: {list(dd)}")
    return dd[split]


def load_squad(
    path_or_dataset: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    split: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Load SQuAD (v1.1 or v2.0) questions as a ``datasets.Dataset`` in the ``squad_v2`` schema.

    Args:
        path_or_dataset: an official SQuAD JSON file, a ``save_to_disk`` directory, a ``Dataset`` or a
            ``DatasetDict`` (see the module docstring).
        split: which split of a ``DatasetDict`` (needed when it has more than one); ignored for JSON files.
        limit: keep only the first ``limit`` questions (in file order), for quick runs.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    datasets = require_datasets()
    if isinstance(path_or_dataset, datasets.DatasetDict):
        ds = _check_schema(_pick_split(path_or_dataset, split, "the DatasetDict"), "the dataset")
    elif isinstance(path_or_dataset, datasets.Dataset):
        ds = _check_schema(path_or_dataset, "the dataset")
    elif isinstance(path_or_dataset, (str, os.PathLike)):
        path = Path(path_or_dataset)
        if not path.exists():
            raise FileNotFoundError(f"no SQuAD data at {path}; expected {_EXPECTED}")
        if path.is_dir():
            try:
                loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            except FileNotFoundError as err:
                raise ValueError(f"{path} is a directory but not one saved with save_to_disk ({err})") from err
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _pick_split(loaded, split, str(path))
            ds = _check_schema(loaded, str(path))
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    squad = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not a JSON file ({err}); expected {_EXPECTED}") from err
            try:
                records = question_list_to_records(squad) if isinstance(squad, list) else squad_json_to_records(squad)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
            if limit is not None:
                records = records[:limit]
            return datasets.Dataset.from_list(records, features=squad_features())
    else:
        raise TypeError(f"load_squad got a {type(path_or_dataset).__name__}; expected {_EXPECTED}")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds
