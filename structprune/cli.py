"""The ``structprune`` console script. Each command lives in its own module exposing ``register(subparsers)``,
which adds the sub-command and sets ``func(args) -> int | None`` on it."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

COMMAND_MODULES = ("structprune.tools.demo", "structprune.tools.info", "structprune.qa.commands",
                   "structprune.lm.command", "structprune.qa.predict", "structprune.benchmark",
                   "structprune.tools.kernel_report", "structprune.latency.command", "structprune.export.command")


class UsageError(ValueError):
    """Bad input from the command line (a wrong path, a run directory of another command, ...): the CLI prints
    its message as one line and exits with status 2."""


# Exceptions that, reaching the top of a command, mean bad input rather than a bug: one line, exit 2.
_INPUT_ERRORS = (UsageError, ValueError, TypeError, OSError, KeyError)
EXIT_USAGE = 2


def fraction(text: str) -> float:
    """argparse ``type=``: a float in (0, 1] (a kept fraction)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] (the share kept), got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def check_model_dir(path, flag: str = "--model", onnx: bool = False) -> Path:
    """Fail fast, before any work, when a model path is not a local model directory (or, with ``onnx``, an
    exported ``.onnx`` graph or OpenVINO ``.xml`` IR): a :class:`UsageError` saying the folder does not exist,
    rather than whatever a loader makes of it later (the Hub's "Repo id must be in the form ...")."""
    p = Path(path)
    if p.is_dir() or (onnx and p.suffix in (".onnx", ".xml") and p.is_file()):
        return p
    what = "a local model directory (a HF model or the 'model' folder of a finetune/prune run)"
    if onnx:
        what += " or an exported .onnx graph / OpenVINO .xml IR"
    if p.exists():
        raise UsageError(f"{flag} {path} is a file, not a model directory; pass {what}")
    raise UsageError(f"{flag} {path}: no such directory (the folder does not exist); pass {what}")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: ``(default: X)`` is appended unless the text already says
    what the default is, or there is none to say (``None``, a flag's ``False``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):  # nargs="+": as it is typed
            return f"{text} (default: {' '.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where to look, no usage block; option help with defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="structprune",
                     description="Structured pruning (gated heads and FFN units) of BERT-family QA models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    for command in sub.choices.values():  # --debug after the command too; SUPPRESS keeps a leading one
        if "--debug" not in command._option_string_actions:
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show the full traceback of an error")
    return parser


def _one_line(exc: BaseException) -> str:
    text = f"missing key {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; bad input ends with one line on stderr and status 2 (a traceback with
    ``--debug``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # so that run directories can record the exact command
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except _INPUT_ERRORS as exc:
        if args.debug:
            raise
        print(f"structprune {args.command}: error: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
