"""``python -m gesim simulate``: preference optimisation on synthetic policies, per suffix length."""

from __future__ import annotations

import argparse

from gesim.cli.options import add_format_option, add_param_option, dump_json, finite_float, parse_params, positive_int
from gesim.errors import GesimError

POLICIES = ("single_token", "free_logits", "context")
OPTIMIZERS = ("sgd", "adam", "pngd", "calibrated")


def suffix_list(text: str) -> list[int]:
    """argparse type: comma-separated non-negative suffix lengths, e.g. ``0,2,8,32``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"suffix lengths must be non-negative integers, got {text!r}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="simulate preference optimisation on synthetic policies",
        description="Train many independent synthetic policies, each on one pair (a differing token "
        "then a shared suffix), and report per suffix length the mean cos(g_w, g_l), the fractions "
        "of instance-steps whose realised chosen change is negative (p_chosen_down) or rejected change "
        "positive (p_rejected_up), and the agreement of realised and first-order predicted regimes.")
    p.add_argument("--policy", choices=POLICIES, default="context", help="synthetic policy (default context)")
    p.add_argument("--loss", default="dpo", metavar="NAME", help="a registered loss (default dpo)")
    add_param_option(p)
    p.add_argument("--suffix", type=suffix_list, default=None,
                   help="shared-suffix lengths, comma-separated (default 0,2,8,32; 0 for single_token)")
    p.add_argument("--instances", type=positive_int, default=400, help="independent instances (default 400)")
    p.add_argument("--steps", type=positive_int, default=5, help="optimisation steps (default 5)")
    p.add_argument("--eta", type=finite_float, default=0.1, help="step size (default 0.1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="update rule: sgd, adam, or the mitigations pngd (pairwise-normalised) and calibrated "
                   "(default sgd)")
    p.add_argument("--vocab", type=positive_int, default=64, help="vocabulary size (default 64)")
    p.add_argument("--dim", type=positive_int, default=32, help="feature dimension (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    add_format_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import gesim.methods.pairwise  # noqa: F401  (registers the pngd and calibrated rules)
    from gesim.simulate import SimConfig, sweeps

    suffixes = args.suffix if args.suffix is not None else ([0] if args.policy == "single_token" else [0, 2, 8, 32])
    if args.policy == "single_token" and any(suffixes):
        raise GesimError("the single_token policy has one-token responses: use --suffix 0")
    if args.eta <= 0:
        raise GesimError(f"--eta must be positive, got {args.eta:g}")
    cfg = SimConfig(policy=args.policy, loss=args.loss, params=parse_params(args.param),
                    instances=args.instances, steps=args.steps, eta=args.eta, optimizer=args.optimizer,
                    seed=args.seed, vocab=args.vocab, dim=args.dim)
    cfg.check()
    rows = sweeps.suffix_sweep(cfg, suffixes, progress=args.progress)
    for r in rows:
        r.update(policy=cfg.policy, optimizer=cfg.optimizer, eta=cfg.eta, seed=cfg.seed)
    if args.format == "json":
        print(dump_json(rows))
    else:
        print(f"policy={cfg.policy} loss={cfg.loss} optimizer={cfg.optimizer} eta={cfg.eta:g} "
              f"instances={cfg.instances} steps={cfg.steps} seed={cfg.seed}")
        print(f"{'suffix':>6}  {'mean_cos':>8}  {'p_chosen_down':>13}  {'p_rejected_up':>13}  {'regime_agreement':>16}")
        for r in rows:
            print(f"{r['suffix']:>6}  {r['mean_cos']:>8.3f}  {r['p_chosen_down']:>13.4f}  "
                  f"{r['p_rejected_up']:>13.4f}  {r['regime_agreement']:>16.4f}")
    return 0
