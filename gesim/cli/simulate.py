"""``python -m gesim simulate``: preference optimisation on synthetic policies, per suffix length."""

from __future__ import annotations

import argparse

import numpy as np

from gesim import registries
from gesim.cli.options import add_format_option, add_param_option, dump_json, parse_params, positive_float, positive_int
from gesim.errors import GesimError

#: Per-step arrays that must stay finite; cos must also lie in [-1, 1] where both norms are > 0.
WATCHED = ("lw", "ll", "d_w", "d_l", "ip", "nw2", "nl2", "pred_dlw", "pred_dll", "real_dlw", "real_dll")


def suffix_list(text: str) -> list[int]:
    """argparse type: comma-separated non-negative suffix lengths, e.g. ``0,2,8,32``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"suffix lengths must be integers >= 0, got {text}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="simulate preference optimisation on synthetic policies",
        description="Train many independent synthetic policies, each on one pair (a differing token "
        "then a shared suffix), and report per suffix length the mean cos(g_w, g_l), the fractions "
        "of instance-steps whose realised chosen change is negative (p_chosen_down) or rejected change "
        "positive (p_rejected_up), and the agreement of realised and first-order predicted regimes.")
    p.add_argument("--policy", choices=registries.POLICIES, default="context",
                   help="synthetic policy (default context)")
    p.add_argument("--loss", default="dpo", metavar="NAME", help="a registered loss (default dpo)")
    add_param_option(p)
    p.add_argument("--suffix", type=suffix_list, default=None,
                   help="shared-suffix lengths, comma-separated (default 0,2,8,32; 0 for single_token)")
    p.add_argument("--instances", type=positive_int, default=400, help="independent instances (default 400)")
    p.add_argument("--steps", type=positive_int, default=5, help="optimisation steps (default 5)")
    p.add_argument("--eta", type=positive_float, default=0.1, help="step size (default 0.1)")
    p.add_argument("--rule", "--optimizer", dest="rule", choices=registries.RULES, default="sgd",
                   help="update rule: sgd, adam, or the mitigations pngd (pairwise-normalised) and calibrated "
                   "(default sgd; --optimizer is its former, deprecated name)")
    p.add_argument("--vocab", type=positive_int, default=64, help="vocabulary size (default 64)")
    p.add_argument("--dim", type=positive_int, default=32, help="feature dimension (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--progress", action="store_true",
                   help="show progress on stderr: a bar on a terminal, one line per suffix length otherwise")
    add_format_option(p)
    p.set_defaults(func=run)


def divergence(arrays: dict):
    """(step index, what went wrong) of the first step whose numbers are not numbers any more, or None.

    Log-probs, loss weights, norms and changes must be finite; the geometry must obey
    Cauchy-Schwarz, |ip| <= ||g_w|| ||g_l|| (a huge step saturates the softmax and the
    gradients underflow unevenly); cos(g_w, g_l) must be finite and within [-1, 1] except
    where a gradient is exactly zero together with ip (then cos is undefined, not divergent)."""
    a = arrays
    found = {f"{k} is inf/NaN": ~np.isfinite(a[k]) for k in WATCHED}
    with np.errstate(invalid="ignore", over="ignore"):
        bound = np.sqrt(np.abs(a["nw2"])) * np.sqrt(np.abs(a["nl2"]))
        found["|ip| > ||g_w|| ||g_l|| (gradients under- or overflowed)"] = np.abs(a["ip"]) > bound * (1 + 1e-6)
        zero = (a["ip"] == 0) & ((a["nw2"] == 0) | (a["nl2"] == 0))
        found["cos(g_w, g_l) is outside [-1, 1]"] = ~(np.abs(a["cos"]) <= 1 + 1e-6) & ~zero
    hits = [(int(np.flatnonzero(v.any(axis=1))[0]), k) for k, v in found.items() if v.any()]
    return min(hits) if hits else None


def suffix_rows(cfg, suffixes, progress=False) -> list[dict]:
    """One summary row per suffix length; refuses a run whose numbers overflowed."""
    import dataclasses
    import sys
    import time

    from gesim.simulate import simulate

    bar = progress and sys.stderr.isatty()  # a bar on a terminal, one line per suffix in logs
    rows = []
    for i, suffix in enumerate(suffixes, 1):
        t0 = time.perf_counter()
        res = simulate(dataclasses.replace(cfg, suffix=int(suffix)), bar)
        if progress and not bar:
            print(f"[{i}/{len(suffixes)}] suffix {suffix}: {cfg.instances} instances x {cfg.steps} steps in "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        hit = divergence(res.arrays)
        if hit is not None:
            step, what = hit
            worst = float(np.min(np.minimum(res.arrays["lw"][step], res.arrays["ll"][step])))
            raise GesimError(
                f"diverged at step {step + 1} of {cfg.steps} (suffix {suffix}): {what}, log-probs down to "
                f"{worst:.3g}; the step size --eta {cfg.eta:g} is likely too large for --rule "
                f"{cfg.rule}, try a smaller one")
        s = res.summary()
        rows.append({"loss": cfg.loss, "suffix": int(suffix), **{k: s[k] for k in (
            "instances", "steps", "mean_cos", "p_chosen_down", "p_rejected_up", "regime_agreement")},
            "realised_regimes": s["realised_regimes"], "predicted_regimes": s["predicted_regimes"]})
    return rows


def run(args) -> int:
    from gesim.simulate import SimConfig

    suffixes = args.suffix if args.suffix is not None else ([0] if args.policy == "single_token" else [0, 2, 8, 32])
    if args.policy == "single_token" and any(suffixes):
        raise GesimError("the single_token policy has one-token responses: use --suffix 0")
    cfg = SimConfig(policy=args.policy, loss=args.loss, params=parse_params(args.param),
                    instances=args.instances, steps=args.steps, eta=args.eta, rule=args.rule,
                    seed=args.seed, vocab=args.vocab, dim=args.dim)
    cfg.check()
    rows = suffix_rows(cfg, suffixes, progress=args.progress)
    for r in rows:
        r.update(policy=cfg.policy, rule=cfg.rule, eta=cfg.eta, seed=cfg.seed)
    if args.format == "json":
        print(dump_json(rows))
    else:
        print(f"policy={cfg.policy} loss={cfg.loss} rule={cfg.rule} eta={cfg.eta:g} "
              f"instances={cfg.instances} steps={cfg.steps} seed={cfg.seed}")
        print(f"{'suffix':>6}  {'mean_cos':>8}  {'p_chosen_down':>13}  {'p_rejected_up':>13}  {'regime_agreement':>16}")
        for r in rows:
            print(f"{r['suffix']:>6}  {r['mean_cos']:>8.3f}  {r['p_chosen_down']:>13.4f}  "
                  f"{r['p_rejected_up']:>13.4f}  {r['regime_agreement']:>16.4f}")
    return 0
