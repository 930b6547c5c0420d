"""The exact token Gram, fast: one forward per row, one activation-only backward per token,
one GEMM per layer, and the LM head in closed form.

For the response tokens k = (row r, position t) of right-padded rows, with ``log p_k =
log pi(y_k | x_<t)``, ``K[k, l] = <grad log p_k, grad log p_l>`` over the selected parameters
(docs/theory.md section 8.5). Per row: one forward; the head's input ``h`` (T, d) and, for
each hooked module, its input ``A`` (T, d_in) and output. The gradient of ``log p_k`` with
respect to ``h`` is ``W^T (e_{y_k} - p_k)`` at position t-1 only (``W`` the head, (V, d));
one backward per token from there to the hooked outputs (activations only: no weight
gradients, no pass through the head) gives ``B_k`` (T, d_out); the backwards of a few tokens
run as one vmapped backward (the same arithmetic per token in larger GEMMs, :func:`_backward`).
Per layer the per-token weight
gradient is ``G_k = B_k^T A_r``, and the layer's (M, M) block is taken by the cheaper of two
exact forms, counting the FLOPs of all M^2 pairs of a full Gram:

* materialised: ``J = [vec G_k]`` (M, d_in d_out), then ``J J^T``: ``2 M T d_in d_out +
  2 M^2 d_in d_out``; ``J[k]`` is written as token k's backward returns (:class:`_Stream`), or, for a
  layer split over d_out (memory) or called more than once per row, by one GEMM per row afterwards;
* ghost: ``<G_k, G_l> = <B_k, (A_r A_r'^T) B_l>_F``: ``2 N^2 T^2 d_in + 2 N M T^2 d_out +
  2 M^2 T d_out``; cheaper when T < d_in (short rows, wide layers). A bias rides along at no cost:
  its per-token gradient ``B_k^T 1`` is the weight gradient of an extra input column of ones, so
  weight and bias together are ``<B_k, (A_r A_r'^T + 1) B_l>_F``.

Embeddings: ``G_k = sum_t e_{x_t} c_kt^T`` grouped over the U distinct ids of the batch,
``S_k`` (U, d), then ``S S^T``. Vector parameters (biases, norm weights): per-token vectors,
stacked side by side into one Gram.

**LM head, closed form** (:mod:`gesim.probe.lmhead`): only position t-1's logits depend on the head
for token k; its block is ``(h_k . h_l) <q_k, q_l>`` with ``q = e_y - p``, in vocabulary chunks.
The forward of each row stops at the head's input (the (T, V) logits are never formed; without a
selected body parameter it runs without a graph); on the last row the model's own head runs on the
hidden states of the first ``m0 = CHUNK // V`` response tokens (at least one; the GEMM padded to a
multiple of 4 rows, :class:`gesim.probe.lmhead.FirstTokens`), its logits are
checked against ``W h + b`` (a head that post-processes its logits, soft-capping or scaling, is
refused) and reused by the head pass, so that check costs no extra read of W.

What each row's forward records, and what is refused (modules other than Linear / HF Conv1D /
Embedding / LayerNorm / elementwise-parameter norms, parameters used outside their module, with a
GesimError naming the module; ``token_gram``'s ``"auto"`` backend then uses the per-token loop), is in
:mod:`gesim.probe.tokencapture`.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from gesim import lm
from gesim.errors import GesimError
from gesim.probe import lmhead
from gesim.probe.reference import selected_named
from gesim.probe.tokencapture import Capture, Stop, check_uses, plan_uses

BWD_CAP = 1 << 22  # output-gradient elements (tokens x positions x widths) of one batched backward (cache-sized)
MAT_CAP = 1 << 25  # elements of one materialised (tokens x d_out x d_in) block; larger layers are split over d_out


def linear_gram_flops(M, N, T, d_in, d_out) -> dict:
    """FLOPs of the two exact forms of one linear layer's full (M, M) token Gram (module docstring)."""
    return {"materialise": 2 * M * T * d_in * d_out + 2 * M * M * d_in * d_out,
            "ghost": 2 * N * N * T * T * d_in + 2 * N * M * T * T * d_out + 2 * M * M * T * d_out}


