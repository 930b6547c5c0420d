"""What the trainer measures on its fixed eval pairs (theory.md sections 2, 3 and 5).

Two checks of the first-order theory, at every measured step:

* **one-pair check** (:func:`pair_check`): for each eval pair alone, the regime the symbolic
  derivation predicts from (lw, ll, ip, nw2, nl2) next to the realised signs of one step on
  that pair alone, u_i = -eta_i P grad L_i. For SGD, P = 1; for Adam, P is the current
  denominator 1 / (sqrt(v_hat) + eps), and ip, nw2, nl2 are the P-weighted products of
  theory.md section 3 (momentum is left out: it does not depend on the pair). The predicted
  signs do not depend on eta_i; it is set per pair so that the predicted change is
  ``size`` nats (1e-4 by default): small enough for first order to dominate (Adam's P can
  reach 1/eps where v_hat is tiny), large enough to read in float64, on a float64 copy of
  the model so that round-off never decides a sign.
* **whole-batch check** (:func:`step_check`): for the optimizer's actual step u on a training
  batch, the first-order change <grad f, u> of every eval pair's lw and ll next to the
  realised change. This holds for any update (theory.md section 3).

Plus token-level cosine matrices (chosen tokens x rejected tokens) for a few pairs
(:func:`token_cosines`; theory.md prediction 11) and confusion matrices of predicted against
realised regimes (:func:`confusion`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from gesim import dynamics, lm, losses, probe, regimes, symbolic


def adam_precond(opt: torch.optim.Optimizer, model) -> dict | None:
    """Adam's diagonal P = 1 / (sqrt(v_hat) + eps) per parameter, or None when the optimizer
    is not Adam-like or has taken no step yet (its first step is then treated as plain SGD)."""
    if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
        return None
    out = {}
    for group in opt.param_groups:
        b2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "exp_avg_sq" not in state:
                return None
            k = float(state["step"])
            out[p] = 1.0 / ((state["exp_avg_sq"] / (1 - b2**k)).sqrt() + eps)
    return out


def pair_check(model, evals: lm.PairBatch, loss: str, params: dict, ref: tuple, precond: dict | None = None,
               size: float = 1e-4) -> dict:
    """The one-pair check: predicted and realised (delta lw, delta ll) of a step on each pair alone.

    ``ref`` = (lw_ref, ll_ref) reference log-probs of the eval pairs; ``precond`` keyed by the
    parameters of ``model``. Returns arrays (B,): the step sizes ``eta``, ``pred_dlw``,
    ``pred_dll``, ``real_dlw``, ``real_dll`` and the regime codes ``pred``, ``real``.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = dict(model.named_parameters())
    P = None if precond is None else {n: precond[by_name[n]].double() for n in names}
    m64 = copy.deepcopy(model).double().eval()
    theta = {n: p.detach() for n, p in m64.named_parameters()}
    prec64 = None if P is None else {dict(m64.named_parameters())[n]: P[n] for n in names}
    stats = probe.pair_stats(m64, evals, precond=prec64)
    len_w, len_l = evals.chosen_mask.sum(1).double(), evals.rejected_mask.sum(1).double()
    lw_ref, ll_ref = (r.double() for r in ref)
    d = symbolic.derive(loss)
    np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
    pred = dynamics.predict(d, lw=np_(stats["lw"]), ll=np_(stats["ll"]), ip=np_(stats["ip"]), nw2=np_(stats["nw2"]),
                     nl2=np_(stats["nl2"]), lw_ref=np_(lw_ref), ll_ref=np_(ll_ref), len_w=np_(len_w),
                     len_l=np_(len_l), check=False, **params)
    scale = np.maximum(np.abs(pred["delta_lw"]), np.abs(pred["delta_ll"]))
    eta = np.where(scale > 0, size / np.where(scale > 0, scale, 1.0), 0.0)
    lossfn = losses.get(loss)
    real_w, real_l = np.zeros(len(evals)), np.zeros(len(evals))
    for i in range(len(evals)):
        one = evals.pair(i)
        point = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        lw, ll = lm.pair_logps(lm.at_params(m64, point), one)
        L = lossfn("torch", lw, ll, lw_ref[i:i + 1], ll_ref[i:i + 1], len_w[i:i + 1], len_l[i:i + 1], **params).sum()
        grads = torch.autograd.grad(L, [point[n] for n in names], allow_unused=True)
        with torch.no_grad():
            moved = dict(theta)
            for n, g in zip(names, grads):
                if g is not None:
                    moved[n] = theta[n] - float(eta[i]) * (g if P is None else P[n] * g)
            aw, al = lm.pair_logps(lm.at_params(m64, moved), one)
        real_w[i], real_l[i] = float(aw - lw.detach()), float(al - ll.detach())
    d_w, d_l = pred["d_w"], pred["d_l"]
    return {"eta": eta, "pred_dlw": eta * pred["delta_lw"], "pred_dll": eta * pred["delta_ll"],
            "real_dlw": real_w, "real_dll": real_l,
            "pred": regimes.regime_codes(pred["delta_lw"], pred["delta_ll"], d_w, d_l),
            "real": regimes.regime_codes(real_w, real_l, d_w, d_l)}


