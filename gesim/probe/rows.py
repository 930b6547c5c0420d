"""Row views and row products shared by the probe's engines (:mod:`gesim.probe.fast`, the training
recorder :mod:`gesim.probe.recorder`, the token Gram :mod:`gesim.probe.tokens`) and their layer
rules (:mod:`gesim.probe.layers`): a module argument split by the batch's rows, the tensors in a
module's output, per-row dot products (``rowdot``, the stacked ``pair_gram``), the tied
embedding x LM head gathers, and the closeness test rules use to check a re-run."""

from __future__ import annotations

import torch

from gesim.errors import GesimError

#: module types that only hold parameters for their parent (a parameter registered in one belongs to the parent)
CONTAINERS = (torch.nn.ParameterDict, torch.nn.ParameterList, torch.nn.ModuleDict, torch.nn.ModuleList)


def rows_view(x: torch.Tensor, N: int, T: int, name: str, last: int = 1) -> torch.Tensor:
    """``x`` as (N, positions, *x.shape[-last:]): rows first (N, ...) or flattened tokens (N*T, ...)."""
    if x.shape[0] == N or (x.shape[0] % (N * T) == 0 and x.dim() == 1 + last):
        return x.reshape(N, -1, *x.shape[x.dim() - last:])  # (N*T*k, ...): rows outermost, as reshape(-1, d) makes
    raise GesimError(f"module {name}: input of shape {tuple(x.shape)} does not map to the batch's {N} rows "
                     f"(neither ({N}, ...) nor flattened ({N * T}, ...)); the probe cannot split it per sample")


def row_slicer(x, N: int, T: int):
    """Row i of a module argument: dim 0 of size N -> x[i:i+1], of size N*T -> x[iT:(i+1)T], else x
    (tuples and lists element by element, e.g. rotary (cos, sin))."""
    if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
        parts = [row_slicer(v, N, T) for v in x]
        return lambda i: type(x)(s(i) for s in parts)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return lambda i: x
    if x.shape[0] == N:
        return lambda i: x[i:i + 1]
    if x.shape[0] % (N * T) == 0 and x.shape[0] > 0:
        k = x.shape[0] // N
        return lambda i: x[i * k:(i + 1) * k]
    return lambda i: x


def map_tensors(out, fn):
    """``out`` with ``fn`` applied to each float tensor (same order as :func:`tensors`)."""
    if isinstance(out, torch.Tensor):
        return fn(out) if out.is_floating_point() else out
    if isinstance(out, dict):
        for k in list(out.keys()):
            out[k] = map_tensors(out[k], fn)
        return out
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(map_tensors(o, fn) for o in out)
    return out


def tensors(out) -> list:
    """The floating-point tensors in a module output (tensor, tuple, list, dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    return []


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_j x[i, ...] y[i, ...]`` per row i (an elementwise product and a sum: on CPU a batched
    (1 x P)(P x 1) GEMM took 5-6x as long for any row length measured, 4k to 256k)."""
    n = x.shape[0]
    return torch.linalg.vecdot(x.reshape(n, -1), y.reshape(n, -1))


def pair_gram(x: torch.Tensor, y: torch.Tensor, B: int) -> tuple:
    """``(ip, nw2, nl2)``, each (B,), of per-row vectors x, y (2B, ...) stacked as rows 0..B-1
    chosen and B..2B-1 rejected: ``<x_w, y_l>``, ``<x_w, y_w>``, ``<x_l, y_l>`` from one (B, 2, P) x
    (B, P, 2) batched GEMM (x and y read once; no (B, P) temporary). ``y`` may be ``P x``
    (preconditioned); the (2 x 2) block per pair is then ``[[<w,Pw>, <w,Pl>], [<l,Pw>, <l,Pl>]]``."""
    xs = x.reshape(2, B, -1).transpose(0, 1)  # (B, 2, P) views: row stride B P, no copy
    ys = y.reshape(2, B, -1).transpose(0, 1)
    g = torch.bmm(xs, ys.transpose(1, 2))  # (B, 2, 2)
    return g[:, 0, 1], g[:, 0, 0], g[:, 1, 1]


SPLIT_T = 64  # self Grams of at least this many positions are formed as three half blocks (ghost_pair)


