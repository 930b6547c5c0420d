"""Results over seeds: a mean with its 95% interval, and "holds in k/n seeds".

A claim that rests on one seed cannot carry a result; every experiment that gesim reports
runs several seeds and summarises each number with :func:`spread` and each yes/no claim with
:func:`holds`. The interval is Student's t interval of the mean,

    mean +- t_{0.975, n-1} * s / sqrt(n),     s the sample standard deviation,

exact for normal per-seed values and the usual choice for a handful of seeds (a bootstrap
interval is too narrow at n = 3-10). With one seed the interval is (nan, nan): gesim prints
no interval it cannot compute.

numpy and scipy only, so every layer can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from gesim.errors import GesimError

LEVEL = 0.95


@dataclass(frozen=True)
class Spread:
    """One summary number over seeds: mean, its 95% t interval [lo, hi], n and the values."""

    mean: float
    lo: float
    hi: float
    n: int
    values: tuple[float, ...]

    def as_dict(self) -> dict:
        return asdict(self) | {"values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict) -> Spread:
        """The inverse of :meth:`as_dict` (e.g. a spread read back from a figure's JSON)."""
        return cls(d["mean"], d["lo"], d["hi"], d["n"], tuple(d["values"]))

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.3g}"
        return f"{self.mean:+.3g} [{self.lo:+.3g}, {self.hi:+.3g}]"


def spread(values: Iterable[float], level: float = LEVEL) -> Spread:
    """Mean and ``level`` Student-t interval of per-seed ``values`` (NaN values are refused)."""
    from scipy.stats import t as student_t

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise GesimError("spread of no values: run at least one seed")
    if not np.all(np.isfinite(x)):
        raise GesimError(f"spread of non-finite values {x.tolist()}: a run diverged")
    mean = float(x.mean())
    if x.size < 2:
        return Spread(mean, math.nan, math.nan, 1, (float(x[0]),))
    half = float(student_t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Spread(mean, mean - half, mean + half, int(x.size), tuple(float(v) for v in x))


@dataclass(frozen=True)
class Holds:
    """A yes/no claim checked on each seed: it held in ``k`` of ``n``."""

    k: int
    n: int
    per_seed: tuple[bool, ...]

    @property
    def always(self) -> bool:
        return self.k == self.n

    def as_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "per_seed": list(self.per_seed)}

    @classmethod
    def from_dict(cls, d: dict) -> Holds:
        """The inverse of :meth:`as_dict` (a saved figure's JSON); checks k against the flags."""
        flags = tuple(bool(v) for v in d["per_seed"])
        if sum(flags) != d["k"] or len(flags) != d["n"]:
            raise GesimError(f"a saved claim says {d['k']}/{d['n']} but its per-seed flags give "
                             f"{sum(flags)}/{len(flags)}")
        return cls(d["k"], d["n"], flags)

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def holds(values: Iterable, test: Callable[[object], bool] = bool) -> Holds:
    """How many per-seed ``values`` pass ``test`` (default: truthiness)."""
    flags = tuple(bool(test(v)) for v in values)
    if not flags:
        raise GesimError("a claim checked on no seed: run at least one seed")
    return Holds(sum(flags), len(flags), flags)


def parse_seeds(text: str) -> tuple[int, ...]:
    """Seeds from ``"0-9"``, ``"0,3,7"`` or a mix (``"0-2,10"``); each at most once, in order."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            rng = range(int(lo), int(hi) + 1) if sep else (int(lo),)
            if sep and int(hi) < int(lo):
                raise ValueError
            seeds += [s for s in rng if s not in seeds]
    except ValueError:
        raise GesimError(f"seeds {text!r}: write non-negative integers like 0-9 or 0,3,7") from None
    if not seeds or min(seeds) < 0:
        raise GesimError(f"seeds {text!r}: write non-negative integers like 0-9 or 0,3,7")
    return tuple(seeds)


def table(rows: Sequence[dict], keys: Sequence[str]) -> dict[str, Spread]:
    """:func:`spread` of each of ``keys`` over per-seed result dicts ``rows``."""
    return {k: spread(r[k] for r in rows) for k in keys}
