"""Figures from the synthetic simulator (:mod:`gesim.simulate`): first-order error, shared
suffixes, simulated regime maps and SimPO's length ratio."""

from __future__ import annotations

import dataclasses

import numpy as np

from gesim import regimes
from gesim.figures import figure

#: Losses compared in the suffix and regime-map figures.
LOSSES = ("dpo", "simpo", "ipo")


def _cfg(ctx, **overrides):
    from gesim.simulate import SimConfig

    base = SimConfig.fast(instances=300, steps=1) if ctx.fast else SimConfig.full(steps=1)
    return dataclasses.replace(base, seed=ctx.figure_seed, **overrides)


@figure("first_order_error", "Realised minus first-order predicted one-step change against eta: slope 2 (log-log)")
def first_order_error(ctx):
    from gesim import plotting
    from gesim.simulate import sweeps

    etas = np.logspace(-4, -0.5, 6 if ctx.fast else 12)
    fig, ax = plotting.figure(1, 1, width=4.8, height=3.8)
    data = {"etas": etas.tolist(), "series": {}}
    for opt, marker in (("sgd", "o"), ("adam", "s")):
        cfg = _cfg(ctx, suffix=8, rule=opt, instances=100 if ctx.fast else 1000)
        out = sweeps.eta_sweep(cfg, etas if opt == "sgd" else etas / 100)
        x = [r["eta"] for r in out["rows"]]
        y = [r["median_error"] for r in out["rows"]]
        name = "SGD" if opt == "sgd" else "Adam"
        ax.loglog(x, y, marker=marker, label=f"{name} (fitted slope {out['slope']:.2f})")
        data["series"][opt] = out
    # the eta^2 guide runs a decade below the SGD points so that it hides no curve
    ref = np.array([min(etas) / 100, max(etas)])
    ax.loglog(ref, 0.1 * data["series"]["sgd"]["rows"][-1]["median_error"] * (ref / etas[-1]) ** 2, "k:",
              label=r"$\propto \eta^2$")
    ax.set_xlabel(r"step size $\eta$")
    ax.set_ylabel(r"median $|\Delta_{\mathrm{realised}} - \Delta_{\mathrm{first\ order}}|$ (nats)")
    ax.legend(loc="lower right")
    slopes = {k: v["slope"] for k, v in data["series"].items()}
    fig.suptitle(f"One DPO step, context policy: the first-order error shrinks as $\\eta^{{{slopes['sgd']:.2f}}}$ "
                 f"(SGD) and $\\eta^{{{slopes['adam']:.2f}}}$ (Adam)")
    fig.tight_layout()
    return fig, data


