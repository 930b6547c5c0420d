"""``python -m gesim transformer``: SFT then preference optimisation of the small GPT on one
synthetic pair structure, with the entanglement measurements of :mod:`gesim.transformer.train`."""

from __future__ import annotations

from gesim import claims, registries
from gesim.cli.options import (
    add_format_option,
    add_param_option,
    dump_json,
    parse_params,
    positive_float,
    positive_int,
)
from gesim.errors import GesimError


def add_parser(sub) -> None:
    p = sub.add_parser("transformer", help="train the small GPT and measure entanglement (SFT, then a loss)",
                       description="SFT on the offline review language, then preference optimisation with a "
                       "registered loss; reports gradient cosines, log-prob changes and the agreement of "
                       "predicted and realised regimes on a fixed eval set.")
    p.add_argument("--structure", "--dataset", dest="structure", choices=registries.STRUCTURES, default="1t",
                   help="pair structure (default 1t; --dataset is its former, deprecated name)")
    p.add_argument("--loss", default="dpo", metavar="NAME", help="a registered loss (default dpo)")
    add_param_option(p)
    p.add_argument("--mode", choices=registries.MODES, default="fast", help="config preset (default fast)")
    p.add_argument("--device", choices=registries.DEVICES, default="cpu", help="device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--seeds", default=None, metavar="SPEC",
                   help="run several seeds, e.g. 0-9 or 0,3,7: per-seed rows, mean and 95%% interval of every "
                   "summary number, and each claim as 'holds in k/n' (with --out: one folder per seed)")
    p.add_argument("--arch", choices=registries.ARCHS, default="gpt",
                   help="gpt: gesim's small GPT; hf-gpt2: a Hugging Face GPT-2 built from a config (default gpt)")
    p.add_argument("--optimizer", choices=registries.TORCH_OPTIMIZERS, default="adamw",
                   help="preference optimizer (default adamw)")
    p.add_argument("--lr", type=positive_float, default=None, help="preference learning rate (default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=None, help="preference steps (default: the preset's)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write sft.pt, checkpoint.pt, metrics.csv and summary.json here")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="checkpoint every N preference steps (default: the preset's)")
    p.add_argument("--telemetry", choices=registries.TELEMETRY, default="off",
                   help="record every training pair of every step from the step's own backward: 'pairs' (own-step "
                   "regime, cos, ip/nw2/nl2), 'batch' (also the batch step's regime); per-step fractions in "
                   "metrics.csv, per-pair rows in DIR/train_pairs/ (default off)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    add_format_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from gesim import losses
    from gesim.output import check_out_dir
    from gesim.transformer.train import TrainConfig
    from gesim.transformer.train import run as train

    params = parse_params(args.param)
    losses.get(args.loss).params(**params)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise GesimError("--device cuda was asked for but no CUDA device is available")
    check_out_dir(args.out, "--out")
    if args.resume and not args.out:
        raise GesimError("--resume needs --out DIR, the folder of the interrupted run")
    seeds = None if args.seeds is None else claims.parse_seeds(args.seeds)
    runs = [Path(args.out or ".")] if seeds is None else [Path(args.out or ".") / f"seed-{s}" for s in seeds]
    if args.resume and not any((d / "checkpoint.pt").is_file() for d in runs):
        raise GesimError(f"--resume: nothing to resume in {args.out} (no checkpoint.pt there); "
                         "drop --resume to start a new run")
    preset = TrainConfig.fast if args.mode == "fast" else TrainConfig.full
    overrides = {k: v for k, v in (("lr", args.lr), ("pref_steps", args.steps),
                                   ("checkpoint_every", args.checkpoint_every)) if v is not None}
    cfg = preset(seed=args.seed, device=args.device, arch=args.arch, optimizer=args.optimizer,
                 telemetry=args.telemetry, **overrides)
    if seeds is not None:
        return _many(args, params, cfg, seeds)
    out = train(args.structure, args.loss, params, cfg, progress=args.progress, out=args.out, resume=args.resume)
    _check_finite(out.get("history", []), cfg)
    if args.format == "json":
        print(dump_json(out))
        return 0
    keys = ("structure", "loss", "steps", "cos_first", "cos_last", "cos_mean", "lw_start", "lw_end", "ll_start",
            "ll_end", "regime_agreement", "pair_agreement")
    print("\n".join(f"{k:<17} {out[k]:.4f}" if isinstance(out[k], float) else f"{k:<17} {out[k]}" for k in keys))
    return 0


def diverged_at(history):
    """The first measured step whose loss, log-probs or cosine is not a finite number, or None."""
    import math

    for row in history:
        if not all(math.isfinite(row[k]) for k in ("loss", "lw", "ll", "cos") if k in row):
            return row.get("step")
    return None


def _check_finite(history, cfg) -> None:
    step = diverged_at(history)
    if step is not None:
        raise GesimError(f"diverged: loss, log-probs or cos(g_w, g_l) became inf/NaN by step {step}; "
                         f"the learning rate (--lr {cfg.lr:g}) is likely too large for --optimizer {cfg.optimizer}")


def _many(args, params, cfg, seeds) -> int:
    """``--seeds``: one run per seed, then the per-seed rows, their spread and the claims."""
    import dataclasses
    from pathlib import Path

    from gesim.transformer import experiment
    from gesim.transformer.train import run as train

    rows = []
    for seed in seeds:
        out_dir = Path(args.out) / f"seed-{seed}" if args.out else None
        out = train(args.structure, args.loss, params, dataclasses.replace(cfg, seed=seed), progress=args.progress,
                    out=out_dir, resume=args.resume)
        _check_finite(out.get("history", []), dataclasses.replace(cfg, seed=seed))
        rows.append({"seed": seed, **{k: out[k] for k in experiment.SUMMARY},
                     **{k: out["outcomes"][k] for k in experiment.OUTCOMES}})
    keys = experiment.SUMMARY + experiment.OUTCOMES
    agg = {k: claims.spread(r[k] for r in rows) for k in keys}
    table = experiment.run_claims(rows)
    if args.format == "json":
        print(dump_json({"structure": args.structure, "loss": args.loss, "params": params, "seeds": list(seeds),
                         "config": dataclasses.asdict(cfg), "aggregate": {k: v.as_dict() for k, v in agg.items()},
                         "claims": table, "per_seed": rows}))
        return 0
    print(f"{args.structure}, {args.loss}, {len(seeds)} seeds ({args.seeds}); mean [95% t interval]")
    print("seed  " + "  ".join(f"{k:>10}" for k in ("cos_first", "cos_last", "dlw", "dll", "chosen_fell",
                                                     "pair_agree")))
    for r in rows:
        print(f"{r['seed']:<5} " + "  ".join(f"{r[k]:>+10.4f}" for k in ("cos_first", "cos_last", "dlw", "dll",
                                                                         "chosen_fell", "pair_agreement")))
    print()
    print("\n".join(f"{k:<17} {v}" for k, v in agg.items()))
    print()
    print("\n".join(f"{c['holds']:>6}  {c['claim']}" for c in table))
    return 0
