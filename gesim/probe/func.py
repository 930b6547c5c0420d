"""The torch.func backend: per-sample gradients by ``vmap(grad(...))`` over the 2B rows.

``g_i = grad_theta S_i`` for every row at once (docs/theory.md section 8.3, the PyTorch
per-sample-gradients recipe), then the three products per pair. Tied weights stay tied
(``functional_call`` ties by default and named_parameters lists a shared parameter once).
Memory is N x P: a test oracle and a fine path for LoRA subsets, not for large models.
Rows are right-padded, so under causal attention the padding after a row's last response
token cannot change its log-probs; the model is called without an attention mask here
(an all-ones mask, since a data-dependent one cannot be built inside vmap).
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from gesim import dynamics, lm
from gesim.probe.reference import precond_vector, selected_named


class _Rows(torch.nn.Module):
    """S(ids, mask) = summed masked log-probs of one row, as a module for functional_call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):  # ids, mask: (T,)
        if lm.is_hf(self.model):  # an all-ones mask built outside vmap: HF's mask checks stay untraced
            positions = torch.arange(ids.shape[0], device=ids.device)[None]
            ones = torch.ones(1, ids.shape[0], dtype=torch.long, device=ids.device)
            logits = self.model(input_ids=ids[None], attention_mask=ones, position_ids=positions,
                                use_cache=False).logits
        else:
            logits = lm.logits(self.model, ids[None])
        logp = lm.token_logps(logits, ids[None])[0]  # (T,)
        m = mask.clone()
        m[0] = 0
        return (logp * m).sum()


def per_sample_grads(model, ids, mask, select="all", chunk_size=None) -> torch.Tensor:
    """Flattened per-row gradients (N, P) of the summed masked log-probs."""
    chosen = selected_named(model, select)
    rows = _Rows(model)
    theta = {"model." + name: p.detach() for name, p in chosen}
    f = lambda th, x, m: functional_call(rows, th, (x, m))  # noqa: E731
    g = vmap(grad(f), in_dims=(None, 0, 0), chunk_size=chunk_size)(theta, ids, mask)
    return torch.cat([g["model." + name].flatten(1) for name, _ in chosen], dim=1)


def func_pair_stats(model, batch: lm.PairBatch, select="all", precond=None):
    """See :func:`gesim.probe.pair_stats` (backend ``"func"``)."""
    B = len(batch)
    ids, mask = batch.stacked()
    G = per_sample_grads(model, ids, mask, select)  # (2B, P)
    P = precond_vector(precond, [p for _, p in selected_named(model, select)])
    PG = G if P is None else G * P
    g_w, g_l, pg_w, pg_l = G[:B], G[B:], PG[:B], PG[B:]
    out = {"ip": (g_w * pg_l).sum(1), "nw2": (g_w * pg_w).sum(1), "nl2": (g_l * pg_l).sum(1)}
    out["cos"] = dynamics.cosine(out["ip"], out["nw2"], out["nl2"])
    with torch.no_grad():
        out["lw"], out["ll"] = lm.pair_logps(model, batch)
    return out
