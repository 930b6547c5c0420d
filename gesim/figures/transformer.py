"""Figures from the small Transformer (theory.md section 5): the paper's sentiment study
offline, over seeds (issue 11).

All Transformer figures share one stream of seeds, derived from (seed, "transformer") like a
figure's own stream (:func:`seeds`), so they share their training runs (cached for the life of
the process by :func:`gesim.transformer.experiment.run_cached`) and ``--only NAME`` trains
exactly what a full run trains. Fast mode: 3 seeds; full mode: 10. Every JSON keeps the
per-seed rows next to the aggregate (mean and 95% t interval) and the claims ("holds in k/n").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gesim import registries
from gesim.figures import Context, figure

STRUCTURES = registries.PAPER_STRUCTURES
LOSSES = ("dpo", "ipo", "simpo")
COLORS = {"1t": "C0", "short-suffix": "C1", "long-suffix": "C3"}
N_SEEDS = {"fast": 3, "full": 10}


def seeds(ctx) -> tuple[int, ...]:
    """The Transformer figures' seeds: N_SEEDS[mode] consecutive seeds from the shared stream."""
    base = Context("transformer", ctx.mode, ctx.seed, ctx.device).figure_seed
    return tuple(base + i for i in range(N_SEEDS[ctx.mode]))


def config(ctx, **overrides):
    from gesim.transformer.train import TrainConfig

    preset = TrainConfig.fast if ctx.fast else TrainConfig.full
    return preset(device=ctx.device, **overrides)


def band(ax, x, per_seed, color, label):
    """Mean over seeds with its 95% t interval as a band (per_seed: (n_seeds, len(x)))."""
    from gesim import claims

    s = [claims.spread(col) for col in np.asarray(per_seed, float).T]
    mean = np.array([v.mean for v in s])
    ax.plot(x, mean, color=color, label=label)
    if s and s[0].n > 1:
        ax.fill_between(x, [v.lo for v in s], [v.hi for v in s], color=color, alpha=0.2, lw=0)


def structures(ctx, loss="dpo"):
    from gesim.transformer import experiment

    return experiment.structure_rows(seeds(ctx), config(ctx), loss=loss, tokens_on_first=loss == "dpo")


@figure("transformer_dynamics",
        "Small GPT, DPO after SFT, over seeds: chosen and rejected log-prob changes and the gradient cosine over "
        "training (mean with 95% band), for the 1t, short-suffix and long-suffix structures")
def transformer_dynamics(ctx):
    from gesim import plotting
    from gesim.transformer import experiment

    rows = structures(ctx)
    fig, axes = plotting.figure(1, 3, width=12, height=3.6)
    for name in STRUCTURES:
        mine = [r for r in rows if r["structure"] == name]
        steps = [h["step"] for h in mine[0]["history"]]
        lw = [[h["lw"] - r["history"][0]["lw"] for h in r["history"]] for r in mine]
        ll = [[h["ll"] - r["history"][0]["ll"] for h in r["history"]] for r in mine]
        cos = [[h["cos"] for h in r["history"]] for r in mine]
        for ax, vals in zip(axes, (lw, ll, cos)):
            band(ax, steps, vals, COLORS[name], name)
    for ax, title in zip(axes, (r"chosen: $l_w - l_w(0)$ (nats)", r"rejected: $l_l - l_l(0)$ (nats)",
                                r"mean $\cos(g_w, g_l)$")):
        ax.set_title(title)
        ax.set_xlabel("DPO step")
        ax.axhline(0, color="0.7", lw=0.8)
    axes[2].legend()
    table = experiment.claims_table(structures=rows)
    agg = experiment.aggregate(rows, ("structure",), experiment.SUMMARY + experiment.OUTCOMES)
    dlw = {a["structure"]: a["dlw"]["mean"] for a in agg}
    order = table[0]
    fig.suptitle(f"DPO, AdamW, {len(seeds(ctx))} seeds: mean chosen change 1t {dlw['1t']:+.3f}, short "
                 f"{dlw['short-suffix']:+.3f}, long {dlw['long-suffix']:+.3f} nats; cos order long > short > 1t "
                 f"holds in {order['holds']} seeds")
    fig.tight_layout()
    return fig, {"config": dataclasses.asdict(config(ctx)), "seeds": list(seeds(ctx)), "aggregate": agg,
                 "claims": table, "per_seed": rows}