def method_pair_check(model, evals: lm.PairBatch, objective, ref: tuple, size: float = 1e-4) -> dict:
    """The one-pair check for any trainer objective (a mitigation of :mod:`gesim.methods`).

    For each eval pair alone: the plain gradient step u_i = -eta_i grad objective_i, its exact
    first-order changes <g_w, u_i>, <g_l, u_i> (autograd gradients, float64) as the
    prediction and the realised changes; eta_i scaled as in :func:`pair_check`. Same keys.
    """
    m64 = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    theta = {n: p.detach().clone() for n, p in m64.named_parameters()}
    len_w, len_l = evals.chosen_mask.sum(1).double(), evals.rejected_mask.sum(1).double()
    lw_ref, ll_ref = (r.double() for r in ref)
    out = {k: np.zeros(len(evals)) for k in ("eta", "pred_dlw", "pred_dll", "real_dlw", "real_dll")}
    for i in range(len(evals)):
        one = evals.pair(i)
        params = [p for _, p in named]
        L = objective(m64, one, lw_ref[i:i + 1], ll_ref[i:i + 1], len_w[i:i + 1], len_l[i:i + 1])
        step = [(-g if g is not None else torch.zeros_like(p))
                for g, p in zip(torch.autograd.grad(L, params, allow_unused=True), params)]
        lw, ll = lm.pair_logps(m64, one)
        g_w = torch.autograd.grad(lw.sum(), params, allow_unused=True, retain_graph=True)
        g_l = torch.autograd.grad(ll.sum(), params, allow_unused=True)
        pw, pl = (sum(float((g * u).sum()) for g, u in zip(gs, step) if g is not None) for gs in (g_w, g_l))
        scale = max(abs(pw), abs(pl))
        eta = size / scale if scale > 0 else 0.0
        with torch.no_grad():
            moved = dict(theta)
            for (n, _), u in zip(named, step):
                moved[n] = theta[n] + eta * u
            aw, al = lm.pair_logps(lm.at_params(m64, moved), one)
        for k, v in (("eta", eta), ("pred_dlw", eta * pw), ("pred_dll", eta * pl),
                     ("real_dlw", float(aw - lw.detach())), ("real_dll", float(al - ll.detach()))):
            out[k][i] = v
    out["pred"] = regimes.regime_codes(out["pred_dlw"], out["pred_dll"])
    out["real"] = regimes.regime_codes(out["real_dlw"], out["real_dll"])
    return out


