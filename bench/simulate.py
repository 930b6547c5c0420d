"""Benchmark: the vectorised simulator against the plain per-instance loop, same work, same run.

    python bench/simulate.py                    # writes bench/results/simulate.json, prints the ratio
    python bench/simulate.py --compare 100 --big 10000 --steps 100 --dtype float32

1. ``compare``: the same ``--compare`` instances x ``--compare-steps`` steps of the context
   policy (vocab 256, dim 64, length 32: one differing token then a 31-token shared suffix),
   once with :func:`gesim.simulate.simulate` and once with :func:`gesim.simulate.simulate_loop`
   (per instance, torch autograd); checks that both give the same numbers, reports both
   times and the ratio.
2. ``big``: ``--big`` instances x ``--steps`` steps of the same policy, vectorised only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: this tree's gesim

from gesim.output import write_json  # noqa: E402
from gesim.simulate import FIELDS, SimConfig, simulate, simulate_loop  # noqa: E402

BASE = SimConfig(policy="context", loss="dpo", vocab=256, dim=64, suffix=31, differ=1, eta=0.1)
SMALL = SimConfig(policy="context", loss="dpo", vocab=64, dim=32, suffix=8, differ=1, eta=0.1)


def compare(cfg) -> dict:
    """Time the vectorised simulator and the per-instance loop on the same instances and steps."""
    simulate(dataclasses.replace(cfg, instances=2, steps=1))  # warm-up: derive the loss weights (sympy) once
    simulate_loop(dataclasses.replace(cfg, instances=1, steps=1))
    t0 = time.perf_counter()
    fast = simulate(cfg)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = simulate_loop(cfg)
    t_loop = time.perf_counter() - t0
    diff = max(float(np.max(np.abs(fast.arrays[k] - plain.arrays[k]))) for k in FIELDS if "regime" not in k)
    return {"config": dataclasses.asdict(cfg), "vectorised_s": t_vec, "loop_s": t_loop, "ratio": t_loop / t_vec,
            "max_abs_difference": diff,
            "regimes_equal": bool(np.array_equal(fast.arrays["real_regime"], plain.arrays["real_regime"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", type=int, default=200, help="instances in the loop-vs-vectorised comparison")
    ap.add_argument("--compare-steps", type=int, default=10)
    ap.add_argument("--big", type=int, default=10_000, help="instances in the large vectorised run (0: skip)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulate.json"))
    args = ap.parse_args(argv)

    result = {"compare": {}, "machine": {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    sizes = {"bench (vocab 256, dim 64, length 32)": BASE, "cli default (vocab 64, dim 32, length 9)": SMALL}
    for label, base in sizes.items():
        cfg = dataclasses.replace(base, instances=args.compare, steps=args.compare_steps, chunk=args.chunk,
                                  dtype="float64")
        result["compare"][label] = row = compare(cfg)
        print(f"{label}: {args.compare} instances x {args.compare_steps} steps: vectorised "
              f"{row['vectorised_s']:.2f}s, loop {row['loop_s']:.2f}s, ratio {row['ratio']:.1f}x "
              f"(max |diff| {row['max_abs_difference']:.1e})")
    if args.big:
        big = dataclasses.replace(BASE, instances=args.big, steps=args.steps, chunk=args.chunk, dtype=args.dtype)
        t0 = time.perf_counter()
        res = simulate(big, progress=True)
        t_big = time.perf_counter() - t0
        result["big"] = {"config": dataclasses.asdict(big), "seconds": t_big, "summary": res.summary(),
                         "instance_steps_per_s": args.big * args.steps / t_big}
        print(f"big {args.big} instances x {args.steps} steps ({args.dtype}): {t_big:.1f}s")
    write_json(Path(args.out), result)
    ratios = ", ".join(f"{r['ratio']:.1f}x" for r in result["compare"].values())
    print(f"ratios {ratios} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
