"""Pair-reweighting mitigations: pairwise-normalised gradient descent and reward calibration.

Both keep the direction family of a margin step, u = eta (a g_w - b g_l), and choose the
per-pair weights (a, b) >= 0 so that the pair lands in the ideal regime to first order
(theory.md sections 2 and 6):

    delta lw = eta (a nw2 - b ip),   delta ll = eta (a ip - b nl2).

**Pairwise-normalised gradient descent (PNGD)**, the entanglement paper's proposal (Yuan et
al., arXiv 2410.13828, section 5; the exact form is our reconstruction): a = c / ||g_w||,
b = c / ||g_l||, so u = eta c (g_w / ||g_w|| - g_l / ||g_l||) and

    delta lw = eta c ||g_w|| (1 - cos) >= 0,   delta ll = -eta c ||g_l|| (1 - cos) <= 0

for every pair and any c >= 0. ``scale`` picks c: ``"none"`` (c = 1), ``"weight"`` (the
loss's mean weight (d_w + d_l) / 2) or ``"mean_norm"`` (the default: the weight times
(||g_w|| + ||g_l||) / 2, which keeps the step as long as the loss's own step when the two
norms are equal, so learning rates stay comparable).

**Reward calibration** (after "Towards Disentangled Preference Optimization Dynamics",
arXiv 2604.18239, whose "disentanglement band" is the pair of conditions above): keep
d_l and move k = d_w / d_l into the band ip / nw2 <= k <= nl2 / ip (never empty, by
Cauchy-Schwarz) when the loss's k falls outside it; pairs already inside are untouched.

Both are simulator update rules (registered in :data:`gesim.simulate.optim.RULES` as
``pngd`` and ``calibrated`` on import) and Transformer objectives (:func:`pngd_objective`,
:func:`calibrated_objective`): surrogate losses -a lw + b ll with a, b held constant
(stop-gradient), whose gradient is the reweighted step.
"""

from __future__ import annotations

import torch

from gesim import lm, losses, probe
from gesim.errors import unknown
from gesim.simulate import optim

SCALES = ("none", "weight", "mean_norm")


def pngd_weights(d_w, d_l, nw2, nl2, scale: str = "mean_norm"):
    """Per-pair (a, b) of PNGD from the loss weights and the squared norms (tensors (N,))."""
    if scale not in SCALES:
        raise unknown("PNGD scale", scale, SCALES)
    nw, nl = nw2.clamp_min(1e-300).sqrt(), nl2.clamp_min(1e-300).sqrt()
    c = torch.ones_like(nw) if scale == "none" else (d_w + d_l) / 2
    if scale == "mean_norm":
        c = c * (nw + nl) / 2
    return c / nw, c / nl


def calibrated_weights(d_w, d_l, ip, nw2, nl2, slack: float = 1e-6):
    """Per-pair (a, b): k = d_w / d_l clipped into the band [ip / nw2, nl2 / ip] (ip > 0 only).

    ``slack`` moves a clipped k a relative hair inside the band so the first-order signs are
    strict. Pairs with d_l <= 0 or ip <= 0 keep the loss's weights (their band is unbounded).
    """
    tiny = torch.finfo(nw2.dtype).tiny
    k = d_w / torch.where(d_l > 0, d_l, torch.ones_like(d_l))
    lo = ip / nw2.clamp_min(tiny) * (1 + slack)
    hi = nl2 / ip.clamp_min(tiny) * (1 - slack)
    fix = (d_l > 0) & (ip > 0) & ((k < lo) | (k > hi))
    k_new = torch.minimum(torch.maximum(k, lo), hi)
    return torch.where(fix, k_new * d_l, d_w), d_l


def _sq(g):
    return (g.flatten(1) ** 2).sum(1)


class PNGD:
    """Simulator rule: u = eta (a g_w - b g_l) with the PNGD weights of :func:`pngd_weights`."""

    def __init__(self, eta: float, scale: str = "mean_norm"):
        self.eta, self.scale = eta, scale

    def step(self, g_w, g_l, d_w, d_l) -> optim.Update:
        a, b = pngd_weights(d_w, d_l, _sq(g_w), _sq(g_l), self.scale)
        return optim.Update(optim.direction(g_w, g_l, a, b).mul_(self.eta), d_w=a, d_l=b)


class Calibrated:
    """Simulator rule: the loss's step with k = d_w / d_l calibrated into the ideal band."""

    def __init__(self, eta: float):
        self.eta = eta

    def step(self, g_w, g_l, d_w, d_l) -> optim.Update:
        ip, nw2, nl2 = optim.geometry(g_w, g_l)
        a, b = calibrated_weights(d_w, d_l, ip, nw2, nl2)
        return optim.Update(optim.direction(g_w, g_l, a, b).mul_(self.eta), d_w=a, d_l=b)


optim.RULES.setdefault("pngd", PNGD)
optim.RULES.setdefault("calibrated", Calibrated)


def _reweighted_objective(loss: str, params: dict, weights):
    """Surrogate mean_i(-a_i lw_i + b_i ll_i), a and b from ``weights(d_w, d_l, stats)`` held constant."""
    lossfn = losses.get(loss)

    def objective(model, batch, lw_ref, ll_ref, len_w, len_l):
        stats = probe.pair_stats(model, batch)  # exact per-pair ip, nw2, nl2 (no graph)
        lw, ll = lm.pair_logps(model, batch)
        d_w, d_l = lossfn.weights(lw, ll, lw_ref, ll_ref, len_w, len_l, **params)
        a, b = weights(d_w, d_l, {k: v.to(lw.dtype) for k, v in stats.items()})
        return (-a * lw + b * ll).mean()

    return objective


def pngd_objective(loss: str = "dpo", params: dict | None = None, scale: str = "mean_norm"):
    """Transformer objective for PNGD: -a lw + b ll with the PNGD weights (stop-gradient)."""
    return _reweighted_objective(loss, params or {},
                                 lambda d_w, d_l, s: pngd_weights(d_w, d_l, s["nw2"], s["nl2"], scale))


def calibrated_objective(loss: str = "dpo", params: dict | None = None):
    """Transformer objective for reward calibration (weights from :func:`calibrated_weights`)."""
    return _reweighted_objective(loss, params or {},
                                 lambda d_w, d_l, s: calibrated_weights(d_w, d_l, s["ip"], s["nw2"], s["nl2"]))
