"""Plain text as training blocks for a causal LM: every non-empty line tokenized (an end-of-sequence token after
each, when the tokenizer has one), the tokens concatenated and cut into blocks of ``block_size``; the last, shorter
block is right-padded, its padding masked out (``attention_mask`` 0, ``labels`` -100)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

IGNORE = -100  # the label HF's causal-LM loss leaves out


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file; a ValueError when there are none."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path}: no text (the file is empty or holds only blank lines)")
    return lines


def tokenize_blocks(tokenizer, lines: list[str], block_size: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels``, each ``[blocks, block_size]``."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a token and the next to predict), got {block_size}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for line in lines:
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    if len(ids) < 2:
        raise ValueError(f"the text makes {len(ids)} token(s); a causal LM needs at least 2")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    blocks = -(-len(ids) // block_size)
    input_ids = torch.full((blocks * block_size,), pad, dtype=torch.long)
    input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(blocks * block_size, dtype=torch.long)
    mask[: len(ids)] = 1
    input_ids, mask = input_ids.view(blocks, block_size), mask.view(blocks, block_size)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, IGNORE)}


def text_blocks(tokenizer, path: str | Path, block_size: int) -> dict[str, torch.Tensor]:
    """:func:`tokenize_blocks` of the lines of the text file ``path``."""
    return tokenize_blocks(tokenizer, read_lines(path), block_size)


def batches(blocks: dict[str, torch.Tensor], batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``blocks`` in batches of ``batch_size`` (the last may be smaller), shuffled with ``generator``."""
    n = blocks["input_ids"].shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        yield {k: v.index_select(0, rows) for k, v in blocks.items()}


__all__ = ["IGNORE", "read_lines", "tokenize_blocks", "text_blocks", "batches"]
