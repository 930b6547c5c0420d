"""Sweeps over the simulator: shared-suffix length, (cos, rho) regime maps, length ratio, step size.

Each sweep takes a base :class:`SimConfig` and varies one thing with ``dataclasses.replace``;
results are lists of plain dicts (JSON- and pandas-friendly).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gesim import dynamics, regimes
from gesim.simulate.engine import SimConfig, simulate


def suffix_sweep(cfg: SimConfig, suffixes, loss_names=None, progress=False) -> list[dict]:
    """One row per (loss, suffix): mean cos, P(chosen down), P(rejected up), regime agreement.

    theory.md prediction 10: cos and P(chosen down) grow with the shared-suffix length.
    """
    rows = []
    for loss in loss_names or [cfg.loss]:
        params = cfg.params if loss == cfg.loss else {}
        for suffix in suffixes:
            res = simulate(dataclasses.replace(cfg, loss=loss, params=params, suffix=int(suffix)), progress)
            s = res.summary()
            rows.append({"loss": loss, "suffix": int(suffix), **{k: s[k] for k in (
                "instances", "steps", "mean_cos", "p_chosen_down", "p_rejected_up", "regime_agreement")},
                "realised_regimes": s["realised_regimes"], "predicted_regimes": s["predicted_regimes"]})
    return rows


def regime_points(cfg: SimConfig, suffixes=(0, 2, 8, 32), length_gaps=(0, 2), progress=False) -> dict:
    """Simulated instance-steps spread over the (cos, rho) plane, with both regimes.

    Mixes shared-suffix lengths and unequal differing blocks so that cos and rho = ||g_w|| /
    ||g_l|| vary. Returns arrays cos, rho, k = d_w / d_l, pred_regime, real_regime.
    """
    out = {k: [] for k in ("cos", "rho", "k", "pred_regime", "real_regime")}
    for suffix in suffixes:
        for gap in length_gaps:
            res = simulate(dataclasses.replace(cfg, suffix=int(suffix), differ_w=1, differ_l=1 + int(gap)),
                           progress)
            a = res.arrays
            with np.errstate(divide="ignore", invalid="ignore"):
                out["rho"].append(np.sqrt(a["nw2"] / a["nl2"]).ravel())
                out["k"].append((a["d_w"] / a["d_l"]).ravel())
            out["cos"].append(a["cos"].ravel())
            out["pred_regime"].append(a["pred_regime"].ravel())
            out["real_regime"].append(a["real_regime"].ravel())
    return {k: np.concatenate(v) for k, v in out.items()}


def boundary(k, cos):
    """The symbolic regime boundaries in the (cos, rho) plane for weight ratio k = d_w / d_l > 0.

    Chosen up iff ip < k nw2, i.e. cos < k rho, so the boundary is rho = cos / k; rejected down
    iff ip < nl2 / k, i.e. rho < 1 / (k cos). Returns (rho_chosen, rho_rejected), NaN where cos <= 0.
    """
    cos = np.asarray(cos, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = np.where(cos > 0, cos, np.nan)
        return pos / k, 1.0 / (k * pos)


def length_ratio_sweep(cfg: SimConfig, gaps=(-16, -8, -4, -2, 0, 2, 4, 8, 16), progress=False) -> list[dict]:
    """Pairs of unequal length: an unshared tail of |g| tokens after the shared suffix, on the
    rejected response for g > 0 and on the chosen one for g < 0 (so len_l - len_w = g).

    For SimPO, k = d_w / d_l = len_l / len_w (theory.md prediction 6): a longer rejected
    response raises k (chosen up iff ip < k nw2) and lowers the rejected threshold nl2 / k.
    """
    rows = []
    for g in gaps:
        res = simulate(dataclasses.replace(cfg, tail_w=max(-g, 0), tail_l=max(g, 0)), progress)
        s, a = res.summary(), res.arrays
        differ_w = cfg.differ if cfg.differ_w is None else cfg.differ_w
        differ_l = cfg.differ if cfg.differ_l is None else cfg.differ_l
        len_w = cfg.prefix + differ_w + cfg.suffix + max(-g, 0)
        len_l = cfg.prefix + differ_l + cfg.suffix + max(g, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.nanmedian(a["d_w"] / a["d_l"])
        rows.append({"loss": cfg.loss, "gap": int(g), "len_w": len_w, "len_l": len_l, "ratio": len_l / len_w,
                     "median_k": float(k), **{key: s[key] for key in (
                         "mean_cos", "p_chosen_down", "p_rejected_up", "regime_agreement")}})
    return rows


def eta_sweep(cfg: SimConfig, etas) -> dict:
    """First-order error against step size, from the first step of every instance.

    error(eta) = median over instances of |realised - predicted| for lw and ll; first-order
    theory says error = O(eta^2), so the fitted log-log slope should be about 2 (prediction 1).
    """
    rows = []
    for eta in etas:
        a = simulate(dataclasses.replace(cfg, eta=float(eta), steps=1)).arrays
        err = np.concatenate([np.abs(a["real_dlw"] - a["pred_dlw"]), np.abs(a["real_dll"] - a["pred_dll"])], axis=1)
        scale = np.concatenate([np.abs(a["pred_dlw"]), np.abs(a["pred_dll"])], axis=1)
        rows.append({"eta": float(eta), "median_error": float(np.median(err)),
                     "median_relative_error": float(np.median(err / np.maximum(scale, 1e-300)))})
    x = np.log([r["eta"] for r in rows])
    y = np.log([r["median_error"] for r in rows])
    return {"rows": rows, "slope": float(np.polyfit(x, y, 1)[0])}


def agreement_by_loss(cfg: SimConfig, names) -> dict:
    """Regime agreement (predicted vs realised) per loss for the same base config."""
    out = {}
    for name in names:
        s = simulate(dataclasses.replace(cfg, loss=name, params={})).summary()
        out[name] = s["regime_agreement"]
    return out


def predicted_regime_at(loss, cos, rho, k_point: dict | None = None):
    """Regime codes from the symbolic first-order identity at unit ||g_l|| (for map backgrounds)."""
    cos, rho = np.broadcast_arrays(np.asarray(cos, float), np.asarray(rho, float))
    point = k_point or {"lw": -10.0, "ll": -10.0, "lw_ref": -10.0, "ll_ref": -10.0}
    out = dynamics.predict(loss, **point, ip=cos * rho, nw2=rho**2, nl2=np.ones_like(rho))
    return regimes.regime_codes(out["delta_lw"], out["delta_ll"], out["d_w"], out["d_l"])
