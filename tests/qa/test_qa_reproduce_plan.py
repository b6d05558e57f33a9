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


def parse_plan(plan):
    """``{product: (args, cmd)}`` of the plan's steps, parsed in order; every model a step reads was made before."""
    parser = build_parser()
    products, parsed = set(), {}
    for product, cmd in plan:
        args = parser.parse_args(cmd[1:])  # exits (SystemExit) on an option the CLI does not have
        for flag in ("model", "latency_table"):
            path = getattr(args, flag, None)
            if path is not None and cmd[1] in ("prune", "predict"):
                made = Path(path).parent / "metrics.json" if flag == "model" else Path(path)
                assert str(made) in products, f"{cmd[1]} reads {path} before a step makes it"
        parsed[str(product)] = (args, cmd)
        assert str(product) not in products, f"two steps make {product}"
        products.add(str(product))
    return parsed


def test_frontier_steps_parse_and_follow_the_protocol(reproduce, tmp_path):
    runs = tmp_path / "runs"
    plan = reproduce.commands(runs, tmp_path / "data", threads=1, frontier=True)
    base = reproduce.commands(runs, tmp_path / "data", threads=1)
    assert plan[:len(base)] == base  # the frontier adds steps, it changes none
    parsed = parse_plan(plan)
    students = {Path(a.out).name: a for a, cmd in parsed.values() if cmd[1] == "prune"}
    layerdrop = {name: a for name, a in students.items() if a.method == "layerdrop"}
    assert {name: a.keep_layers for name, a in layerdrop.items()} == {"layerdrop-k3-distill": 3,
                                                                       "layerdrop-k2-distill": 2}
    for a in layerdrop.values():  # distilled as l0-full is (logits and layers, live teacher), one epoch, dev curve
        assert a.distill and a.distill_layers and not a.teacher_logits and a.epochs == 1.0 and a.eval_every
        assert a.lr == 5e-5 and a.max_length == 192 and a.batch_size == 16 and not a.bf16
    full = [a for a, cmd in parsed.values() if "--full" in cmd]
    assert [a.speedup for a in full] == [3.0, 4.0, 6.0]
    assert all(a.method == "l0" and a.distill and a.distill_layers and a.latency_table and a.l0_until_target
               for a in full)
    # held-out and dev predictions, at the dev-chosen threshold and always answering, for the teacher and every
    # new student
    always = {Path(a.out).relative_to(runs).parts for a, cmd in parsed.values()
              if cmd[1] == "predict" and a.always_answer}
    for run in ["teacher"] + list(reproduce.frontier_students()):
        assert {("heldout", run), ("devpred", run)} <= always, run
    for product, (a, cmd) in parsed.items():
        if cmd[1] == "predict" and a.always_answer:
            assert product.endswith("predictions_always.json") and a.null_threshold is None


def test_bf16_frontier_and_the_bf16_check(reproduce, tmp_path):
    runs = tmp_path / "runs"
    plan = reproduce.commands(runs, tmp_path / "data", threads=1, frontier=True, bf16=True, bf16_check=True)
    parsed = parse_plan(plan)
    students = {Path(a.out).name: a for a, cmd in parsed.values() if cmd[1] == "prune"}
    assert students["layerdrop-k3-distill-bf16"].bf16 and students["layerdrop-k2-distill-bf16"].bf16
    assert not students["layerdrop-k3-distill"].bf16  # the check's fp32 twin
    assert all("--bf16" in cmd for _, cmd in plan if "--full" in cmd)
    # the later students: each variant with its own flags, set once (no flag repeated for argparse to pick)
    assert students["l0-h0.5-f0.3-distill-bf16"].method == "l0" and students["l0-h0.5-f0.3-distill-bf16"].distill_layers
    for (speedup, suffix), changes in reproduce.FULL_VARIANTS.items():
        a = students[f"l0-full-speed{speedup}-distill-bf16{suffix}"]
        assert a.speedup == float(speedup) and a.bf16 and a.distill_layers
        for flag, value in zip(changes[::2], changes[1::2]):
            assert float(getattr(a, flag[2:].replace("-", "_"))) == float(value), (suffix, flag)
    for _, cmd in plan:
        flags = [f for f in cmd if f.startswith("--")]
        assert len(flags) == len(set(flags)), cmd
    assert students["l0-full-speed4-distill-bf16"].lr == 5e-5
    check = reproduce.commands(runs, tmp_path / "data", threads=1, bf16_check=True)
    names = {Path(a.out).name for a, cmd in parse_plan(check).values() if cmd[1] == "prune"}
    assert names - {n for n, *_ in reproduce.student_runs()} - {f"l0-speed{reproduce.LATENCY_SPEEDUP}-distill"} == {
        "layerdrop-k3-distill", "layerdrop-k3-distill-bf16"}


def test_frontier_only_is_the_teacher_and_the_frontier_steps(reproduce, tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    plan = reproduce.commands(runs, data, threads=1, frontier=True, frontier_only=True)
    full = reproduce.commands(runs, data, threads=1, frontier=True)
    assert plan[0] == full[0] and plan[1:] == full[-(len(plan) - 1):]  # the teacher, then the frontier's own steps
    trained = [Path(cmd[cmd.index("--out") + 1]).name for _, cmd in plan if cmd[1] == "prune"]
    assert trained == list(reproduce.frontier_students())  # no student of steps 3-4
    made = {"teacher", *trained}
    # the existing L0 students' predictions run only where their models already are (from an earlier full run)
    elsewhere = {Path(cmd[cmd.index("--model") + 1]).parent.name for _, cmd in plan
                 if cmd[1] == "predict" and Path(cmd[cmd.index("--model") + 1]).parent.name not in made}
    assert elsewhere and all(name.startswith("l0-") and "full" not in name for name in elsewhere)
    parse_plan([step for step in plan if not (step[1][1] == "predict" and any(f"/{n}/" in str(step[0])
                                                                              for n in elsewhere))])
    check = reproduce.commands(runs, data, threads=1, bf16_check=True, frontier_only=True)
    names = [Path(cmd[cmd.index("--out") + 1]).name for _, cmd in check if cmd[1] == "prune"]
    assert names == ["layerdrop-k3-distill", "layerdrop-k3-distill-bf16"]
