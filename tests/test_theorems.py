"""theory.md section 7, predictions 1-7 (and the section 2 facts), one test each.

The "real gradient step" checks use a small softmax model in float64: a sequence of
positions with fixed features h_t and logits W h_t, W (V, D) learnable; the chosen and
rejected responses share a suffix of features and tokens, which makes their gradients
similar (theory.md section 4).
"""

import math

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from gesim import dynamics, losses, regimes, symbolic

V, D = 7, 5


def make_instance(seed: int):
    """A random pair on the softmax model: (W, features and tokens of y_w and y_l, refs)."""
    g = torch.Generator().manual_seed(seed)
    T_w, T_l = (int(x) for x in torch.randint(1, 6, (2,), generator=g))
    shared = int(torch.randint(0, 4, (1,), generator=g))
    h_w = torch.randn(T_w + shared, D, generator=g, dtype=torch.float64)
    h_l = torch.randn(T_l + shared, D, generator=g, dtype=torch.float64)
    y_w = torch.randint(0, V, (T_w + shared,), generator=g)
    y_l = torch.randint(0, V, (T_l + shared,), generator=g)
    if shared:  # identical suffix: same features, same tokens
        h_l[-shared:] = h_w[-shared:]
        y_l[-shared:] = y_w[-shared:]
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    offsets = torch.randn(2, generator=g, dtype=torch.float64) * 2
    return W, (h_w, y_w), (h_l, y_l), offsets


def logp(W, seq):
    h, y = seq
    return torch.log_softmax(h @ W.T, dim=-1).gather(1, y[:, None]).sum()


def step_check(name, seed, etas, **params):
    """Predicted and realised (delta_lw, delta_ll) of one SGD step on loss ``name``, per eta."""
    W0, seq_w, seq_l, offsets = make_instance(seed)
    W = W0.clone().requires_grad_(True)
    lw, ll = logp(W, seq_w), logp(W, seq_l)
    g_w = torch.autograd.grad(lw, W, retain_graph=True)[0].reshape(-1)
    g_l = torch.autograd.grad(ll, W, retain_graph=True)[0].reshape(-1)
    lw_, ll_ = float(lw.detach()), float(ll.detach())
    data = {"lw": lw_, "ll": ll_, "lw_ref": min(lw_ + float(offsets[0]), 0.0),  # a log-prob is <= 0
            "ll_ref": min(ll_ + float(offsets[1]), 0.0),
            "len_w": float(len(seq_w[1])), "len_l": float(len(seq_l[1]))}
    L = losses.get(name)("torch", lw, ll, data["lw_ref"], data["ll_ref"], data["len_w"], data["len_l"], **params)
    grad = torch.autograd.grad(L, W)[0]
    geo = {"ip": float(g_w @ g_l), "nw2": float(g_w @ g_w), "nl2": float(g_l @ g_l)}
    out = []
    for eta in etas:
        pred = dynamics.predict(name, **data, **geo, eta=eta, **params)
        W1 = W0 - eta * grad
        real = (float(logp(W1, seq_w)) - data["lw"], float(logp(W1, seq_l)) - data["ll"])
        out.append((pred, real))
    return out


def slope(etas, errs):
    return np.polyfit(np.log(etas), np.log(errs), 1)[0]


ETAS = [1e-2 / 2**k for k in range(5)]


def test_p1_dpo_first_order_error_shrinks_like_eta_squared():
    for seed in range(5):
        res = step_check("dpo", seed, ETAS)
        ratio = [r[0] / float(p["delta_lw"]) for p, r in res]
        err = [abs(r[0] - float(p["delta_lw"])) for p, r in res]
        assert abs(ratio[-1] - 1) < abs(ratio[0] - 1) + 1e-12  # realised/predicted -> 1
        assert 1.8 < slope(ETAS, err) < 2.2


