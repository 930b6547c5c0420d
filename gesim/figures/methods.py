"""Figures of the mitigations (docs/theory.md section 6): regimes, Fish, alignment tax.

Every Transformer figure here runs several seeds and shows means with 95% t intervals
(:mod:`gesim.claims`) and the per-seed values (in the JSON). The seeds come from
``ctx.figure_seed``: ``mitigation_regimes`` and ``entanglement_by_method`` share their runs, so
both derive theirs from the ``mitigation_regimes`` stream (:func:`_seeds`).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from gesim.figures import Context, figure

N_SEEDS = {"fast": 3, "full": 8}


def _seeds(ctx, stream: str) -> tuple[int, ...]:
    """``N_SEEDS[mode]`` consecutive seeds starting from the figure seed of (ctx.seed, stream)."""
    base = Context(stream, ctx.mode, ctx.seed, ctx.device).figure_seed % 100_000
    return tuple(range(base, base + N_SEEDS[ctx.mode]))


@cache
def _mitigations(seeds: tuple, fast: bool, device: str) -> dict:
    from gesim.methods.mitigation import mitigation_study

    return mitigation_study(seeds, fast=fast, device=device)


def _err(s: dict):
    """(mean, [[mean - lo], [hi - mean]]) of a spread dict, for errorbar."""
    return s["mean"], [[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]]


def _bars(ax, spreads, offset, width, color, label, per_seed=None):
    for i, s in enumerate(spreads):
        m, e = _err(s)
        ax.bar(i + offset, m, width, color=color, label=label if i == 0 else None)
        ax.errorbar(i + offset, m, yerr=e, color="k", capsize=2, lw=0.8)
        if per_seed is not None:
            ax.plot([i + offset] * len(per_seed[i]), per_seed[i], ".", color="k", ms=2)


@figure("mitigation_regimes",
        "Small GPT after SFT on long-suffix pairs, AdamW (lr 3e-4, 40 steps) where plain DPO lowers the chosen "
        "log-prob: realised changes of chosen / rejected log-probs, ideal-regime fraction and margin change per "
        "method, means with 95% intervals over seeds")
def mitigation_regimes(ctx):
    from gesim import plotting
    from gesim.methods.mitigation import METHODS

    out = _mitigations(_seeds(ctx, "mitigation_regimes"), ctx.fast, ctx.device)
    t, per = out["table"], out["per_seed"]
    col = lambda k: [[r[k] for r in per[m]] for m in METHODS]  # noqa: E731
    fig, axes = plotting.figure(1, 3, width=15, height=4.2)
    _bars(axes[0], [t[m]["dlw"] for m in METHODS], -0.2, 0.4, "#4c9f70", r"chosen $\Delta l_w$", col("dlw"))
    _bars(axes[0], [t[m]["dll"] for m in METHODS], 0.2, 0.4, "#d1495b", r"rejected $\Delta l_l$", col("dll"))
    axes[0].set(ylabel="realised change over training (nats, summed over response)", title="chosen and rejected")
    _bars(axes[1], [t[m]["pair_ideal_fraction"] for m in METHODS], -0.2, 0.4, "#2e86ab",
          "one-pair step", col("pair_ideal_fraction"))
    _bars(axes[1], [t[m]["batch_ideal_fraction"] for m in METHODS], 0.2, 0.4, "#f18f01",
          "actual batch step", col("batch_ideal_fraction"))
    axes[1].set(ylabel="fraction of eval pairs ideal (per step, mean)", ylim=(0, 1.05), title="ideal regime")
    _bars(axes[2], [t[m]["margin_change"] for m in METHODS], 0, 0.6, "#6c757d", None, col("margin_change"))
    axes[2].set(ylabel=r"margin change $\Delta(l_w - l_l)$ (nats)", title="final margin")
    for ax in axes:
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=35, fontsize=7)
        ax.axhline(0, color="0.5", lw=0.8)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    falls = out["dpo_chosen_falls"]
    d = t["dpo"]["dlw"]
    fig.suptitle(f"Plain DPO lowers the chosen log-prob in {falls['k']}/{falls['n']} seeds "
                 f"(mean {d['mean']:+.2f} nats); bars: mean, whiskers: 95% t interval, dots: seeds")
    fig.tight_layout()
    return fig, out


@figure("entanglement_by_method",
        "Small GPT on long-suffix pairs, AdamW: change of the mean gradient cosine cos(g_w, g_l) over training, "
        "one panel per method (grey: plain DPO), mean and 95% band over seeds")
def entanglement_by_method(ctx):
    from gesim import claims, plotting
    from gesim.methods.mitigation import METHODS

    out = _mitigations(_seeds(ctx, "mitigation_regimes"), ctx.fast, ctx.device)
    fig, axes = plotting.figure(2, 4, width=13, height=5.5, sharex=True, sharey=True)
    data = {}
    for ax, m in zip(axes.flat, list(METHODS)):
        for name, color in ((("dpo", "0.6"),) if m != "dpo" else ()) + ((m, "#2e86ab"),):
            rows = out["per_seed"][name]
            steps = rows[0]["steps"]
            delta = np.array([np.array(r["cos"]) - r["cos"][0] for r in rows])  # (seeds, steps)
            s = [claims.spread(delta[:, j]) for j in range(len(steps))]
            ax.plot(steps, [x.mean for x in s], "o-", ms=3, color=color, label=name)
            ax.fill_between(steps, [x.lo for x in s], [x.hi for x in s], color=color, alpha=0.25)
            if name == m:
                data[m] = {"steps": steps, "dcos_mean": [x.mean for x in s], "dcos_lo": [x.lo for x in s],
                           "dcos_hi": [x.hi for x in s], "per_seed_cos": [r["cos"] for r in rows]}
        ax.set_title(m, fontsize=9)
        ax.axhline(0, color="0.5", lw=0.6)
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel(r"$\cos(g_w, g_l) - $ its start value")
    c0 = claims.spread(r["cos"][0] for r in out["per_seed"]["dpo"])
    fig.suptitle(f"Long suffix: cos(g_w, g_l) starts at {c0.mean:.3f} (mean over {c0.n} seeds); "
                 "its change over training per method (blue) against plain DPO (grey)")
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


def _mean_path(runs, key="step"):
    """Mean and interval of tax and reward at each recorded point of a list of per-seed paths."""
    from gesim import claims

    n = min(len(r) for r in runs)
    tax = [claims.spread(r[i]["tax"] for r in runs) for i in range(n)]
    rew = [claims.spread(r[i]["reward"] for r in runs) for i in range(n)]
    return tax, rew


@figure("alignment_tax_pareto",
        "Pretrain -> SFT -> DPO on the small GPT, preference for responses opening with 'rated': reward "
        "(P(opener = rated) on held-out reviews) against tax (SFT suffix NLL increase) for early stopping, model "
        "averaging, HMA and OMO, the AdamW end point chosen on validation reviews; and the three seed-paper claims "
        "as differences at equal tax, over seeds")
def alignment_tax_pareto(ctx):
    from gesim import plotting
    from gesim.methods.harness import TaxConfig
    from gesim.methods.tax import tax_study
    from gesim.transformer.train import TrainConfig

    preset = TaxConfig.fast if ctx.fast else TaxConfig.full
    model = TaxConfig().model if ctx.fast else TrainConfig.full()
    import dataclasses

    cfg = preset(model=dataclasses.replace(model, device=ctx.device))
    out = tax_study(cfg, seeds=_seeds(ctx, "alignment_tax_pareto"))
    per, summ = out["per_seed"], out["summary"]
    fig, (ax, bx) = plotting.figure(1, 2, width=13, height=5.6)
    omos = [k for k in per[0] if k.startswith("omo_")]
    styles = [("early_stopping", "o-", "k"), ("model_averaging", "s-", "#2e86ab"), ("hma", "D--", "#f18f01")]
    colors = plotting.matplotlib.colormaps["viridis"](np.linspace(0.1, 0.9, max(len(omos), 1)))
    styles += [(k, "^:" if "dare" in k else "v:", c) for k, c in zip(omos, colors)]
    for name, style, color in styles:
        tax, rew = _mean_path([s[name] for s in per])
        big = name.startswith("omo_") and name != omos[0] and not name.endswith(omos[0].rsplit("_", 1)[1])
        # OMO runs that differ only in alpha can coincide: later alphas get large open markers
        ax.plot([t.mean for t in tax], [r.mean for r in rew], style, ms=7 if big else 3, lw=1, color=color,
                label=name, alpha=0.85, mfc="none" if big else color)
        # intervals: every point of averaging and HMA, the end point of a training path
        ends = range(len(tax)) if name in ("model_averaging", "hma") else [len(tax) - 1]
        for i in ends:
            ax.errorbar(tax[i].mean, rew[i].mean, xerr=[[tax[i].mean - tax[i].lo], [tax[i].hi - tax[i].mean]],
                        yerr=[[rew[i].mean - rew[i].lo], [rew[i].hi - rew[i].mean]], fmt="none", elinewidth=0.7,
                        capsize=2, color=color, alpha=0.85)
    # the AdamW end point of each seed (best validation reward), mean and intervals over seeds
    from gesim import claims

    end_pts = [s["early_stopping"][s["end"]] for s in per]
    et, er = claims.spread(p["tax"] for p in end_pts), claims.spread(p["reward"] for p in end_pts)
    ax.errorbar(et.mean, er.mean, xerr=[[et.mean - et.lo], [et.hi - et.mean]],
                yerr=[[er.mean - er.lo], [er.hi - er.mean]], fmt="*", ms=12, mfc="none", color="#d1495b",
                capsize=3, elinewidth=0.9, zorder=5, label="AdamW end point (best validation reward)")
    ax.set(xlabel="tax: held-out SFT suffix NLL - SFT model's (nats/token)",
           ylabel="reward: P(response opens with 'rated')", ylim=(-0.05, 1.05),
           title="mean paths; whiskers: 95% t intervals (last steps; star: end point)")
    ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: over no data
    groups = [("avg - ES", summ["avg_vs_es"]), ("HMA - avg", summ["hma_vs_avg"]), ("OMO - AdamW", summ["omo_vs_adamw"])]
    labels, x = [], 0
    for gi, (g, table) in enumerate(groups):
        for k, s in table.items():
            m, e = _err(s)
            bx.bar(x, m, 0.7, color=["#2e86ab", "#f18f01", "#6a4c93"][gi])
            bx.errorbar(x, m, yerr=e, color="k", capsize=2, lw=0.8)
            labels.append(f"{g} {k.replace('omo_', '')}")
            x += 1
    bx.set_xticks(range(len(labels)), labels, rotation=60, fontsize=6, ha="right")
    bx.axhline(0, color="0.5", lw=0.8)
    bx.set(ylabel="reward difference at equal tax", title="seed-paper claims (> 0: the claim holds)")
    g, r0, r1, tx = summ["end_reward_gain"], summ["sft_reward"], summ["end_reward"], summ["end_tax"]
    up, last = summ["reward_rises"], summ["last_reward_rises"]
    fig.suptitle(f"AdamW DPO's end point (best validation reward, step {summ['end_step']['mean']:.0f} on average) "
                 f"raises the reward from {r0['mean']:.2f} to {r1['mean']:.2f} (clearly in {up['k']}/{up['n']} seeds; "
                 f"the last step in {last['k']}/{last['n']})\nat a tax of {tx['mean']:+.2f} nats/token; "
                 f"means with 95% t intervals over {g['n']} seeds", fontsize=10)
    fig.tight_layout()
    return fig, out
