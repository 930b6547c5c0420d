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
from gesim.errors import GesimError, OneLineParser, one_line

#: Command modules, in the order ``--help`` lists them.
COMMANDS = ("conditions", "regime", "simulate", "transformer", "probe")

#: The parser class of every gesim command line (a usage error is one line, exit code 2).
Parser = OneLineParser


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
    parser.commands = sub.choices  # command name -> its parser
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # report an unknown flag under the command it was given to
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    prog = f"{parser.prog} {args.command}"
    try:
        threads.configure()  # one torch thread per worker: gesim's models are tiny (issue 17)
        return args.func(args) or 0
    except GesimError as err:
        print(one_line(prog, err), file=sys.stderr)
        return 2
    except OSError as err:  # an output that became unwritable mid-run (disk full, folder removed)
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(one_line(prog, f"{err.strerror or err}{where}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
