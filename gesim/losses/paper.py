"""The paper's family: DPO, IPO, SimPO, CPO, ... (docs/theory.md section 2)."""

from __future__ import annotations

from gesim.losses.registry import NONNEG, POSITIVE, REAL, Trl, register
from gesim.losses.terms import BETA, dpo_trl, h, h_norm, log_odds


@register("dpo", margin=True, ranges=BETA, beta=0.1, trl=dpo_trl(),
          source="Rafailov et al. 2023, DPO (arXiv 2305.18290), Eq. (7); trl loss_type='sigmoid'")
def dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta h),  h = (lw - lw_ref) - (ll - ll_ref)."""
    return -ops.log_sigmoid(beta * h(lw, ll, lw_ref, ll_ref))


@register("ipo", margin=True, ranges={"tau": POSITIVE}, tau=0.1,
          source="Azar et al. 2023, IPO (arXiv 2310.12036), Eq. (17), summed log-ratios "
          "(trl's 'ipo' is length-averaged: see ipo_norm)")
def ipo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, tau):
    """L = (h - 1/(2 tau))^2 on summed log-ratios."""
    return (h(lw, ll, lw_ref, ll_ref) - 1 / (2 * tau)) ** 2


@register("ipo_norm", margin=False, ranges={"tau": POSITIVE}, tau=0.1,
          trl=Trl("DPOTrainer", "ipo", {"tau": "beta"}),
          source="trl loss_type='ipo' (length-averaged log-probs, tau = trl beta), after Azar et al. 2023")
def ipo_norm(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, tau):
    """L = (rw/len_w - rl/len_l - 1/(2 tau))^2: IPO on per-token mean log-ratios."""
    return (h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l) - 1 / (2 * tau)) ** 2


@register("hinge", margin=True, ranges=BETA, beta=0.1, trl=dpo_trl("hinge"),
          source="Zhao et al. 2023, SLiC (arXiv 2305.10425); trl loss_type='hinge'")
def hinge(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = relu(1 - beta h)."""
    return ops.relu(1 - beta * h(lw, ll, lw_ref, ll_ref))


@register("slic_hf", margin=False, ranges={"delta": POSITIVE, "lam": NONNEG}, delta=1.0, lam=0.1,
          source="Zhao et al. 2023, SLiC-HF (arXiv 2305.10425), regulariser on the chosen response")
def slic_hf(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, delta, lam):
    """L = relu(delta - lw + ll) - lam lw: rank calibration plus a chosen-side NLL term."""
    return ops.relu(delta - lw + ll) - lam * lw


@register("simpo", margin=False, ranges={"beta": POSITIVE, "gamma": NONNEG}, beta=2.0, gamma=1.0,
          trl=Trl("CPOTrainer", "simpo", {"beta": "beta", "gamma": "simpo_gamma"}, {"cpo_alpha": 0.0}),
          source="Meng et al. 2024, SimPO (arXiv 2405.14734), Eq. (6); trl CPOTrainer loss_type='simpo', "
          "cpo_alpha=0, gamma = simpo_gamma")
def simpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, gamma):
    """L = -log sigma(beta lw/len_w - beta ll/len_l - gamma): reference-free, length-normalised."""
    return -ops.log_sigmoid(beta * lw / len_w - beta * ll / len_l - gamma)


@register("r_dpo", margin=True, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=0.01,
          source="Park et al. 2024, R-DPO (arXiv 2403.19159)")
def r_dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta h - alpha (len_w - len_l)): DPO with a length penalty."""
    return -ops.log_sigmoid(beta * h(lw, ll, lw_ref, ll_ref) - alpha * (len_w - len_l))



@register("cpo", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=1.0,
          trl=Trl("CPOTrainer", "sigmoid", {"beta": "beta"}, {"cpo_alpha": 0.0}, requires={"alpha": 0.0}),
          source="Xu et al. 2024, CPO (arXiv 2401.08417) with the per-pair NLL term -alpha lw; trl "
          "averages the NLL over the batch's tokens and offers label_smoothing (cpo_trl)")
def cpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta (lw - ll)) - alpha lw: reference-free DPO plus chosen NLL."""
    return -ops.log_sigmoid(beta * (lw - ll)) - alpha * lw


@register("rrhf", margin=False, ranges={"lam": NONNEG}, lam=1.0,
          source="Yuan et al. 2023, RRHF (arXiv 2304.05302), two responses")
def rrhf(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam):
    """L = relu(ll/len_l - lw/len_w) - lam lw: length-normalised ranking plus chosen NLL."""
    return ops.relu(ll / len_l - lw / len_w) - lam * lw


@register("orpo", margin=False, ranges={"lam": NONNEG}, lam=0.1,
          source="Hong et al. 2024, ORPO (arXiv 2403.07691), per-pair NLL of the response; lam is trl's "
          "beta; trl's NLL runs over prompt and response tokens, batch-averaged (orpo_trl)")
def orpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam):
    """L = -lw/len_w - lam log sigma(logodds(lw/len_w) - logodds(ll/len_l))."""
    ratio = log_odds(ops, lw / len_w) - log_odds(ops, ll / len_l)
    return -lw / len_w - lam * ops.log_sigmoid(ratio)


_KTO_RANGES = {"beta": POSITIVE, "z0": REAL, "lambda_d": NONNEG, "lambda_u": NONNEG}


@register("kto", margin=False, ranges=_KTO_RANGES, beta=0.1, z0=0.0, lambda_d=1.0, lambda_u=1.0,
          trl=Trl("KTOTrainer", "kto", {"beta": "beta", "lambda_d": "desirable_weight",
                                        "lambda_u": "undesirable_weight"}, scale=0.5,
                  batch="z0 is trl's detached batch KL estimate clamp(mean(KL logps - ref KL logps), min=0)"),
          source="Ethayarajh et al. 2024, KTO (arXiv 2402.01306), used on pairs; z0 is the detached KL "
          "reference point; trl's KTOTrainer on a batch of B pairs (2B single examples) gives 0.5 x this")
def kto(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, z0, lambda_d, lambda_u):
    """L = lambda_d (1 - sigma(beta (rw - z0))) + lambda_u (1 - sigma(beta (z0 - rl)))."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return lambda_d * (1 - ops.sigmoid(beta * (rw - z0))) + lambda_u * (1 - ops.sigmoid(beta * (z0 - rl)))


@register("dpop", margin=False, ranges={"beta": POSITIVE, "lam": NONNEG}, beta=0.1, lam=50.0,
          source="Pal et al. 2024, Smaug / DPO-Positive (arXiv 2402.13228)")
def dpop(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, lam):
    """L = -log sigma(beta (h - lam relu(lw_ref - lw))): penalise chosen below the reference."""
    return -ops.log_sigmoid(beta * (h(lw, ll, lw_ref, ll_ref) - lam * ops.relu(lw_ref - lw)))


@register("rpo", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=1.0,
          source="Pang et al. 2024, iterative RPO (arXiv 2404.19733), Eq. (3): per-pair NLL over |y_w|; "
          "trl 1.16 runs loss_type=['sigmoid', 'sft'] with a batch-level SFT mean (rpo_trl)")
def rpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta h) - alpha lw/len_w: DPO plus per-token chosen NLL."""
    return -ops.log_sigmoid(beta * h(lw, ll, lw_ref, ll_ref)) - alpha * lw / len_w
