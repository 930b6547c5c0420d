"""Argument types and output helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import math

from gesim import registries
from gesim.errors import GesimError
from gesim.output import to_jsonable


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and infinities get a clear message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (a step size, a learning rate)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, instances, pairs)."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 switches the feature off)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def parse_params(items) -> dict[str, float]:
    """``--param NAME=VALUE`` items to a dict (range checks happen in the loss registry)."""
    params = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise GesimError(f"--param expects NAME=VALUE, got {item}")
        try:
            params[name.strip()] = finite_float(value)
        except argparse.ArgumentTypeError as err:
            raise GesimError(f"--param {name}: {err}") from None
    return params


def add_param_option(parser) -> None:
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a loss hyper-parameter (repeatable), e.g. --param beta=0.5")


def add_format_option(parser, choices=registries.FORMATS, default="text") -> None:
    parser.add_argument("--format", choices=choices, default=default, help=f"output format (default {default})")


def dump_json(obj) -> str:
    return json.dumps(to_jsonable(obj), indent=2)
