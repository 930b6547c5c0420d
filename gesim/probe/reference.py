"""The plain method: one pair at a time, two backward passes, flattened gradients.

This is what the entanglement paper's code does (docs/theory.md section 8.1), minus its two faults
(batching that sums gradients over pairs and counts padding, and the "condition" that divides
by ||g_w||^2 twice). Slow, simple, exact: the oracle every faster path is tested against.
Also the plain token Gram (one backward pass per response token, docs/theory.md section 8.5).
"""

from __future__ import annotations

import torch

from gesim import dynamics, lm
from gesim.errors import GesimError


def selected_named(model, select="all") -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) to differentiate: ``"all"`` trainable ones, ``"lora"`` (name contains
    'lora_', or a PEFT ``modules_to_save`` copy: trained with the adapter), or a predicate
    ``f(name, param) -> bool``; a tied parameter appears once."""
    if select == "all":
        keep = lambda name, p: p.requires_grad  # noqa: E731
    elif select == "lora":  # the adapter's trainable parameters: LoRA/DoRA factors and PEFT modules_to_save copies
        keep = lambda name, p: "lora_" in name or ".modules_to_save." in name  # noqa: E731
    elif callable(select):
        keep = select
    else:
        raise GesimError(f"select must be 'all', 'lora' or a predicate f(name, param) -> bool, got {select!r}")
    chosen = [(name, p) for name, p in model.named_parameters() if keep(name, p)]
    if not chosen:
        raise GesimError(f"select={select!r} selects no parameter of the model")
    return chosen


def selected_parameters(model, select="all") -> list[torch.nn.Parameter]:
    """The parameters of :func:`selected_named`, without names."""
    return [p for _, p in selected_named(model, select)]


def precond_vector(precond, chosen) -> torch.Tensor | None:
    """A diagonal preconditioner ``{parameter: tensor of its shape}`` flattened in the order of
    ``chosen`` (missing parameters get 1: no preconditioning), or None."""
    if precond is None:
        return None
    ids = {id(p) for p in chosen}
    for p, value in precond.items():
        if id(p) not in ids:
            raise GesimError("precond has a tensor for a parameter that is not selected")
        if tuple(value.shape) != tuple(p.shape):
            raise GesimError(f"precond tensor of shape {tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")
    by_id = {id(p): v for p, v in precond.items()}
    return torch.cat([by_id.get(id(p), torch.ones_like(p)).reshape(-1).to(p.dtype) for p in chosen])


def _flat_grad(value, theta) -> torch.Tensor:
    grads = torch.autograd.grad(value, theta, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, theta)])


def reference_pair_stats(model, batch: lm.PairBatch, select="all", precond=None) -> dict[str, torch.Tensor]:
    """Per pair ``ip = <g_w, P g_l>``, ``nw2 = <g_w, P g_w>``, ``nl2``, ``cos``, ``lw``, ``ll``
    (each (B,)), the plain way; P is the diagonal ``precond`` (identity when None).

    Each pair is trimmed of padding and run alone; the products are taken in the gradients'
    dtype (use float64 models for exact checks).
    """
    chosen = selected_parameters(model, select)
    p_vec = precond_vector(precond, chosen)
    out = {k: [] for k in ("ip", "nw2", "nl2", "lw", "ll")}
    for i in range(len(batch)):
        pair = batch.pair(i)
        lw = lm.response_logps(model, pair.chosen_ids, pair.chosen_mask)[0]
        g_w = _flat_grad(lw, chosen)
        ll = lm.response_logps(model, pair.rejected_ids, pair.rejected_mask)[0]
        g_l = _flat_grad(ll, chosen)
        pg_l = g_l if p_vec is None else p_vec * g_l
        pg_w = g_w if p_vec is None else p_vec * g_w
        for key, value in (("ip", g_w @ pg_l), ("nw2", g_w @ pg_w), ("nl2", g_l @ pg_l),
                           ("lw", lw.detach()), ("ll", ll.detach())):
            out[key].append(value)
    stats = {k: torch.stack(v) for k, v in out.items()}
    stats["cos"] = dynamics.cosine(stats["ip"], stats["nw2"], stats["nl2"])
    return stats


def reference_token_jacobian(model, ids: torch.Tensor, mask: torch.Tensor, select="all"):
    """Flattened per-token gradients J (M, P) of log pi(x_t | x_<t) for every masked token
    (row by row, t ascending; position 0 never counts), one backward pass per token, and the
    index list [(row, t)]."""
    chosen = selected_parameters(model, select)
    rows, index = [], []
    for r in range(len(ids)):
        logp = lm.token_logps(lm.logits(model, ids[r:r + 1], mask[r:r + 1]), ids[r:r + 1])[0]  # (T,)
        for t in range(1, ids.shape[1]):
            if mask[r, t]:
                rows.append(_flat_grad(logp[t], chosen))
                index.append((r, t))
    if not rows:
        raise GesimError("token_gram: the mask selects no response token")
    return torch.stack(rows), index


def reference_token_gram(model, ids: torch.Tensor, mask: torch.Tensor, select="all"):
    """K = J J^T (M, M) by the plain per-token loop; returns (K, index)."""
    J, index = reference_token_jacobian(model, ids, mask, select)
    return J @ J.T, index
