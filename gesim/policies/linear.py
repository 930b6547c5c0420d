"""Closed forms shared by every synthetic policy: a softmax over a linear read-out of features.

Every policy in :mod:`gesim.policies` is a linear-softmax model (theory.md section 4)

    pi(y_t | y_<t, x) = softmax(W h_t)[y_t],     W in R^{V x d} learnable,

whose features h_t are fixed (they may depend on the prompt and the prefix, never on W). For
a response y with response mask m the summed log-prob and its gradient are

    l(y)  = sum_t m_t log p_t(y_t),            p_t = softmax(W h_t)
    g(y)  = dl/dW = sum_t m_t (e_{y_t} - p_t) h_t^T

and for a pair the inner products are the double sums of theory.md section 4,

    ip = <g_w, g_l>_F = sum_{t,s} (e_{w_t} - p^w_t).(e_{l_s} - p^l_s) (h^w_t . h^l_s).

Everything is batched over N independent instances (each with its own W): ``W`` (N, V, d),
features ``H`` (N, T, d), token ids (N, T), masks (N, T). Torch, no autograd needed.
"""

from __future__ import annotations

import torch


def token_probs(W, H):
    """p_t = softmax(W h_t): (N, T, V) from W (N, V, d) and H (N, T, d)."""
    return torch.softmax(torch.einsum("ntd,nvd->ntv", H, W), dim=-1)  # (N, T, V)


def logps(W, H, ids, mask):
    """Summed response log-probs l(y) = sum_t m_t log p_t(y_t), shape (N,)."""
    logp = torch.log_softmax(torch.einsum("ntd,nvd->ntv", H, W), dim=-1)  # (N, T, V)
    tok = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return (tok * mask).sum(-1)


def residuals(W, H, ids, mask):
    """(l(y), C) with C_t = m_t (e_{y_t} - p_t): the per-position logit gradients, C (N, T, V)."""
    lp, C = _residuals(W, H, ids, mask)
    return lp, C * mask.unsqueeze(-1)


def _residuals(W, H, ids, mask):
    """(l(y), e_{y_t} - p_t) without the mask on C (the caller masks H or C)."""
    logp = torch.log_softmax(torch.bmm(H, W.transpose(1, 2)), dim=-1)  # (N, T, V)
    tok = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (N, T) log p_t(y_t)
    C = logp.exp_().neg_()  # -p_t, in place
    C.scatter_add_(-1, ids.unsqueeze(-1), torch.ones_like(tok).unsqueeze(-1))
    return (tok * mask).sum(-1), C


def grad(W, H, ids, mask):
    """(l(y), g(y)) with the closed-form gradient g = sum_t m_t (e_{y_t} - p_t) h_t^T, (N, V, d)."""
    lp, C = _residuals(W, H, ids, mask)
    return lp, torch.bmm(C.transpose(1, 2), H * mask.unsqueeze(-1))  # (N, V, d)


def pair_ip(W, H_w, ids_w, mask_w, H_l, ids_l, mask_l):
    """ip, nw2, nl2 of a pair from the double sums of theory.md section 4, without forming g.

    ip = sum_{t,s} (C^w_t . C^l_s)(h^w_t . h^l_s); nw2, nl2 likewise. Each (N,).
    """
    _, C_w = residuals(W, H_w, ids_w, mask_w)
    _, C_l = residuals(W, H_l, ids_l, mask_l)

    def dot(Ca, Ha, Cb, Hb):
        return (torch.einsum("ntv,nsv->nts", Ca, Cb) * torch.einsum("ntd,nsd->nts", Ha, Hb)).sum((-1, -2))

    return dot(C_w, H_w, C_l, H_l), dot(C_w, H_w, C_w, H_w), dot(C_l, H_l, C_l, H_l)
