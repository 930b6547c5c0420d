"""Every figure gesim draws, in one registry; ``python -m gesim.figures`` runs them.

A figure is a function ``fn(ctx) -> (fig, data)`` registered with :func:`figure`: it draws
a matplotlib figure and returns the numbers the figure shows as a JSON-able ``data``. The
runner saves ``NAME.png``, ``NAME.pdf`` and ``NAME.json`` (the data plus provenance: mode,
seed, config, versions, wall time). Each figure's random stream derives from (seed, name), so
``--only NAME`` draws exactly what a full run draws.

Figure modules live in this package and are discovered automatically.
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gesim.errors import GesimError
from gesim.registries import MODES

__all__ = ["MODES", "Context", "Figure", "figure", "registry", "select"]


@dataclass(frozen=True)
class Context:
    """What a figure function gets: the mode, the seed, the device and its own random stream."""

    name: str
    mode: str = "fast"
    seed: int = 0
    device: str = "cpu"

    @property
    def fast(self) -> bool:
        return self.mode == "fast"

    @property
    def figure_seed(self) -> int:
        """A seed derived from (seed, figure name), stable across runs and Python versions."""
        return (self.seed * 1_000_003 + zlib.crc32(self.name.encode())) % (2**31)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.figure_seed)


@dataclass(frozen=True)
class Figure:
    name: str
    fn: Callable
    description: str
    needs: tuple[str, ...] = ()


_REGISTRY: dict[str, Figure] = {}
_LOADED = False


def figure(name: str, description: str, needs: tuple[str, ...] = ()):
    """Decorator registering a figure function under ``name``.

    ``needs`` lists optional packages the figure imports (e.g. ``("transformers",)``).
    """
    def decorate(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise GesimError(f"figure {name!r} is registered twice")
        _REGISTRY[name] = Figure(name, fn, description, tuple(needs))
        return fn

    return decorate


def _load() -> None:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def registry() -> dict[str, Figure]:
    """All registered figures, by name (sorted)."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def select(patterns: str | None) -> list[Figure]:
    """Figures matching comma-separated glob ``patterns`` (all when None); error if none match."""
    from fnmatch import fnmatchcase

    figs = registry()
    if not patterns:
        return list(figs.values())
    chosen = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        hits = [f for n, f in figs.items() if fnmatchcase(n, pattern)]
        if not hits:
            raise GesimError(f"no figure matches {pattern!r}; choose from: {', '.join(figs)}")
        chosen += [f for f in hits if f not in chosen]
    return chosen


def saved_data(folder, name: str) -> dict:
    """The ``data`` a figure run saved as ``folder/NAME.json`` (notebooks read committed figures)."""
    import json
    from pathlib import Path

    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise GesimError(f"{path} does not exist: run python -m gesim.figures --only {name} first")
    return json.loads(path.read_text())["data"]
