"""Run one ``structprune`` command importing only that command's module: ``python gpu/command.py info``.

``structprune.cli`` builds its parser from every command module, and some of those need packages the GPU machine
does not have (the QA commands need ``datasets``); the validation needs only ``info``, ``kernels`` and ``bench``.
Same arguments, output and exit status as ``structprune COMMAND ...``; works from a checkout that is not installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when structprune is not installed
from structprune import cli  # noqa: E402  (imports no command module by itself)

# command -> a dotted-name part of the module that registers it (found in cli.COMMAND_MODULES)
COMMANDS = {"info": "info", "kernels": "kernel_report", "bench": "benchmark"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python gpu/command.py {{{','.join(COMMANDS)}}} [ARGS...]", file=sys.stderr)
        return 2
    module = [m for m in cli.COMMAND_MODULES if COMMANDS[argv[0]] in m.split(".")]
    if len(module) != 1:
        raise SystemExit(f"gpu/command.py: no single module for {argv[0]!r} in {cli.COMMAND_MODULES}")
    cli.COMMAND_MODULES = tuple(module)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
