"""Fish (Shi et al., ICLR 2022): exact steps, the second-order expansion, the pair analogue."""

import math

import pytest
import torch

from gesim.errors import GesimError
from gesim.methods.fish import (
    disentangle_step,
    expansion_error,
    fish_expected,
    fish_gamma,
    fish_step,
    fish_target_gradient,
)

DT = torch.float64


def _mlp(seed=0, dim=3, hidden=5, V=4):
    """Tiny tanh policy (D -> hidden -> V) with random float64 weights."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    params = {"W1": randn(dim, hidden), "b1": randn(hidden), "W2": randn(hidden, V)}
    logp = lambda p, x: torch.log_softmax(torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"], -1)  # (N, V)
    return params, logp, randn


def _flat_dot(a, b):
    return sum(float((a[k] * b[k]).sum()) for k in a)


def test_single_domain_is_sgd_step_scaled_by_eps():
    params, logp, randn = _mlp()
    x, y = randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    loss = lambda p: torch.nn.functional.nll_loss(logp(p, x), y)
    alpha, eps = 0.3, 0.7
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = dict(zip(leaves, torch.autograd.grad(loss(leaves), list(leaves.values()))))
    out = fish_step(params, [loss], alpha, eps)
    for k in params:
        assert torch.equal(out[k], params[k] - eps * (alpha * grads[k]))


def test_two_quadratic_domains_by_hand():
    # L_0 = a x^2 / 2, L_1 = b (x - c)^2 / 2, scalar x
    a, b, c, x, alpha, eps = 2.0, 0.5, 3.0, 1.5, 0.1, 0.4
    losses = [lambda p: 0.5 * a * p["x"] ** 2, lambda p: 0.5 * b * (p["x"] - c) ** 2]
    params = {"x": torch.tensor(x, dtype=DT)}
    x1 = x - alpha * a * x
    x01 = x1 - alpha * b * (x1 - c)
    x1 = x - alpha * b * (x - c)
    x10 = x1 - alpha * a * x1
    assert float(fish_step(params, losses, alpha, eps)["x"]) == pytest.approx(x + eps * (x01 - x), rel=1e-14)
    assert float(fish_step(params, losses, alpha, eps, order=[1, 0])["x"]) == pytest.approx(
        x + eps * (x10 - x), rel=1e-14)
    expected = eps * ((x01 - x) + (x10 - x)) / 2
    assert float(fish_expected(params, losses, alpha, eps)["x"]) == pytest.approx(expected, rel=1e-14)
    # grad(L_erm - gamma G_hat) with L_erm the mean, G_hat = g_0 g_1 = a x b (x - c)
    gamma = 0.25
    by_hand = (a * x + b * (x - c)) / 2 - gamma * a * b * (2 * x - c)
    assert float(fish_target_gradient(params, losses, gamma)["x"]) == pytest.approx(by_hand, rel=1e-14)


def test_expected_fish_matches_gradient_matching_to_second_order():
    alphas = [0.08, 0.04, 0.02, 0.01]
    for S in (2, 3):
        r = expansion_error(alphas, S=S)
        assert 1.7 <= r["slope"] <= 2.3, r
        assert r["rel_error"][-1] < 1e-3
        # the alpha^2 (gradient-matching) part alone matches to relative O(alpha)
        assert 0.7 <= r["slope_second_order"] <= 1.3, r
        assert r["rel_error_second_order"][-1] < 0.05


def test_other_normalisation_is_only_first_order():
    # gamma = alpha S (S-1)/4 belongs to L_erm = sum; used with the mean it is wrong at O(alpha)
    params, logp, randn = _mlp(seed=1)
    S = 3
    losses = []
    for _ in range(S):
        x, y = randn(5, 3) + randn(1, 3), torch.tensor([0, 1, 2, 3, 1])
        losses.append(lambda p, x=x, y=y: torch.nn.functional.nll_loss(logp(p, x), y))

    def rel(alpha, gamma):
        E = fish_expected(params, losses, alpha)
        T = {k: -alpha * S * g for k, g in fish_target_gradient(params, losses, gamma).items()}
        d = {k: E[k] - T[k] for k in E}
        return math.sqrt(_flat_dot(d, d) / _flat_dot(E, E))

    right = [rel(a, fish_gamma(a, S)) for a in (0.02, 0.01)]
    wrong = [rel(a, a * S * (S - 1) / 4) for a in (0.02, 0.01)]
    assert math.log2(right[0] / right[1]) == pytest.approx(2.0, abs=0.3)
    assert math.log2(wrong[0] / wrong[1]) == pytest.approx(1.0, abs=0.3)
    assert wrong[1] > 10 * right[1]


def _pair(seed=2):
    params, logp, randn = _mlp(seed=seed)
    x = randn(2, 3)
    lw = lambda p: logp(p, x[:1])[0, 1]
    ll = lambda p: logp(p, x[1:])[0, 2]
    return params, lw, ll


def _grad_ip(params, lw, ll):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    vals = list(leaves.values())
    g_w = torch.autograd.grad(lw(leaves), vals, create_graph=True)
    g_l = torch.autograd.grad(ll(leaves), vals, create_graph=True)
    ip = sum((a * b).sum() for a, b in zip(g_w, g_l))
    grads = torch.autograd.grad(ip, vals)
    return ({k: g.detach() for k, g in zip(leaves, g_w)}, {k: g.detach() for k, g in zip(leaves, g_l)},
            dict(zip(leaves, grads)))


def test_disentangle_step_lowers_ip_relative_to_plain_step():
    params, lw, ll = _pair()
    g_w, g_l, grad_ip = _grad_ip(params, lw, ll)
    alpha, eps, d_w, d_l = 0.01, 0.5, 0.8, 0.6
    fish = {k: v - params[k] for k, v in disentangle_step(params, lw, ll, alpha, eps, d_w, d_l).items()}
    plain = {k: eps * alpha * (d_w * g_w[k] - d_l * g_l[k]) for k in params}
    dip_fish, dip_plain = _flat_dot(grad_ip, fish), _flat_dot(grad_ip, plain)
    predicted = -eps * alpha**2 / 2 * d_w * d_l * _flat_dot(grad_ip, grad_ip)
    assert abs(predicted) > 1e-3 * abs(dip_plain)  # the Hessian term is not negligible here
    assert dip_fish < dip_plain
    assert dip_fish - dip_plain == pytest.approx(predicted, rel=0.1)


def test_disentangle_orders_average_to_expected_step():
    params, lw, ll = _pair(seed=3)
    both = disentangle_step(params, lw, ll, 0.05)
    w_first = disentangle_step(params, lw, ll, 0.05, order=(0, 1))
    l_first = disentangle_step(params, lw, ll, 0.05, order=(1, 0))
    for k in params:
        torch.testing.assert_close(both[k], (w_first[k] + l_first[k]) / 2, rtol=1e-12, atol=1e-14)


def test_bad_arguments_raise():
    loss = lambda p: (p["x"] ** 2).sum()
    params = {"x": torch.ones(2, dtype=DT)}
    with pytest.raises(GesimError, match="alpha"):
        fish_step(params, [loss], 0.0, 1.0)
    with pytest.raises(GesimError, match="alpha"):
        fish_expected(params, [loss], -0.1)
    with pytest.raises(GesimError, match="eps"):
        fish_step(params, [loss], 0.1, 0.0)
    with pytest.raises(GesimError, match="S=7"):
        fish_expected(params, [loss] * 7, 0.1)
    with pytest.raises(GesimError, match="permutation"):
        fish_step(params, [loss, loss], 0.1, 1.0, order=[0, 0])
    with pytest.raises(GesimError, match="at least one"):
        fish_step(params, [], 0.1, 1.0)
    with pytest.raises(GesimError, match="scalar"):
        fish_step(params, [lambda p: p["x"]], 0.1, 1.0)
    with pytest.raises(GesimError, match="alphas"):
        expansion_error([0.1])
