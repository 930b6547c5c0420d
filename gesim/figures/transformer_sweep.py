"""Transformer figures that measure the mechanism over seeds (issue 11; theory.md section 4):
the shared-suffix length sweep and the cross-loss comparison on long-suffix data.

They use the seeds and configuration of :mod:`gesim.figures.transformer`, so the long-suffix
SFT model of each seed is trained once for every Transformer figure.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gesim.figures import figure
from gesim.figures.transformer import config, seeds

SETTING_STYLE = {"adamw": ("C3", "o"), "sgd": ("C0", "s")}
FAST_LENGTHS = (0, 2, 8, 27)


def lengths(ctx) -> tuple[int, ...]:
    from gesim.transformer import experiment

    return FAST_LENGTHS if ctx.fast else experiment.SWEEP_LENGTHS


def _errorbar(ax, x, spreads, color, marker, label, offset=0.0):
    mean = np.array([s["mean"] for s in spreads])
    lo, hi = np.array([s["lo"] for s in spreads]), np.array([s["hi"] for s in spreads])
    yerr = None if np.isnan(lo).any() else [mean - lo, hi - mean]
    ax.errorbar(np.asarray(x, float) * (1 + offset), mean, yerr=yerr, color=color, marker=marker, ms=4, capsize=2,
                label=label)


@figure("transformer_suffix_sweep",
        "Small GPT, DPO after SFT on 27-token suffixes: the same pairs cut to label + L shared suffix tokens, "
        "AdamW and SGD, over seeds: gradient cosine, fraction of pairs whose chosen log-prob fell and the "
        "fraction the measured geometry predicted, mean chosen change with 95% intervals")
def transformer_suffix_sweep(ctx):
    from gesim import plotting
    from gesim.transformer import experiment

    cfg = config(ctx)
    settings = experiment.sweep_settings(ctx.fast)
    rows = experiment.sweep_rows(seeds(ctx), cfg, lengths(ctx), settings)
    agg = experiment.aggregate(rows, ("setting", "suffix_len"), experiment.LIGHT_OUTCOMES)
    paired = experiment.paired_rows(rows, "dlw")
    agg += experiment.aggregate(paired, ("setting", "suffix_len"), ("dlw_minus_L0",))
    fig, axes = plotting.figure(1, 5, width=18, height=3.6)
    for k, name in enumerate(settings):
        a = [r for r in agg if r["setting"] == name and "dlw" in r]
        x = np.array([r["suffix_len"] for r in a]) + 0.5  # L + 1/2 on a log axis, so L = 0 shows
        color, marker = SETTING_STYLE.get(name, ("k", "^"))
        off = 0.04 * (k - 0.5)
        if k == 0:  # the start (same SFT model, same pairs) is shared by every setting: drawn once
            _errorbar(axes[0], x, [r["cos_start"] for r in a], "k", "D", "start (every setting)")
            _errorbar(axes[1], x, [r["pred_fall_start"] for r in a], "k", "D",
                      "predicted at the start (every setting)")
        _errorbar(axes[0], x, [r["cos_end"] for r in a], color, marker, f"{name}, end", off)
        _errorbar(axes[1], x, [r["chosen_fell"] for r in a], color, marker, f"{name}: fell", off)
        _errorbar(axes[2], x, [r["agree_start"] for r in a], color, marker, f"{name}: start geometry", off)
        _errorbar(axes[2], x, [r["agree_sum"] for r in a], color, "x", f"{name}: summed first order", off)
        _errorbar(axes[3], x, [r["dlw"] for r in a if "dlw" in r], color, marker,
                  f"{name} (lr {settings[name]['lr']:g})", off)
        _errorbar(axes[4], x, [r["dlw_minus_L0"] for r in agg if r["setting"] == name and "dlw_minus_L0" in r],
                  color, marker, name, off)
    titles = (r"mean $\cos(g_w, g_l)$", "fraction of pairs: chosen fell", r"fraction: sign of $\Delta l_w$ predicted",
              r"mean $\Delta l_w$ over training (nats)", r"paired: $\Delta l_w(L) - \Delta l_w(0)$ (nats)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        if ax in (axes[3], axes[4]):
            ax.set_yscale("symlog", linthresh=0.01, linscale=0.5)
            lo, hi = ax.get_ylim()
            ticks = [t for t in (-10, -1, -0.1, -0.01, 0, 0.01, 0.1, 1, 10) if lo <= t <= hi]
            ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        if ax in (axes[1], axes[2]):
            ax.set_ylim(-0.05, 1.05)  # fractions; a t interval may reach past [0, 1] and is clipped here
        if ax is axes[0]:
            ax.set_ylim(-1.1, 1.1)  # a cosine; a t interval of 3 seeds may reach past [-1, 1] and is clipped here
        ax.set_xticks(np.array(lengths(ctx)) + 0.5, [str(v) for v in lengths(ctx)])
        ax.minorticks_off()
        ax.set_xlabel("shared suffix length $L$ (tokens)")
        ax.set_title(title)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.legend(fontsize=6)
    table = experiment.claims_table(sweep=rows)
    held = [f"{c['claim'].split(': ', 1)[1]} {c['holds']}" for c in table if "(adamw)" in c["claim"]]
    half = (len(held) + 1) // 2
    fig.suptitle(f"Suffix sweep, {len(seeds(ctx))} seeds, AdamW: " + "; ".join(held[:half]) + ";\n"
                 + "; ".join(held[half:]), fontsize=9)
    fig.tight_layout()
    return fig, {"config": dataclasses.asdict(cfg), "settings": settings, "seeds": list(seeds(ctx)),
                 "lengths": list(lengths(ctx)), "aggregate": agg, "claims": table, "per_seed": rows,
                 "paired": paired}


@figure("transformer_loss_comparison",
        "Small GPT on long-suffix data, every registered pairwise loss the trainer supports (defaults, one "
        "shared budget), over seeds: regimes predicted from the measured start geometry next to realised "
        "regimes and mean changes of the chosen and rejected log-probs")
def transformer_loss_comparison(ctx):
    from gesim import plotting, regimes
    from gesim.plotting import REGIME_COLORS
    from gesim.transformer import experiment

    cfg = config(ctx, **experiment.loss_budget(ctx.fast))
    rows = experiment.loss_rows(seeds(ctx), cfg)
    names = list(dict.fromkeys(r["loss"] for r in rows))
    agg = experiment.aggregate(rows, ("loss",), experiment.LIGHT_OUTCOMES)
    frac = {side: {n: {g: float(np.mean([r[side][g] for r in rows if r["loss"] == n])) for g in regimes.REGIMES}
                   for n in names} for side in ("pred_regimes", "real_regimes")}
    fig, axes = plotting.figure(1, 3, width=13, height=0.32 * len(names) + 1.6, sharey=True)
    y = np.arange(len(names))
    for ax, side, title in zip(axes[:2], ("pred_regimes", "real_regimes"),
                               ("predicted at the start (one-pair check)", "realised over training")):
        left = np.zeros(len(names))
        for g in regimes.REGIMES:
            w = np.array([frac[side][n][g] for n in names])
            ax.barh(y, w, left=left, color=REGIME_COLORS[g], label=g.replace("_", " "))
            left += w
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of eval pairs")
        ax.set_title(title)
    axes[0].legend(fontsize=6, loc="lower left", bbox_to_anchor=(0, 1.06), ncol=3)
    for key, color, dy, label in (("dlw", "C2", -0.15, r"$\Delta l_w$ (chosen)"), ("dll", "C3", 0.15,
                                                                                  r"$\Delta l_l$ (rejected)")):
        s = [a[key] for a in agg]
        mean = np.array([v["mean"] for v in s])
        err = None if np.isnan(s[0]["lo"]) else [mean - [v["lo"] for v in s], [v["hi"] for v in s] - mean]
        axes[2].errorbar(mean, y + dy, xerr=err, fmt="o", ms=3, color=color, capsize=2, label=label)
    axes[2].axvline(0, color="0.6", lw=0.8)
    axes[2].set_xscale("symlog", linthresh=0.1)
    axes[2].set_xlabel("mean change over training (nats), 95% interval")
    axes[2].legend(fontsize=6)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    table = experiment.claims_table(cross=rows)
    up = sum(a["dlw"]["mean"] > 0 for a in agg)
    fig.suptitle(f"{len(names)} losses, {len(seeds(ctx))} seeds, long suffix: chosen rose on average for {up}; "
                 f"the paper's reading (NLL-side losses and dpop keep it up, dpo/ipo/simpo let it fall) holds in "
                 f"{table[-1]['holds']} seeds")
    fig.tight_layout()
    return fig, {"config": dataclasses.asdict(cfg), "seeds": list(seeds(ctx)), "losses": names, "aggregate": agg,
                 "regime_fractions": frac, "claims": table, "per_seed": rows}
