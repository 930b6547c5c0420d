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
A rule whose weights ignore the geometry (``geometry_free``, e.g. SGD) lets a whole step
(residuals, GEMM, dots, update, softmax) run tile by tile (:data:`TILE_BYTES` of B) while the
tile is in cache; the three dots are one batched (2 x TV)(TV x 4) product that reads C and B
once. What stays above the counted floor is mostly memory, not arithmetic: Z and C (2 x 2T x V
per instance) must be read and written once per step, and between steps they leave the core's
cache (the loss weights of a step need every instance's log-probs first).
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

    Caveat (shared logits, K = kappa I: ``free_logits``, ``single_token``): the residual,
    geometry and update counts above assume C = m (e_y - p) is formed. In exact arithmetic the
    geometry could be read off the row norms of p instead, |m (p - e_y)|^2 = sum_t m_t
    (|p_t|^2 - 2 p_t(y_t) + 1), and the update done as Z += c p plus a scatter, about two
    passes over T x V instead of the counted ones over 2T x V; so for these two policies the
    elementwise part may be above what some exact method needs. That form cancels as p_y -> 1
    (float32 regimes could flip), so the engine does not use it.
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

    Order of work: a step needs the loss weights of every instance of the block (one numpy
    call), then runs tile by tile (:data:`TILE_BYTES`, :class:`_Tile`): the GEMM B = K C', the
    dots, Z += step B, p = softmax(Z), p_y and the next step's C' = p - e_y, all while the
    tile is in cache; then the log-probs for the whole block (:class:`_Stats`). Tiles are
    visited in serpentine order (reversed every step), so a step starts on the tiles the last
    one left in cache. A rule whose weights read the geometry (not ``geometry_free``) needs the
    whole block's geometry first: its steps run GEMM and dots tile by tile, then the weights,
    then the rest tile by tile (B is kept for the whole block).
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
    identity = shared and torch.equal(K, torch.eye(T, dtype=dt).expand(n, T, T))  # K = I: B_w = C_w, B_l = C_l
    # [K_{:,w}; K_{:,l}] per instance, as 2n matrices (R, T): one batched GEMM gives B_w and B_l
    Kb = None if identity else (K.unsqueeze(1).expand(n, 2, T, T) if shared
                                else K.view(n, R, 2, T).permute(0, 2, 1, 3)).reshape(2 * n, R, T)
    fused = bool(getattr(rule, "geometry_free", False))
    tile = max(1, TILE_BYTES // (2 * R * V * C.element_size()))
    B = C if identity else torch.empty(n if not fused else min(n, tile), 2, R, V, dtype=dt)
    G = torch.empty(n, 2, 2 * R // T, dtype=dt)  # <C'_a, (B_b)_c>: a = w, l; (b, c) every T-row block of B
    # ip = <C'_w, (B_l)_w>, nw2 = <C'_w, (B_w)_w>, nl2 = <C'_l, (B_l)_l> in G.view(n, -1)
    gcol = torch.tensor([2, 0, 4 + 3] if R == 2 * T else [1, 0, 2 + 1])
    coef, step = torch.tensor([-cfg.eta, cfg.eta], dtype=dt), torch.empty(n, 2, dtype=dt)  # C' = -C
    logp = torch.empty(S + 1, 2, n, dtype=dt)  # lw, ll before every step and after the last
    pmin = torch.full((S + 1,), math.nan, dtype=dt)
    geo = torch.empty(S, 5, n, dtype=dt)  # ip, nw2, nl2 and the rule's weights a, b
    py = torch.empty(n, 2, T, 1, dtype=dt)  # p_y (z_y when safe), then the masked log p_y
    lse = torch.empty(n, R, 1, dtype=dt) if safe else None  # log-sum-exp of every row of Z when safe
    tiles = [_Tile(slice(i, min(i + tile, n)), Z, P, C, B, G, Kb, Y, negM, M if shared else None, step, fused,
                   py, lse) for i in range(0, n, tile)]
    stats = _Stats(py, lse, M, shared)
    deriv, params = symbolic.derive(cfg.loss), losses.get(cfg.loss).params(**cfg.params)
    dd = np.empty((S, 2, n))  # the loss's d_w, d_l
    for t in tiles:
        t.softmax()
        t.residuals()
    stats(logp[0], pmin[0])
    lw_ref, ll_ref = logp[0].double().numpy()
    own, done = True, 0  # the rule kept the loss's weights (SGD): predictions use them in float64
    for k in range(S):
        lw, ll = logp[k].double().numpy()
        if not safe and not (np.isfinite(lw).all() and np.isfinite(ll).all()):
            break  # some p_y underflowed to 0: rerun below
        # the data checks once (log-probs are <= 0 by construction; non-finite ones broke out above)
        dd[k, 0], dd[k, 1] = deriv.weights(lw, ll, lw_ref, ll_ref, len_w, len_l, check=safe or k == 0, **params)
        g = geo[k]
        g[3:].copy_(torch.from_numpy(dd[k]))
        if fused:  # weights first, then the whole step tile by tile while the tile is in cache
            own = _weights(rule, g, None) and own
            torch.mul(g[3:].T, coef, out=step)  # (n, 2): -eta a, eta b
            for t in tiles:
                t.geometry()
                t.update()
                t.softmax()
                t.residuals()
            tiles.reverse()  # serpentine: the next step starts on the tiles still in cache
            torch.index_select(G.view(n, -1), 1, gcol, out=g[:3].T)
        else:  # the rule reads the geometry: the whole block's first
            for t in tiles:
                t.geometry()
            tiles.reverse()
            torch.index_select(G.view(n, -1), 1, gcol, out=g[:3].T)
            own = _weights(rule, g, g[:3]) and own
            torch.mul(g[3:].T, coef, out=step)
            for t in tiles:
                t.update()
                t.softmax()
                t.residuals()
            tiles.reverse()
        stats(logp[k + 1], pmin[k + 1])
        done = k + 1
        if bar is not None:
            bar.update(n)
    if not safe and not bool((pmin >= math.log(torch.finfo(dt).tiny) + 10).all()):  # NaN fails too
        if bar is not None:
            bar.update(-n * done)
        rule = optim.make(cfg.rule, cfg.eta)  # fresh: rules may keep state
        return run_block(cfg, H_w, H_l, W0, yw, mw, yl, ml, len_w, len_l, rule, bar, safe=True)
    return _record(cfg, logp.double().numpy(), geo.double().numpy(), dd[:, 0], dd[:, 1], own)


#: Bytes of B (2 x R x V per instance) per tile: a tile's Z, C' and B stay in cache from its
#: residuals to its softmax; larger tiles make fewer torch calls per step.
TILE_BYTES = 2**21


def _weights(rule, g, geometry) -> bool:
    """The rule's (a, b) into g[3], g[4] (which hold the loss's d_w, d_l); True if it kept them."""
    ip, nw2, nl2 = (None, None, None) if geometry is None else geometry
    a, b = rule.weights(g[3], g[4], ip, nw2, nl2)
    if a is g[3] and b is g[4]:
        return True
    g[3], g[4] = a, b
    return False


class _Tile:
    """Views of one tile of instances (``sl``) and the phases of a step on it, in this order.

    ``geometry``: B = K C' (one batched GEMM; B = C' when K = I), then the dots of C'_w, C'_l
    with every T-row block of B (one batched (2 x TV)(TV x 2R/T) product that reads C' and B
    once) into the block's G. ``update``: Z += step B (step = (-eta a, eta b) per instance).
    ``softmax``: P = softmax(Z), one exp per logit. ``residuals``: p_y (z_y and the rows'
    log-sum-exp when safe) into the block's buffers, then C' = p - e_y in place of P (masked
    when the responses share Z; with separate logits P is C' and K masks the pads), while the
    tile's P is still in cache.
    """

    def __init__(self, sl, Z, P, C, B, G, Kb, Y, negM, M, step, fused, py, lse):
        m, (R, V), T = sl.stop - sl.start, Z.shape[1:], C.shape[2]
        Bt = B[sl] if B is C or not fused else B[:m]
        grouped = (lambda X: X.unsqueeze(1).expand(m, 2, T, X.shape[-1])) if M is not None else \
            (lambda X: X.view(m, 2, T, X.shape[-1]))
        self.Z, self.P, self.C, self.Y, self.negM, self.G = Z[sl], P[sl], C[sl], Y[sl], negM[sl], G[sl]
        self.Pm = None if M is None else (grouped(P[sl]), M[sl])
        self.src = grouped(Z[sl] if lse is not None else P[sl])  # p_y from P, or z_y from Z when safe
        self.py, self.lse = py[sl], None if lse is None else lse[sl]
        self.Kb = None if Kb is None else Kb[2 * sl.start:2 * sl.stop]
        self.gemm = torch.mul if T == 1 else torch.bmm  # T = 1: K is a scalar
        self.Ck, self.Bk = C[sl].view(2 * m, T, V), Bt.view(2 * m, R, V)
        self.Cd, self.Bd = C[sl].view(m, 2, T * V), Bt.view(m, 2 * R // T, T * V).transpose(1, 2)
        self.Zrow, self.Brow, self.st = Z[sl].view(m, 1, -1), Bt.view(m, 2, -1), step[sl].unsqueeze(1)

    def geometry(self):
        if self.Kb is not None:
            self.gemm(self.Kb, self.Ck, out=self.Bk)
        torch.bmm(self.Cd, self.Bd, out=self.G)

    def update(self):
        self.Zrow.baddbmm_(self.st, self.Brow)  # Z += eta (a B_w - b B_l) = -eta (a B'_w - b B'_l)

    def softmax(self):
        torch.ops.aten._softmax.out(self.Z, -1, False, out=self.P)

    def residuals(self):
        torch.gather(self.src, -1, self.Y, out=self.py)
        if self.lse is not None:
            torch.logsumexp(self.Z, -1, keepdim=True, out=self.lse)
        if self.Pm is not None:
            torch.mul(*self.Pm, out=self.C)
        self.C.scatter_add_(-1, self.Y, self.negM)  # p - e_y (negM = -1 or -m)


class _Stats:
    """Per step, for the whole block, from the tiles' p_y (or z_y and log-sum-exp when
    ``safe``: immune to p_y underflowing): lw, ll = sum_t m_t log p_t(y_t) and the smallest
    masked log p_y (the underflow check)."""

    def __init__(self, py, lse, M, shared):
        n, _, T, _ = py.shape
        self.py, self.M = py, M
        self.lse = None if lse is None else (lse.unsqueeze(1).expand(n, 2, T, 1) if shared else lse.view(n, 2, T, 1))

    def __call__(self, out, pmin):
        logp = self.py.log_() if self.lse is None else self.py.sub_(self.lse)
        logp.mul_(self.M)
        torch.amin(logp, out=pmin)
        torch.sum(logp, (2, 3), out=out.T)


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
