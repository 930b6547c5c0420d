"""Full Gram matrices ``<G_i, G_j>`` of per-row gradients over R rows, from the inputs and
output gradients the recorder captured (:mod:`gesim.probe.recorder`, ``batch_gram=True``).

Per-row gradients are materialised at most ``CHUNK_BYTES`` at a time (chunks of the output
dimension or of vocabulary rows), never the whole R x P; or, for linear maps where it is
cheaper, not at all (flattened ghost Grams).
"""

from __future__ import annotations

import torch

from gesim.probe.layers import EmbeddingRule

CHUNK_BYTES = 256 * 2**20  # materialised per-row gradients: at most this much at once


def _chunk(R, other, dtype):
    return max(1, CHUNK_BYTES // max(1, R * other * torch.finfo(dtype).bits // 8))


def linear_gram(a, b) -> torch.Tensor:
    """Full Gram ``<G_i, G_j>`` (R, R) of a linear map's per-row weight gradients
    ``G_i = B_i^T A_i`` (a: (R, T, d_in), b: (R, T, d_out); Frobenius products are transpose
    invariant, so HF Conv1D is the same): flattened ghost Grams ``sum_{t,s} (A A^T)(B B^T)``
    (2 (RT)^2 (d_in + d_out) FLOPs) or per-row gradients materialised in chunks of the output
    dimension (2 R T d_in d_out + 2 R^2 d_in d_out FLOPs, counted twice: writing R d_in d_out
    floats made it about 2.6x a weight-gradient GEMM on CPU), whichever is cheaper."""
    R, T, d_in = a.shape
    d_out = b.shape[2]
    if (R * T) ** 2 * (d_in + d_out) < 2 * R * T * d_in * d_out + R * R * d_in * d_out:  # x2: memory-bound
        af, bf = a.reshape(R * T, d_in), b.reshape(R * T, d_out)
        return ((af @ af.T) * (bf @ bf.T)).view(R, T, R, T).sum((1, 3))
    K = torch.zeros(R, R, dtype=a.dtype, device=a.device)
    step = _chunk(R, d_in, a.dtype)
    for o in range(0, d_out, step):
        G = torch.einsum("nto,nti->noi", b[..., o:o + step], a).reshape(R, -1)
        K += G @ G.T
    return K


def embedding_gram(ids, c) -> torch.Tensor:
    """Full Gram of an embedding's per-row gradients ``G_i = sum_t e_{x_it} c_it^T``:
    ``sum_{t,s} [x_it = x_js] c_it . c_js`` (ids: (R, T), c: (R, T, d))."""
    R, T, d = c.shape
    cf, xf = c.reshape(R * T, d), ids.reshape(R * T)
    return ((xf[:, None] == xf[None, :]) * (cf @ cf.T)).view(R, T, R, T).sum((1, 3))


def tied_gram(uses, shape) -> torch.Tensor:
    """Full Gram of a tied (V, d) weight's per-row gradients summed over its uses (embedding
    lookups and linear heads), materialised in chunks of vocabulary rows."""
    V, d = shape
    R = uses[0][1].shape[0]
    ref = next(b for _, _, b in uses)
    K = torch.zeros(R, R, dtype=ref.dtype, device=ref.device)
    step = _chunk(R, d, ref.dtype)
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        G = torch.zeros(R, v1 - v0, d, dtype=ref.dtype, device=ref.device)
        for rule, a, b in uses:
            if isinstance(rule, EmbeddingRule):
                inside = (a >= v0) & (a < v1)
                rows = torch.arange(R, device=a.device)[:, None].expand_as(a)[inside]
                G.view(-1, d).index_add_(0, rows * (v1 - v0) + (a[inside] - v0), b[inside])
            else:
                G += torch.einsum("ntv,nti->nvi", b[..., v0:v1], a)
        G = G.reshape(R, -1)
        K += G @ G.T
    return K
