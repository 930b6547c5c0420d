"""Update rules: how per-instance g_w, g_l and weights d_w, d_l become a parameter update.

Gradient descent on a pair loss moves the parameters along s = d_w g_w - d_l g_l
(= -dL/dtheta). An update rule returns an :class:`Update`

    u = eta P (d_w g_w - d_l g_l) + rest

with ``precond`` the diagonal P applied to the current gradient (None: P = 1) and ``rest``
whatever else the rule adds (momentum). A rule that reweights the pair (pairwise
normalisation, calibration: :mod:`gesim.methods`) returns the weights it used as ``d_w``,
``d_l``, so that u = eta P (d_w' g_w - d_l' g_l) + rest. The first-order change of any log-prob f is then
<grad f, u> (theory.md section 3):

    delta_lw = eta (d_w <g_w, P g_w> - d_l <g_w, P g_l>) + <g_w, rest>,

so the P-weighted ip, nw2, nl2 replace the plain ones. A rule is a class with
``step(g_w, g_l, d_w, d_l) -> Update``, named in :data:`gesim.registries.RULES` with the
module that defines it (resolved on first use by :func:`make`).
A rule in the SGD family (u = eta (a g_w - b g_l), no preconditioner, no rest) may also define
``weights(d_w, d_l, ip, nw2, nl2) -> (a, b)`` from the plain geometry: the engine then runs it in
logit space (:mod:`gesim.simulate.logit`), without forming g_w, g_l or W.

Shapes: g_w, g_l (N, V, d); d_w, d_l (N,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gesim import registries
from gesim.errors import GesimError, unknown


@dataclass
class Update:
    """u (N, ...), the preconditioner P of the current gradient (or None), the rest, and the
    weights (N,) the rule applied in place of the loss's d_w, d_l (or None: the loss's)."""

    u: torch.Tensor
    precond: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    d_w: torch.Tensor | None = None
    d_l: torch.Tensor | None = None


def _b(x, like):
    """(N,) weights broadcast against (N, ...) gradients."""
    return x.reshape(-1, *([1] * (like.dim() - 1)))


def direction(g_w, g_l, d_w, d_l):
    """s = d_w g_w - d_l g_l = -dL/dtheta, the steepest-descent direction of the pair loss."""
    return (_b(d_w, g_w) * g_w).sub_(_b(d_l, g_l) * g_l)


class SGD:
    """u = eta (d_w g_w - d_l g_l): P = 1, no rest."""

    def __init__(self, eta: float):
        self.eta = eta

    def step(self, g_w, g_l, d_w, d_l) -> Update:
        return Update(direction(g_w, g_l, d_w, d_l).mul_(self.eta))

    #: weights() ignores ip, nw2, nl2: the engine may fuse GEMM, geometry and update per tile
    geometry_free = True

    def weights(self, d_w, d_l, ip, nw2, nl2):
        """(a, b) of u = eta (a g_w - b g_l): the loss's own weights (the logit-space protocol)."""
        return d_w, d_l


class Adam:
    """Adam (Kingma and Ba 2015) with bias correction, as a diagonal preconditioner plus momentum.

    m_k = b1 m_{k-1} + (1 - b1) grad,  v_k = b2 v_{k-1} + (1 - b2) grad^2,  grad = -s,
    u = -eta m_hat / (sqrt(v_hat) + eps) = eta P s + rest with
    P = (1 - b1) / ((1 - b1^k)(sqrt(v_hat) + eps)),  rest = -eta b1 m_{k-1} / ((1 - b1^k)(sqrt(v_hat) + eps)).
    """

    def __init__(self, eta: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.eta, self.b1, self.b2, self.eps = eta, b1, b2, eps
        self.m = self.v = None
        self.k = 0

    def step(self, g_w, g_l, d_w, d_l) -> Update:
        s = direction(g_w, g_l, d_w, d_l)
        grad = -s
        if self.m is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        self.k += 1
        m_prev = self.m
        self.m = self.b1 * m_prev + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        denom = (1 - self.b1**self.k) * (torch.sqrt(self.v / (1 - self.b2**self.k)) + self.eps)
        precond = (1 - self.b1) / denom
        rest = -self.eta * self.b1 * m_prev / denom
        u = -self.eta * self.m / denom
        return Update(u, precond, rest)


#: Rules by name. Names are registered (with where they live) in :data:`gesim.registries.RULES`;
#: :func:`make` imports a rule's module on first use, so the mitigations' rules work without
#: anything importing :mod:`gesim.methods` first. A class put here directly (experiments,
#: notebooks) is used as is.
RULES = {"sgd": SGD, "adam": Adam}


def make(name: str, eta: float):
    """A fresh update rule ``name`` with step size ``eta``."""
    if name not in RULES:
        if name not in registries.RULES:
            raise unknown("update rule", name, {*RULES, *registries.RULES})
        RULES.setdefault(name, registries.rule(name))
    if not (eta > 0 and eta < float("inf")):
        raise GesimError(f"eta is a step size and must be > 0 and finite, got {eta}")
    return RULES[name](eta)


def geometry(g_w, g_l, precond=None):
    """P-weighted ip, nw2, nl2, each (N,), summed over every parameter axis.

    The torch twin of :func:`gesim.dynamics.geometry` for (N, V, d) gradients, as batched
    row-times-column products of the flattened gradients (no temporaries of size (N, P)
    without a preconditioner).
    """
    a, b = g_w.flatten(1), g_l.flatten(1)  # (N, P)
    pa = a if precond is None else a * precond.flatten(1)
    pb = b if precond is None else b * precond.flatten(1)

    def dot(x, y):
        return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).reshape(-1)  # (N,)

    return dot(pa, b), dot(pa, a), dot(pb, b)
