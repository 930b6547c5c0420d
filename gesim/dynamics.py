"""Numeric first-order predictions over arrays of pairs, preconditioned steps and batches.

Builds on :mod:`gesim.symbolic` (the weights d_w, d_l of any registered loss) and
:mod:`gesim.regimes` (the first-order identity and the regime names). Shapes: ``N`` pairs,
``P`` parameters.

* :func:`predict` (:func:`evaluate` for one pair): one SGD step on each pair alone (theory.md
  section 2), from the closed-form weights d_w, d_l of :mod:`gesim.symbolic`.
* :func:`geometry`: ip, nw2, nl2, cos, rho from gradient vectors, optionally P-weighted
  (a diagonal preconditioner such as Adam's, theory.md section 3).
* :func:`batch_first_order`: one step on a whole batch, where pairs couple through the Gram
  matrices of their gradients (theory.md section 3):

      delta lw_i = eta sum_j (d_w^j <g_w^i, g_w^j> - d_l^j <g_w^i, g_l^j>)
      delta ll_i = eta sum_j (d_w^j <g_l^i, g_w^j> - d_l^j <g_l^i, g_l^j>)

* :func:`update_first_order`: the change <grad f, u> of any log-prob under any update u.
"""

from __future__ import annotations

import numpy as np

from gesim import regimes, symbolic
from gesim.errors import GesimError


def predict(loss, *, lw, ll, ip, nw2, nl2, lw_ref=0.0, ll_ref=0.0, len_w=1.0, len_l=1.0, eta=1.0, check=True,
            **params) -> dict:
    """First-order changes and regimes of one SGD step on each pair alone, vectorised (broadcasting).

    ``loss``: a registered name, a :class:`gesim.losses.Loss` or a :class:`gesim.symbolic.Derivation`
    (its closed-form weights d_w, d_l); ``params`` override the loss's defaults. With
    delta lw = eta (d_w nw2 - d_l ip) and delta ll = eta (d_w ip - d_l nl2) (theory.md section 2,
    :func:`gesim.regimes.first_order`), returns arrays ``d_w, d_l, delta_lw, delta_ll,
    delta_margin, regime`` (regime names). ``check``: refuse a geometry with ip^2 > nw2 nl2 or
    negative norms, and a step size that is not positive and finite.
    """
    d = loss if isinstance(loss, symbolic.Derivation) else symbolic.derive(getattr(loss, "name", loss))
    if check:
        regimes.check_geometry(ip, nw2, nl2)
        if not (np.all(np.isfinite(eta)) and np.all(np.asarray(eta) > 0)):
            raise GesimError(f"eta is a step size and must be > 0 and finite, got {eta}")
    d_w, d_l = d.weights(lw, ll, lw_ref, ll_ref, len_w, len_l, **params)
    delta_lw, delta_ll = regimes.first_order(d_w, d_l, np.asarray(ip, float), np.asarray(nw2, float),
                                             np.asarray(nl2, float), eta)
    return {"d_w": d_w, "d_l": d_l, "delta_lw": delta_lw, "delta_ll": delta_ll,
            "delta_margin": delta_lw - delta_ll, "regime": regimes.classify(delta_lw, delta_ll, d_w, d_l)}


def evaluate(loss, **values) -> dict:
    """:func:`predict` for one pair: a dict of floats plus the regime name."""
    out = predict(loss, **values)
    return {key: (str(v) if key == "regime" else float(v)) for key, v in out.items()}


def geometry(g_w, g_l, precond=None) -> dict:
    """ip, nw2, nl2, cos and rho from gradients ``g_w``, ``g_l`` of shape (N, P) or (P,).

    With a diagonal preconditioner ``precond`` (shape (P,) or (N, P), entries > 0) every inner
    product becomes <a, P b>: the update is -eta P grad, so the first-order change of f is
    <grad f, P u>. For Adam, P = 1 / (sqrt(v_hat) + eps).
    """
    g_w, g_l = np.asarray(g_w, float), np.asarray(g_l, float)
    pw = g_w if precond is None else g_w * np.asarray(precond, float)
    ip = np.sum(pw * g_l, axis=-1)
    nw2 = np.sum(pw * g_w, axis=-1)
    nl2 = np.sum((g_l if precond is None else g_l * np.asarray(precond, float)) * g_l, axis=-1)
    return {"ip": ip, "nw2": nw2, "nl2": nl2, **cos_rho(ip, nw2, nl2)}


def cosine(ip, nw2, nl2):
    """cos(g_w, g_l) = ip / (||g_w|| ||g_l||), for floats, numpy arrays or torch tensors alike.

    The norms are taken before the product: sqrt(nw2 nl2) underflows to 0 (and cos to inf)
    when both squared norms are tiny, e.g. 1e-170 each, though the cosine is well defined.
    NaN (or inf) where a norm is zero.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return ip / (nw2**0.5 * nl2**0.5)


def cos_rho(ip, nw2, nl2) -> dict:
    """cos = :func:`cosine` and rho = ||g_w|| / ||g_l|| (NaN where a norm is zero)."""
    ip, nw2, nl2 = (np.asarray(x, float) for x in (ip, nw2, nl2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"cos": cosine(ip, nw2, nl2), "rho": np.sqrt(nw2) / np.sqrt(nl2)}


def batch_first_order(d_w, d_l, gram_ww, gram_wl, gram_ll, eta=1.0):
    """First-order (delta_lw, delta_ll), each (N,), of one step on a batch of N pairs.

    ``gram_ww[i, j] = <g_w^i, g_w^j>``, ``gram_wl[i, j] = <g_w^i, g_l^j>``,
    ``gram_ll[i, j] = <g_l^i, g_l^j>``; the update is eta sum_j (d_w^j g_w^j - d_l^j g_l^j).
    With N = 1 this is :func:`gesim.regimes.first_order`.
    """
    d_w, d_l = np.asarray(d_w, float), np.asarray(d_l, float)
    gram_ww, gram_wl, gram_ll = (np.asarray(g, float) for g in (gram_ww, gram_wl, gram_ll))
    delta_lw = eta * (gram_ww @ d_w - gram_wl @ d_l)
    delta_ll = eta * (gram_wl.T @ d_w - gram_ll @ d_l)
    return delta_lw, delta_ll


def grams(g_w, g_l, precond=None):
    """The three (N, N) Gram matrices of stacked gradients (N, P), optionally P-weighted."""
    g_w, g_l = np.asarray(g_w, float), np.asarray(g_l, float)
    pw = g_w if precond is None else g_w * np.asarray(precond, float)
    pl = g_l if precond is None else g_l * np.asarray(precond, float)
    return pw @ g_w.T, pw @ g_l.T, pl @ g_l.T


def update_first_order(grad_f, u):
    """First-order change <grad f, u> of log-probs with gradients ``grad_f`` (..., P) under update u."""
    return np.asarray(grad_f, float) @ np.asarray(u, float)


def regime_fractions(delta_lw, delta_ll, d_w=None, d_l=None) -> dict[str, float]:
    """Fraction of pairs in each regime."""
    return regimes.fractions(regimes.regime_codes(delta_lw, delta_ll, d_w, d_l))
