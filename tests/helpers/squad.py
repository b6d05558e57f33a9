"""The real SQuAD 2.0 data the QA command tests read (``../shared/data/squad2`` beside the checkout), and the small
command-line settings they run the commands with."""
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad2"
needs_squad = pytest.mark.skipif(not (DATA / "dev.json").is_file(), reason=f"no SQuAD data at {DATA}")


def eval_args(dev_limit: int = 6) -> list[str]:
    """Short windows, one thread, the first ``dev_limit`` dev questions."""
    return ["--max-length", "96", "--doc-stride", "32", "--eval-batch-size", "8", "--threads", "1",
            "--dev", str(DATA / "dev.json"), "--dev-limit", str(dev_limit)]


def train_args(dev_limit: int = 6) -> list[str]:
    """:func:`eval_args` plus training on the first 8 dev questions, 4 windows a step."""
    return eval_args(dev_limit) + ["--batch-size", "4", "--train", str(DATA / "dev.json"), "--train-limit", "8"]
