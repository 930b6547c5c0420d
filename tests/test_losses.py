"""The loss registry: every backend agrees, every derivative agrees, hand values, errors.

Symbolic = numeric = autograd = finite differences for every registered loss (design.md,
"Tests that prove theorems").
"""

import math

import numpy as np
import pytest
import sympy as sp
import torch

import gesim
from gesim import losses, symbolic
from gesim.backends import stop_gradient
from gesim.errors import GesimError

ALL = losses.names()


def random_points(seed: int, n: int = 8) -> list[dict]:
    """Data points in the domain of every loss: log-probs < 0, lengths >= 1."""
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(n):
        len_w, len_l = rng.integers(1, 40, size=2).astype(float)
        pts.append({"lw": -rng.uniform(0.5, 3.0) * len_w, "ll": -rng.uniform(0.5, 3.0) * len_l,
                    "lw_ref": -rng.uniform(0.5, 3.0) * len_w, "ll_ref": -rng.uniform(0.5, 3.0) * len_l,
                    "len_w": len_w, "len_l": len_l})
    return pts


def grads(value, lw, ll):
    """(dL/dlw, dL/dll) by autograd; 0 for a side the loss does not use (sft)."""
    g = torch.autograd.grad(value, (lw, ll), allow_unused=True)
    return tuple(torch.zeros((), dtype=torch.float64) if x is None else x for x in g)


def sympy_value(name, pt, **params):
    d = symbolic.derive(name)
    values = losses.get(name).params(**params)
    subs = {s: pt[s.name] for s in symbolic.DATA} | {p: values[p.name] for p in d.params}
    return float(d.L.subs(subs).evalf(30))


