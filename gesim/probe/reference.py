"""The plain method: one pair at a time, two backward passes, flattened gradients.

This is what the entanglement paper's code does (probe.md section 1), minus its two faults
(batching that sums gradients over pairs and counts padding, and the "condition" that divides
by ||g_w||^2 twice). Slow, simple, exact: the oracle every faster path is tested against.
"""

from __future__ import annotations

import torch

from gesim import lm


def selected_parameters(model, params="all") -> list[torch.nn.Parameter]:
    """Parameters to differentiate: ``"all"`` trainable ones, ``"lora"`` (name contains
    'lora_'), or a predicate ``f(name, param) -> bool``; a tied parameter appears once."""
    if params == "all":
        keep = lambda name, p: p.requires_grad  # noqa: E731
    elif params == "lora":
        keep = lambda name, p: "lora_" in name  # noqa: E731
    elif callable(params):
        keep = params
    else:
        raise ValueError(f"params must be 'all', 'lora' or a predicate, got {params!r}")
    return [p for name, p in model.named_parameters() if keep(name, p)]


def _flat_grad(value, params) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def reference_pair_stats(model, batch: lm.PairBatch, params="all") -> dict[str, torch.Tensor]:
    """Per pair ``ip``, ``nw2``, ``nl2``, ``cos``, ``lw``, ``ll`` (each (B,)), the plain way.

    Each pair is trimmed of padding and run alone; the products are taken in the gradients'
    dtype (use float64 models for exact checks).
    """
    chosen = selected_parameters(model, params)
    out = {k: [] for k in ("ip", "nw2", "nl2", "lw", "ll")}
    for i in range(len(batch)):
        pair = batch.pair(i)
        lw = lm.response_logps(model, pair.chosen_ids, pair.chosen_mask)[0]
        g_w = _flat_grad(lw, chosen)
        ll = lm.response_logps(model, pair.rejected_ids, pair.rejected_mask)[0]
        g_l = _flat_grad(ll, chosen)
        for key, value in (("ip", g_w @ g_l), ("nw2", g_w @ g_w), ("nl2", g_l @ g_l),
                           ("lw", lw.detach()), ("ll", ll.detach())):
            out[key].append(value)
    stats = {k: torch.stack(v) for k, v in out.items()}
    stats["cos"] = stats["ip"] / (stats["nw2"] * stats["nl2"]).sqrt()
    return stats
