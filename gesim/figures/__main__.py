"""``python -m gesim.figures``: regenerate gesim's figures (PNG + PDF + JSON each).

    python -m gesim.figures                       # every figure, fast mode, into figures/
    python -m gesim.figures --list
    python -m gesim.figures --only 'regime*' --mode full --device cuda --seed 1
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from gesim import figures, registries, threads
from gesim.errors import GesimError, OneLineParser, one_line
from gesim.figures._run import run_group
from gesim.output import check_out_dir

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
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="parallel single-threaded worker processes on CPU (default: the CPUs this process may "
                   "use, see gesim.threads); figures of one module share a worker")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        threads.configure()  # one torch thread per worker: the figures' models are tiny (issue 17)
        chosen = figures.select(args.only)
        if args.list:
            width = max(len(f.name) for f in chosen)
            print("\n".join(f"{f.name:<{width}}  {f.description}" for f in chosen))
            return 0
        if args.jobs is not None and args.jobs < 1:
            raise GesimError(f"argument --jobs: must be a positive integer, got {args.jobs}")
        check_out_dir(args.outdir, "--outdir")  # before any figure is computed
        device = resolve_device(args.device)
    except GesimError as err:
        print(one_line(PROG, err), file=sys.stderr)
        return 2
    jobs = 1 if device == "cuda" else max(1, args.jobs or threads.workers())
    groups = plan(chosen, args.outdir, jobs)
    failed, done = [], 0
    for name, wall, error in _results(groups, args, device, jobs):
        done += 1
        if error is None:
            line = f"[{done}/{len(chosen)}] {name}: {wall:.1f}s -> {args.outdir / name}.{{png,pdf,json}}"
        else:
            failed.append(name)
            line = f"[{done}/{len(chosen)}] {name}: error: {error}"
        print(line, file=sys.stderr, flush=True)
    if failed:
        print(f"{PROG}: {len(failed)} figure(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def plan(chosen: list, outdir: Path, jobs: int) -> list[list[str]]:
    """Figure names in groups, one group per figure module (figures of a module may share runs),
    the costliest first by the wall times the last run recorded in ``outdir`` (longest processing
    time first keeps ``jobs`` workers evenly busy); one group in all when ``jobs`` is 1."""
    import json

    if jobs == 1:
        return [[f.name for f in chosen]]
    groups: dict[str, list] = {}
    for f in chosen:
        groups.setdefault(f.fn.__module__, []).append(f.name)

    def cost(names):
        total = 0.0
        for name in names:
            try:
                total += float(json.loads((outdir / f"{name}.json").read_text())["wall_time_s"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return total

    return sorted(groups.values(), key=cost, reverse=True)


def _results(groups, args, device, jobs):
    """Each finished figure's (name, wall, error): in this process for one job (a bar on a
    terminal), else from ``jobs`` spawned single-threaded processes as their groups finish."""
    from tqdm.auto import tqdm

    if jobs == 1 or len(groups) == 1:
        names = [n for g in groups for n in g]
        bar = tqdm(names, desc="figures", unit="fig", file=sys.stderr, disable=None)
        for name in bar:
            bar.set_postfix_str(name)
            yield from run_group([name], args, device)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")  # torch state is not fork-safe
    with ProcessPoolExecutor(min(jobs, len(groups)), mp_context=ctx) as pool:
        futures = [pool.submit(run_group, g, args, device) for g in groups]
        for fut in as_completed(futures):
            yield from fut.result()

if __name__ == "__main__":
    raise SystemExit(main())
