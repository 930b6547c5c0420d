"""Sparsity-regularised token masking (theory.md section 6; published relative: SparsePO,
Christopoulou et al., arXiv 2410.05102; the exact form here is our reconstruction).

The margin is taken over masked log-probs, one learned weight per vocabulary word,

    lw^m = sum_t m(y_t) log pi(y_t | ...),   m(y) = sigmoid(s_y) in (0, 1),

(the same for ll and the reference), and an L1 penalty lam * mean_t m(y_t) over the batch's
response tokens pulls every weight down. A word whose log-ratio moves the same way in the
chosen and the rejected response (a shared suffix word) adds nothing to the margin, so the
penalty wins and its weight falls; the label words carry the margin and keep theirs. The
policy's gradient becomes d_w sum_t m_t g_{w,t} - d_l sum_t m_t g_{l,t}: shared tokens stop
inflating ip = <g_w, g_l> (token_cosine_heatmap shows why they would).

The mask logits s are trained with the model by the same optimizer (their own parameter
group and learning rate: :meth:`TokenMask.optimizer`).
"""

from __future__ import annotations

import torch

from gesim import lm, losses
from gesim.errors import GesimError


class TokenMask(torch.nn.Module):
    """One mask logit per vocabulary word; ``init`` sets m = sigmoid(init) at the start."""

    def __init__(self, vocab_size: int, init: float = 2.0, lam: float = 0.05):
        super().__init__()
        if not lam >= 0:
            raise GesimError(f"token-mask L1 weight lam must be >= 0, got {lam}")
        self.s = torch.nn.Parameter(torch.full((vocab_size,), float(init)))
        self.lam = lam

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """m(y_t) for every token of ``ids`` (N, T)."""
        return torch.sigmoid(self.s)[ids]

    def masked_logps(self, model, batch: lm.PairBatch):
        """(lw^m, ll^m, mean m over response tokens), the masked sums in one forward pass."""
        ids, mask = batch.stacked()
        mask = mask.clone()
        mask[:, 0] = 0
        m = self.weights(ids).to(mask.dtype) * mask
        s = (lm.token_logps(lm.logits(model, ids, mask), ids) * m).sum(-1)
        B = len(batch)
        return s[:B], s[B:], m.sum() / mask.sum().clamp_min(1)

    def objective(self, loss: str = "dpo", params: dict | None = None, ref_model=None):
        """Trainer objective: the loss on masked log-probs + lam * mean mask weight.

        The reference log-probs are masked with the same weights, so they are recomputed from
        ``ref_model`` (a frozen copy of the SFT model) at every step.
        """
        if ref_model is None:
            raise GesimError("token masking needs ref_model, a frozen copy of the reference (SFT) model")
        lossfn, params = losses.get(loss), params or {}

        def objective(model, batch, lw_ref, ll_ref, len_w, len_l):
            lw, ll, mean_m = self.masked_logps(model, batch)
            rw, rl, _ = self.masked_logps(ref_model, batch)
            return lossfn("torch", lw, ll, rw, rl, len_w, len_l, **params).mean() + self.lam * mean_m

        return objective

    def optimizer(self, model, lr: float, mask_lr: float = 0.05, kind: str = "sgd"):
        """The model's optimizer (``kind``, ``lr``) chained with Adam on the mask logits (``mask_lr``)."""
        if kind == "sgd":
            inner = torch.optim.SGD(model.parameters(), lr=lr)
        elif kind == "adamw":
            inner = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        else:
            raise GesimError(f"unknown optimizer {kind!r}; choose from: sgd, adamw")
        return Chain(inner, torch.optim.Adam([self.s], lr=mask_lr))


class Chain:
    """Several optimizers stepped together (the trainer's optimizer interface)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.optimizers:
            o.step()

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
