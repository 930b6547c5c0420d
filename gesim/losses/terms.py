"""Terms shared by several loss formulas (notation of docs/theory.md section 1).

``rw = lw - lw_ref``, ``rl = ll - ll_ref``, ``h = rw - rl`` (the DPO log-ratio margin).
"""

from __future__ import annotations

from gesim.losses.registry import POSITIVE, Range, Trl


def h(lw, ll, lw_ref, ll_ref):
    """DPO's implicit-reward margin h = (lw - lw_ref) - (ll - ll_ref)."""
    return (lw - lw_ref) - (ll - ll_ref)


def h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l):
    """Length-normalised margin (lw - lw_ref)/len_w - (ll - ll_ref)/len_l (trl's IPO)."""
    return (lw - lw_ref) / len_w - (ll - ll_ref) / len_l


def log_odds(ops, s):
    """log(p / (1 - p)) for p = exp(s), s <= 0 a per-token mean log-prob (ORPO)."""
    return s - ops.log(-ops.expm1(s))


BETA = {"beta": POSITIVE}
EPS = Range(0.0, 0.5, low_closed=True)


def dpo_trl(loss_type="sigmoid", **params):
    """A :class:`Trl` record for trl's DPOTrainer (``beta`` maps to ``beta`` unless given)."""
    return Trl("DPOTrainer", loss_type, {"beta": "beta", **params})


def smoothed(ops, z, eps):
    """Label-smoothed logistic loss -(1 - eps) log sigma(z) - eps log sigma(-z) (cDPO, trl)."""
    return -(1 - eps) * ops.log_sigmoid(z) - eps * ops.log_sigmoid(-z)



def alpha_reward(ops, s, alpha):
    """AlphaPO's reward r(s) = (1 - p^-alpha) / alpha with p = exp(s); alpha -> 0 gives s."""
    return -ops.expm1(-alpha * s) / alpha

