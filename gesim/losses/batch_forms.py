"""trl's batch-normalised forms, next to the per-pair paper forms.

Each takes len_bar, the batch-mean token count that trl divides by (trl_batch_params sets
it); for one pair or equal lengths they equal the per-pair forms.
"""

from __future__ import annotations

from gesim.losses.registry import LEN_BAR, NONNEG, POSITIVE, Trl, register
from gesim.losses.terms import EPS, h, log_odds, smoothed

_LEN = {LEN_BAR: POSITIVE}


@register("sft", margin=False, ranges={}, source="supervised fine-tuning on the chosen response, "
          "per-pair token mean; trl loss_type='sft' averages over the batch's tokens instead (sft_trl)")
def sft(ops, lw, ll, lw_ref, ll_ref, len_w, len_l):
    """L = -lw / len_w: the chosen response's mean token NLL (no rejected term, d_l = 0)."""
    return -lw / len_w


@register("sft_trl", margin=False, ranges=_LEN, len_bar=1.0,
          trl=Trl("DPOTrainer", "sft", batch="len_bar = mean chosen response length of the batch"),
          source="trl DPOTrainer loss_type='sft': -sum(lw) / sum(len_w) over the batch; per pair "
          "-lw / len_bar with len_bar the batch-mean chosen length")
def sft_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, len_bar):
    """L = -lw / len_bar (len_bar: the batch-mean chosen length, a batch constant)."""
    return -lw / len_bar


@register("rpo_trl", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG, **_LEN},
          beta=0.1, alpha=1.0, len_bar=1.0,
          trl=Trl("DPOTrainer", ("sigmoid", "sft"), {"beta": "beta", "alpha": "loss_weights[1]"},
                  batch="len_bar = mean chosen response length of the batch"),
          source="trl DPOTrainer loss_type=['sigmoid', 'sft'], loss_weights=[1, alpha] (trl's form of "
          "RPO, Pang et al. 2024): the SFT term is -sum(lw)/sum(len_w) over the batch")
def rpo_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha, len_bar):
    """L = -log sigma(beta h) - alpha lw / len_bar."""
    return -ops.log_sigmoid(beta * h(lw, ll, lw_ref, ll_ref)) - alpha * lw / len_bar


@register("cpo_trl", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG, "eps": EPS, **_LEN},
          beta=0.1, alpha=1.0, eps=0.0, len_bar=1.0,
          trl=Trl("CPOTrainer", "sigmoid", {"beta": "beta", "alpha": "cpo_alpha", "eps": "label_smoothing"},
                  batch="len_bar = mean chosen response length of the batch"),
          source="trl CPOTrainer loss_type='sigmoid' (Xu et al. 2024): NLL = -sum(lw)/sum(len_w) over the "
          "batch, weight cpo_alpha; eps = label_smoothing")
def cpo_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha, eps, len_bar):
    """L = -(1-eps) log sigma(beta (lw - ll)) - eps log sigma(-beta (lw - ll)) - alpha lw / len_bar."""
    return smoothed(ops, beta * (lw - ll), eps) - alpha * lw / len_bar


@register("orpo_trl", margin=False, ranges={"lam": NONNEG, **_LEN}, lam=0.1, len_bar=1.0,
          trl=Trl("ORPOTrainer", "orpo", {"lam": "beta"},
                  batch="len_bar = mean predicted prompt+response tokens of the chosen sequences; the "
                  "prompt tokens' NLL (outside the g_w, g_l plane) is not part of the per-pair loss"),
          source="trl ORPOTrainer (Hong et al. 2024): NLL over the chosen prompt and response tokens, "
          "averaged over the batch's tokens; the odds ratio on per-token mean log-probs")
def orpo_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam, len_bar):
    """L = -lw/len_bar - lam log sigma(logodds(lw/len_w) - logodds(ll/len_l))."""
    ratio = log_odds(ops, lw / len_w) - log_odds(ops, ll / len_l)
    return -lw / len_bar - lam * ops.log_sigmoid(ratio)
