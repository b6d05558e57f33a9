"""The ``structprune`` console script. Each command lives in its own module exposing ``register(subparsers)``,
which adds the sub-command and sets ``func(args) -> int | None`` on it."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("structprune.demo", "structprune.info", "structprune.qa.commands", "structprune.benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structprune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # so that run directories can record the exact command
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
