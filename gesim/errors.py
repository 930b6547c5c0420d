"""The one exception family gesim raises for bad input.

Every user-facing check raises :class:`GesimError` (a ``ValueError``) with a message that
names the problem and, where there is a finite set, the valid choices. The command line
turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import re


class GesimError(ValueError):
    """Bad input: an unknown loss, a parameter out of range, impossible geometry, ..."""


def unknown(kind: str, name: str, choices) -> GesimError:
    """Error for an unknown name, with the closest match and the valid choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return GesimError(f"unknown {kind} {name!r}{hint}; choose from: {', '.join(choices)}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help) and exit code 2.

    Every gesim command line (``python -m gesim``, ``python -m gesim.figures``) uses it, so a
    bad flag and a :class:`GesimError` read alike: ``PROG: error: MESSAGE``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads "-1e3" and "-inf" as option names ("--lw -1e3: expected one argument");
        # numbers in any float syntax are values here (no gesim option looks like a number)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-inf(inity)?$", re.I)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(prog: str, err: BaseException) -> str:
    """The one stderr line for a refused input: ``PROG: error: MESSAGE`` (newlines folded)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{prog}: error: {text}"
