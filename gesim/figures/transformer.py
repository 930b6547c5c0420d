"""Figures from the small Transformer (theory.md section 5): the paper's sentiment study offline.

The three figures share their training runs (one SFT per dataset, one preference run per
(dataset, loss)), cached for the life of the process.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from gesim.figures import figure

DATASETS = ("1t", "short-suffix", "long-suffix")
LOSSES = ("dpo", "ipo", "simpo")
HEADLINE = ("cos_first", "cos_last", "cos_mean", "lw_start", "lw_end", "ll_start", "ll_end", "regime_agreement",
            "pair_agreement")


def _cfg(ctx):
    from gesim.transformer.train import TrainConfig

    preset = TrainConfig.fast if ctx.fast else TrainConfig.full
    return preset(seed=ctx.seed, device=ctx.device)


@cache
def _run(dataset: str, loss: str, cfg):
    from gesim.transformer.train import run

    return run(dataset, loss, cfg=cfg)


@figure("transformer_dynamics",
        "Small GPT, DPO after SFT: chosen and rejected log-probs and the gradient cosine over training, "
        "for the 1t, short-suffix and long-suffix datasets")
def transformer_dynamics(ctx):
    from gesim import plotting

    cfg = _cfg(ctx)
    fig, axes = plotting.figure(1, 3, width=12, height=3.4)
    data = {"config": None, "datasets": {}}
    for name in DATASETS:
        out = _run(name, "dpo", cfg)
        h = out["history"]
        steps = [r["step"] for r in h]
        axes[0].plot(steps, [r["lw"] - h[0]["lw"] for r in h], label=name)
        axes[1].plot(steps, [r["ll"] - h[0]["ll"] for r in h], label=name)
        axes[2].plot(steps, [r["cos"] for r in h], label=name)
        data["config"] = out["config"]
        data["datasets"][name] = {k: out[k] for k in HEADLINE} | {"history": h}
    for ax, title in zip(axes, ("chosen: lw - lw(start)", "rejected: ll - ll(start)", "mean cos(g_w, g_l)")):
        ax.set_title(title)
        ax.set_xlabel("DPO step")
        ax.axhline(0, color="0.7", lw=0.8)
    axes[2].legend()
    fig.suptitle("Shared suffixes entangle: 1t has cos < 0 and chosen up; the long suffix has cos near 1 and "
                 "chosen down (DPO, AdamW)")
    fig.tight_layout()
    return fig, data


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
        "for one eval pair of each dataset (theory.md prediction 11)")
def token_cosine_heatmap(ctx):
    from gesim import plotting
    from gesim.transformer.data import Language

    cfg = _cfg(ctx)
    vocab = Language().vocab
    fig, axes = plotting.figure(1, 3, width=13, height=4.6, gridspec_kw={"width_ratios": [1, 2, 5]})
    data = {"config": None, "datasets": {}}
    for ax, name in zip(axes, DATASETS):
        out = _run(name, "dpo", cfg)
        m = out["token_cos_last"][0]
        cos = np.asarray(m["cos"])
        im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(m["rejected"])), [vocab[i] for i in m["rejected"]], rotation=90, fontsize=6)
        ax.set_yticks(range(len(m["chosen"])), [vocab[i] for i in m["chosen"]], fontsize=6)
        ax.set_title(f"{name}")
        ax.set_xlabel("rejected tokens")
        data["config"] = out["config"]
        data["datasets"][name] = _token_summary(m) | {"pair": m}
    axes[0].set_ylabel("chosen tokens")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="cos(grad log p_a, grad log p_b)")
    fig.suptitle("Token gradients: the label tokens point apart (blue); the same suffix word at the same "
                 "position is nearly parallel (red diagonal)")
    return fig, data


@figure("regime_agreement",
        "Small GPT: predicted against realised regime of one step on each eval pair alone (symbolic "
        "prediction with Adam-preconditioned products), per dataset and loss")
def regime_agreement(ctx):
    from gesim import plotting, regimes

    cfg = _cfg(ctx)
    short = ["ideal", "both\ndown", "both\nup", "w down\nl up", "stalled"]
    fig, axes = plotting.figure(len(LOSSES), len(DATASETS), width=10, height=9.5)
    data = {"config": None, "regimes": list(regimes.REGIMES), "runs": {}}
    for i, loss in enumerate(LOSSES):
        for j, name in enumerate(DATASETS):
            out = _run(name, loss, cfg)
            C = np.asarray(out["pair_confusion"])
            ax = axes[i, j]
            ax.imshow(np.log1p(C), cmap="Greens")
            for (p, r), c in np.ndenumerate(C):
                if c:
                    ax.text(r, p, str(c), ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(short)), short, fontsize=6)
            ax.set_yticks(range(len(short)), short, fontsize=6)
            ax.set_title(f"{loss}, {name}: {out['pair_agreement']:.2f} (batch {out['regime_agreement']:.2f})")
            data["config"] = out["config"]
            data["runs"].setdefault(name, {})[loss] = {k: out[k] for k in HEADLINE} | {
                "pair_confusion": out["pair_confusion"], "batch_confusion": out["batch_confusion"]}
        axes[i, 0].set_ylabel("predicted")
    for ax in axes[-1]:
        ax.set_xlabel("realised")
    fig.suptitle("Regime agreement: one-pair check (title: its agreement; batch: the actual AdamW step)")
    fig.tight_layout()
    return fig, data
