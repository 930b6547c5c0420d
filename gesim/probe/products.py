"""Which products the fast probe takes and where they accumulate (:class:`Products`): the three
pair products ``ip, nw2, nl2`` of a pair batch (one stacked Gram per parameter), any set of
(row, row) index pairs, or the full (N, N) Gram; per-use contributions kept per layer when asked;
short per-sample gradients (norm weights, biases) joined into one pair Gram at the end."""

from __future__ import annotations

from collections import defaultdict

import torch

from gesim.probe.grams import embedding_gram, linear_gram
from gesim.probe.layers import EmbeddingRule, LinearRule
from gesim.probe.rows import pair_gram

KEYS = ("ip", "nw2", "nl2")
SMALL = 4096  # per-sample gradients up to this length (norms, biases) are joined into one pair Gram


class Products:
    """Which products to take: ``pairs`` {key: (ia, ib)} row indices (or slices) over the N rows, or the
    full (N, N) Gram when ``pairs`` is None."""

    def __init__(self, pairs, N, dtype, device):
        self.pairs, self.N = pairs, N
        B = N // 2  # the pair layout of fast_pair_stats: one stacked Gram per parameter for all three keys
        self.stacked = pairs is not None and N % 2 == 0 and set(pairs) == set(KEYS) and all(
            isinstance(x, slice) and (x.start, x.stop) == want for k in KEYS for x, want in
            zip(pairs[k], {"ip": ((0, B), (B, N)), "nw2": ((0, B), (0, B)), "nl2": ((B, N), (B, N))}[k]))
        if pairs is None:
            self.total = torch.zeros(N, N, dtype=dtype, device=device)
        else:
            self.total = {k: torch.zeros(len(range(N)[ia]), dtype=dtype, device=device) for k, (ia, _) in pairs.items()}
        self.layers = defaultdict(dict)
        self.record_layers = True  # per-use contributions in self.layers (pair_stats(per_layer=True))
        self.small = []  # (g_u, g_v) of short per-sample gradients, joined in flush() (not per layer)
        self.deferred = []  # {key: (K,)} per use, summed in flush() (not per layer)

    def index_pairs(self):
        if self.pairs is None:  # full Gram: all (i, j), built once (the same objects every call)
            ia = torch.arange(self.N).repeat_interleave(self.N)
            self.pairs_all = getattr(self, "pairs_all", None) or {"K": (ia, torch.arange(self.N).repeat(self.N))}
            return self.pairs_all
        return self.pairs

    def add(self, name, values):
        """values: {key: (K,)} from ghost products (K index pairs)."""
        if self.pairs is None:
            values = {"K": values["K"].view(self.N, self.N)}
            self.total += values["K"]
        elif not self.record_layers:  # summed once in flush(): one stack and sum per key, not an add per use
            self.deferred.append(values)
        else:
            for k, v in values.items():
                self.total[k] += v
        if self.record_layers:
            for k, v in values.items():
                self.layers[name][k] = self.layers[name].get(k, 0) + v.detach()

    def dots(self, name, g_u, g_v, P=None):
        """Add <g_u, P g_v> for materialised per-sample gradients (N, ...)."""
        gu, gv = g_u.flatten(1), g_v.flatten(1)
        if P is not None:
            gv = gv * P.reshape(1, -1).to(gv.dtype)
        if self.stacked and not self.record_layers and gu.shape[1] <= SMALL:  # joined in flush()
            self.small.append((gu, gv))
            return
        if self.stacked:  # <g_w, P g_l>, <g_w, P g_w>, <g_l, P g_l> in one (B, 2, P) x (B, P, 2) GEMM
            ip, nw2, nl2 = pair_gram(gu, gv, self.N // 2)
            self.add(name, {"ip": ip, "nw2": nw2, "nl2": nl2})
            return
        if self.pairs is None:
            self.add(name, {"K": (gu @ gv.T).reshape(-1)})
        else:
            self.add(name, {k: (gu[ia] * gv[ib]).sum(1) for k, (ia, ib) in self.pairs.items()})

    def flush(self):
        """The products of the small per-sample gradients (norm weights, biases) kept by ``dots``:
        concatenated, one pair Gram (one call instead of several small ones per vector)."""
        if self.small:
            gu, gv = (torch.cat(x, 1) for x in zip(*self.small))
            self.small = []
            ip, nw2, nl2 = pair_gram(gu, gv, self.N // 2)
            self.add("vectors", {"ip": ip, "nw2": nw2, "nl2": nl2})
        if self.deferred:
            for k, total in self.total.items():
                parts = [v[k] for v in self.deferred if k in v]
                if parts:
                    total += torch.stack(parts).sum(0)
            self.deferred = []

    def ghost(self, name, u, v):
        if self.stacked and u is v:
            got = u.rule.pair_products(u, self.N // 2)
            if got is not None:
                self.add(name, got)
                return
        if self.pairs is None and u is v and isinstance(u.rule, (LinearRule, EmbeddingRule)):
            # the full Gram from flattened (NT x NT) Grams, not N^2 gathered T x T pairs (gesim.probe.grams)
            K = linear_gram(u.a, u.b) if isinstance(u.rule, LinearRule) else embedding_gram(u.a, u.b)
            self.add(name, {"K": K.reshape(-1)})
            return
        self.add(name, {k: u.rule.product(u, ia, v, ib) for k, (ia, ib) in self.index_pairs().items()})

    def ghost_both(self, name, u, v):
        """``<G_u, G_v> + <G_v, G_u>`` of two uses of one tied parameter (``u`` alone if ``u is v``);
        for a key pairing a row set with itself the two orders are the same numbers (a real inner
        product is symmetric): one product, doubled."""
        if u is v:
            return self.ghost(name, u, u)
        self.add(name, {k: 2 * u.rule.product(u, ia, v, ib) if ia is ib else
                        u.rule.product(u, ia, v, ib) + v.rule.product(v, ia, u, ib)
                        for k, (ia, ib) in self.index_pairs().items()})
