"""``python -m gesim conditions``: the table of d_w, d_l and regime thresholds per loss."""

from __future__ import annotations

from gesim import losses, symbolic


def add_parser(sub) -> None:
    p = sub.add_parser("conditions", help="table of weights and regime conditions for every loss",
                       description="Derive d_w = -dL/dlw, d_l = dL/dll and the chosen-up / rejected-down "
                       "thresholds of each loss with sympy, and print them as a table.")
    p.add_argument("--loss", action="append", metavar="NAME",
                   help="a loss to include (repeatable; default: all registered losses)")
    p.add_argument("--format", choices=symbolic.TABLE_FORMATS, default="text", help="output format (default text)")
    p.set_defaults(func=run)


def run(args) -> int:
    names = [losses.get(n).name for n in args.loss] if args.loss else None
    print(symbolic.table(names, fmt=args.format))
    return 0