@torch.no_grad()
def step_check(model, at: dict, batch: lm.PairBatch, u: dict):
    """<grad lw_i, u> and <grad ll_i, u> at parameters ``at``, for every pair.

    The symmetric difference (f(at + u) - f(at - u)) / 2 equals <grad f, u> up to O(|u|^3):
    the even (curvature) terms cancel. Forward-mode AD would be exact, but torch has no
    forward derivative for CPU scaled-dot-product attention.
    """
    def f(sign):
        point = {n: at[n] + sign * u[n] for n in at}
        return lm.pair_logps(lm.at_params(model, point), batch)

    (pw, pl), (mw, ml) = f(1.0), f(-1.0)
    return (pw - mw) / 2, (pl - ml) / 2


def token_cosines(model, evals: lm.PairBatch, rows=(0, 1)) -> list[dict]:
    """For each eval pair in ``rows``: the cosine matrix of per-token log-prob gradients,
    chosen response tokens x rejected response tokens, with the token ids."""
    out = []
    for i in rows:
        if i >= len(evals):
            break
        one = evals.pair(i)
        ids, mask = one.stacked()
        gram = probe.token_gram(model, ids, mask)
        cos = gram.cos()
        ia = [k for k, (r, _) in enumerate(gram.index) if r == 0]
        ib = [k for k, (r, _) in enumerate(gram.index) if r == 1]
        out.append({"pair": i, "cos": cos[ia][:, ib].double().tolist(),
                    "chosen": [int(ids[0, t]) for r, t in gram.index if r == 0],
                    "rejected": [int(ids[1, t]) for r, t in gram.index if r == 1]})
    return out


def confusion(pred, real) -> np.ndarray:
    """Counts C[p, r] of predicted regime p against realised regime r (codes of :data:`regimes.REGIMES`)."""
    n = len(regimes.REGIMES)
    return np.bincount(np.asarray(pred, int) * n + np.asarray(real, int), minlength=n * n).reshape(n, n)


def pair_outcomes(pairs: dict) -> dict:
    """Per-run fractions over the eval pairs, from :func:`preference`'s per-pair record.

    dlw, dll: mean realised change of lw and ll over the whole run; chosen_fell, rejected_rose:
    fraction of pairs with lw_final < lw_start, ll_final > ll_start; pred_fall_start: fraction
    the one-pair check at the start (measured ip, nw2, nl2 and the loss's d_w, d_l) predicts
    chosen down; agree_start: fraction whose realised sign of delta lw over the run matches that
    prediction; with the summed first-order prediction (light runs) pred_fall_sum, agree_sum;
    regime fractions predicted at the start and realised over the run."""
    lw0, ll0 = np.asarray(pairs["lw_start"]), np.asarray(pairs["ll_start"])
    dlw, dll = np.asarray(pairs["lw_final"]) - lw0, np.asarray(pairs["ll_final"]) - ll0
    pw = np.asarray(pairs["pred_start_dlw"])
    real_codes = regimes.regime_codes(dlw, dll)
    pred_codes = np.asarray(pairs["pred_start_regime"], int)
    out = {"dlw": float(dlw.mean()), "dll": float(dll.mean()), "chosen_fell": float(np.mean(dlw < 0)),
           "rejected_rose": float(np.mean(dll > 0)), "cos_start": float(np.mean(pairs["cos_start"])),
           "cos_end": float(np.mean(pairs["cos_end"])), "pred_fall_start": float(np.mean(pw < 0)),
           "agree_start": float(np.mean((pw < 0) == (dlw < 0))),
           "pred_regimes": {r: float(np.mean(pred_codes == i)) for i, r in enumerate(regimes.REGIMES)},
           "real_regimes": {r: float(np.mean(real_codes == i)) for i, r in enumerate(regimes.REGIMES)}}
    if "pred_sum_dlw" in pairs:
        ps = np.asarray(pairs["pred_sum_dlw"])
        out |= {"pred_fall_sum": float(np.mean(ps < 0)), "agree_sum": float(np.mean((ps < 0) == (dlw < 0)))}
    return out
