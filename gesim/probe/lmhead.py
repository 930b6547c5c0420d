"""The LM head's block of the token Gram in closed form (used by :mod:`gesim.probe.tokens`).

Only position t-1's logits ``z = W h + b`` depend on the head for token k, so ``grad_W log p_k =
(e_{y_k} - p_k) h_k^T`` and, with ``<u v^T, u' v'^T> = (u.u') (v.v')``,

    <H_k, H_l> = (h_k . h_l) (1[y_k = y_l] - p_k[y_l] - p_l[y_k] + <p_k, p_l>)

(the bias: the second factor alone). The second factor is computed as ``<q_k, q_l>`` with
``q = e_y - p`` summed directly (:func:`head_pass`: the four-term form cancels in float32
where the model is confident). It costs ``2 M V d`` (logits) + ``2 M^2 V`` (``<q_k, q_l>``)
instead of a (T, V) x (V, d) weight gradient per token, and is taken in vocabulary chunks with
an online softmax (running max, rescaled accumulators), so memory is ``M x chunk`` whatever V.
A tied head (``W`` is also the input embedding) adds the cross terms ``<E_k, H_l> = sum_x
(e_{y_l} - p_l)[x] (S_k[x] . h_l)`` over the ids x of the batch (one GEMM) and their transposes.
``q @ W`` (``2 M V d``, the cotangent ``W^T (e_y - p)`` into the body) is skipped when only the
head is selected. W is read in chunks of ``ROWS`` rows, each used for the logits and for ``q @ W``
while it is in cache; the logits of the first m0 tokens come from the model's own head
(:class:`FirstTokens`, :func:`check_head`: the check that the model does not post-process its
logits costs no extra read of W). When the model's head gave every token's logits, ``q @ W`` is the
only use of W: it runs over ``TOUCH``-row sub-chunks, each read once (a sum) just before its GEMM,
which then finds it in cache (on a CPU; measured at M = 8, V = 50257, d = 128, float64: 7.6 ms
against 10.5 ms for the one thin GEMM, whose reads of a W larger than the cache stall).

On a CPU in float64 the two thin GEMMs ``(M x d)(d x V)`` and ``(M x V)(V x d)`` run far below the
machine's rate for well-shaped GEMMs when M is small (measured at M = 8, d = 128, V = 50257:
10-16 GFLOP/s with MKL and with OpenBLAS over several layouts and chunk sizes, against about
45 GFLOP/s for a (256 x 1024)(1024 x 1024) GEMM; bench/probe.py records both).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from gesim.errors import GesimError
from gesim.probe.rows import close

CHUNK = 1 << 21  # elements of one (tokens x vocabulary) chunk of logits
ROWS = 2048  # vocabulary rows of W per chunk: the chunk is read from memory once, reused from cache
TOUCH = 1024  # rows of W read (summed) just before the cotangent GEMM uses them, when the logits come from the model


def head_pass(H, W, b, y, U, need_pw=True, Z0=None):
    """The head's quantities for the M tokens from ``q_k = e_{y_k} - p_k`` (the gradient of
    log p_k with respect to its logits), in one pass over vocabulary chunks with an online
    softmax (running max, rescaled accumulators): ``QQ = <q_k, q_l>`` (M, M), ``qW = q @ W``
    (M, d: the cotangent ``W^T (e_y - p)`` into the body), ``qU = q[:, U]`` (M, |U|), ``lse``.
    ``Z0`` (m0, V): the logits of the first m0 tokens as the model computed them (bias included),
    used instead of recomputing them.

    q is summed directly, never as ``1[y_k = y_l] - p_k[y_l] - p_l[y_k] + <p_k, p_l>`` or
    ``W_y - p @ W``: where the model is confident (p_k[y_k] near 1) those forms cancel
    catastrophically (measured on an SFT model in float32: token cosines off by 2e-3 against
    the per-token loop's 3e-6). Here ``q_k = -p_off_k + rest_k e_{y_k}`` with ``p_off`` the
    probabilities off the token's own column and ``rest_k = 1 - p_k[y_k]`` taken as their sum,
    so every accumulator is a sum of like-signed terms.

    Chunks: ``CHUNK // M`` vocabulary rows (memory M x chunk), at most ``ROWS`` when W's chunk is
    used twice (logits, then ``e @ W_c``), so the second use reads it from cache. Each token's own
    column is zeroed by index in the one chunk that holds it (lists built once, no per-chunk search).
    """
    M, V = H.shape[0], W.shape[0]
    m0 = 0 if Z0 is None else Z0.shape[0]
    step = max(1, CHUNK // max(M, 1))
    if need_pw and m0 < M:
        step = min(step, ROWS)
    own = defaultdict(lambda: ([], []))  # chunk -> (tokens, their own column in the chunk)
    for k, v in enumerate(y.tolist()):
        own[v // step][0].append(k)
        own[v // step][1].append(v % step)
    Hc = H[m0:]

    def logits(cols):  # (M, len(cols)) logits at the given vocabulary columns (a slice or an index tensor)
        parts = [Z0[:, cols]] if m0 else []
        if m0 < M:
            Wc = W[cols]
            parts.append(Hc @ Wc.T if b is None else torch.addmm(b[cols], Hc, Wc.T))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    m = torch.full((M,), -torch.inf, dtype=H.dtype, device=H.device)
    s_off = torch.zeros(M, dtype=H.dtype, device=H.device)  # sum_{v != y} exp(z_v - m)
    eW = torch.zeros_like(H)
    EE = torch.zeros(M, M, dtype=H.dtype, device=H.device)
    for j, v0 in enumerate(range(0, V, step)):
        sl = slice(v0, v0 + step)
        z = logits(sl)
        m_new = torch.maximum(m, z.amax(1))
        scale = torch.exp(m - m_new)
        e = (z - m_new[:, None]).exp_()
        if j in own:  # off the token's own column
            ks, cs = own[j]
            e[torch.tensor(ks, device=e.device), torch.tensor(cs, device=e.device)] = 0.0
        s_off.mul_(scale).add_(e.sum(1))
        if need_pw:
            eW.mul_(scale[:, None])
            _cotangent(eW, e, W[sl], m0 == M and W.device.type == "cpu")
        EE.mul_(scale[:, None] * scale[None, :]).addmm_(e, e.T)
        m = m_new
    z_y = (H * W[y]).sum(1) + (b[y] if b is not None else 0)
    if m0:
        z_y[:m0] = Z0.gather(1, y[:m0, None])[:, 0]
    s = s_off + torch.exp(z_y - m)
    lse = m + torch.log(s)
    rest = s_off / s  # 1 - p_k[y_k], as a sum

    def p_off(cols):  # p_k[cols], 0 where the column is the token's own y
        return torch.exp(logits(cols) - lse[:, None]).masked_fill(y[:, None] == cols[None, :], 0.0)

    QQ = EE / (s[:, None] * s[None, :])  # <p_off_k, p_off_l>
    cross = -p_off(y) * rest[None, :]  # [k, l] = q_off_k[y_l] rest_l
    QQ += cross + cross.T + rest[:, None] * rest[None, :] * (y[:, None] == y[None, :]).to(H.dtype)
    qW = -eW / s[:, None] + rest[:, None] * W[y] if need_pw else eW
    qU = None
    if U is not None:
        qU = -p_off(U) + rest[:, None] * (y[:, None] == U[None, :]).to(H.dtype)
    return lse, qW, QQ, qU


def _cotangent(eW, e, Wc, touch):
    """``eW += e @ Wc``; ``touch``: in sub-chunks of ``TOUCH`` rows, each read once (a sum) before
    its GEMM, so the GEMM finds it in cache (when no logits GEMM has just read the chunk)."""
    if not touch:
        eW.addmm_(e, Wc)
        return
    for r0 in range(0, Wc.shape[0], TOUCH):
        w = Wc[r0:r0 + TOUCH]
        w.sum()
        eW.addmm_(e[:, r0:r0 + TOUCH], w)


class FirstTokens:
    """The head's input for the check row: the hidden states of the first m0 response tokens (earlier
    rows' from ``H``, then this row's at ``pos``), shaped like the row's (1, rows, d); ``rows`` = m0
    rounded up to a multiple of 4 (the last state repeated; 1 stays 1), the callers keep the first m0
    logits. Measured with MKL on a CPU (float64, d 128, V 50257): a GEMM of m rows by W costs about
    that of 4 floor(m / 4) rows plus one matrix-vector product (6 ms) per remaining row (7 rows:
    26 ms inside the token Gram, 4 rows: 7.7 ms, 8 rows: 8.2 ms)."""

    def __init__(self, H, pos, m0, T):
        self.H, self.pos, self.m0, self.T, self.sub = list(H), pos, m0, T, None

    def __call__(self, h):
        if h.numel() % self.T:
            raise GesimError("the output head was not called on the row's hidden states")
        own = h.detach().reshape(self.T, -1)[self.pos]
        sub = torch.cat([x.to(own.dtype) for x in self.H] + [own])[:self.m0]
        rows = self.m0 if self.m0 == 1 else -(-self.m0 // 4) * 4
        sub = torch.cat([sub, sub[-1:].expand(rows - self.m0, -1)]) if rows > self.m0 else sub
        self.sub = sub.reshape(*h.shape[:-2], rows, -1) if h.dim() > 2 else sub
        return self.sub


def check_head(logits, head, h, dtype):
    """The model's logits at the check positions equal its head applied to the head's input there
    (on up to 512 vocabulary columns spread over V: soft-capping or scaling would change them all);
    returns them as (rows, V) in ``dtype`` (None if the model's logits have another dtype)."""
    if h is None:
        raise GesimError("the output head was not called in the forward pass")
    V = head.weight.shape[0]
    cols = torch.linspace(0, V - 1, min(V, 512), device=head.weight.device).long()
    h = h.reshape(-1, h.shape[-1])
    with torch.no_grad():
        got = logits.detach().reshape(-1, V)[:, cols] if logits.shape[-1] == V else None
        b = head.bias[cols] if head.bias is not None else None
        want = torch.nn.functional.linear(h, head.weight[cols], b)
    if got is None or got.shape != want.shape or not close(got, want):
        raise GesimError("the model's logits are not its output head applied to the head's input "
                         "(soft-capping or scaling after the head): no closed form for the head")
    return logits.detach().reshape(-1, V) if logits.dtype == dtype else None