@pytest.mark.parametrize("name", losses.names())
def test_first_order_error_is_order_eta_squared_for_every_loss(name):
    for seed in range(3):
        # the expansion's small number is eta |d|: scale the steps by the weights (Cal-DPO's reach 1e3)
        ((pred, _),) = step_check(name, seed, [1e-6])
        scale = max(1.0, abs(float(pred["d_w"])), abs(float(pred["d_l"])))
        res = step_check(name, seed, [eta / scale for eta in ETAS])
        for side in (0, 1):
            key = ("delta_lw", "delta_ll")[side]
            err = [abs(r[side] - float(p[key])) for p, r in res]
            if max(abs(float(p[key])) for p, _ in res) == 0:  # stalled: nothing moves at all
                assert max(err) == 0
                continue
            assert 1.8 < slope([eta / scale for eta in ETAS], err) < 2.2, (name, seed, key, err)


@pytest.mark.parametrize("name", losses.names())
def test_p2_realised_sign_matches_predicted_regime_for_every_loss(name):
    agree = []
    for seed in range(60):
        ((pred, real),) = step_check(name, seed, [1e-6])
        realised = regimes.classify(real[0], real[1], pred["d_w"], pred["d_l"])
        agree.append(realised == str(pred["regime"]))
    assert np.mean(agree) >= 0.99


def test_p3_dpo_margin_grows_even_when_both_fall():
    d = symbolic.derive("dpo")
    identity = d.delta_lw - d.delta_ll - symbolic.eta * d.d_w * (symbolic.nw2 - 2 * symbolic.ip + symbolic.nl2)
    assert sp.simplify(identity) == 0  # delta margin = eta d_w ||g_w - g_l||^2 >= 0
    seen = 0
    for seed in range(200):
        ((pred, real),) = step_check("dpo", seed, [1e-4])
        if pred["regime"] == "both_down":
            seen += 1
            assert real[0] < 0 and real[1] < 0 and real[0] - real[1] > 0
    assert seen >= 3  # shared suffixes make "both down" common enough to check


@given(g=st.lists(st.floats(-10, 10), min_size=6, max_size=6),
       d_w=st.floats(1e-6, 1e3), d_l=st.floats(1e-6, 1e3))
def test_p4_no_chosen_down_rejected_up_for_positive_weights(g, d_w, d_l):
    g_w, g_l = np.array(g[:3]), np.array(g[3:])
    delta_lw, delta_ll = regimes.first_order(d_w, d_l, g_w @ g_l, g_w @ g_w, g_l @ g_l)
    # Cauchy-Schwarz: delta_lw < 0 and delta_ll > 0 would need ip^2 > nw2 nl2 (allow round-off).
    scale = 1e-9 * (d_w + d_l) * (g_w @ g_w + g_l @ g_l + 1)
    assert not (delta_lw < -scale and delta_ll > scale)


@pytest.mark.parametrize("name", losses.names())
def test_p4_holds_for_every_loss_where_its_weights_are_positive(name):
    rng = np.random.default_rng(0)
    n = 2000
    g_w, g_l = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    geo = dynamics.geometry(g_w, g_l)
    data = {"lw": -rng.uniform(1, 40, n), "ll": -rng.uniform(1, 40, n), "lw_ref": -rng.uniform(1, 40, n),
            "ll_ref": -rng.uniform(1, 40, n), "len_w": rng.integers(1, 20, n), "len_l": rng.integers(1, 20, n)}
    out = dynamics.predict(name, **data, ip=geo["ip"], nw2=geo["nw2"], nl2=geo["nl2"])
    positive = (out["d_w"] > 0) & (out["d_l"] > 0)
    assert not np.any(out["regime"][positive] == "chosen_down_rejected_up")


