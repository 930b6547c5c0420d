"""AOT: a batch loss with no per-pair form; its per-pair weights for gesim.dynamics.batch_first_order."""

from __future__ import annotations


def aot_weights(lw, ll, lw_ref, ll_ref, *, beta=0.1, eps=0.0, unpaired=False):
    """Per-pair weights (d_w, d_l) = (-dL/dlw_i, dL/dll_i) of trl's AOT batch loss, in numpy.

    ``unpaired=False`` (trl loss_type='aot', Melnyk et al. 2024): sort the policy margins
    ``lw - ll`` and the reference margins separately, delta_k = sorted_k - sorted_ref_k,
    L = mean_k [-(1-eps) log sigma(beta delta_k) - eps log sigma(-beta delta_k)]. The pair
    holding rank k of the policy margin gets c_k = (beta/B)((1-eps) sigma(-beta delta_k) -
    eps sigma(beta delta_k)) on both sides: d_w = d_l = c_k. ``unpaired=True`` ('aot_unpaired')
    sorts the chosen and the rejected log-ratios separately: d_w of the pair at chosen rank k
    is c_k and d_l of the pair at rejected rank k is c_k. Feed them, with the batch's Gram
    matrices, to :func:`gesim.dynamics.batch_first_order` (eps = trl label_smoothing).
    """
    import numpy as np
    from scipy.special import expit

    lw, ll, lw_ref, ll_ref = (np.asarray(a, float) for a in (lw, ll, lw_ref, ll_ref))
    a, b = (lw - lw_ref, ll - ll_ref) if unpaired else (lw - ll, lw_ref - ll_ref)
    ia, ib = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    delta = a[ia] - b[ib]
    c = beta / len(a) * ((1 - eps) * expit(-beta * delta) - eps * expit(beta * delta))
    d_w, d_l = np.empty_like(a), np.empty_like(a)
    d_w[ia] = c
    if unpaired:
        d_l[ib] = c
    else:
        d_l[ia] = c
    return d_w, d_l