def _token_summary(m: dict) -> dict:
    """Contrastive (first differing position) and shared (same word, same position) cosines."""
    cos, cw, cl = np.asarray(m["cos"]), m["chosen"], m["rejected"]
    diff = [t for t in range(min(len(cw), len(cl))) if cw[t] != cl[t]]
    shared = [cos[t, t] for t in range(min(len(cw), len(cl))) if cw[t] == cl[t]]
    off = cos[~np.eye(*cos.shape, dtype=bool)] if cos.size > 1 else np.array([])
    return {"contrastive_cos": float(cos[diff[0], diff[0]]) if diff else None,
            "shared_diag_cos_mean": float(np.mean(shared)) if shared else None,
            "shared_diag_cos_min": float(np.min(shared)) if shared else None,
            "off_diag_abs_mean": float(np.abs(off).mean()) if off.size else None}


@figure("token_cosine_heatmap",
        "Small GPT after DPO: cosines of per-token log-prob gradients, chosen tokens x rejected tokens, "
        "for one eval pair of each structure (theory.md prediction 11; first seed of the shared stream)")
def token_cosine_heatmap(ctx):
    from gesim import plotting
    from gesim.transformer import experiment
    from gesim.transformer.data import Language

    cfg = dataclasses.replace(config(ctx), seed=seeds(ctx)[0])
    vocab = Language().vocab
    fig, axes = plotting.figure(1, 3, width=13, height=4.6, gridspec_kw={"width_ratios": [1, 2, 5]})
    data = {"config": dataclasses.asdict(cfg), "seed": cfg.seed, "structures": {}}
    for ax, name in zip(axes, STRUCTURES):
        m = experiment.run_cached(name, "dpo", cfg)["token_cos_last"][0]
        cos = np.asarray(m["cos"])
        im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(m["rejected"])), [vocab[i] for i in m["rejected"]], rotation=90, fontsize=6)
        ax.set_yticks(range(len(m["chosen"])), [vocab[i] for i in m["chosen"]], fontsize=6)
        ax.set_title(f"{name}")
        ax.set_xlabel("rejected tokens")
        data["structures"][name] = _token_summary(m) | {"pair": m}
    axes[0].set_ylabel("chosen tokens")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label=r"$\cos(\nabla \log p_a, \nabla \log p_b)$")
    label = {k: v["contrastive_cos"] for k, v in data["structures"].items()}
    shared = data["structures"]["long-suffix"]["shared_diag_cos_mean"]
    fig.suptitle(f"Token gradients: label tokens point apart (cos {label['1t']:+.2f} / {label['short-suffix']:+.2f}"
                 f" / {label['long-suffix']:+.2f}); the same suffix word at the same position is nearly parallel "
                 f"(mean {shared:+.2f})")
    return fig, data


@figure("regime_agreement",
        "Small GPT: predicted against realised regime of one step on each eval pair alone (symbolic "
        "prediction with Adam-preconditioned products), per structure and loss, summed over seeds")
def regime_agreement(ctx):
    from gesim import claims, plotting, regimes

    short = ["ideal", "both\ndown", "both\nup", "w down\nl up", "stalled"]
    fig, axes = plotting.figure(len(LOSSES), len(STRUCTURES), width=10, height=9.8)
    data = {"config": dataclasses.asdict(config(ctx)), "seeds": list(seeds(ctx)), "regimes": list(regimes.REGIMES),
            "runs": {}, "per_seed": []}
    worst = 1.0
    for i, loss in enumerate(LOSSES):
        rows = structures(ctx, loss)
        data["per_seed"] += [{k: v for k, v in r.items() if k != "history"} for r in rows]
        for j, name in enumerate(STRUCTURES):
            mine = [r for r in rows if r["structure"] == name]
            C = np.sum([r["pair_confusion"] for r in mine], axis=0)
            pa, ba = (claims.spread(r[k] for r in mine) for k in ("pair_agreement", "regime_agreement"))
            worst = min(worst, pa.mean)
            ax = axes[i, j]
            ax.imshow(np.log1p(C), cmap="Greens")
            for (p, r), c in np.ndenumerate(C):
                if c:
                    ax.text(r, p, str(c), ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(short)), short, fontsize=6)
            ax.set_yticks(range(len(short)), short, fontsize=6)
            ax.set_title(f"{loss}, {name}: one-pair {pa.mean:.2f}\nbatch {ba}", fontsize=8)
            data["runs"].setdefault(name, {})[loss] = {"pair_agreement": pa.as_dict(), "batch_agreement": ba.as_dict(),
                                                      "pair_confusion": C.tolist()}
        axes[i, 0].set_ylabel("predicted regime")
    for ax in axes[-1]:
        ax.set_xlabel("realised regime")
    fig.suptitle(f"Regime agreement over {len(seeds(ctx))} seeds (counts summed): one-pair check at least "
                 f"{worst:.2f} in every cell; batch = the actual AdamW step, mean [95% interval]")
    fig.tight_layout()
    return fig, data
