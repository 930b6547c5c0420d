"""Regimes of a first-order step, from the loss weights and the gradient geometry.

One gradient step on one pair moves the chosen and rejected log-probs by (theory.md section 2)

    delta_lw = eta (d_w nw2 - d_l ip),    delta_ll = eta (d_w ip - d_l nl2)

with ip = <g_w, g_l>, nw2 = ||g_w||^2, nl2 = ||g_l||^2. The *regime* names the pair of signs:

============================  =====================================================
``ideal``                     chosen up (or flat), rejected down (or flat)
``both_down``                 chosen down, rejected down
``both_up``                   chosen up, rejected up
``chosen_down_rejected_up``   the reverse of the goal (impossible when d_w, d_l > 0)
``stalled``                   both weights vanish, or neither log-prob moves
============================  =====================================================

Everything here is vectorised numpy over arrays of pairs; the symbolic derivations, the
simulator and the probe all classify with these functions.
"""

from __future__ import annotations

import numpy as np

from gesim.errors import GesimError

REGIMES = ("ideal", "both_down", "both_up", "chosen_down_rejected_up", "stalled")
IDEAL, BOTH_DOWN, BOTH_UP, CHOSEN_DOWN_REJECTED_UP, STALLED = range(5)


def check_geometry(ip, nw2, nl2, rtol: float = 1e-9):
    """Raise :class:`GesimError` unless (ip, nw2, nl2) can come from two real vectors.

    Rejects NaN and infinities, negative squared norms and ip^2 > nw2 nl2 (Cauchy-Schwarz),
    the last with a relative tolerance ``rtol`` for round-off.
    """
    ip, nw2, nl2 = (np.asarray(x, dtype=float) for x in (ip, nw2, nl2))
    for name, x in (("ip", ip), ("nw2", nw2), ("nl2", nl2)):
        if not np.all(np.isfinite(x)):
            raise GesimError(f"{name} must be a finite number, got {_first_bad(x, ~np.isfinite(x))}")
    for name, x in (("nw2", nw2), ("nl2", nl2)):
        if np.any(x < 0):
            raise GesimError(f"{name} is a squared norm and cannot be negative, got {_first_bad(x, x < 0)}")
    bad = ip**2 > nw2 * nl2 * (1 + rtol) + 1e-300
    if np.any(bad):
        i = np.flatnonzero(np.broadcast_to(bad, np.broadcast(ip, nw2, nl2).shape))[0]
        b = np.broadcast_arrays(ip, nw2, nl2)
        raise GesimError(
            f"impossible geometry: ip^2 = {b[0].flat[i] ** 2:g} > nw2 * nl2 = {b[1].flat[i] * b[2].flat[i]:g} "
            "(Cauchy-Schwarz needs |ip| <= sqrt(nw2 nl2))")


def _first_bad(x, mask):
    return np.asarray(x)[np.broadcast_to(mask, np.shape(x))].flat[0] if np.ndim(x) else float(x)


def first_order(d_w, d_l, ip, nw2, nl2, eta=1.0):
    """First-order changes (delta_lw, delta_ll) of one gradient step on one pair.

    Implements theory.md section 2: delta_lw = eta (d_w nw2 - d_l ip),
    delta_ll = eta (d_w ip - d_l nl2).
    """
    return eta * (d_w * nw2 - d_l * ip), eta * (d_w * ip - d_l * nl2)


def regime_codes(delta_lw, delta_ll, d_w=None, d_l=None) -> np.ndarray:
    """Integer regime codes (indices into :data:`REGIMES`) for arrays of changes.

    ``stalled`` when both weights are zero (if given) or both changes are zero; otherwise
    the signs decide, a zero change counting toward ``ideal``.
    """
    delta_lw, delta_ll = np.broadcast_arrays(np.asarray(delta_lw, float), np.asarray(delta_ll, float))
    codes = np.full(delta_lw.shape, IDEAL, dtype=np.int8)
    codes[(delta_lw < 0) & (delta_ll < 0)] = BOTH_DOWN
    codes[(delta_lw > 0) & (delta_ll > 0)] = BOTH_UP
    codes[(delta_lw < 0) & (delta_ll > 0)] = CHOSEN_DOWN_REJECTED_UP
    stalled = (delta_lw == 0) & (delta_ll == 0)
    if d_w is not None and d_l is not None:
        stalled = stalled | ((np.asarray(d_w) == 0) & (np.asarray(d_l) == 0))
    codes[np.broadcast_to(stalled, codes.shape)] = STALLED
    return codes


def classify(delta_lw, delta_ll, d_w=None, d_l=None):
    """Regime names for the changes: a ``str`` for scalars, an array of ``str`` otherwise."""
    codes = regime_codes(delta_lw, delta_ll, d_w, d_l)
    names = np.asarray(REGIMES)[codes]
    return str(names) if names.ndim == 0 else names


def fractions(codes) -> dict[str, float]:
    """Fraction of entries in each regime (all five keys, summing to 1)."""
    codes = np.asarray(codes).ravel()
    counts = np.bincount(codes.astype(np.int64), minlength=len(REGIMES))
    total = max(codes.size, 1)
    return {name: float(c) / total for name, c in zip(REGIMES, counts)}