@pytest.mark.parametrize("name", ALL)
def test_backends_agree_numpy_torch_sympy(name):
    loss = losses.get(name)
    for pt in random_points(1):
        args = [pt[k] for k in ("lw", "ll", "lw_ref", "ll_ref", "len_w", "len_l")]
        v_np = float(loss("numpy", *args))
        v_torch = float(loss("torch", *[torch.tensor(a, dtype=torch.float64) for a in args]))
        v_sp = sympy_value(name, pt)
        assert math.isfinite(v_np)
        assert v_np == pytest.approx(v_sp, rel=1e-9, abs=1e-10)
        assert v_torch == pytest.approx(v_sp, rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_weights_symbolic_equal_autograd_and_finite_differences(name):
    """d_w = -dL/dlw and d_l = dL/dll: sympy = torch autograd = central differences."""
    loss, d = losses.get(name), symbolic.derive(name)
    for pt in random_points(2):
        lw = torch.tensor(pt["lw"], dtype=torch.float64, requires_grad=True)
        ll = torch.tensor(pt["ll"], dtype=torch.float64, requires_grad=True)
        rest = [torch.tensor(pt[k], dtype=torch.float64) for k in ("lw_ref", "ll_ref", "len_w", "len_l")]
        g_lw, g_ll = grads(loss("torch", lw, ll, *rest), lw, ll)
        d_w, d_l = d.weights(**pt)
        assert float(d_w) == pytest.approx(-float(g_lw), rel=1e-9, abs=1e-12)
        assert float(d_l) == pytest.approx(float(g_ll), rel=1e-9, abs=1e-12)
        if d.L.has(stop_gradient):
            continue  # a detached weight (WPO): finite differences see its derivative, autograd does not
        h = 1e-5
        f = lambda pt=pt, **kw: float(loss("numpy", **{**pt, **kw}))  # noqa: E731
        fd_w = -(f(lw=pt["lw"] + h) - f(lw=pt["lw"] - h)) / (2 * h)
        fd_l = (f(ll=pt["ll"] + h) - f(ll=pt["ll"] - h)) / (2 * h)
        assert float(d_w) == pytest.approx(fd_w, rel=1e-5, abs=1e-7)
        assert float(d_l) == pytest.approx(fd_l, rel=1e-5, abs=1e-7)


# ---- hand-computed values, written out independently of the registry ------------------------

def sig(x):
    return 1 / (1 + math.exp(-x))


def test_hand_value_dpo():
    lw, ll, lw_ref, ll_ref, beta = -5.0, -7.0, -6.0, -6.5, 0.1
    h = (lw - lw_ref) - (ll - ll_ref)  # 1.5
    assert losses.get("dpo")("numpy", lw, ll, lw_ref, ll_ref, 3, 4) == pytest.approx(-math.log(sig(beta * h)))
    out = symbolic.derive("dpo").evaluate(lw=lw, ll=ll, lw_ref=lw_ref, ll_ref=ll_ref, ip=0.5, nw2=2.0, nl2=1.0,
                                          eta=0.1)
    c = beta * sig(-beta * h)
    assert out["d_w"] == pytest.approx(c) and out["d_l"] == pytest.approx(c)
    assert out["delta_lw"] == pytest.approx(0.1 * c * (2.0 - 0.5))
    assert out["delta_ll"] == pytest.approx(0.1 * c * (0.5 - 1.0))
    assert out["regime"] == "ideal"


def test_hand_value_simpo():
    lw, ll, len_w, len_l, beta, gamma = -12.0, -30.0, 6, 10, 2.0, 1.0
    z = beta * lw / len_w - beta * ll / len_l - gamma  # -4 + 6 - 1 = 1
    assert losses.get("simpo")("numpy", lw, ll, 0, 0, len_w, len_l) == pytest.approx(-math.log(sig(z)))
    d_w, d_l = symbolic.derive("simpo").weights(lw, ll, 0, 0, len_w, len_l)
    assert float(d_w) == pytest.approx(beta / len_w * sig(-z))
    assert float(d_l) == pytest.approx(beta / len_l * sig(-z))


def test_hand_value_ipo():
    lw, ll, lw_ref, ll_ref, tau = -5.0, -7.0, -6.0, -6.5, 0.1
    h, target = 1.5, 1 / (2 * tau)
    assert losses.get("ipo")("numpy", lw, ll, lw_ref, ll_ref, 1, 1) == pytest.approx((h - target) ** 2)
    d_w, d_l = symbolic.derive("ipo").weights(lw, ll, lw_ref, ll_ref)
    assert float(d_w) == pytest.approx(2 * (target - h)) and float(d_l) == pytest.approx(2 * (target - h))


def test_hand_value_cpo():
    lw, ll, beta, alpha = -5.0, -7.0, 0.1, 1.0
    assert losses.get("cpo")("numpy", lw, ll, 0, 0, 1, 1) == pytest.approx(-math.log(sig(0.2)) + 5.0)
    d_w, d_l = symbolic.derive("cpo").weights(lw, ll)
    assert float(d_w) == pytest.approx(beta * sig(-0.2) + alpha)
    assert float(d_l) == pytest.approx(beta * sig(-0.2))


def test_hand_value_orpo():
    lw, ll, len_w, len_l, lam = -2.0, -6.0, 4, 3, 0.1
    pw, pl = math.exp(lw / len_w), math.exp(ll / len_l)
    odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
    expect = -lw / len_w - lam * math.log(sig(odds))
    assert losses.get("orpo")("numpy", lw, ll, 0, 0, len_w, len_l) == pytest.approx(expect)


# ---- registry behaviour ----------------------------------------------------------------------

def test_registry_covers_the_issue_losses():
    required = {"dpo", "ipo", "ipo_norm", "hinge", "slic_hf", "simpo", "r_dpo", "cpo", "rrhf", "orpo", "kto",
                "dpop", "rpo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                "apo_down", "discopop", "sigmoid_norm"}
    assert required <= set(ALL)
    for name in ALL:
        loss = losses.get(name)
        assert loss.source and set(loss.ranges) == set(loss.defaults)


def test_unsupported_losses_say_why():
    for name in ("aot", "aot_unpaired"):
        with pytest.raises(GesimError, match="not supported.*sort"):
            losses.get(name)


def test_unknown_loss_suggests_the_closest_name():
    with pytest.raises(GesimError, match="did you mean 'simpo'"):
        losses.get("simp")


def test_parameters_override_defaults_and_are_range_checked():
    dpo = losses.get("dpo")
    assert dpo.params(beta=0.5) == {"beta": 0.5}
    with pytest.raises(GesimError, match="out of range"):
        dpo.params(beta=0.0)
    with pytest.raises(GesimError, match="unknown parameter"):
        dpo.params(gamma=1.0)
    with pytest.raises(GesimError, match="out of range"):
        dpo.params(beta=float("nan"))
    assert float(dpo("numpy", -5, -6, beta=0.5)) == pytest.approx(-math.log(sig(0.5)))


def test_register_checks_the_signature():
    with pytest.raises(GesimError, match="positional arguments"):
        losses.register("bad1", margin=True, source="x", beta=1.0)(lambda ops, lw, ll, *, beta: lw)
    with pytest.raises(GesimError, match="must match"):
        @losses.register("bad2", margin=True, source="x", beta=1.0)
        def bad2(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, gamma):
            return lw
    with pytest.raises(GesimError, match="already registered"):
        losses.register("dpo", margin=True, source="x")(lambda ops, lw, ll, lw_ref, ll_ref, len_w, len_l: lw)
    assert "bad1" not in losses.names() and "bad2" not in losses.names()


def test_user_loss_in_five_lines_gets_its_conditions():
    @gesim.losses.register("user_sq", margin=True, source="test", ranges={"beta": losses.POSITIVE}, beta=0.5)
    def user_sq(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
        return -ops.log_sigmoid(beta * (lw - ll)) + ops.square(lw - ll) / 100

    try:
        d = gesim.symbolic.derive("user_sq")
        assert sp.simplify(d.k - 1) == 0  # a margin loss: k = 1
        out = d.evaluate(lw=-5, ll=-6, ip=1.0, nw2=2.0, nl2=3.0, eta=1.0, beta=1.0)
        c = sig(-1.0) - 2 * 1.0 / 100
        assert out["d_w"] == pytest.approx(c) and out["delta_lw"] == pytest.approx(c * (2.0 - 1.0))
        assert "user_sq" in symbolic.table(fmt="markdown")
    finally:
        gesim.losses.unregister("user_sq")


# ---- property test over losses and their parameter ranges ------------------------------------

def param_values(name):
    """A hypothesis strategy for a loss's parameters, inside their registered ranges."""
    from hypothesis import strategies as st

    loss = losses.get(name)
    fields = {}
    for key, rng in loss.ranges.items():
        lo = max(rng.low, -5.0) + (0 if rng.low_closed else 1e-3)
        hi = min(rng.high, 5.0) - (0 if rng.high_closed else 1e-3)
        fields[key] = st.floats(lo, hi, allow_nan=False)
    return st.fixed_dictionaries(fields)


def _loss_and_params():
    from hypothesis import strategies as st

    return st.sampled_from(ALL).flatmap(lambda n: st.tuples(st.just(n), param_values(n)))


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(case=_loss_and_params(), seed=st.integers(0, 10**6))
def test_property_weights_equal_autograd_for_any_parameters(case, seed):
    name, params = case
    loss, d = losses.get(name), symbolic.derive(name)
    (pt,) = random_points(seed, 1)
    lw = torch.tensor(pt["lw"], dtype=torch.float64, requires_grad=True)
    ll = torch.tensor(pt["ll"], dtype=torch.float64, requires_grad=True)
    rest = [torch.tensor(pt[k], dtype=torch.float64) for k in ("lw_ref", "ll_ref", "len_w", "len_l")]
    value = loss("torch", lw, ll, *rest, **params)
    g_lw, g_ll = grads(value, lw, ll)
    assert float(value) == pytest.approx(float(loss("numpy", **pt, **params)), rel=1e-9, abs=1e-9)
    d_w, d_l = d.weights(**pt, **params)
    assert float(d_w) == pytest.approx(-float(g_lw), rel=1e-8, abs=1e-10)
    assert float(d_l) == pytest.approx(float(g_ll), rel=1e-8, abs=1e-10)
