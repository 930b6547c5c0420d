"""Drawing and saving one figure, and a group of figures in one worker process.

Separate from ``__main__`` so that the runner's spawned workers can import it (multiprocessing
does not re-import a package's ``__main__`` in a child).
"""

from __future__ import annotations

import platform
import sys
import time

from gesim import figures, threads
from gesim.errors import GesimError
from gesim.output import write_json


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("gesim", "numpy", "sympy", "matplotlib", "torch", "transformers"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


def run_one(fig: figures.Figure, args, device: str) -> float:
    ctx = figures.Context(fig.name, args.mode, args.seed, device)
    t0 = time.perf_counter()
    drawn, data = fig.fn(ctx)
    wall = time.perf_counter() - t0
    from gesim import plotting

    stem = args.outdir / fig.name
    plotting.save(drawn, stem)
    write_json(stem.with_suffix(".json"), {
        "figure": fig.name, "description": fig.description, "mode": args.mode, "seed": args.seed,
        "figure_seed": ctx.figure_seed, "device": device, "gpu": device == "cuda",
        "command": f"python -m gesim.figures --only {fig.name} --mode {args.mode} --seed {args.seed}",
        "wall_time_s": round(wall, 3), "versions": versions(), "data": data})
    return wall


def run_group(names: list[str], args, device: str) -> list[tuple[str, float | None, str | None]]:
    """Run figures ``names`` one after another: (name, wall seconds, None) or (name, None, error)."""
    threads.configure()
    registry, out = figures.registry(), []
    for name in names:
        try:
            out.append((name, run_one(registry[name], args, device), None))
        except GesimError as err:
            out.append((name, None, str(err)))
    return out
