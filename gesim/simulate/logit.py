"""The simulator's fast path: exact gradient steps in logit space, where the features are fixed.

Every synthetic policy is a linear read-out z_t = W h_t of features h_t that never depend on
W (:mod:`gesim.policies.linear`). Stack the 2T positions of a pair (chosen, then rejected):
features H (2T, d), logits Z = H W^T (2T, V), masked residuals C = m (e_y - p) (2T, V), so that
g_w = C_w^T H_w and g_l = C_l^T H_l. A step u = eta (a g_w - b g_l) of any rule in the SGD
family (a, b: the loss's weights d_w, d_l or a reweighting of them) moves the logits by

    Delta Z = H u^T = eta (a B_w - b B_l),   B_w = K_{:,w} C_w,  B_l = K_{:,l} C_l,
    K = H H^T  (2T, 2T, computed once per instance),

and the geometry the engine records is read off the same products (theory.md section 4):

    nw2 = <C_w, (B_w)_w>,   ip = <C_w, (B_l)_w>,   nl2 = <C_l, (B_l)_l>.

So one instance-step is one softmax (one exp per logit), one batched GEMM of
2 (2T)^2 V FLOPs and a few passes over the 2T x V logits; W is never formed. The
weight-space engine (:func:`gesim.simulate.engine.run_chunk`) needs two GEMMs of 2 (2T) d V
each plus passes over V x d. :func:`floor` counts the cheapest exact update per policy.

Rules enter through ``weights(d_w, d_l, ip, nw2, nl2) -> (a, b)`` (plain geometry, P = 1);
a rule without it (Adam: a diagonal preconditioner acts in weight space) runs in weight space.
A rule whose weights ignore the geometry (``geometry_free``, e.g. SGD) lets the GEMM, the three
dots and the update run tile by tile (:data:`TILE_BYTES` of B) while B is still in cache.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gesim import dynamics, regimes, symbolic
from gesim.simulate import optim


def floor(policy: str, T: int, V: int, d: int) -> dict:
    """FLOPs per instance-step of the cheapest exact update (counted, not measured).

    T: padded response length, V: vocabulary, d: feature dimension. Per logit of the 2T x V
    block: softmax 4 FLOPs (max, subtract, sum, scale) and 1 exp; residual 1; geometry 3 (three
    dots over T x V each); update 4 (two scales, two adds). The GEMM that moves the logits is
    2 (2T)^2 V in logit space or 2 * 2 (2T) d V through weight space (g = C^T H, then H u^T),
    whichever is smaller. ``context`` pays the GEMM; ``single_token`` has T = 1 and one shared
    feature x (Z_w = Z_l, one softmax of V); ``free_logits`` has H = I (K is the identity on
    each side: no GEMM at all, Z_w = Z_l, one softmax of T x V). The one-off cost of the
    features and K = H H^T is amortised over ``steps`` and not counted here.
    """
    L = 2 * T * V
    if policy == "free_logits":
        soft, gemm = T * V, 0  # one softmax shared by both responses; Delta Z = eta (a C_w - b C_l)
    elif policy == "single_token":
        soft, gemm = V, 0  # 2 x 2 kernel: 8V multiply-adds fold into the update count below
    else:
        soft, gemm = L, min(2 * (2 * T) ** 2 * V, 2 * 2 * (2 * T) * d * V)
    elementwise = 4 * soft + 1 * L + 3 * L + 4 * L
    return {"policy": policy, "T": T, "V": V, "d": d, "gemm_flops": gemm, "elementwise_flops": elementwise,
            "exps": soft, "flops": gemm + elementwise}


def supports(rule) -> bool:
    """True when ``rule`` is in the SGD family (defines ``weights``): it can run in logit space."""
    return callable(getattr(rule, "weights", None))


def _stats(Z, P, C, Y, M, negM, out, pmin, safe):
    """Log-probs (lw, ll) into ``out`` (2, n) and the sign-flipped residuals C = p - e_y (n, 2, T, V).

    Z (n, R, V): R = 2T rows (chosen then rejected; P is C and pad rows stay unmasked, the
    kernel K masks them) or R = T when both responses share the logits (P is a separate buffer
    and C = m (p - e_y) is masked here). Y, M, negM: (n, 2, T, 1). The smallest masked log p_y
    goes to ``pmin`` (a 0-d tensor) so the caller can detect underflow; ``safe`` takes log p_y
    from log-sum-exp instead of log(p_y) (two exps per logit).
    """
    n, _, T, V = C.shape
    torch.ops.aten._softmax.out(Z, -1, False, out=P)  # one exp per logit
    Pg = P.view(n, 2, T, V) if P.shape[1] == 2 * T else P.unsqueeze(1).expand(n, 2, T, V)
    if safe:
        Zg = Z.view(n, 2, T, V) if Z.shape[1] == 2 * T else Z.unsqueeze(1).expand(n, 2, T, V)
        logp = (Zg.gather(-1, Y) - torch.logsumexp(Zg, -1, keepdim=True)).mul_(M)
    else:
        logp = Pg.gather(-1, Y).log_().mul_(M)
    torch.amin(logp, out=pmin)
    torch.sum(logp, (2, 3), out=out.T)
    if P.data_ptr() == C.data_ptr():
        C.scatter_add_(-1, Y, negM)  # p - e_y (negM = -1)
    else:
        torch.mul(Pg, M, out=C).scatter_add_(-1, Y, negM)  # m (p - e_y)


def run_block(cfg, H_w, H_l, W0, yw, mw, yl, ml, len_w, len_l, rule, bar=None, safe=False) -> dict:
    """Simulate one block of instances in logit space; arrays (steps, n) for every engine field.

    Same inputs and outputs as :func:`gesim.simulate.engine.run_chunk` (whose docstring lists
    the fields); ``rule`` must satisfy :func:`supports`. Per step only the loss weights leave
    torch; predictions, cosines and regimes are computed once at the end over all steps.

    The residuals are kept as C' = p - e_y = -C (the geometry is quadratic in C, the update
    changes sign). With separate logits per response, pad positions are masked through
    K = Hm Hm^T (Hm = m H), so C' needs no mask pass. When both responses see the same
    features (``free_logits``, ``single_token``: H_w = H_l) they share one block of logits
    Z (T, V) and one softmax, with K = H H^T (T, T) (no GEMM at all when K is the identity) and
    C' masked explicitly. If some masked p_y came near float underflow the block is rerun
    with log p_y from log-sum-exp (``safe``).
    """
    from gesim import losses

    n, T = yw.shape
    V, S, dt = W0.shape[1], cfg.steps, W0.dtype
    shared = torch.equal(H_w, H_l)
    H = H_w if shared else torch.cat([H_w, H_l], 1)  # (n, R, d), R = T or 2T
    R = H.shape[1]
    Y = torch.stack([yw, yl], 1).unsqueeze(-1)  # (n, 2, T, 1)
    M = torch.stack([mw, ml], 1).unsqueeze(-1)
    negM = -M if shared else torch.full_like(M, -1.0)  # what C' gets at y: -m, or -1 (K masks)
    Z = torch.bmm(H, W0.transpose(1, 2))  # (n, R, V)
    Hm = H if shared else H * M.view(n, R, 1)
    K = torch.bmm(Hm, Hm.transpose(1, 2))  # (n, R, R)
    C = torch.empty(n, 2, T, V, dtype=dt)
    P = C.view(n, 2 * T, V) if not shared else torch.empty_like(Z)
    if shared and torch.equal(K, torch.eye(T, dtype=dt).expand(n, T, T)):
        B, Kb = C, None  # K = I: B_w = C_w, B_l = C_l
    else:
        B = torch.empty(n, 2, R, V, dtype=dt)
        # [K_{:,w}; K_{:,l}] per instance, as 2n matrices (R, T): one batched GEMM gives B_w and B_l
        Kb = (K.unsqueeze(1).expand(n, 2, T, T) if shared else K.view(n, R, 2, T).permute(0, 2, 1, 3))
        Kb = Kb.reshape(2 * n, R, T)
    coef, step = torch.tensor([-cfg.eta, cfg.eta], dtype=dt), torch.empty(n, 2, dtype=dt)  # C' = -C
    logp = torch.empty(S + 1, 2, n, dtype=dt)  # lw, ll before every step and after the last
    pmin = torch.full((S + 1,), math.nan, dtype=dt)
    geo = torch.empty(S, 5, n, dtype=dt)  # ip, nw2, nl2 and the rule's weights a, b
    tile = max(1, TILE_BYTES // (2 * R * V * B.element_size()))
    fused = bool(getattr(rule, "geometry_free", False)) and Kb is not None and n > tile
    tiles = _tiles(n, tile if fused else n, T, R, V, Z, C, B[:tile] if fused else B, Kb, step)
    deriv, params = symbolic.derive(cfg.loss), losses.get(cfg.loss).params(**cfg.params)
    dd = np.empty((S, 2, n))  # the loss's d_w, d_l
    _stats(Z, P, C, Y, M, negM, logp[0], pmin[0], safe)
    lw_ref, ll_ref = logp[0].double().numpy()
    own, done = True, 0  # the rule kept the loss's weights (SGD): predictions use them in float64
    for k in range(S):
        lw, ll = logp[k].double().numpy()
        if not safe and not (np.isfinite(lw).all() and np.isfinite(ll).all()):
            break  # some p_y underflowed to 0: rerun below
        dd[k, 0], dd[k, 1] = deriv.weights(lw, ll, lw_ref, ll_ref, len_w, len_l, **params)
        g = geo[k]
        g[3:].copy_(torch.from_numpy(dd[k]))
        if fused:  # weights first, then GEMM, geometry and update tile by tile while B is in cache
            a, b = rule.weights(g[3], g[4], None, None, None)
            if not (a is g[3] and b is g[4]):
                own = False
                g[3], g[4] = a, b
            torch.mul(g[3:].T, coef, out=step)
        for sl, Kt, Ct, Bt, Cw, Cl, Bww, Bwl, Bll, Zrow, Brow, st in tiles:
            if Kt is not None:
                (torch.mul if T == 1 else torch.bmm)(Kt, Ct, out=Bt)  # T = 1: K is a scalar
            torch.linalg.vecdot(Cw, Bwl, out=g[0, sl])
            torch.linalg.vecdot(Cw, Bww, out=g[1, sl])
            torch.linalg.vecdot(Cl, Bll, out=g[2, sl])
            if fused:
                Zrow.baddbmm_(st, Brow)
        if not fused:
            a, b = rule.weights(g[3], g[4], g[0], g[1], g[2])
            if not (a is g[3] and b is g[4]):
                own = False
                g[3], g[4] = a, b
            torch.mul(g[3:].T, coef, out=step)  # (n, 2): -eta a, eta b
            Zrow, Brow, st = tiles[0][-3:]
            Zrow.baddbmm_(st, Brow)  # Z += eta (a B_w - b B_l) = -eta (a B'_w - b B'_l)
        _stats(Z, P, C, Y, M, negM, logp[k + 1], pmin[k + 1], safe)
        done = k + 1
        if bar is not None:
            bar.update(n)
    if not safe and not bool((pmin >= math.log(torch.finfo(dt).tiny) + 10).all()):  # NaN fails too
        if bar is not None:
            bar.update(-n * done)
        rule = optim.make(cfg.rule, cfg.eta)  # fresh: rules may keep state
        return run_block(cfg, H_w, H_l, W0, yw, mw, yl, ml, len_w, len_l, rule, bar, safe=True)
    return _record(cfg, logp.double().numpy(), geo.double().numpy(), dd[:, 0], dd[:, 1], own)


#: Bytes of B (2 x R x V per instance) per tile when the GEMM, the geometry and the update are
#: fused (rules whose weights ignore the geometry): an L2 cache's worth.
TILE_BYTES = 2**20


def _tiles(n, size, T, R, V, Z, C, B, Kb, step):
    """Per tile of ``size`` instances: the views the fused step needs (B is reused per tile)."""
    out = []
    for i in range(0, n, size):
        sl = slice(i, min(i + size, n))
        m = sl.stop - i
        Ct, Bt = C[sl], B[:m]
        out.append((sl, None if Kb is None else Kb[2 * i:2 * sl.stop], Ct.view(2 * m, T, V), Bt.view(2 * m, R, V),
                    Ct[:, 0].reshape(m, -1), Ct[:, 1].reshape(m, -1), Bt[:, 0, :T].reshape(m, -1),
                    Bt[:, 1, :T].reshape(m, -1), Bt[:, 1, R - T:].reshape(m, -1), Z[sl].view(m, 1, -1),
                    Bt.view(m, 2, -1), step[sl].unsqueeze(1)))
    return out


def _record(cfg, logp, geo, d_w, d_l, own) -> dict:
    """The engine's fields (steps, n) from log-probs (steps + 1, 2, n), geometry and weights."""
    lw, ll = logp[:-1, 0], logp[:-1, 1]
    ip, nw2, nl2 = geo[:, 0], geo[:, 1], geo[:, 2]
    ew, el = (d_w, d_l) if own else (geo[:, 3], geo[:, 4])
    pred_dlw, pred_dll = regimes.first_order(ew, el, ip, nw2, nl2, cfg.eta)
    real_dlw, real_dll = logp[1:, 0] - lw, logp[1:, 1] - ll
    cos = dynamics.cosine(ip, nw2, nl2)
    return {"lw": lw, "ll": ll, "margin": lw - ll, "d_w": d_w, "d_l": d_l, "ip": ip, "nw2": nw2, "nl2": nl2,
            "cos": cos, "pred_dlw": pred_dlw, "pred_dll": pred_dll, "real_dlw": real_dlw, "real_dll": real_dll,
            "pred_regime": regimes.regime_codes(pred_dlw, pred_dll, d_w, d_l),
            "real_regime": regimes.regime_codes(real_dlw, real_dll, d_w, d_l)}
