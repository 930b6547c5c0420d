"""trl DPOTrainer's other pairwise losses (docs/theory.md section 2, last paragraph)."""

from __future__ import annotations

from gesim.losses.registry import NONNEG, POSITIVE, REAL, Range, Trl, register
from gesim.losses.terms import BETA, EPS, alpha_reward, dpo_trl, h, h_norm


@register("exo_pair", margin=True, ranges={"beta": POSITIVE, "eps": Range(0.0, 0.5)}, beta=0.1, eps=1e-3,
          trl=dpo_trl("exo_pair", eps="label_smoothing"),
          source="Ji et al. 2024, EXO (arXiv 2402.00856), pairwise; trl loss_type='exo_pair', eps = label_smoothing")
def exo_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, eps):
    """L = sigma(beta h)(log sigma(beta h) - log(1-eps)) + sigma(-beta h)(log sigma(-beta h) - log eps)."""
    z = beta * h(lw, ll, lw_ref, ll_ref)
    return (ops.sigmoid(z) * (ops.log_sigmoid(z) - ops.log(1 - eps))
            + ops.sigmoid(-z) * (ops.log_sigmoid(-z) - ops.log(eps)))


@register("nca_pair", margin=False, ranges=BETA, beta=0.1, trl=dpo_trl("nca_pair"),
          source="Chen et al. 2024, NCA (arXiv 2402.05369); trl loss_type='nca_pair'")
def nca_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta rw) - log sigma(-beta rw)/2 - log sigma(-beta rl)/2."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(beta * rw) - ops.log_sigmoid(-beta * rw) / 2 - ops.log_sigmoid(-beta * rl) / 2


@register("robust", margin=True, ranges={"beta": POSITIVE, "eps": EPS}, beta=0.1, eps=0.1,
          trl=dpo_trl("robust", eps="label_smoothing"),
          source="Chowdhury et al. 2024, robust DPO (arXiv 2403.00409); trl loss_type='robust' "
          "with label_smoothing=eps")
def robust(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, eps):
    """L = ((1 - eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps)."""
    z = beta * h(lw, ll, lw_ref, ll_ref)
    return ((1 - eps) * -ops.log_sigmoid(z) + eps * ops.log_sigmoid(-z)) / (1 - 2 * eps)


@register("bco_pair", margin=False, ranges={"beta": POSITIVE, "delta": REAL}, beta=0.1, delta=0.0,
          trl=Trl("DPOTrainer", "bco_pair", {"beta": "beta"}, requires={"delta": 0.0}),
          source="Jung et al. 2024, BCO (arXiv 2404.04656), paired; delta is the paper's reward shift "
          "(a detached running mean of the rewards there); trl 1.16 loss_type='bco_pair' has no shift "
          "(delta = 0)")
def bco_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, delta):
    """L = -log sigma(beta rw - delta) - log sigma(-(beta rl - delta))."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(beta * rw - delta) - ops.log_sigmoid(-(beta * rl - delta))


@register("sppo_hard", margin=False, ranges=BETA, beta=0.1, trl=dpo_trl("sppo_hard"),
          source="Wu et al. 2024, SPPO (arXiv 2405.00675) with hard labels; trl loss_type='sppo_hard'")
def sppo_hard(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = (rw - 1/(2 beta))^2 + (rl + 1/(2 beta))^2."""
    return (lw - lw_ref - 1 / (2 * beta)) ** 2 + (ll - ll_ref + 1 / (2 * beta)) ** 2


@register("apo_zero", margin=False, ranges=BETA, beta=0.1, trl=dpo_trl("apo_zero"),
          source="D'Oosterlinck et al. 2024, APO-zero (arXiv 2408.06266); trl loss_type='apo_zero'")
def apo_zero(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = (1 - sigma(beta rw)) + sigma(beta rl): push chosen up and rejected down separately."""
    return 1 - ops.sigmoid(beta * (lw - lw_ref)) + ops.sigmoid(beta * (ll - ll_ref))


@register("apo_down", margin=False, ranges=BETA, beta=0.1, trl=dpo_trl("apo_down"),
          source="D'Oosterlinck et al. 2024, APO-down (arXiv 2408.06266); trl loss_type='apo_down'")
def apo_down(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = sigma(beta rw) + (1 - sigma(beta h)): push both down, rejected more."""
    return ops.sigmoid(beta * (lw - lw_ref)) + 1 - ops.sigmoid(beta * h(lw, ll, lw_ref, ll_ref))


@register("discopop", margin=True, ranges={"beta": POSITIVE, "tau": POSITIVE}, beta=0.1, tau=0.05,
          trl=dpo_trl("discopop", tau="discopop_tau"),
          source="Lu et al. 2024, DiscoPOP / log-ratio modulated loss (arXiv 2406.08414); "
          "trl loss_type='discopop', tau = discopop_tau")
def discopop(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, tau):
    """L = (1 - m)(-log sigma(z)) + m exp(-z),  z = beta h,  m = sigma(z / tau)."""
    z = beta * h(lw, ll, lw_ref, ll_ref)
    m = ops.sigmoid(z / tau)
    return (1 - m) * -ops.log_sigmoid(z) + m * ops.exp(-z)


@register("sigmoid_norm", margin=False, ranges=BETA, beta=5.0, trl=dpo_trl("sigmoid_norm"),
          source="Lambert et al. 2024, Tulu 3 (arXiv 2411.15124), length-normalised DPO; "
          "trl loss_type='sigmoid_norm'")
def sigmoid_norm(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta (rw/len_w - rl/len_l))."""
    return -ops.log_sigmoid(beta * h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l))



@register("alphapo", margin=False, ranges={"beta": POSITIVE, "gamma": NONNEG, "alpha": POSITIVE},
          beta=2.0, gamma=1.0, alpha=0.25,
          trl=Trl("CPOTrainer", "alphapo", {"beta": "beta", "gamma": "simpo_gamma", "alpha": "alpha"}),
          source="Gupta et al. 2025, AlphaPO (arXiv 2501.03884) on per-token mean log-probs; trl CPOTrainer "
          "loss_type='alphapo' (= 'simpo' with cpo_alpha=0); alpha -> 0 recovers SimPO")
def alphapo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, gamma, alpha):
    """L = -log sigma(beta (r(lw/len_w) - r(ll/len_l)) - gamma),  r(s) = (1 - exp(-alpha s)) / alpha."""
    return -ops.log_sigmoid(beta * (alpha_reward(ops, lw / len_w, alpha)
                                    - alpha_reward(ops, ll / len_l, alpha)) - gamma)
