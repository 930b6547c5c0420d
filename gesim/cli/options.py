"""Argument types and output helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import math

from gesim.errors import GesimError
from gesim.output import to_jsonable


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and infinities get a clear message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_params(items) -> dict[str, float]:
    """``--param NAME=VALUE`` items to a dict (range checks happen in the loss registry)."""
    params = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise GesimError(f"--param expects NAME=VALUE, got {item!r}")
        try:
            params[name.strip()] = finite_float(value)
        except argparse.ArgumentTypeError as err:
            raise GesimError(f"--param {name}: {err}") from None
    return params


def add_param_option(parser) -> None:
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a loss hyper-parameter (repeatable), e.g. --param beta=0.5")


def add_format_option(parser, choices=("text", "json"), default="text") -> None:
    parser.add_argument("--format", choices=choices, default=default, help=f"output format (default {default})")


def dump_json(obj) -> str:
    return json.dumps(to_jsonable(obj), indent=2)
