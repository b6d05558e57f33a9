"""What a new user meets first: every option says what it is and its default, and the commands that need no
SQuAD data work without the ``datasets`` package installed."""
import argparse
import os
import subprocess
import sys
import textwrap

import pytest

from structprune.cli import build_parser


def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _options():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, sub, action


def test_every_option_of_every_command_has_help():
    options = list(_options())
    assert {"finetune", "prune", "eval", "predict", "export", "demo", "info", "bench", "kernels"} <= {
        name for name, _, _ in options}
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, _, a in options if not (a.help or "").strip()]
    assert not missing, f"options without help: {missing}"


def test_every_option_taking_a_value_says_its_default():
    """Options that take a value and are not required show their default: argparse's, or words saying what
    happens without them (the parser's formatter adds ``(default: X)`` where the text does not say it)."""
    silent = []
    for name, sub, action in _options():
        if not action.option_strings or action.nargs == 0 or action.required:
            continue  # flags (store_true ...) default to off; required options have none
        text = sub._get_formatter()._expand_help(action)
        if "default" not in text:
            silent.append(f"{name} {action.option_strings[0]}: {text!r}")
    assert not silent, "options whose help does not say the default:\n" + "\n".join(silent)


def test_help_shows_the_argparse_default():
    help_text = " ".join(_subparsers(build_parser())["prune"].format_help().split())
    assert "peak learning rate (AdamW, linear warm-up and decay) (default: 5e-05)" in help_text
    assert "passes over the train windows (may be fractional) (default: 1.0)" in help_text  # prune's own default


NO_DATASETS = 'import sys\nsys.modules["datasets"] = None  # as if it were not installed: `import datasets` fails\n'


@pytest.fixture
def no_datasets_env(tmp_path):
    """The environment of a subprocess in which ``import datasets`` fails (a ``sitecustomize`` blocks it)."""
    (tmp_path / "sitecustomize.py").write_text(NO_DATASETS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return env


def test_cli_works_without_datasets(no_datasets_env):
    script = textwrap.dedent("""
        import sys
        import structprune.cli
        from structprune.cli import build_parser, main
        build_parser()
        for command in ("kernels", "info", "export", "bench", "demo", "prune", "eval", "predict"):
            try:
                main([command, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, (command, exc.code)
        assert sys.modules.get("datasets") is None, "datasets was imported"
        from structprune.qa import load_squad  # importable; loading data says what is missing
        try:
            load_squad("dev.json")
        except ModuleNotFoundError as exc:
            assert "pip install" in str(exc) and "datasets" in str(exc), exc
        else:
            raise AssertionError("load_squad without datasets did not fail")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], env=no_datasets_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


def test_python_m_structprune_help_without_datasets(no_datasets_env):
    out = subprocess.run([sys.executable, "-c", "import datasets"], env=no_datasets_env, capture_output=True,
                         text=True)
    assert out.returncode != 0  # the blocker works
    out = subprocess.run([sys.executable, "-m", "structprune", "--help"], env=no_datasets_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "info", "export", "bench", "kernels", "finetune", "prune", "eval", "predict"):
        assert command in out.stdout
