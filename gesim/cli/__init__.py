"""The command line: ``python -m gesim COMMAND ...`` (``--help`` on every command).

Each command is a module in this package exposing ``add_parser(subparsers)`` (which sets
``func`` on its parser) and is listed in :data:`COMMANDS`; modules import their heavy
dependencies inside ``run`` so that ``--help`` stays fast. Bad input raises
:class:`gesim.GesimError`, which becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gesim import threads
from gesim.errors import GesimError

#: Command modules, in the order ``--help`` lists them.
COMMANDS = ("conditions", "regime", "simulate", "transformer", "probe")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m gesim",
        description="Gradient entanglement in preference optimisation: exact conditions, "
        "simulation and measurement.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gesim.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"gesim.cli.{name}":
                continue  # a command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        threads.configure()  # one torch thread per worker: gesim's models are tiny (issue 17)
        return args.func(args) or 0
    except GesimError as err:
        print(f"gesim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gesim {args.command}: interrupted", file=sys.stderr)
        return 130
