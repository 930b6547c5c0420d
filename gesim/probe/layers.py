"""Per-layer pieces of the fast probe: which modules it understands, what it captures from
each call ("use") and the exact products of per-sample gradients between two uses.

For a use with input activations ``A_i`` (T, d_in) and output gradients ``B_i`` (T, d_out)
(``B = dS/d(output)``, one backward with respect to activations), the per-sample weight
gradient is ``G_i = B_i^T A_i`` (nn.Linear; its transpose for HF Conv1D) and
``<G_i, G_j> = sum_{t,s} (A_i A_j^T)[t,s] (B_i B_j^T)[t,s]`` (ghost, docs/theory.md section 8.2).
Embedding: ``G_i = sum_t e_{x_it} c_it^T``, ``<G_i, G_j> = sum_{t,s} [x_it = x_js] c_it . c_js``.
Embedding x linear head (tied weights, docs/theory.md section 8.4):
``<E_i, H_j> = sum_{t,s} B_j[s, x_it] (c_it . a_js)``. Norms and biases: per-sample vectors
``sum_t xhat_t * b_t`` and ``sum_t b_t`` (section 3.2.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gesim.errors import GesimError


def module_kind(module) -> str | None:
    """'linear', 'conv1d', 'embedding', 'layernorm', 'rmsnorm' or None (not understood)."""
    name = type(module).__name__
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if name == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.LayerNorm):
        return "layernorm"
    if name.endswith("RMSNorm") and hasattr(module, "weight"):
        return "rmsnorm"
    return None


def rms_xhat(module, x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) as HF Llama-style RMSNorm computes it (in float32, then back to x's dtype)."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if type(module).__name__.startswith("Llama") or hasattr(module, "variance_epsilon"):
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@dataclass
class Use:
    """One call of a hooked module: its kind, the selected parameters it touches by role
    ('weight', 'bias'), and what backward needs (``a``: inputs, ids or xhat; ``b``: output grad)."""

    name: str
    kind: str
    module: torch.nn.Module
    roles: dict
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    padding_idx: int | None = None
    extra: dict = field(default_factory=dict)


def per_sample(use: Use, role: str) -> torch.Tensor:
    """Materialised per-sample gradient of ``use.roles[role]`` from this use: (N, *param.shape)."""
    a, b = use.a, use.b
    if role == "bias":
        return b.sum(1)  # (N, d_out)
    if use.kind == "linear":
        return torch.einsum("nto,nti->noi", b, a)  # (N, d_out, d_in)
    if use.kind == "conv1d":
        return torch.einsum("nti,nto->nio", a, b)  # (N, d_in, d_out)
    if use.kind in ("layernorm", "rmsnorm"):
        return (a * b).sum(1)  # (N, d)
    if use.kind == "embedding":
        N, T, d = b.shape
        V = use.roles["weight"].shape[0]
        G = torch.zeros(N * V, d, dtype=b.dtype, device=b.device)
        rows = (a + torch.arange(N, device=a.device)[:, None] * V).reshape(-1)
        G.index_add_(0, rows, b.reshape(-1, d))
        return G.view(N, V, d)
    raise GesimError(f"no per-sample gradient rule for {use.kind}")


def ghost_cost_wins(use: Use) -> bool:
    """Cost rule (docs/theory.md section 8.2): ghost when 3 T (d_in + d_out) < 2 d_in d_out."""
    T, d_in, d_out = use.a.shape[1], use.a.shape[2], use.b.shape[2]
    return 3 * T * (d_in + d_out) < 2 * d_in * d_out


def _gram(x: torch.Tensor, ia, y: torch.Tensor, ib) -> torch.Tensor:
    return torch.bmm(x[ia], y[ib].transpose(1, 2))  # (K, T, T)


def ghost_product(u: Use, ia, v: Use, ib) -> torch.Tensor:
    """<G^u_I, G^v_J> per index pair (K,) for the weight role, without forming any G."""
    ku, kv = u.kind, v.kind
    if ku in ("linear", "conv1d") and kv in ("linear", "conv1d"):
        if ku != kv:
            raise GesimError(f"tied weight used as both Linear and Conv1D ({u.name}, {v.name}): not supported")
        return (_gram(u.a, ia, v.a, ib) * _gram(u.b, ia, v.b, ib)).sum((1, 2))
    if ku == "embedding" and kv == "embedding":
        eq = u.a[ia][:, :, None] == v.a[ib][:, None, :]  # (K, T, T)
        return (eq * _gram(u.b, ia, v.b, ib)).sum((1, 2))
    if ku == "embedding" and kv == "linear":
        gathered = v.extra["gathered"][id(u)][(id(ia), id(ib))] if v.b is None else gather_head(v.b, ib, u.a, ia)
        return emb_head_from_gather(u.b, ia, v.a, ib, gathered)
    if ku == "linear" and kv == "embedding":
        return ghost_product(v, ib, u, ia)
    raise GesimError(f"no exact product rule between a {ku} use ({u.name}) and a {kv} use ({v.name})")


def gather_head(head_b: torch.Tensor, ib, ids: torch.Tensor, ia) -> torch.Tensor:
    """``B_j[s, x_it]``: the head's output gradient of rows ib gathered at the embedding input
    ids of rows ia. (K, Ts, Tt); T x T per pair, so the (N, T, V) gradient can be freed."""
    bj = head_b[ib]  # (K, Ts, V)
    return torch.gather(bj, 2, ids[ia][:, None, :].expand(-1, bj.shape[1], -1))


def emb_head_from_gather(emb_b, ia, head_a, ib, gathered) -> torch.Tensor:
    """``<E_i, H_j> = sum_{t,s} B_j[s, x_it] (c_it . a_js)`` per pair (K,)."""
    ca = torch.bmm(emb_b[ia], head_a[ib].transpose(1, 2))  # (K, Tt, Ts)
    return (gathered.transpose(1, 2) * ca).sum((1, 2))
