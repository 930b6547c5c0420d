"""``python -m gesim.figures``: regenerate gesim's figures (PNG + PDF + JSON each).

    python -m gesim.figures                       # every figure, fast mode, into figures/
    python -m gesim.figures --list
    python -m gesim.figures --only 'regime*' --mode full --device cuda --seed 1
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

from gesim import figures, registries, threads
from gesim.errors import GesimError, OneLineParser, one_line
from gesim.output import check_out_dir, write_json

PROG = "python -m gesim.figures"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Regenerate gesim's figures: a PNG, a PDF and a JSON of the plotted "
                      "numbers with provenance for each.")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    p.add_argument("--only", metavar="NAME[,NAME]", help="comma-separated names or globs (default: all)")
    p.add_argument("--mode", choices=registries.MODES, default="fast",
                   help="fast: CPU-sized, minutes; full: paper-sized (GPU where available). Default fast")
    p.add_argument("--seed", type=int, default=0, help="base seed; each figure derives its own (default 0)")
    p.add_argument("--outdir", type=Path, default=Path("figures"), help="output folder (default figures/)")
    p.add_argument("--device", choices=registries.FIGURE_DEVICES, default="auto",
                   help="device for torch figures (default auto: cuda when available)")
    return p


def resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise GesimError("--device cuda was asked for but no CUDA device is available")
    return "cuda" if cuda else "cpu"


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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        threads.configure()  # one torch thread per worker: the figures' models are tiny (issue 17)
        chosen = figures.select(args.only)
        if args.list:
            width = max(len(f.name) for f in chosen)
            print("\n".join(f"{f.name:<{width}}  {f.description}" for f in chosen))
            return 0
        check_out_dir(args.outdir, "--outdir")  # before any figure is computed
        device = resolve_device(args.device)
    except GesimError as err:
        print(one_line(PROG, err), file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    failed = []
    # tqdm draws a bar on a terminal (disable=None: off when stderr is not one); the one line per
    # finished figure below goes to stderr either way, so logs show progress too.
    bar = tqdm(chosen, desc="figures", unit="fig", file=sys.stderr, disable=None)
    for i, fig in enumerate(bar, 1):
        bar.set_postfix_str(fig.name)
        try:
            wall = run_one(fig, args, device)
            tqdm.write(f"[{i}/{len(chosen)}] {fig.name}: {wall:.1f}s -> {args.outdir / fig.name}.{{png,pdf,json}}",
                       file=sys.stderr)
        except GesimError as err:
            failed.append(fig.name)
            tqdm.write(f"[{i}/{len(chosen)}] {fig.name}: error: {err}", file=sys.stderr)
        sys.stderr.flush()
    if failed:
        print(f"{PROG}: {len(failed)} figure(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