def ghost_pair(A: torch.Tensor, G: torch.Tensor, B: int) -> tuple:
    """Ghost products of a linear use over the stacked pair batch (rows 0..B-1 chosen, B..2B-1
    rejected; A: (2B, T, d_in) inputs, G: (2B, T, d_out) output gradients): ``ip`` (B,), the
    chosen x rejected ``sum_{t,s} (A_w A_l^T)[t,s] (G_w G_l^T)[t,s]``, and ``own`` (2B,), the same of
    every row with itself (nw2 then nl2). Both self Grams are symmetric, so from T >= SPLIT_T the
    positions are split into halves h, h' and three blocks are formed, ``<X_hh, Y_hh> + <X_h'h',
    Y_h'h'> + 2 <X_hh', Y_hh'>``: 3/4 of the self Grams' FLOPs, 5/6 of the ghost's. Measured on
    one CPU core from a cold cache: 0.89-0.93x the time of whole Grams at T 128-256, 0.93-1.03x at
    T 64 (one shape 1.25x), 1.1-1.25x at T 32 (the extra calls cost more than they save), hence
    SPLIT_T; whole probe at d 128, T 64: 0.97-1.0x. Each side's Grams are taken back to back, so
    its later passes read it from cache."""
    T = A.shape[1]
    blocks = [(slice(None), slice(None), 1.0)]
    if T >= SPLIT_T:
        h, k = slice(0, T // 2), slice(T // 2, T)
        blocks = [(h, h, 1.0), (k, k, 1.0), (h, k, 2.0)]
    grams = []
    for X in (A, G):
        grams.append([torch.bmm(X[:, a], X[:, b].transpose(1, 2)) for a, b, _ in blocks]
                     + [torch.bmm(X[:B], X[B:].transpose(1, 2))])
    own = sum(w * rowdot(x, y) for (_, _, w), x, y in zip(blocks, grams[0], grams[1]))
    return rowdot(grams[0][-1], grams[1][-1]), own


def pair_gram_rows(g: torch.Tensor, ia, ib) -> tuple:
    """``(<g_a, g_b>, <g_a, g_a>, <g_b, g_b>)``, each (K,), for the row pairs ``a = ia[k]``,
    ``b = ib[k]`` of per-row vectors g (N, ...): one (K, 2, P) x (K, P, 2) batched GEMM, g read
    once, no (K, P) product temporaries. ``ia``, ``ib``: slices (of step 1 over a contiguous g:
    a strided view, no copy) or index tensors (one stacked gather)."""
    g = g.reshape(len(g), -1)
    n, P = g.shape
    ra, rb = (range(n)[x] if isinstance(x, slice) else None for x in (ia, ib))
    if ra is not None and rb is not None and len(ra) == len(rb) and ra.step == rb.step == 1 and \
            rb.start >= ra.start and g.is_contiguous():
        xs = g.as_strided((len(ra), 2, P), (P, (rb.start - ra.start) * P, 1), g.storage_offset() + ra.start * P)
    else:
        xs = torch.stack([g[ia], g[ib]], 1)  # (K, 2, P)
    gram = torch.bmm(xs, xs.transpose(1, 2))  # (K, 2, 2)
    return gram[:, 0, 1], gram[:, 0, 0], gram[:, 1, 1]


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to the rounding of x's dtype (a re-run of the same module on the same input)."""
    if x.shape != y.shape:
        return False
    tol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(x.dtype, 2e-2)  # float64 models may round parts in float32
    x, y = x.detach(), y.detach()
    return bool(torch.allclose(x, y.to(x.dtype), rtol=tol, atol=tol * float(y.abs().max().clamp_min(1e-30))))


def gather_head(head_b: torch.Tensor, ib, ids: torch.Tensor, ia) -> torch.Tensor:
    """``B_j[s, x_it]``: the head's output gradient of rows ib gathered at the embedding input
    ids of rows ia. (K, Ts, Tt); T x T per pair, so the (N, T, V) gradient can be freed."""
    bj = head_b[ib]  # (K, Ts, V)
    return torch.gather(bj, 2, ids[ia][:, None, :].expand(-1, bj.shape[1], -1))


def emb_head_from_gather(emb_b, ia, head_a, ib, gathered) -> torch.Tensor:
    """``<E_i, H_j> = sum_{t,s} B_j[s, x_it] (c_it . a_js)`` per pair (K,)."""
    ca = torch.bmm(emb_b[ia], head_a[ib].transpose(1, 2))  # (K, Tt, Ts)
    return (gathered.transpose(1, 2) * ca).sum((1, 2))
