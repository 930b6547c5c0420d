"""The three synthetic policies: single token, free logits, context-dependent features.

Each is a linear softmax pi(y_t | y_<t, x) = softmax(W h_t) (closed forms in
:mod:`gesim.policies.linear`) and differs only in its fixed features h_t (theory.md section 4):

* :class:`SingleToken`: one position, h = h_x a fixed random prompt feature. With
  ``learnable_logits=True``, d = 1 and h = 1, so W is the logit vector itself.
  Closed form: ip = ||h||^2 (||p||^2 - p_w - p_l).
* :class:`FreeLogits`: one free logit vector per position, context-independent: h_t = e_t
  (one-hot position), W[:, t] the logits at t. Closed form: ||g_w - g_l||^2 = 2 Hamming.
* :class:`Context`: h_t depends on the prefix through a fixed random contracting recurrence
  h_0 = phi(A x),  h_t = phi(A h_{t-1} + E[y_{t-1}]),   phi = identity (default) or tanh
  (x the prompt feature, A = a Q with Q random orthogonal and a = ``contraction``, E random
  N(0, embed_scale^2 (1 - a^2) / d) embeddings, so ||h_t|| is about embed_scale): a differing
  token perturbs every later feature by delta_t = A^t (E[l] - E[w]) (linear case), decaying by
  a per token, so a shared suffix sits in nearly but not exactly the same context (the
  mechanism of real Transformers). Only W is learnable (learnable embeddings: not built).

Every instance gets its own W (and prompt x); A and E are shared by the instances of a seed.
``init(rng, n, T, shared_rng=...)`` draws them (A, E from ``shared_rng`` when given);
``features(inst, ids)`` gives H (N, T, d).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gesim.errors import GesimError, unknown


@dataclass(frozen=True)
class Instances:
    """Per-instance initial weights W0 (N, V, d) and prompt features x (N, d), plus the shared
    recurrence (A (d, d), E (V, d)) of the context policy."""

    W0: torch.Tensor
    x: torch.Tensor
    A: torch.Tensor | None = None
    E: torch.Tensor | None = None

    def take(self, idx) -> Instances:
        return Instances(self.W0[idx], self.x[idx], self.A, self.E)


def _check(vocab, dim):
    if int(vocab) < 3:
        raise GesimError(f"vocab must be at least 3 (id 0 is the pad), got {vocab}")
    if int(dim) < 1:
        raise GesimError(f"feature dimension must be positive, got {dim}")


@dataclass(frozen=True)
class SingleToken:
    """pi(.|x) = softmax(W h_x), one token per response; ``learnable_logits``: h = 1."""

    vocab: int = 16
    dim: int = 8
    init_scale: float = 1.0
    learnable_logits: bool = False
    name: str = "single_token"

    def __post_init__(self):
        _check(self.vocab, self.dim)

    @property
    def d(self) -> int:
        return 1 if self.learnable_logits else self.dim

    def init(self, rng, n, T, dtype=torch.float64, shared_rng=None) -> Instances:
        if T != 1:
            raise GesimError(f"the single_token policy takes one-token responses, got length {T}")
        if self.learnable_logits:
            x = np.ones((n, 1))
        else:
            x = rng.standard_normal((n, self.d)) / np.sqrt(self.d)
        W0 = rng.standard_normal((n, self.vocab, self.d)) * self.init_scale
        return Instances(torch.as_tensor(W0, dtype=dtype), torch.as_tensor(x, dtype=dtype))

    def features(self, inst: Instances, ids) -> torch.Tensor:
        return inst.x.unsqueeze(1).expand(-1, ids.shape[1], -1)  # (N, T, d)


@dataclass(frozen=True)
class FreeLogits:
    """One free logit vector per position: h_t = e_t, so W (V, T) holds the logits."""

    vocab: int = 16
    init_scale: float = 1.0
    name: str = "free_logits"

    def __post_init__(self):
        _check(self.vocab, 1)

    def init(self, rng, n, T, dtype=torch.float64, shared_rng=None) -> Instances:
        W0 = rng.standard_normal((n, self.vocab, T)) * self.init_scale
        return Instances(torch.as_tensor(W0, dtype=dtype), torch.zeros((n, 0), dtype=dtype))

    def features(self, inst: Instances, ids) -> torch.Tensor:
        n, T = ids.shape
        return torch.eye(T, dtype=inst.W0.dtype).expand(n, T, T)  # (N, T, d=T)


@dataclass(frozen=True)
class Context:
    """Learnable read-out W over prefix-dependent features of a fixed random recurrence."""

    vocab: int = 64
    dim: int = 32
    contraction: float = 0.97
    embed_scale: float = 1.0
    init_scale: float = 0.1
    activation: str = "linear"
    name: str = "context"

    def __post_init__(self):
        _check(self.vocab, self.dim)
        if self.activation not in ("tanh", "linear"):
            raise unknown("activation", self.activation, ("tanh", "linear"))
        if not 0 <= self.contraction < 1:
            raise GesimError(f"contraction must be in [0, 1), got {self.contraction}")

    def init(self, rng, n, T, dtype=torch.float64, shared_rng=None) -> Instances:
        d = self.dim
        srng = rng if shared_rng is None else shared_rng
        Q, _ = np.linalg.qr(srng.standard_normal((d, d)))
        A = self.contraction * Q
        # stationary feature norm about embed_scale: Var h = |E|^2 / (1 - a^2) per coordinate
        E = srng.standard_normal((self.vocab, d)) * self.embed_scale * np.sqrt((1 - self.contraction**2) / d)
        x = rng.standard_normal((n, d)) * self.embed_scale / np.sqrt(d)
        W0 = rng.standard_normal((n, self.vocab, d)) * self.init_scale
        t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
        return Instances(t(W0), t(x), t(A), t(E))

    def features(self, inst: Instances, ids) -> torch.Tensor:
        n, T = ids.shape
        act = torch.tanh if self.activation == "tanh" else (lambda z: z)
        h = act(inst.x @ inst.A.T)  # (N, d)
        hs = [h]
        emb = inst.E[ids]  # (N, T, d)
        for t in range(1, T):
            h = act(h @ inst.A.T + emb[:, t - 1])
            hs.append(h)
        return torch.stack(hs, dim=1)  # (N, T, d)


POLICIES = {"single_token": SingleToken, "free_logits": FreeLogits, "context": Context}


def make(name: str, **kwargs):
    """The policy called ``name`` with keyword settings (e.g. vocab=256, dim=64)."""
    if name not in POLICIES:
        raise unknown("policy", name, POLICIES)
    try:
        return POLICIES[name](**kwargs)
    except TypeError as err:
        raise GesimError(f"policy {name!r}: {err}") from None
