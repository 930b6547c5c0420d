"""More trl options and literature losses: f-DPO, LD-DPO, WPO, APO, AlphaPO, Cal-DPO, DPO-Shift."""

from __future__ import annotations

from gesim.losses.registry import NONNEG, POSITIVE, Range, Trl, register
from gesim.losses.terms import BETA, EPS, alpha_reward, h, smoothed


def _f_div_dpo(ops, score, lw, ll, lw_ref, ll_ref, beta):
    return -ops.log_sigmoid(beta * (score(lw - lw_ref) - score(ll - ll_ref)))


@register("dpo_forward_kl", margin=False, ranges=BETA, beta=0.1,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta"}, {"f_divergence_type": "forward_kl"}),
          source="Wang et al. 2023, f-DPO (arXiv 2309.16240), forward KL: f'(t) = 1 - 1/t; "
          "trl f_divergence_type='forward_kl'")
def dpo_forward_kl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta (exp(-rl) - exp(-rw))): scores 1 - exp(-r)."""
    return _f_div_dpo(ops, lambda r: 1 - ops.exp(-r), lw, ll, lw_ref, ll_ref, beta)


@register("dpo_js", margin=False, ranges=BETA, beta=0.1,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta"}, {"f_divergence_type": "js_divergence"}),
          source="Wang et al. 2023, f-DPO (arXiv 2309.16240), Jensen-Shannon: f'(t) = log(2t/(1+t)); "
          "trl f_divergence_type='js_divergence'")
def dpo_js(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta (log sigma(rw) - log sigma(rl)))."""
    return _f_div_dpo(ops, ops.log_sigmoid, lw, ll, lw_ref, ll_ref, beta)


@register("dpo_alpha_div", margin=False, ranges={"beta": POSITIVE, "alpha": Range(0.0, 1.0)}, beta=0.1, alpha=0.5,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta", "alpha": "f_alpha_divergence_coef"},
                  {"f_divergence_type": "alpha_divergence"}),
          source="Wang et al. 2023, f-DPO (arXiv 2309.16240), alpha-divergence; trl f_divergence_type="
          "'alpha_divergence' with f_alpha_divergence_coef = alpha: f'(t) = (t^(alpha-1) - 1)/(alpha - 1) "
          "(the paper's (1 - t^-a)/a with a = 1 - alpha); trl evaluates it in float32")
def dpo_alpha_div(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta (s(rw) - s(rl))),  s(r) = (exp((alpha - 1) r) - 1) / (alpha - 1)."""
    return _f_div_dpo(ops, lambda r: ops.expm1((alpha - 1) * r) / (alpha - 1), lw, ll, lw_ref, ll_ref, beta)


def _ld(ops, r, length, shared, a):
    """LD-DPO's log-ratio when every token carries the mean r/length: shared + a * tail."""
    return r * (shared + a * (length - shared)) / length


@register("ld_dpo", margin=False, ranges={"beta": POSITIVE, "alpha": Range(0.0, 1.0, True, True)},
          beta=0.1, alpha=0.5,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta", "alpha": "ld_alpha"},
                  batch="exact when each response's tokens carry equal log-probs (the per-pair model); trl "
                  "splits the actual per-token log-probs at the shared length"),
          source="Liu et al. 2024, LD-DPO (arXiv 2409.06411): the tokens beyond the shorter response's "
          "length count alpha times; trl ld_alpha")
def ld_dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta (rw (m + alpha (len_w - m))/len_w - rl (m + alpha (len_l - m))/len_l)),
    m = min(len_w, len_l)."""
    m = ops.minimum(len_w, len_l)
    return -ops.log_sigmoid(beta * (_ld(ops, lw - lw_ref, len_w, m, alpha) - _ld(ops, ll - ll_ref, len_l, m, alpha)))


@register("wpo", margin=False, ranges=BETA, beta=0.1,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta"}, {"use_weighting": True},
                  batch="trl's weight subtracts each token's log sum_v p_v^2 (weight alignment); gesim's "
                  "is exp(mean log-prob) (the alignment term set to 0): a detached per-pair factor"),
          source="Zhou et al. 2024, WPO (arXiv 2406.11827), Eq. (2): DPO weighted by the detached "
          "exp(lw/len_w + ll/len_l); trl use_weighting=True")
def wpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = sg(exp(lw/len_w + ll/len_l)) * -log sigma(beta h), sg = stop_gradient."""
    return ops.exp(ops.stop_gradient(lw / len_w + ll / len_l)) * -ops.log_sigmoid(beta * h(lw, ll, lw_ref, ll_ref))


@register("apo_zero_unpaired", margin=False, ranges={"beta": POSITIVE, "lambda_d": NONNEG, "lambda_u": NONNEG},
          beta=0.1, lambda_d=1.0, lambda_u=1.0,
          trl=Trl("KTOTrainer", "apo_zero_unpaired", {"beta": "beta", "lambda_d": "desirable_weight",
                                                      "lambda_u": "undesirable_weight"}, scale=0.5),
          source="D'Oosterlinck et al. 2024, APO-zero unpaired (arXiv 2408.06266); trl KTOTrainer "
          "loss_type='apo_zero_unpaired' on the 2B examples of B pairs gives 0.5 x this")
def apo_zero_unpaired(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, lambda_d, lambda_u):
    """L = lambda_d (1 - sigma(beta rw)) + lambda_u sigma(beta rl)."""
    return lambda_d * (1 - ops.sigmoid(beta * (lw - lw_ref))) + lambda_u * ops.sigmoid(beta * (ll - ll_ref))


@register("alphapo_sum", margin=False, ranges={"beta": POSITIVE, "alpha": POSITIVE, "eps": EPS},
          beta=0.1, alpha=0.01, eps=0.0,
          trl=Trl("CPOTrainer", "sigmoid", {"beta": "beta", "alpha": "alpha", "eps": "label_smoothing"},
                  {"cpo_alpha": 0.0}),
          source="AlphaPO reward (Gupta et al. 2025, arXiv 2501.03884) on summed log-probs: trl CPOTrainer "
          "loss_type='sigmoid' with alpha != 0 and cpo_alpha=0")
def alphapo_sum(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha, eps):
    """L = -(1-eps) log sigma(z) - eps log sigma(-z),  z = beta (r(lw) - r(ll)),  r(s) = (1 - e^(-alpha s))/alpha."""
    return smoothed(ops, beta * (alpha_reward(ops, lw, alpha) - alpha_reward(ops, ll, alpha)), eps)


@register("cal_dpo", margin=False, ranges=BETA, beta=0.002,
          source="Xiao et al. 2024, Cal-DPO (NeurIPS 2024, arXiv 2412.14516), the authors' code "
          "(tengxiao1/Cal-DPO): DPO at unit temperature plus half the squared calibration errors; "
          "beta=0.002 from their zephyr config")
def cal_dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(rw - rl) + ((rw - 1/(2 beta))^2 + (rl + 1/(2 beta))^2) / 2."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(rw - rl) + ((rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2) / 2


@register("dpo_shift", margin=False, ranges={"beta": POSITIVE, "lam": Range(0.0, 1.0, high_closed=True)},
          beta=0.1, lam=0.95,
          source="Yang et al. 2025, DPO-Shift (arXiv 2502.07599): the rejected log-ratio scaled by "
          "f(lambda) = lam <= 1 (fixed strategy; lam = 1 is DPO)")
def dpo_shift(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, lam):
    """L = -log sigma(beta (rw - lam rl))."""
    return -ops.log_sigmoid(beta * ((lw - lw_ref) - lam * (ll - ll_ref)))
