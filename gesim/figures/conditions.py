"""Figures from the exact conditions alone (no simulation): the regime phase diagram."""

from __future__ import annotations

import math

import numpy as np

from gesim import dynamics, losses, regimes, symbolic
from gesim.figures import figure

#: The data point at which each loss's weights are evaluated: the start of training
#: (policy = reference), chosen shorter than rejected so length-normalised losses show it.
PHASE_POINT = {"lw": -20.0, "ll": -24.0, "lw_ref": -20.0, "ll_ref": -24.0, "len_w": 16.0, "len_l": 24.0}


def phase_grid(loss: str, n: int, log2_rho_max: float = 2.0, point=None):
    """Regime codes over a grid of (cos, rho), rho = ||g_w||/||g_l|| on a log scale.

    Geometry: nl2 = 1, nw2 = rho^2, ip = cos rho; weights at ``point`` (default
    :data:`PHASE_POINT`) and default parameters. Returns (cos, rho, codes[n_rho, n_cos]).
    """
    cos = np.linspace(-1, 1, n)
    rho = 2.0 ** np.linspace(-log2_rho_max, log2_rho_max, n)
    C, R = np.meshgrid(cos, rho)
    out = dynamics.predict(loss, **(point or PHASE_POINT), ip=C * R, nw2=R**2, nl2=np.ones_like(R))
    codes = regimes.regime_codes(out["delta_lw"], out["delta_ll"], out["d_w"], out["d_l"])
    return cos, rho, codes


@figure("condition_phase_diagram",
        "For each loss, the (cos, rho = ||g_w||/||g_l||) plane coloured by first-order regime at defaults")
def condition_phase_diagram(ctx):
    from gesim import plotting

    names = losses.names()
    n = 121 if ctx.fast else 401
    ncols = 6
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plotting.figure(nrows, ncols, width=2.0 * ncols, height=1.9 * nrows + 0.6,
                                sharex=True, sharey=True)
    data = {"point": PHASE_POINT, "grid": n, "axes": {"cos": [-1, 1], "log2_rho": [-2, 2]}, "losses": {}}
    for ax, name in zip(axes.flat, names):
        cos, rho, codes = phase_grid(name, n)
        ax.pcolormesh(cos, np.log2(rho), codes, cmap=plotting.REGIME_CMAP, vmin=-0.5,
                      vmax=len(regimes.REGIMES) - 0.5, shading="nearest", rasterized=True)
        ax.set_title(name)
        d = symbolic.derive(name)
        w = d.weights(**PHASE_POINT)
        data["losses"][name] = {
            "d_w": float(w[0]), "d_l": float(w[1]), "k": float(w[0] / w[1]) if w[1] else None,
            "fractions": regimes.fractions(codes), "k_symbolic": str(d.k)}
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(r"$\log_2 \rho$, $\rho = \|g_w\| / \|g_l\|$", fontsize=7)
    for i, ax in enumerate(axes.flat[:len(names)]):
        if i + ncols >= len(names):  # the lowest panel of its column: show its x axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(r"$\cos(g_w, g_l)$")
    plotting.regime_legend(fig, loc="lower center", ncol=5, bbox_to_anchor=(0.5, -0.01))
    ideal = {name: d["fractions"]["ideal"] for name, d in data["losses"].items()}
    lo, hi = min(ideal, key=ideal.get), max(ideal, key=ideal.get)
    tied = sum(abs(v - ideal[hi]) < 1e-12 for v in ideal.values()) - 1
    fig.suptitle(f"First-order regime of one step per loss (default parameters, $|y_w|$ = {PHASE_POINT['len_w']:g}, "
                 f"$|y_l|$ = {PHASE_POINT['len_l']:g} tokens, policy = reference):\nthe ideal region covers "
                 f"{ideal[lo]:.0%} ({lo}) to {ideal[hi]:.0%} ({hi}{f' and {tied} more' if tied else ''}) of the plane")
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    return fig, data
