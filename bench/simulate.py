"""Benchmark: the simulator against its counted floor, the weight-space engine and the plain loop.

    python bench/simulate.py             # full: writes bench/results/simulate.json (~10-15 min on 2 cores)
    python bench/simulate.py --quick     # the same checks, smaller (under 3 minutes on 2 quiet cores)

1. ``floor``: FLOPs per instance-step of the cheapest exact update, per policy
   (:func:`gesim.simulate.logit.floor`), and the time of the kernels that update must run
   (one batched GEMM of the counted FLOPs, one softmax, three passes over the logits),
   single-threaded, each at its best batch size, each repeated on data already in cache.
   Also reported, not part of the floor: ``gemm_engine_layout``, the same FLOPs in the layout
   the engine runs (two (2T x T)(T x V) products per instance, B_w and B_l, which the
   geometry needs separately; the floor's one (2T x 2T)(2T x V) product gives only their
   sum). The floor stays a lower bound for any exact method: it counts no memory traffic,
   while an engine whose step needs every instance's loss weights first streams Z and C
   (2 x 2T x V per instance) through memory once per step.
2. ``compare``: the same instances x steps of each policy run by the logit-space engine, the
   weight-space engine and the per-instance autograd loop (:func:`gesim.simulate.simulate_loop`),
   all on one thread, in float32, interleaved, ``--repeats`` times, medians of CPU time
   (``ratio_to_floor`` includes the one-off set-up, ``setup_us_per_instance``, spread over the
   steps; ``marginal_ratio_to_floor`` is the cost of one more step). Each
   timing is reported only if the three agree (float64: max |difference| <= 1e-8 relative,
   float32: 1e-3; identical regimes in both); the engine's ratio to the floor comes from the
   same run.
3. ``big``: ``--big`` instances x ``--steps`` steps of the context policy (float32) on
   ``--workers`` parallel single-threaded workers (default: the CPUs this process may use,
   :func:`gesim.threads.available_cpus`, so ``OMP_NUM_THREADS=1``, which keeps the comparisons
   on one thread, does not shrink the big run to one worker), wall time, and the regimes of its
   first ``--check`` instances against the weight-space engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: this tree's gesim

from gesim import threads  # noqa: E402
from gesim.output import write_json  # noqa: E402
from gesim.simulate import FIELDS, SimConfig, engine, logit, simulate, simulate_loop  # noqa: E402

BASE = SimConfig(policy="context", loss="dpo", vocab=256, dim=64, suffix=31, differ=1, eta=0.1)
POLICIES = {
    "context (vocab 256, dim 64, length 32)": BASE,
    "context, cli size (vocab 64, dim 32, length 9)": dataclasses.replace(BASE, vocab=64, dim=32, suffix=8),
    "free_logits (vocab 256, length 32)": dataclasses.replace(BASE, policy="free_logits"),
    "single_token (vocab 256, dim 64)": dataclasses.replace(BASE, policy="single_token", suffix=0),
}
#: Single-threaded comparisons are timed in CPU time of this process (time.process_time): on a
#: shared machine it excludes the time the scheduler gives to other jobs. The big run is wall time.
CLOCK = time.process_time
LOAD_NOTE = ("CPU time of this process for the single-threaded comparisons, wall time for the big run; "
             "how busy the machine was is in machine.load_average_before/after (2 CPUs: near 1 = nothing "
             "else running besides the bench); ratios within one run (interleaved, medians) are the "
             "meaningful numbers, absolute times move with the load")


def _median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return statistics.median(ts)


def floor_kernels(policy: str, n: int, T: int, V: int, d: int, dtype, repeats: int = 5) -> dict:
    """Median seconds per instance-step of the kernels the cheapest exact update must run."""
    count = logit.floor(policy, T, V, d)
    g = torch.Generator().manual_seed(0)
    rows = count["exps"] // V
    Z = torch.randn(n, 2 * T, V, generator=g, dtype=dtype)
    P = torch.empty(n, rows, V, dtype=dtype)
    Zs = Z[:, :rows].contiguous()
    B = torch.randn_like(Z)
    kernels = {"softmax": lambda: torch.ops.aten._softmax.out(Zs, -1, False, out=P),
               "pass": lambda: Z.add_(B, alpha=1e-30)}
    if count["gemm_flops"]:
        K = torch.randn(n, 2 * T, 2 * T, generator=g, dtype=dtype)
        kernels["gemm"] = lambda: torch.bmm(K, Z, out=B)
        if policy == "context":  # informational: the engine's layout of the same FLOPs (not in the floor)
            Kb = torch.randn(2 * n, 2 * T, T, generator=g, dtype=dtype)
            Bb = torch.empty(2 * n, 2 * T, V, dtype=dtype)
            kernels["gemm_engine_layout"] = lambda: torch.bmm(Kb, Z.view(2 * n, T, V), out=Bb)
    out = {}
    for name, fn in kernels.items():
        fn()
        out[name] = _median_time(lambda fn=fn: [fn() for _ in range(10)], repeats) / 10 / n
    out["floor"] = out.get("gemm", 0.0) + out["softmax"] + 3 * out["pass"]
    return out


def best_floor(policy, block, T, V, d, dtype) -> dict:
    """Each floor kernel at its best batch size (8 to 64 instances, or the engine's block): the
    floor is what the kernels can do, not what they do at the engine's choice of block."""
    runs = [floor_kernels(policy, n, T, V, d, dtype) for n in sorted({8, 16, 32, 64, block}) if n <= max(block, 8)]
    out = {k: min(r[k] for r in runs) for k in runs[0] if k != "floor"}
    out["floor"] = out.get("gemm", 0.0) + out["softmax"] + 3 * out["pass"]
    return out


def _parity(a, b, tol) -> dict:
    diff = max(float(np.nanmax(np.abs(a[k] - b[k]) / (1 + np.abs(b[k])))) for k in FIELDS if "regime" not in k)
    same = all(np.array_equal(a[k], b[k]) for k in ("pred_regime", "real_regime"))
    return {"max_rel_difference": diff, "tolerance": tol, "regimes_identical": same, "ok": bool(diff <= tol and same)}


def _three(cfg, loop_n, workers=1):
    """The three implementations on ``cfg`` (the loop on its first ``loop_n`` instances)."""
    return {"logit": lambda: simulate(cfg, engine="logit", workers=workers),
            "weights": lambda: simulate(cfg, engine="weights", workers=workers),
            "loop": lambda: simulate_loop(cfg, instances=loop_n)}


def parity(cfg, loop_n) -> dict:
    """The logit engine against the weight-space engine and the loop, in float64 (1e-8) and in
    ``cfg``'s float32 (1e-3, relative to 1 + |value|); regimes must be identical in both."""
    out = {}
    for dtype, tol in (("float64", 1e-8), ("float32", 1e-3)):
        c = dataclasses.replace(cfg, dtype=dtype, instances=min(cfg.instances, 64))
        r = {k: fn().arrays for k, fn in _three(c, loop_n).items()}
        first = {k: v[:, :loop_n] for k, v in r["logit"].items()}
        out[dtype] = {"logit_vs_loop": _parity(first, r["loop"], tol),
                      "logit_vs_weights": _parity(r["logit"], r["weights"], tol)}
    return out


def compare(label, cfg, repeats, loop_n) -> dict:
    """Interleaved, repeated CPU-time measurements of the three implementations and the floor
    kernels on ``cfg`` (float32), gated on :func:`parity`.

    The loop runs the first ``loop_n`` instances only (its cost is linear in them); times are
    compared per instance-step."""
    T = cfg.prefix + max(cfg.differ_w or cfg.differ, cfg.differ_l or cfg.differ) + cfg.suffix
    V, d = cfg.vocab, (T if cfg.policy == "free_logits" else cfg.dim)
    simulate(dataclasses.replace(cfg, instances=2, steps=1), workers=1)  # warm-up: sympy derivation
    simulate_loop(dataclasses.replace(cfg, instances=1, steps=1))
    checks = parity(cfg, loop_n)
    row = {"config": dataclasses.asdict(cfg), "floor_count": logit.floor(cfg.policy, T, V, d), "parity": checks,
           "repeats": repeats, "loop_instances": loop_n}
    if not all(p["ok"] for by_dtype in checks.values() for p in by_dtype.values()):
        row["timings"] = "withheld: the engines disagree"
        print(f"{label}: PARITY FAILED {checks}", flush=True)
        return row
    runs = _three(cfg, loop_n)
    runs["logit_1step"] = lambda: simulate(dataclasses.replace(cfg, steps=1), engine="logit", workers=1)
    work = {"logit": cfg.instances * cfg.steps, "weights": cfg.instances * cfg.steps, "loop": loop_n * cfg.steps,
            "logit_1step": cfg.instances}
    times, floors = {k: [] for k in runs}, []
    block = min(engine.block_size(cfg), cfg.instances)
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
        floors.append(best_floor(cfg.policy, block, T, V, d, getattr(torch, cfg.dtype)))
    med = {k: statistics.median(v) / work[k] for k, v in times.items()}  # seconds per instance-step
    floor_s = statistics.median(f["floor"] for f in floors)
    marginal = (med["logit"] * cfg.steps - med["logit_1step"]) / (cfg.steps - 1)
    row.update({
        "block": block,
        "us_per_instance_step": {k: 1e6 * v for k, v in med.items()},
        "floor_kernels_us_per_instance_step": {k: 1e6 * statistics.median(f[k] for f in floors) for k in floors[0]},
        "ratio_to_floor": med["logit"] / floor_s,
        # the cost of one more step, set-up (data, features, K) excluded: (t(S) - t(1)) / (S - 1)
        "marginal_us_per_instance_step": 1e6 * marginal,
        # what ratio_to_floor adds to the marginal one: the one-off set-up per instance (drawing W0
        # and the pairs, the features, Z0 = H W0^T, K), spread over the steps
        "setup_us_per_instance": 1e6 * (med["logit_1step"] - marginal),
        "marginal_ratio_to_floor": marginal / floor_s,
        "speedup_over_weight_space_engine": med["weights"] / med["logit"],
        "speedup_over_loop": med["loop"] / med["logit"]})
    print(f"{label}: logit {1e6 * med['logit']:.0f} us/inst-step, floor {1e6 * floor_s:.0f} us (ratio "
          f"{row['ratio_to_floor']:.2f}, marginal {row['marginal_ratio_to_floor']:.2f}), "
          f"x{row['speedup_over_weight_space_engine']:.1f} the weight-space engine, "
          f"x{row['speedup_over_loop']:.0f} the loop", flush=True)
    return row


def big_check(cfg, arrays, check) -> dict:
    """The big run's first ``check`` instances (same data: the first chunk) against the
    weight-space engine in float32 and a float64 reference: float32 rounding flips a few regimes
    where a realised change is near zero, in either engine."""
    sub = slice(0, check)
    runs = {"logit_float32": {k: v[:, sub] for k, v in arrays.items()}}
    with torch.no_grad(), threads.single():
        for name, dtype in (("weights_float32", "float32"), ("reference_float64", "float64")):
            c = dataclasses.replace(cfg, dtype=dtype)
            pol, inst, pairs = engine.make_data(c, 0, min(c.chunk, c.instances))
            runs[name] = engine.run_chunk(c, pol, inst.take(sub), pairs.take(sub), engine="weights")
    ref = runs.pop("reference_float64")
    out = {"instances": check}
    for name, a in runs.items():
        out[name + "_vs_float64"] = {
            "regimes_identical_fraction": float(np.mean(a["real_regime"] == ref["real_regime"])),
            "pred_regimes_identical_fraction": float(np.mean(a["pred_regime"] == ref["pred_regime"])),
            "max_rel_difference_lw": float(np.max(np.abs(a["lw"] - ref["lw"]) / (1 + np.abs(ref["lw"])))),
            "max_rel_difference_ll": float(np.max(np.abs(a["ll"] - ref["ll"]) / (1 + np.abs(ref["ll"]))))}
    return out


def big_run(n, steps, check, workers=None) -> dict:
    cfg = dataclasses.replace(BASE, instances=n, steps=steps, dtype="float32")
    workers = workers or threads.available_cpus()
    load = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulate(cfg, progress=True, workers=workers)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"config": dataclasses.asdict(cfg), "seconds": wall, "instance_steps_per_s": n * steps / wall,
           # CPU seconds of all workers together: / workers = the wall time if they had their cores
           "cpu_seconds": cpu, "workers": workers, "load_average_before": load,
           "load_average_after": os.getloadavg(), "summary": res.summary()}
    if check:
        out["check"] = big_check(cfg, res.arrays, check)
    print(f"big {n} x {steps} (float32, {out['workers']} workers): {wall:.1f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes: under 3 minutes on 2 quiet cores")
    ap.add_argument("--compare", type=int, default=None, help="instances in the comparison (default 256; quick 128)")
    ap.add_argument("--compare-steps", type=int, default=None, help="steps in the comparison (default 50; quick 20)")
    ap.add_argument("--loop", type=int, default=None, help="instances the loop runs (default 16; quick 4)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 3)")
    ap.add_argument("--big", type=int, default=None, help="instances in the large run (default 10000; quick 2000)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=None, help="single-threaded workers of the large run "
                    "(default: the CPUs this process may use)")
    ap.add_argument("--check", type=int, default=None, help="big-run instances checked against the weight-space "
                    "engine (default 500; quick 100)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulate.json"))
    args = ap.parse_args(argv)
    quick = args.quick
    n_cmp = args.compare or (128 if quick else 256)
    n_steps = args.compare_steps or (20 if quick else 50)
    loop_n = min(n_cmp, args.loop or (4 if quick else 16))
    repeats = args.repeats or 3
    big = args.big if args.big is not None else (2000 if quick else 10_000)
    check = args.check if args.check is not None else (100 if quick else 500)
    threads.configure()

    load0 = os.getloadavg()
    result = {"note": LOAD_NOTE, "quick": quick, "machine": {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpus": os.cpu_count(), "available_cpus": threads.available_cpus(), "load_average_before": load0}}
    result["floor_flops_per_instance_step"] = {
        label: logit.floor(c.policy, 1 + c.suffix, c.vocab, c.dim) for label, c in POLICIES.items()}
    result["compare"] = {}
    for label, base in POLICIES.items():
        cfg = dataclasses.replace(base, instances=n_cmp, steps=n_steps, dtype="float32")
        result["compare"][label] = compare(label, cfg, repeats, loop_n)
    if big:
        result["big"] = big_run(big, args.steps, check, args.workers)
    result["machine"]["load_average_after"] = os.getloadavg()
    write_json(Path(args.out), result)
    ok = all("timings" not in r for r in result["compare"].values())
    print(f"-> {args.out}" + ("" if ok else "  (PARITY FAILED: timings withheld)"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
