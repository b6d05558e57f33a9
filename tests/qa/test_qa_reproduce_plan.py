"""experiments/squad2/reproduce.py's plan: every step is a command the CLI accepts, in an order that can run."""
import importlib.util
from pathlib import Path

import pytest

from structprune.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "experiments" / "squad2" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_step_parses_and_l0_decides_at_its_target(reproduce, tmp_path):
    plan = reproduce.commands(tmp_path / "runs", tmp_path / "data", threads=1)
    parser = build_parser()
    products = set()
    for product, cmd in plan:
        assert cmd[0] == "structprune"
        args = parser.parse_args(cmd[1:])  # exits (SystemExit) on an option the CLI does not have
        if cmd[1] == "prune":
            assert args.eval_every, "every student records its dev curve"
            assert str(Path(args.model).parent / "metrics.json") in products  # the teacher is made before
            if args.method == "l0":
                assert args.l0_until_target and args.l0_train_weights and args.l0_steps > args.l0_warmup_steps
        if cmd[1] == "predict":
            assert str(Path(args.model).parent / "metrics.json") in products
        products.add(str(product))
    assert len(products) == len(plan)