def test_p5_high_cosine_smaller_norm_moves_the_wrong_way():
    d = symbolic.derive("dpo")
    rho = np.array([0.5, 0.8, 0.95, 1.25, 2.0])
    for cos in (0.97, 0.99, 0.999):
        out = dynamics.predict(d, lw=-10, ll=-12, ip=cos * rho, nw2=rho**2, nl2=np.ones_like(rho))
        expect = np.where(rho < cos, "both_down", np.where(1 / rho < cos, "both_up", "ideal"))
        assert list(out["regime"]) == list(expect)
    # ||g_l|| > ||g_w|| with cos near 1 -> both down; the reverse -> both up
    assert dynamics.evaluate(d, lw=-1, ll=-1, ip=0.99 * 0.5, nw2=0.25, nl2=1.0)["regime"] == "both_down"
    assert dynamics.evaluate(d, lw=-1, ll=-1, ip=0.99 * 2.0, nw2=4.0, nl2=1.0)["regime"] == "both_up"


@pytest.mark.parametrize("name", ["simpo", "ipo_norm", "sigmoid_norm"])
def test_p6_length_normalised_thresholds_are_the_length_ratio(name):
    d = symbolic.derive(name)
    assert sp.simplify(d.k - symbolic.len_l / symbolic.len_w) == 0
    # numerically: chosen up iff ip < (len_l/len_w) nw2, rejected down iff ip < (len_w/len_l) nl2
    rng = np.random.default_rng(1)
    n = 4000
    len_w, len_l = rng.integers(1, 30, n), rng.integers(1, 30, n)
    nw2, nl2 = rng.uniform(0.1, 4, n), rng.uniform(0.1, 4, n)
    ip = rng.uniform(-1, 1, n) * np.sqrt(nw2 * nl2)
    lw, ll = -rng.uniform(1, 3, n) * len_w, -rng.uniform(1, 3, n) * len_l
    out = dynamics.predict(d, lw=lw, ll=ll, len_w=len_w, len_l=len_l, ip=ip, nw2=nw2, nl2=nl2)
    np.testing.assert_array_equal(out["delta_lw"] > 0, ip < len_l / len_w * nw2)
    np.testing.assert_array_equal(out["delta_ll"] < 0, ip < len_w / len_l * nl2)


def test_p7_cpo_thresholds():
    d = symbolic.derive("cpo")
    beta, alpha = (p for p in d.params)
    from gesim.backends import sigmoid

    s = sigmoid(-beta * (symbolic.lw - symbolic.ll))
    assert sp.simplify(d.k - (1 + alpha / (beta * s))) == 0
    t_l = sp.solve(sp.Eq(d.delta_ll, 0), symbolic.ip)[0] / symbolic.nl2
    assert sp.simplify(t_l - beta * s / (beta * s + alpha)) == 0


@pytest.mark.parametrize("name,params", [("dpo", ["lw_ref", "ll_ref"]), ("r_dpo", ["lw_ref", "ll_ref", "alpha"]),
                                         ("simpo", ["gamma"]), ("ipo", ["lw_ref", "ll_ref", "tau"])])
def test_reference_gamma_and_length_terms_never_move_the_thresholds(name, params):
    d = symbolic.derive(name)
    names = {s.name for s in d.k.free_symbols}
    assert not names & set(params)


@pytest.mark.parametrize("name,lam,per_token", [("cpo", "alpha", False), ("rpo", "alpha", True),
                                                ("slic_hf", "lam", False), ("rrhf", "lam", False),
                                                ("orpo", None, True)])
def test_chosen_nll_term_adds_to_d_w_only(name, lam, per_token):
    d = symbolic.derive(name)
    params = {p.name: p for p in d.params}
    if name == "orpo":  # ORPO's NLL term has no weight: it is the -lw/len_w itself
        loss = losses.get("orpo")
        assert float(d.weights(-3, -4, len_w=3, len_l=2, lam=0.0)[0]) == pytest.approx(1 / 3)
        assert float(d.weights(-3, -4, len_w=3, len_l=2, lam=0.0)[1]) == 0
        assert loss.margin is False
        return
    lam_sym = params[lam]
    expect = 1 / symbolic.len_w if per_token else 1
    assert sp.simplify(sp.diff(d.d_w, lam_sym) - expect) == 0
    assert sp.diff(d.d_l, lam_sym) == 0


