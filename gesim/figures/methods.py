"""Figures of the mitigations (docs/theory.md section 6): regimes, Fish, alignment tax.

``mitigation_regimes`` and ``entanglement_by_method`` share their runs: the small GPT after
SFT on ``long-suffix`` (where DPO entangles), trained by SGD with each method's objective;
every measured step records the one-pair check of the method's own step (the fraction of
eval pairs whose chosen log-prob rises and rejected falls when stepping on that pair alone).
"""

from __future__ import annotations

import copy
from functools import cache

import numpy as np

from gesim.figures import figure

METHODS = ("dpo", "pngd", "calibrated", "token_mask", "fish_disentangle", "rpo")


def _cfg(ctx):
    from gesim.transformer.train import TrainConfig

    preset = TrainConfig.fast if ctx.fast else TrainConfig.full
    return preset(seed=ctx.seed, device=ctx.device, optimizer="sgd", lr=1e-2)


@cache
def _method_run(method: str, cfg):
    import torch

    from gesim.methods import fish, masking, pairwise
    from gesim.transformer import Language
    from gesim.transformer.train import run, sft_model

    if method in ("dpo", "rpo", "dpop"):
        return run("long-suffix", method, cfg=cfg)
    if method == "pngd":
        return run("long-suffix", "dpo", cfg=cfg, objective=pairwise.pngd_objective())
    if method == "calibrated":
        return run("long-suffix", "dpo", cfg=cfg, objective=pairwise.calibrated_objective())
    if method == "fish_disentangle":
        return run("long-suffix", "dpo", cfg=cfg, objective=fish.disentangle_objective(alpha=0.05, seed=cfg.seed))
    ref = copy.deepcopy(sft_model("long-suffix", cfg)[0]).requires_grad_(False)
    mask = masking.TokenMask(len(Language()), init=2.0, lam=0.2)
    out = run("long-suffix", "dpo", cfg=cfg, objective=mask.objective(ref_model=ref),
              make_optimizer=lambda m: mask.optimizer(m, cfg.lr, 0.1))
    vocab = Language().vocab
    weights = dict(zip(vocab, mask.weights(torch.arange(len(vocab))).detach().tolist()))
    return out | {"mask_weights": {w: weights[w] for w in ("positive", "negative", "<eos>", "rated", "on", "paris")}}


def _summary(h):
    return {"steps": [r["step"] for r in h], "ideal_fraction": [r["pair_ideal_fraction"] for r in h],
            "batch_ideal_fraction": [r["ideal_fraction"] for r in h], "cos": [r["cos"] for r in h],
            "final_lw_change": h[-1]["lw"] - h[0]["lw"], "final_ll_change": h[-1]["ll"] - h[0]["ll"],
            "final_margin_change": h[-1]["margin"] - h[0]["margin"]}


@figure("mitigation_regimes",
        "Small GPT on long-suffix pairs, SGD: fraction of eval pairs in the ideal regime (one-pair step of "
        "each method) over training, and the final chosen / rejected log-prob changes")
def mitigation_regimes(ctx):
    from gesim import plotting

    cfg = _cfg(ctx)
    fig, axes = plotting.figure(1, 2, width=11, height=3.8)
    data = {}
    for i, m in enumerate(METHODS):
        s = _summary(_method_run(m, cfg)["history"])
        data[m] = s
        axes[0].plot(s["steps"], s["ideal_fraction"], marker="o", ms=3, label=m)
        axes[1].bar(i - 0.2, s["final_lw_change"], 0.4, color="#4c9f70")
        axes[1].bar(i + 0.2, s["final_ll_change"], 0.4, color="#d1495b")
    axes[0].set(xlabel="step", ylabel="fraction of ideal pairs", title="ideal regime, one-pair step",
                ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(range(len(METHODS)), METHODS, rotation=30, fontsize=7)
    axes[1].axhline(0, color="0.5", lw=0.8)
    axes[1].set_title("final change: chosen (green), rejected (red)")
    fig.tight_layout()
    return fig, {**data, "config": _method_run("dpo", cfg)["config"]}


@figure("entanglement_by_method",
        "Small GPT on long-suffix pairs, SGD: mean gradient cosine cos(g_w, g_l) over training per method")
def entanglement_by_method(ctx):
    from gesim import plotting

    cfg = _cfg(ctx)
    fig, ax = plotting.figure(1, 1, width=6, height=3.8)
    data = {}
    for m in METHODS:
        s = _summary(_method_run(m, cfg)["history"])
        ax.plot(s["steps"], s["cos"], marker="o", ms=3, label=m)
        data[m] = {"steps": s["steps"], "cos": s["cos"]}
    ax.set(xlabel="step", ylabel="mean cos(g_w, g_l)", title="entanglement over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, data


@figure("fish_expansion",
        "Fish's expected update against SGD on L - gamma G_hat, gamma = alpha (S - 1) / 4: relative error "
        "against the inner step alpha (float64 MLP, S = 3 domains)")
def fish_expansion(ctx):
    from gesim import plotting
    from gesim.methods.fish import expansion_error

    alphas = list(np.geomspace(0.4, 0.003, 8 if ctx.fast else 16))
    out = expansion_error(alphas, S=3, seed=ctx.figure_seed % 1000)
    fig, ax = plotting.figure(1, 1, width=5, height=3.8)
    ax.loglog(out["alpha"], out["rel_error"], "o-", label=f"whole update (slope {out['slope']:.2f})")
    ax.loglog(out["alpha"], out["rel_error_second_order"], "s-",
              label=f"its alpha^2 part (slope {out['slope_second_order']:.2f})")
    ax.set(xlabel="inner step alpha", ylabel="relative error", title="Fish = SGD on L - gamma G_hat + O(alpha^3)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, out


@figure("alignment_tax_pareto",
        "Pretrain -> SFT -> DPO on the small GPT: reward (P(correct label)) against tax (SFT suffix NLL increase) "
        "for early stopping, model averaging, HMA and OMO (OnDARE, OnTIES)")
def alignment_tax_pareto(ctx):
    from gesim import plotting
    from gesim.methods.harness import TaxConfig, tax_study
    from gesim.transformer.train import TrainConfig

    preset = TaxConfig.fast if ctx.fast else TaxConfig.full
    model = (TrainConfig.fast if ctx.fast else TrainConfig.full)(seed=ctx.seed, device=ctx.device)
    out = tax_study(preset(model=model))
    fig, ax = plotting.figure(1, 1, width=6, height=4.2)
    styles = {"early_stopping": "o-", "model_averaging": "s-", "hma": "D", "omo_dare": "^-", "omo_ties": "v-"}
    for name, style in styles.items():
        pts = out[name]
        ax.plot([p["tax"] for p in pts], [p["reward"] for p in pts], style, ms=4, label=name)
    ax.set(xlabel="tax: SFT suffix NLL - its SFT value (nats/token)", ylabel="reward: P(correct label)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, out
