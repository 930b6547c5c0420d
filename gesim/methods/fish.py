"""Fish: inter-domain gradient matching by sequential inner SGD steps.

Implements Algorithm 1 of Shi et al., "Gradient Matching for Domain Generalization",
ICLR 2022, arXiv:2104.09937, functionally on a dict of P parameter tensors, and its
entanglement analogue for one preference pair (docs/theory.md section 6.4).

Notation: S domains with losses L_i, gradients g_i = grad L_i(theta), Hessians H_i, inner
learning rate alpha, meta learning rate eps. For an order pi of the domains

    theta~_0 = theta,   theta~_k = theta~_{k-1} - alpha grad L_{pi_k}(theta~_{k-1}),
    theta <- theta + eps (theta~_S - theta).

Taylor-expanding each inner gradient about theta,

    theta~_S - theta = -alpha sum_i g_i + alpha^2 sum_{m<k} H_{pi_k} g_{pi_m} + O(alpha^3).

Over a uniform order each ordered pair (i before j) has probability 1/2, and
grad sum_{i<j} <g_i, g_j> = sum_{i != j} H_j g_i, so

    E_pi[theta~_S - theta] = -alpha sum_i g_i + (alpha^2/2) grad sum_{i<j} <g_i, g_j> + O(alpha^3)
                           = -alpha S grad(L_erm - gamma G_hat) + O(alpha^3),
    L_erm = (1/S) sum_i L_i,   G_hat = 2/(S(S-1)) sum_{i<j} <g_i, g_j>,   gamma = alpha (S-1)/4.

So gamma = alpha (S-1)/4 is exact (to this order) when L_erm is the MEAN over domains, G_hat
the MEAN over unordered pairs, and the Fish step is read as SGD with learning rate alpha S.
With L_erm the SUM over domains and the same G_hat the constant is alpha S (S-1)/4; with G
the SUM over unordered pairs it is alpha/2. The update directions differ by O(alpha^2):
relative error O(alpha^2) for the whole update, O(alpha) for its alpha^2 part
(:func:`expansion_error` measures both).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gesim.errors import GesimError

Params = dict[str, Tensor]
DomainLoss = Callable[[Params], Tensor]  # one domain's loss of the parameters (not a gesim.losses.Loss)

MAX_EXACT_S = 6  # S! orders are enumerated exactly; 6! = 720


def _check(domain_losses: Sequence[DomainLoss], alpha: float, eps: float = 1.0) -> None:
    if len(domain_losses) == 0:
        raise GesimError("Fish needs at least one domain loss")
    if not alpha > 0:
        raise GesimError(f"inner learning rate alpha must be > 0, got {alpha}")
    if not eps > 0:
        raise GesimError(f"meta learning rate eps must be > 0, got {eps}")


def _leaves(params: Params) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def _grad(value: Tensor, params: Params, create_graph: bool = False) -> Params:
    """grad value w.r.t. the leaves `params`, zeros where a parameter is unused."""
    if value.dim() != 0:
        raise GesimError(f"a domain loss must return a scalar, got shape {tuple(value.shape)}")
    grads = torch.autograd.grad(value, list(params.values()), create_graph=create_graph, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _norm(a: Params) -> float:
    return math.sqrt(float(_dot(a, a)))


def _inner_displacement(params: Params, domain_losses: Sequence[DomainLoss], alpha: float, order) -> Params:
    """theta~_S - theta for one order, accumulated step by step (no cancellation)."""
    theta = {k: v.detach() for k, v in params.items()}
    disp = {k: torch.zeros_like(v) for k, v in theta.items()}
    for i in order:
        leaves = _leaves({k: theta[k] + disp[k] for k in theta})
        g = _grad(domain_losses[i](leaves), leaves)
        disp = {k: disp[k] - alpha * g[k] for k in disp}
    return disp


def fish_gamma(alpha: float, S: int) -> float:
    """gamma = alpha (S-1)/4: the weight of G_hat matched by the expected Fish step."""
    return alpha * (S - 1) / 4


def fish_step(params: Params, domain_losses: Sequence[DomainLoss], alpha: float, eps: float,
              order: Sequence[int] | None = None) -> Params:
    """One Fish meta step: theta + eps (theta~_S - theta), inner SGD over the domains in `order`.

    Algorithm 1 of Shi et al. (2022). `order` is a permutation of range(S); None means the listed
    order. Fish draws a random order each step: pass e.g. ``torch.randperm(S).tolist()``.
    Returns new detached tensors; `params` is not modified.
    """
    _check(domain_losses, alpha, eps)
    S = len(domain_losses)
    order = list(range(S)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(S)):
        raise GesimError(f"order must be a permutation of range({S}), got {order}")
    disp = _inner_displacement(params, domain_losses, alpha, order)
    return {k: v.detach() + eps * disp[k] for k, v in params.items()}


def fish_expected(params: Params, domain_losses: Sequence[DomainLoss], alpha: float, eps: float = 1.0) -> Params:
    """The expected Fish meta update E_pi[fish_step(theta, pi) - theta] = eps E_pi[theta~_S - theta].

    Exact average over all S! orders (S <= 6). By the expansion in the module docstring
    it equals -eps alpha S grad(L_erm - gamma G_hat) + O(eps alpha^3), gamma = alpha (S-1)/4.
    """
    _check(domain_losses, alpha, eps)
    S = len(domain_losses)
    if S > MAX_EXACT_S:
        raise GesimError(f"exact Fish expectation enumerates S! orders; S={S} exceeds {MAX_EXACT_S}")
    orders = list(itertools.permutations(range(S)))
    total = {k: torch.zeros_like(v.detach()) for k, v in params.items()}
    for order in orders:
        disp = _inner_displacement(params, domain_losses, alpha, order)
        total = {k: total[k] + disp[k] for k in total}
    return {k: eps * v / len(orders) for k, v in total.items()}


def fish_target_gradient(params: Params, domain_losses: Sequence[DomainLoss], gamma: float) -> Params:
    """grad(L_erm - gamma G_hat): the inter-domain gradient-matching objective of Shi et al.

    L_erm = (1/S) sum_i L_i (mean over domains) and G_hat = 2/(S(S-1)) sum_{i<j} <g_i, g_j>
    (mean over unordered pairs; 0 for S = 1). grad G_hat needs Hessian-vector products
    sum_{i != j} H_j g_i, taken by double backprop (create_graph=True).
    """
    if len(domain_losses) == 0:
        raise GesimError("Fish needs at least one domain loss")
    leaves = _leaves(params)
    values = [L(leaves) for L in domain_losses]
    grads = [_grad(v, leaves, create_graph=True) for v in values]
    pairs = list(itertools.combinations(range(len(grads)), 2))
    g_hat = sum(_dot(grads[i], grads[j]) for i, j in pairs) / len(pairs) if pairs else 0.0
    objective = sum(values) / len(values) - gamma * g_hat
    return {k: g.detach() for k, g in _grad(objective, leaves).items()}


def disentangle_step(params: Params, lw: DomainLoss, ll: DomainLoss, alpha: float, eps: float = 1.0,
                     d_w: float = 1.0, d_l: float = 1.0, order: Sequence[int] | None = None) -> Params:
    """Fish over the two "domains" of a preference pair: raise chosen, lower rejected.

    Domains: loss_w = -d_w lw (index 0) and loss_l = +d_l ll (index 1), with the DPO weights
    d_w, d_l held fixed for the step. Their gradients -d_w g_w and d_l g_l have inner product
    -d_w d_l ip, ip = <g_w, g_l>, so G_hat = -d_w d_l ip and, with S = 2,

        E[theta~ - theta] = alpha (d_w g_w - d_l g_l) - (alpha^2/2) d_w d_l grad ip + O(alpha^3):

    the plain margin step plus a descent step on ip. Along it the first-order change of ip is
    lower than along the plain step by eps (alpha^2/2) d_w d_l ||grad ip||^2 + O(eps alpha^3)
    (docs/theory.md section 6.4, a hypothesis; tested numerically). `order` None averages both
    orders (the expected, deterministic step); (0, 1) visits chosen first, (1, 0) rejected first.
    """
    domain_losses = [lambda p: -d_w * lw(p), lambda p: d_l * ll(p)]
    if order is not None:
        return fish_step(params, domain_losses, alpha, eps, order)
    update = fish_expected(params, domain_losses, alpha, eps)
    return {k: v.detach() + update[k] for k, v in params.items()}


def _toy_domains(S: int, dim: int, seed: int, dtype: torch.dtype) -> tuple[Params, list[DomainLoss]]:
    """A tanh MLP (D -> 6 -> 3 classes) with S shifted domains of 8 labelled points each."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    params = {"W1": randn(dim, 6) / math.sqrt(dim), "b1": 0.5 * randn(6), "W2": randn(6, 3)}
    data = [(randn(8, dim) + randn(1, dim), torch.randint(0, 3, (8,), generator=gen)) for _ in range(S)]

    def domain_loss(x: Tensor, y: Tensor) -> DomainLoss:
        # (N, D) -> (N, 6) -> (N, 3) logits
        return lambda p: torch.nn.functional.cross_entropy(torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"], y)

    return params, [domain_loss(x, y) for x, y in data]


def _loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def expansion_error(alphas: Sequence[float], S: int = 3, dim: int = 4, seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> dict:
    """How well -alpha S grad(L_erm - gamma G_hat) matches the exact expected Fish update.

    On a small tanh-MLP with S domains, for each alpha: E = E_pi[theta~ - theta] (exact over S!
    orders) and T = -alpha S grad(L_erm - gamma G_hat), gamma = alpha (S-1)/4. Reports
    rel_error = ||E - T|| / ||E|| (expected O(alpha^2)) and, for the alpha^2 parts
    E2 = E + alpha S grad L_erm and T2 = alpha S gamma grad G_hat,
    rel_error_second_order = ||E2 - T2|| / ||E2|| (expected O(alpha)), with log-log slopes.
    """
    alphas = [float(a) for a in alphas]
    if len(alphas) < 2 or min(alphas) <= 0:
        raise GesimError(f"expansion_error needs at least two alphas, all > 0, got {alphas}")
    if S < 2:
        raise GesimError(f"expansion_error needs S >= 2 domains for a gradient-matching term, got {S}")
    params, losses = _toy_domains(S, dim, seed, dtype)
    erm = fish_target_gradient(params, losses, 0.0)
    rel, rel2 = [], []
    for a in alphas:
        E = fish_expected(params, losses, a)
        T = {k: -a * S * g for k, g in fish_target_gradient(params, losses, fish_gamma(a, S)).items()}
        diff = _norm({k: E[k] - T[k] for k in E})
        rel.append(diff / _norm(E))
        rel2.append(diff / _norm({k: E[k] + a * S * erm[k] for k in E}))
    return {"alpha": alphas, "rel_error": rel, "slope": _loglog_slope(alphas, rel),
            "rel_error_second_order": rel2, "slope_second_order": _loglog_slope(alphas, rel2)}


def disentangle_objective(loss: str = "dpo", params: dict | None = None, alpha: float = 1e-2, seed: int = 0,
                          expected: bool = True):
    """Trainer objective for the Fish-sequenced margin step on a Transformer batch.

    Two inner SGD steps of size ``alpha`` over the domains loss_w = -mean(d_w lw) and
    loss_l = +mean(d_l ll) (weights of ``loss`` at the current point, held fixed), averaged over
    both orders (``expected=True``, the step whose alpha^2 term descends on ip) or in one random
    order per step (Fish's own sampling); the outer optimizer then receives G = (theta - theta~) / alpha as the
    gradient, through the surrogate <sg(G), theta>. As alpha -> 0, G is the loss's own
    gradient; the alpha term is the descent on ip of :func:`disentangle_step`.
    """
    from gesim import lm
    from gesim import losses as registry

    if not alpha > 0:
        raise GesimError(f"inner learning rate alpha must be > 0, got {alpha}")
    lossfn, params = registry.get(loss), params or {}
    gen = torch.Generator().manual_seed(seed)

    def objective(model, batch, lw_ref, ll_ref, len_w, len_l):
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            lw, ll = lm.pair_logps(model, batch)
        total = lossfn("torch", lw, ll, lw_ref, ll_ref, len_w, len_l, **params).sum()
        d_w, d_l = (d / len(batch) for d in lossfn.weights(lw, ll, lw_ref, ll_ref, len_w, len_l, **params))
        domains = [lambda p: -(d_w * lm.pair_logps(lm.at_params(model, p), batch)[0]).sum(),
                   lambda p: (d_l * lm.pair_logps(lm.at_params(model, p), batch)[1]).sum()]
        theta = {n: p.detach() for n, p in named.items()}
        if expected:
            disp = fish_expected(theta, domains, alpha)
        else:
            disp = _inner_displacement(theta, domains, alpha, torch.randperm(2, generator=gen).tolist())
        surrogate = sum((-(disp[n] / alpha) * p).sum() for n, p in named.items())
        return total.detach() / len(batch) + surrogate - surrogate.detach()  # value: the loss; gradient: G

    return objective
