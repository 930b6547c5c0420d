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
    fig, ax = plotting.figure(1, 1, width=4.6, height=3.6)
    data = {"etas": etas.tolist(), "series": {}}
    for opt, marker in (("sgd", "o"), ("adam", "s")):
        cfg = _cfg(ctx, suffix=8, optimizer=opt, instances=100 if ctx.fast else 1000)
        out = sweeps.eta_sweep(cfg, etas if opt == "sgd" else etas / 100)
        x = [r["eta"] for r in out["rows"]]
        y = [r["median_error"] for r in out["rows"]]
        ax.loglog(x, y, marker=marker, label=f"{opt} (slope {out['slope']:.2f})")
        data["series"][opt] = out
    ref = np.array([min(etas) / 100, max(etas)])
    ax.loglog(ref, data["series"]["sgd"]["rows"][-1]["median_error"] * (ref / etas[-1]) ** 2, "k:", label="eta^2")
    ax.set_xlabel(r"step size $\eta$")
    ax.set_ylabel("median |realised - predicted|")
    ax.set_title("First-order error, context policy, DPO")
    ax.legend()
    fig.tight_layout()
    return fig, data


@figure("suffix_entanglement", "Mean cos(g_w, g_l) and P(chosen down) against shared-suffix length, per loss")
def suffix_entanglement(ctx):
    from gesim import plotting
    from gesim.simulate import sweeps

    suffixes = [0, 1, 2, 4, 8, 16, 32] if ctx.fast else [0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    rows = sweeps.suffix_sweep(_cfg(ctx), suffixes, LOSSES)
    fig, axes = plotting.figure(1, 2, width=8.4, height=3.4)
    for loss, style in zip(LOSSES, ("-o", "--s", ":^")):
        r = [row for row in rows if row["loss"] == loss]
        kw = dict(color=plotting.loss_color(loss), label=loss)
        axes[0].plot(suffixes, [x["mean_cos"] for x in r], style, **kw)
        axes[1].plot(suffixes, [x["p_chosen_down"] for x in r], style, **kw)
    axes[0].set_ylabel(r"mean $\cos(g_w, g_l)$")
    axes[1].set_ylabel("P(chosen down)")
    for ax in axes:
        ax.set_xlabel("shared-suffix length L")
        ax.set_xscale("symlog", linthresh=1)
    axes[1].legend()
    fig.suptitle("Context policy, first step from the reference: a shared suffix entangles chosen and "
                 "rejected\n(equal lengths and policy = reference give k = 1 for all three losses, so they coincide)")
    fig.tight_layout()
    return fig, {"suffixes": suffixes, "rows": rows}


@figure("regime_map_simulated", "Simulated realised regimes in the (cos, rho) plane against the symbolic boundary")
def regime_map_simulated(ctx):
    from gesim import plotting
    from gesim.simulate import sweeps

    fig, axes = plotting.figure(1, len(LOSSES), width=4.0 * len(LOSSES), height=3.8, sharey=True)
    data = {}
    cos_line = np.linspace(0.01, 1, 200)
    for ax, loss in zip(axes, LOSSES):
        cfg = _cfg(ctx, loss=loss, instances=150 if ctx.fast else 1500, eta=1e-3)
        pts = sweeps.regime_points(cfg, suffixes=(0, 2, 8, 32, 64), length_gaps=(0, 3))
        colors = [plotting.REGIME_COLORS[regimes.REGIMES[c]] for c in pts["real_regime"]]
        ax.scatter(pts["cos"], np.log2(pts["rho"]), c=colors, s=4, alpha=0.6, rasterized=True)
        k = float(np.nanmedian(pts["k"]))
        rho_c, rho_r = sweeps.boundary(k, cos_line)
        ax.plot(cos_line, np.log2(rho_c), "k-", lw=1, label="chosen-up boundary")
        ax.plot(cos_line, np.log2(rho_r), "k--", lw=1, label="rejected-down boundary")
        agree = float(np.mean(pts["pred_regime"] == pts["real_regime"]))
        ax.set_title(f"{loss}: agreement {agree:.3f} (median k = {k:.2f})")
        ax.set_xlabel(r"$\cos(g_w, g_l)$")
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1.5, 1.5)
        data[loss] = {"agreement": agree, "median_k": k, "n": int(len(pts["cos"])),
                      "realised": regimes.fractions(pts["real_regime"]),
                      "predicted": regimes.fractions(pts["pred_regime"])}
    axes[0].set_ylabel(r"$\log_2 \rho = \log_2 \|g_w\| / \|g_l\|$")
    axes[0].legend(loc="lower left")
    plotting.regime_legend(fig, loc="lower center", ncol=5, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig, data


@figure("length_ratio_simpo",
        "SimPO vs DPO on pairs of unequal length: k = len_l/len_w, P(chosen down), P(rejected up)")
def length_ratio_simpo(ctx):
    from gesim import plotting
    from gesim.simulate import sweeps

    gaps = (-16, -8, -4, -2, 0, 2, 4, 8, 16)
    fig, axes = plotting.figure(1, 3, width=11.5, height=3.4)
    data = {}
    for loss, style in (("simpo", "-o"), ("ipo_norm", "--s"), ("dpo", ":^")):
        rows = sweeps.length_ratio_sweep(_cfg(ctx, loss=loss, suffix=32), gaps=gaps)
        data[loss] = rows
        ratio = [r["ratio"] for r in rows]
        for ax, key in zip(axes, ("median_k", "p_chosen_down", "p_rejected_up")):
            ax.plot(ratio, [r[key] for r in rows], style, color=plotting.loss_color(loss), label=loss)
    for ax, label in zip(axes, (r"median $k = d_w / d_l$", "P(chosen down)", "P(rejected up)")):
        ax.set_ylabel(label)
        ax.set_xlabel(r"length ratio $|y_l| / |y_w|$")
    axes[0].legend()
    fig.suptitle("Unequal lengths (an unshared tail after a 32-token shared suffix), context policy: "
                 "SimPO's k = len_l / len_w moves its thresholds")
    fig.tight_layout()
    return fig, data