def fast_token_gram(model, ids, mask, select="all"):
    """See :func:`gesim.probe.token_gram`; returns (K (M, M), index [(row, t)])."""
    from gesim.probe.api import output_head

    mask = mask.clone()
    mask[:, 0] = 0
    index = [(int(r), int(t)) for r, t in mask.nonzero().tolist()]
    if not index:
        raise GesimError("token_gram: the mask selects no response token")
    chosen = selected_named(model, select)
    dtype = torch.float64 if chosen[0][1].dtype == torch.float64 else torch.float32
    head = output_head(model)
    plan, head_roles = plan_uses(model, head, chosen)
    W = head.weight
    N, T = ids.shape
    rows = [[t for r, t in index if r == i] for i in range(N)]
    saved = {p: p.requires_grad for _, p in chosen}
    for _, p in chosen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            caps, H, Z0 = [], [], None
            last = max(r for r in range(N) if rows[r])
            m0 = min(len(index), max(1, lmhead.CHUNK // W.shape[0]))  # tokens whose logits the model's head computes
            for r in range(N):  # one forward per row, up to the head's input
                if not rows[r]:
                    caps.append(None)
                    continue
                pos = torch.tensor(rows[r], device=ids.device) - 1
                check = lmhead.FirstTokens(H, pos, m0, T) if r == last else None
                with Capture(plan, head, T, dtype, check) as cap, torch.set_grad_enabled(bool(plan)):
                    try:
                        logits = lm.logits(model, ids[r:r + 1])
                    except Stop:
                        pass
                    except GesimError:  # a rule's own refusal, already naming the module
                        raise
                    except (RuntimeError, ValueError, IndexError) as err:
                        raise GesimError(f"the model does not run its head on {m0} positions ({err})") from err
                if cap.h is None or cap.h.numel() % T:
                    raise GesimError("the output head was not called on the row's hidden states")
                if check:
                    Z0 = lmhead.check_head(logits, head, check.sub, dtype)
                    Z0 = Z0[:m0] if Z0 is not None else None  # the rows past m0 pad the head's GEMM
                cap.h = cap.h.reshape(T, -1)
                H.append(cap.h.detach()[pos].to(dtype))
                caps.append((cap, pos))
            check_uses(plan, caps)
            y = torch.tensor([int(ids[r, t]) for r, t in index], device=ids.device)
            Hm = torch.cat(H)
            Wd = W.detach().to(dtype)
            bias = head.bias.detach().to(dtype) if head.bias is not None else None
            emb_ids = _embedding_ids(W, caps)
            _, cot, D, qU = lmhead.head_pass(Hm, Wd, bias, y, emb_ids, need_pw=bool(plan), Z0=Z0)
            # cot = W^T (e_y - p): d log p_k / d h at position t-1; D = <q_k, q_l>
            K = torch.zeros(len(index), len(index), dtype=dtype, device=Hm.device)
            if "weight" in head_roles or "bias" in head_roles:
                if "weight" in head_roles:
                    K += (Hm @ Hm.T) * D
                if "bias" in head_roles:
                    K += D
            streams = _streams(plan, caps, len(index), dtype, Hm.device)
            grads = _backward(caps, cot, dtype, streams) if plan else {}
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    _products(K, plan, caps, grads, rows, head_roles.get("weight"), Hm, y, emb_ids, qU, dtype, streams)
    return K, index


def _embedding_ids(W, caps):
    """The distinct ids looked up in the (tied) head weight, or None if the head is not tied."""
    looked = [u.a for c in caps if c for u in c[0].uses if u.roles.get("weight") is W and "scale" in u.extra]
    return torch.unique(torch.cat(looked)) if looked else None


def _backward(caps, cot, dtype, streams):
    """{id(use): (K_r, T, d_out) output gradients} by one activation-only backward per token, run
    batched: up to ``BWD_CAP`` output-gradient elements of tokens of the row go through one vmapped
    backward (``is_grads_batched``: each op of the backward sees the stacked cotangents, the same
    arithmetic as one backward per token, in larger GEMMs and without a copy per token; measured
    20-30% faster than one backward after another at d 128, T 32, forward included); a backward that vmap cannot
    batch falls back to one backward per token. Uses of a streamed module are handed to its
    :class:`_Stream` as they arrive, not kept."""
    out, k0, batched = {}, 0, [True]
    for cap, pos in (c for c in caps if c):
        uses = cap.uses
        targets = [u.extra.pop("out") for u in uses]
        h, n = cap.h, len(pos)
        step = backward_step(n, sum(t.numel() for t in targets))
        shapes = [t.shape[1:] if t.shape[0] == 1 else t.shape for t in targets]
        grads = [None if u.module in streams or step == n else torch.empty(n, *sh, dtype=dtype, device=h.device)
                 for u, sh in zip(uses, shapes)]
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            seeds = torch.zeros(c1 - c0, *h.shape, dtype=h.dtype, device=h.device)
            seeds[torch.arange(c1 - c0, device=h.device), pos[c0:c1]] = cot[k0 + c0:k0 + c1].to(h.dtype)
            got = _grads(h, targets, seeds, batched)
            for i, (u, g) in enumerate(zip(uses, got)):
                g = torch.zeros(c1 - c0, *shapes[i], dtype=dtype, device=h.device) if g is None else \
                    g.reshape(c1 - c0, *shapes[i]).to(dtype)
                if u.module in streams:
                    streams[u.module].take(k0 + c0, u.a, g)
                elif grads[i] is None:
                    grads[i] = g
                else:
                    grads[i][c0:c1] = g
        cap.h = None  # the row's graph (kept for every chunk) is freed with its last references
        for u, g in zip(uses, grads):
            if g is not None:
                out[id(u)] = g.reshape(n, cap.T, -1) if g.dim() > 2 else g.reshape(n, 1, -1)
        k0 += n
    return out


def backward_step(n, per_token):
    """Tokens per batched backward for n tokens whose output gradients have ``per_token`` elements
    each: at most ``BWD_CAP`` elements (measured at d 128: 8 tokens of T 32 and 5 of T 128 beat both
    one token at a time and all 32 of T 128 at once, whose intermediates leave the cache)."""
    return max(1, min(n, BWD_CAP // max(per_token, 1)))


def _grads(h, targets, seeds, batched):
    """d <seeds[j], h> / d targets for each j, stacked: one vmapped backward while ``batched[0]``,
    else (or once vmap refuses the model's backward) one backward per seed."""
    if batched[0] and len(seeds) > 1:
        try:
            return torch.autograd.grad(h, targets, seeds, retain_graph=True, allow_unused=True,
                                       is_grads_batched=True)
        except (RuntimeError, NotImplementedError):  # an op (a custom autograd Function, say) vmap cannot batch
            batched[0] = False
    per = [torch.autograd.grad(h, targets, s, retain_graph=True, allow_unused=True) for s in seeds]
    return [None if per[0][i] is None else torch.stack([g[i] for g in per]) for i in range(len(targets))]


class _Stream:
    """A materialised linear layer's per-token weight gradients written as each batch of tokens' output
    gradients arrives, so no (M, T, d_out) buffer is kept for it (the copy into one cost about 10%
    of the token Gram at T 128): ``J[k] = A_r^T B_k`` (or its transpose: the GEMM runs along the
    wider side) and, with a bias, ``B_k`` summed over positions."""

    def __init__(self, M, d_in, d_out, bias, dtype, device):
        self.wide_out = d_out >= d_in
        self.J = torch.empty(M, *((d_in, d_out) if self.wide_out else (d_out, d_in)), dtype=dtype, device=device)
        self.b = torch.empty(M, d_out, dtype=dtype, device=device) if bias else None

    def take(self, k, a, g):
        """Tokens k, k+1, ... with output gradients ``g`` (tokens, T, d_out)."""
        g = g.reshape(g.shape[0], a.shape[0], -1).to(self.J.dtype)
        J = self.J[k:k + g.shape[0]]
        torch.matmul(a.T, g, out=J) if self.wide_out else torch.matmul(g.transpose(1, 2), a, out=J)
        if self.b is not None:
            torch.sum(g, 1, out=self.b[k:k + g.shape[0]])


def _streams(plan, caps, M, dtype, device):
    """{module: _Stream} for the linear layers whose block is materialised in one piece (the cost rule
    picks it, each row calls the layer once, M d_in d_out <= MAT_CAP)."""
    live = [c[0] for c in caps if c]
    out = {}
    for module, (_, kind, roles) in plan.items():
        if kind != "linear" or "weight" not in roles:
            continue
        per_row = [[u for u in cap.uses if u.module is module] for cap in live]
        if any(len(us) != 1 for us in per_row):
            continue
        a = per_row[0][0].a
        T, d_in = a.shape
        d_out = per_row[0][0].extra["out"].numel() // T
        cost = linear_gram_flops(M, len(live), T, d_in, d_out)
        if cost["ghost"] < cost["materialise"] or M * d_in * d_out > MAT_CAP:
            continue
        out[module] = _Stream(M, d_in, d_out, "bias" in roles, dtype, device)
    return out


def _products(K, plan, caps, grads, rows, head_W, Hm, y, U, qU, dtype, streams):
    """Adds every hooked parameter's block to K."""
    spans, k0 = [], 0
    for c in caps:
        n = len(c[1]) if c else 0
        spans.append(slice(k0, k0 + n))
        k0 += n
    live = [(r, c[0]) for r, c in enumerate(caps) if c]
    per_module = defaultdict(list)  # module -> [(row, use)]
    for r, cap in live:
        for u in cap.uses:
            per_module[u.module].append((r, u))
    vectors = _Vectors(K)
    for module, (_, kind, roles) in plan.items():
        uses = per_module[module]
        multi = len(uses) > len(live)  # called more than once per row
        if module in streams:
            st = streams[module]
            if st.b is not None:
                vectors.add([(slice(0, K.shape[0]), st.b)])
            K.addmm_(st.J.reshape(K.shape[0], -1), st.J.reshape(K.shape[0], -1).T)
        elif kind == "linear":
            _linear(K, uses, grads, spans, multi, roles, module, dtype, vectors)
        elif kind == "embedding":
            tied = roles["weight"] is head_W
            _embedding(K, uses, grads, spans, tied, Hm, U, qU)
        else:
            for role in roles:
                vectors.add([(spans[r], (grads[id(u)].reshape(grads[id(u)].shape[0], *u.a[role].shape) * u.a[role])
                              .sum(1).reshape(grads[id(u)].shape[0], -1)) for r, u in uses])
    vectors.flush()


class _Vectors:
    """Per-token gradients of vector parameters (biases, norm weights), (M, n) each, stacked side by
    side and added to K as one Gram (one GEMM instead of one per parameter; memory <= MAT_CAP)."""

    def __init__(self, K):
        self.K, self.blocks, self.size = K, [], 0

    def add(self, parts):
        """``parts``: [(token span, (K_r, n) rows)]; rows of the same span are summed (repeated uses)."""
        if len(parts) == 1 and parts[0][0] == slice(0, self.K.shape[0]):
            J = parts[0][1]
        else:
            J = torch.zeros(self.K.shape[0], parts[0][1].shape[1], dtype=self.K.dtype, device=self.K.device)
            for span, rows in parts:
                J[span] += rows
        self.blocks.append(J)
        self.size += J.numel()
        if self.size >= MAT_CAP:
            self.flush()

    def flush(self):
        if self.blocks:
            J = torch.cat(self.blocks, 1) if len(self.blocks) > 1 else self.blocks[0]
            self.K.addmm_(J, J.T)
        self.blocks, self.size = [], 0


def _linear(K, uses, grads, spans, multi, roles, module, dtype, vectors):
    M = K.shape[0]
    A0, B0 = uses[0][1].a, grads[id(uses[0][1])]
    T, d_in, d_out = A0.shape[0], A0.shape[1], B0.shape[2]
    n_rows = len({r for r, _ in uses})
    cost = linear_gram_flops(M, n_rows, T, d_in, d_out)
    ghost = "weight" in roles and not multi and cost["ghost"] < cost["materialise"]
    if "bias" in roles and not ghost:
        vectors.add([(spans[r], grads[id(u)].sum(1)) for r, u in uses])
    if "weight" not in roles:
        return
    if ghost:  # a bias rides along: <b_k, b_l> = 1^T B_k B_l^T 1, i.e. A with a column of ones (C + 1)
        for r, u in uses:
            for r2, v in uses:
                C = u.a @ v.a.T
                if "bias" in roles:
                    C += 1.0
                Y = torch.matmul(C, grads[id(v)])  # (K_r2, T, d_out)
                K[spans[r], spans[r2]] += grads[id(u)].reshape(grads[id(u)].shape[0], -1) @ Y.reshape(Y.shape[0], -1).T
        return
    step = max(1, MAT_CAP // max(M * d_in, 1))
    wide_out = d_out >= d_in  # each token's GEMM writes rows along the wider side (measured faster)
    for o0 in range(0, d_out, step):  # split over d_out: memory M x step x d_in
        per_row = {}
        for r, u in uses:  # G_k = B_k^T A_r for all tokens of the row: one batched GEMM, no copies
            B = grads[id(u)][:, :, o0:o0 + step]
            G = torch.matmul(u.a.T, B) if wide_out else torch.matmul(B.transpose(1, 2), u.a)  # G_k^T or G_k
            per_row[r] = per_row[r] + G if r in per_row else G
        parts = [per_row[r].reshape(per_row[r].shape[0], -1) for r in sorted(per_row)]
        J = parts[0] if len(parts) == 1 else torch.cat(parts)  # <G_k, G_l> is the same for G or G^T
        K.addmm_(J, J.T)


def _embedding(K, uses, grads, spans, tied, Hm, U, qU):
    """S_k[x] = s sum_{t: x_t = x} c_kt over the distinct ids x; EE = S S^T; tied: + EH + EH^T."""
    ids_all = U if tied else torch.unique(torch.cat([u.a for _, u in uses]))
    M, d = K.shape[0], grads[id(uses[0][1])].shape[2]
    S = torch.zeros(M, len(ids_all), d, dtype=K.dtype, device=K.device)
    for r, u in uses:
        c = grads[id(u)] * u.extra["scale"]
        if u.extra["keep"] is not None:
            c = c * u.extra["keep"][None, :, None]
        where = torch.searchsorted(ids_all, u.a)
        S[spans[r]] += torch.zeros(c.shape[0], len(ids_all), d, dtype=K.dtype, device=K.device).index_add_(1, where, c)
    J = S.reshape(M, -1)
    K += J @ J.T
    if tied:
        EH = J @ (qU[:, :, None] * Hm[:, None, :]).reshape(M, -1).T  # <E_k, H_l>
        K += EH + EH.T