def test_inactive_hinge_leaves_only_the_sft_term_and_rejected_drifts_up():
    d = symbolic.derive("slic_hf")
    # hinge inactive: lw - ll > delta
    out = dynamics.evaluate(d, lw=-2.0, ll=-10.0, ip=0.5, nw2=1.0, nl2=1.0, eta=0.1)
    assert out["d_l"] == 0
    assert out["delta_ll"] == pytest.approx(0.1 * 0.1 * 0.5)  # eta lam ip > 0
    assert out["regime"] == "both_up"


def test_batch_first_order_matches_the_explicit_update_and_the_single_pair_form():
    rng = np.random.default_rng(3)
    N, P = 5, 11
    g_w, g_l = rng.normal(size=(N, P)), rng.normal(size=(N, P))
    d_w, d_l = rng.uniform(0.1, 1, N), rng.uniform(0.1, 1, N)
    u = 0.3 * (d_w @ g_w - d_l @ g_l)  # eta sum_j (d_w^j g_w^j - d_l^j g_l^j)
    delta_lw, delta_ll = dynamics.batch_first_order(d_w, d_l, *dynamics.grams(g_w, g_l), eta=0.3)
    np.testing.assert_allclose(delta_lw, dynamics.update_first_order(g_w, u), rtol=1e-12)
    np.testing.assert_allclose(delta_ll, dynamics.update_first_order(g_l, u), rtol=1e-12)
    one = dynamics.batch_first_order(d_w[:1], d_l[:1], *dynamics.grams(g_w[:1], g_l[:1]), eta=0.3)
    geo = dynamics.geometry(g_w[0], g_l[0])
    np.testing.assert_allclose(one, np.array(regimes.first_order(d_w[0], d_l[0], geo["ip"], geo["nw2"],
                                                                 geo["nl2"], 0.3))[:, None], rtol=1e-12)


def test_preconditioned_step_uses_the_p_weighted_inner_products():
    rng = np.random.default_rng(4)
    P_ = 9
    g_w, g_l, precond = rng.normal(size=P_), rng.normal(size=P_), rng.uniform(0.1, 3, P_)
    d_w, d_l, eta = 0.4, 0.7, 0.05
    u = eta * precond * (d_w * g_w - d_l * g_l)  # the update of a diagonal-P (Adam-like) step
    geo = dynamics.geometry(g_w, g_l, precond)
    pred = regimes.first_order(d_w, d_l, geo["ip"], geo["nw2"], geo["nl2"], eta)
    assert pred[0] == pytest.approx(g_w @ u) and pred[1] == pytest.approx(g_l @ u)
    assert geo["cos"] == pytest.approx(geo["ip"] / math.sqrt(geo["nw2"] * geo["nl2"]))


@pytest.mark.parametrize("scale", [1e-170, 1.0, 1e160])
def test_cosine_is_scale_free_and_does_not_underflow(scale):
    # cos is invariant to scaling ip, nw2, nl2 together; the product nw2 nl2 underflows to 0 at
    # scale 1e-170 (3.6e-339) and overflows to inf at 1e160 (3.6e321); norms taken first do not.
    import torch

    from gesim import dynamics

    ip, nw2, nl2 = 3.0, 4.0, 9.0  # cos = 3 / (2 * 3) = 0.5
    assert dynamics.cosine(ip * scale, nw2 * scale, nl2 * scale) == pytest.approx(0.5, rel=1e-12)
    t = dynamics.cosine(*(torch.tensor([v * scale], dtype=torch.float64) for v in (ip, nw2, nl2)))
    assert float(t) == pytest.approx(0.5, rel=1e-12)