@figure("suffix_entanglement", "Mean cos(g_w, g_l) and P(chosen down) against shared-suffix length, per loss")
def suffix_entanglement(ctx):
    from gesim import plotting
    from gesim.simulate import sweeps

    suffixes = [0, 1, 2, 4, 8, 16, 32] if ctx.fast else [0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    rows = sweeps.suffix_sweep(_cfg(ctx), suffixes, LOSSES)
    fig, axes = plotting.figure(1, 2, width=8.6, height=3.6)
    drawn = {}
    for loss, style in zip(LOSSES, plotting.nested_styles(len(LOSSES))):
        r = [row for row in rows if row["loss"] == loss]
        series = [x["mean_cos"] for x in r] + [x["p_chosen_down"] for x in r]
        kw = dict(color=plotting.loss_color(loss), label=plotting.same_as(loss, series, drawn), **style)
        drawn[loss] = series
        axes[0].plot(suffixes, [x["mean_cos"] for x in r], **kw)
        axes[1].plot(suffixes, [x["p_chosen_down"] for x in r], **kw)
    axes[0].set_ylabel(r"mean $\cos(g_w, g_l)$")
    axes[1].set_ylabel(r"$P$(chosen down), fraction of instances")
    for ax in axes:
        ax.set_xlabel("shared-suffix length $L$ (tokens)")
        ax.set_xscale("symlog", linthresh=1)
    axes[1].legend(title="loss")
    first = [r for r in rows if r["loss"] == LOSSES[0]]
    a, b = first[0], first[-1]
    fig.suptitle(f"Context policy, first step: from $L$ = {a['suffix']} to {b['suffix']} shared tokens,\nmean cos "
                 f"rises {a['mean_cos']:.2f} $\\to$ {b['mean_cos']:.2f} and $P$(chosen down) "
                 f"{a['p_chosen_down']:.2f} $\\to$ {b['p_chosen_down']:.2f} ({LOSSES[0]})")
    fig.tight_layout()
    return fig, {"suffixes": suffixes, "rows": rows}


@figure("regime_map_simulated", "Simulated realised regimes in the (cos, rho) plane against the symbolic boundary")
def regime_map_simulated(ctx):
    from gesim import plotting
    from gesim.simulate import sweeps

    fig, axes = plotting.figure(1, len(LOSSES), width=4.0 * len(LOSSES), height=4.0, sharey=True)
    data = {}
    cos_line = np.linspace(0.01, 1, 200)
    for ax, loss in zip(axes, LOSSES):
        cfg = _cfg(ctx, loss=loss, instances=150 if ctx.fast else 1500, eta=1e-3)
        pts = sweeps.regime_points(cfg, suffixes=(0, 2, 8, 32, 64), length_gaps=(0, 3))
        colors = [plotting.REGIME_COLORS[regimes.REGIMES[c]] for c in pts["real_regime"]]
        ax.scatter(pts["cos"], np.log2(pts["rho"]), c=colors, s=4, alpha=0.6, rasterized=True)
        k = float(np.nanmedian(pts["k"]))
        rho_c, rho_r = sweeps.boundary(k, cos_line)
        ax.plot(cos_line, np.log2(rho_c), "k-", lw=1, label=r"chosen-up boundary $\rho = \cos / k$")
        ax.plot(cos_line, np.log2(rho_r), "k--", lw=1, label=r"rejected-down boundary $\rho = 1 / (k \cos)$")
        agree = float(np.mean(pts["pred_regime"] == pts["real_regime"]))
        ax.set_title(f"{loss}: agreement {agree:.3f}, median $k$ = {k:.2f}")
        ax.set_xlabel(r"$\cos(g_w, g_l)$")
        ax.set_xlim(-1, 1)
        ax.set_xticks([-1, -0.5, 0, 0.5, 1])
        ax.set_ylim(-1.5, 1.5)
        data[loss] = {"agreement": agree, "median_k": k, "n": int(len(pts["cos"])),
                      "realised": regimes.fractions(pts["real_regime"]),
                      "predicted": regimes.fractions(pts["pred_regime"])}
    axes[0].set_ylabel(r"$\log_2 \rho$, $\rho = \|g_w\| / \|g_l\|$")
    axes[0].legend(loc="lower left", fontsize=7)
    plotting.regime_legend(fig, loc="lower center", ncol=5, bbox_to_anchor=(0.5, -0.02))
    lo, hi = min(d["agreement"] for d in data.values()), max(d["agreement"] for d in data.values())
    off = max(1 - d["realised"]["ideal"] for d in data.values())
    span = f"{lo:.1%}" if f"{lo:.1%}" == f"{hi:.1%}" else f"{lo:.1%} to {hi:.1%}"
    fig.suptitle(f"Simulated one-step regimes ($\\eta$ = {cfg.eta:g}) match the symbolic boundaries in {span} "
                 f"of instance-steps; at most {off:.1%} leave the ideal regime")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig, data


@figure("length_ratio_simpo",
        "SimPO vs DPO on pairs of unequal length: k = len_l/len_w, P(chosen down), P(rejected up)")
def length_ratio_simpo(ctx):
    from gesim import plotting
    from gesim.simulate import sweeps

    gaps = (-16, -8, -4, -2, 0, 2, 4, 8, 16)
    fig, axes = plotting.figure(1, 3, width=11.5, height=3.6)
    data, drawn = {}, {}
    keys = ("median_k", "p_chosen_down", "p_rejected_up")
    names = ("simpo", "ipo_norm", "dpo")
    for loss, style in zip(names, plotting.nested_styles(len(names))):
        rows = sweeps.length_ratio_sweep(_cfg(ctx, loss=loss, suffix=32), gaps=gaps)
        data[loss] = rows
        ratio = [r["ratio"] for r in rows]
        series = [r[key] for key in keys for r in rows]
        label = plotting.same_as(loss, series, drawn)
        drawn[loss] = series
        for ax, key in zip(axes, keys):
            ax.plot(ratio, [r[key] for r in rows], color=plotting.loss_color(loss), label=label, **style)
    for ax, label in zip(axes, (r"median $k = d_w / d_l$", r"$P$(chosen down), fraction of instances",
                                r"$P$(rejected up), fraction of instances")):
        ax.set_ylabel(label)
        ax.set_xlabel(r"length ratio $|y_l| / |y_w|$")
    axes[0].legend(title="loss")
    s = data["simpo"]
    fig.suptitle(f"Unequal lengths after a 32-token shared suffix: SimPO's $k = |y_l|/|y_w|$ runs "
                 f"{s[0]['median_k']:.2f} to {s[-1]['median_k']:.2f},\nso $P$(chosen down) falls "
                 f"{s[0]['p_chosen_down']:.2f} $\\to$ {s[-1]['p_chosen_down']:.2f} and $P$(rejected up) rises "
                 f"{s[0]['p_rejected_up']:.2f} $\\to$ {s[-1]['p_rejected_up']:.2f}; DPO's $k$ stays "
                 f"{data['dpo'][0]['median_k']:.2f}")
    fig.tight_layout()
    return fig, data
