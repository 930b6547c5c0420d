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
from gesim import dynamics, losses, symbolic
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
    out = dynamics.evaluate("dpo", lw=lw, ll=ll, lw_ref=lw_ref, ll_ref=ll_ref, ip=0.5, nw2=2.0, nl2=1.0,
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


# ---- an independent hand-computed value and weights for EVERY registered loss ----------------
# Each entry writes the loss L and its weights d_w = -dL/dlw, d_l = dL/dll out in numpy, derived
# by hand (chain rule on paper), sharing nothing with gesim.losses, gesim.backends or sympy.

def s(x):
    return 1 / (1 + np.exp(-x))


def ls(x):
    return -np.log1p(np.exp(-x))


def ds(x):
    """sigma'(x) = sigma(x) sigma(-x)."""
    return s(x) * s(-x)


def _margin(z_scale, L, dLdz):
    """(L, d_w, d_l) of a loss of z = z_scale h: d_w = -dL/dz z_scale = d_l."""
    return L, -dLdz * z_scale, -dLdz * z_scale


def hand(name, lw, ll, lw_ref, ll_ref, len_w, len_l, **q):  # noqa: C901 (one branch per loss)
    rw, rl = lw - lw_ref, ll - ll_ref
    h = rw - rl
    pw, pl = lw / len_w, ll / len_l
    b = q.get("beta")
    if name == "dpo":
        return _margin(b, -ls(b * h), -s(-b * h))
    if name == "ipo":
        c = 1 / (2 * q["tau"])
        return (h - c) ** 2, -2 * (h - c), -2 * (h - c)
    if name == "ipo_norm":
        u, c = rw / len_w - rl / len_l, 1 / (2 * q["tau"])
        return (u - c) ** 2, -2 * (u - c) / len_w, -2 * (u - c) / len_l
    if name == "hinge":
        on = float(1 - b * h > 0)
        return max(1 - b * h, 0.0), b * on, b * on
    if name == "slic_hf":
        a = q["delta"] - lw + ll
        return max(a, 0.0) - q["lam"] * lw, float(a > 0) + q["lam"], float(a > 0)
    if name == "simpo":
        z = b * pw - b * pl - q["gamma"]
        return -ls(z), b / len_w * s(-z), b / len_l * s(-z)
    if name == "r_dpo":
        z = b * h - q["alpha"] * (len_w - len_l)
        return -ls(z), b * s(-z), b * s(-z)
    if name == "cpo":
        z = b * (lw - ll)
        return -ls(z) - q["alpha"] * lw, b * s(-z) + q["alpha"], b * s(-z)
    if name == "rrhf":
        a = pl - pw
        return max(a, 0.0) - q["lam"] * lw, float(a > 0) / len_w + q["lam"], float(a > 0) / len_l
    if name in ("orpo", "orpo_trl"):
        lo = lambda x: x - np.log(1 - np.exp(x))  # noqa: E731  log odds of p = e^x
        r = lo(pw) - lo(pl)
        nll = len_w if name == "orpo" else q["len_bar"]
        return (-lw / nll - q["lam"] * ls(r), 1 / nll + q["lam"] * s(-r) / ((1 - np.exp(pw)) * len_w),
                q["lam"] * s(-r) / ((1 - np.exp(pl)) * len_l))
    if name == "kto":
        xw, xl = b * (rw - q["z0"]), b * (q["z0"] - rl)
        return (q["lambda_d"] * (1 - s(xw)) + q["lambda_u"] * (1 - s(xl)),
                q["lambda_d"] * b * ds(xw), q["lambda_u"] * b * ds(xl))
    if name == "dpop":
        below = float(lw_ref - lw > 0)
        z = b * (h - q["lam"] * max(lw_ref - lw, 0.0))
        return -ls(z), b * s(-z) * (1 + q["lam"] * below), b * s(-z)
    if name in ("rpo", "rpo_trl"):
        n = len_w if name == "rpo" else q["len_bar"]
        return -ls(b * h) - q["alpha"] * lw / n, b * s(-b * h) + q["alpha"] / n, b * s(-b * h)
    if name == "exo_pair":
        z, e = b * h, q["eps"]
        L = s(z) * (ls(z) - np.log(1 - e)) + s(-z) * (ls(-z) - np.log(e))
        return _margin(b, L, ds(z) * (z - np.log((1 - e) / e)))
    if name == "nca_pair":
        return (-ls(b * rw) - ls(-b * rw) / 2 - ls(-b * rl) / 2, b * s(-b * rw) - b * s(b * rw) / 2,
                b * s(b * rl) / 2)
    if name == "robust":
        z, e = b * h, q["eps"]
        return _margin(b, ((1 - e) * -ls(z) + e * ls(-z)) / (1 - 2 * e), -((1 - e) * s(-z) + e * s(z)) / (1 - 2 * e))
    if name == "bco_pair":
        d = q["delta"]
        return -ls(b * rw - d) - ls(-(b * rl - d)), b * s(-(b * rw - d)), b * s(b * rl - d)
    if name == "sppo_hard":
        c = 1 / (2 * b)
        return (rw - c) ** 2 + (rl + c) ** 2, -2 * (rw - c), 2 * (rl + c)
    if name == "apo_zero":
        return 1 - s(b * rw) + s(b * rl), b * ds(b * rw), b * ds(b * rl)
    if name == "apo_down":
        return s(b * rw) + 1 - s(b * h), b * ds(b * h) - b * ds(b * rw), b * ds(b * h)
    if name == "discopop":
        z, t = b * h, q["tau"]
        m, dm = s(z / t), ds(z / t) / t
        return _margin(b, (1 - m) * -ls(z) + m * np.exp(-z),
                       dm * ls(z) - (1 - m) * s(-z) + dm * np.exp(-z) - m * np.exp(-z))
    if name == "sigmoid_norm":
        u = rw / len_w - rl / len_l
        return -ls(b * u), b * s(-b * u) / len_w, b * s(-b * u) / len_l
    if name == "alphapo":
        a = q["alpha"]
        z = b * ((1 - np.exp(-a * pw)) / a - (1 - np.exp(-a * pl)) / a) - q["gamma"]
        return -ls(z), s(-z) * b * np.exp(-a * pw) / len_w, s(-z) * b * np.exp(-a * pl) / len_l
    if name == "sft":
        return -pw, 1 / len_w, 0.0
    if name == "sft_trl":
        return -lw / q["len_bar"], 1 / q["len_bar"], 0.0
    if name == "cpo_trl":
        z, e = b * (lw - ll), q["eps"]
        c = b * ((1 - e) * s(-z) - e * s(z))
        return -(1 - e) * ls(z) - e * ls(-z) - q["alpha"] * lw / q["len_bar"], c + q["alpha"] / q["len_bar"], c
    if name in ("dpo_forward_kl", "dpo_js", "dpo_alpha_div"):
        if name == "dpo_forward_kl":
            S, dS = (lambda r: 1 - np.exp(-r)), (lambda r: np.exp(-r))
        elif name == "dpo_js":
            S, dS = ls, (lambda r: s(-r))
        else:
            k = q["alpha"] - 1
            S, dS = (lambda r: (np.exp(k * r) - 1) / k), (lambda r: np.exp(k * r))
        z = b * (S(rw) - S(rl))
        return -ls(z), b * s(-z) * dS(rw), b * s(-z) * dS(rl)
    if name == "ld_dpo":
        m, a = min(len_w, len_l), q["alpha"]
        cw, cl = (m + a * (len_w - m)) / len_w, (m + a * (len_l - m)) / len_l
        z = b * (rw * cw - rl * cl)
        return -ls(z), b * s(-z) * cw, b * s(-z) * cl
    if name == "wpo":
        w = np.exp(pw + pl)  # detached: no derivative of the weight
        return w * -ls(b * h), w * b * s(-b * h), w * b * s(-b * h)
    if name == "apo_zero_unpaired":
        return (q["lambda_d"] * (1 - s(b * rw)) + q["lambda_u"] * s(b * rl), q["lambda_d"] * b * ds(b * rw),
                q["lambda_u"] * b * ds(b * rl))
    if name == "alphapo_sum":
        a, e = q["alpha"], q["eps"]
        z = b * ((1 - np.exp(-a * lw)) / a - (1 - np.exp(-a * ll)) / a)
        c = (1 - e) * s(-z) - e * s(z)
        return -(1 - e) * ls(z) - e * ls(-z), b * c * np.exp(-a * lw), b * c * np.exp(-a * ll)
    if name == "cal_dpo":
        c = 1 / (2 * b)
        return (-ls(h) + ((rw - c) ** 2 + (rl + c) ** 2) / 2, s(-h) - (rw - c), s(-h) + rl + c)
    if name == "dpo_shift":
        z = b * (rw - q["lam"] * rl)
        return -ls(z), b * s(-z), b * q["lam"] * s(-z)
    raise KeyError(name)


HAND_POINTS = [  # lw, ll, lw_ref, ll_ref, len_w, len_l: chosen above / below its reference, hinge on / off
    (-5.2, -7.9, -6.1, -6.6, 4.0, 7.0), (-9.6, -4.5, -7.5, -5.0, 6.0, 3.0), (-3.0, -20.0, -8.0, -9.0, 5.0, 10.0)]


def varied(name):
    """Every parameter moved off its default (a wrong parameter wiring shows)."""
    return {k: v * 0.77 if v else 0.2 for k, v in losses.get(name).defaults.items()}


@pytest.mark.parametrize("name", ALL)
def test_hand_value_and_weights_of_every_loss(name):
    loss, d = losses.get(name), symbolic.derive(name)
    for params in (loss.params(), loss.params(**varied(name))):
        for pt in HAND_POINTS:
            L, d_w, d_l = hand(name, *pt, **params)
            assert float(loss("numpy", *pt, **params)) == pytest.approx(L, rel=1e-12, abs=1e-13)
            w = d.weights(*pt, **params)
            assert float(w[0]) == pytest.approx(d_w, rel=1e-10, abs=1e-13), "d_w"
            assert float(w[1]) == pytest.approx(d_l, rel=1e-10, abs=1e-13), "d_l"


# ---- registry behaviour ----------------------------------------------------------------------

def test_registry_covers_the_issue_losses():
    required = {"dpo", "ipo", "ipo_norm", "hinge", "slic_hf", "simpo", "r_dpo", "cpo", "rrhf", "orpo", "kto",
                "dpop", "rpo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                "apo_down", "discopop", "sigmoid_norm", "alphapo",
                # issue 14: trl batch forms, f-DPO, LD-DPO, WPO, SFT, APO unpaired, AlphaPO sums, Cal-DPO, DPO-Shift
                "sft", "sft_trl", "rpo_trl", "cpo_trl", "orpo_trl", "dpo_forward_kl", "dpo_js", "dpo_alpha_div",
                "ld_dpo", "wpo", "apo_zero_unpaired", "alphapo_sum", "cal_dpo", "dpo_shift"}
    assert required <= set(ALL)
    for name in ALL:
        loss = losses.get(name)
        assert loss.source and set(loss.ranges) == set(loss.defaults)


def test_unsupported_losses_say_why():
    for name in ("aot", "aot_unpaired"):
        with pytest.raises(GesimError, match="not supported.*sort"):
            losses.get(name)


def test_aot_weights_of_one_pair_are_dpo_weights_and_follow_the_sort():
    """With one pair AOT is DPO; with two, the pair holding the larger policy margin gets the
    weight computed from the larger reference margin (hand-computed)."""
    d_w, d_l = losses.aot_weights([-5.0], [-7.0], [-6.0], [-6.5], beta=0.1)
    assert float(d_w[0]) == pytest.approx(0.1 * sig(-0.1 * 1.5)) and float(d_l[0]) == float(d_w[0])
    lw, ll, lw_ref, ll_ref = [-1.0, -4.0], [-3.0, -1.0], [-2.0, -2.0], [-2.5, -1.0]  # margins 2, -3; ref .5, -1
    d_w, d_l = losses.aot_weights(lw, ll, lw_ref, ll_ref, beta=0.5)
    expect = [0.5 / 2 * sig(-0.5 * (2 - 0.5)), 0.5 / 2 * sig(-0.5 * (-3 + 1))]
    np.testing.assert_allclose(d_w, expect)
    np.testing.assert_allclose(d_l, expect)
    d_w, d_l = losses.aot_weights(lw, ll, lw_ref, ll_ref, beta=0.5, unpaired=True)  # rw = 1, -2; rl = -.5, 0
    np.testing.assert_allclose(d_w, [0.25 * sig(-0.5 * (1 - 0)), 0.25 * sig(-0.5 * (-2 + 0.5))])
    np.testing.assert_allclose(d_l, [0.25 * sig(-0.5 * (-2 + 0.5)), 0.25 * sig(-0.5 * (1 - 0))])


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
        out = dynamics.evaluate(d, lw=-5, ll=-6, ip=1.0, nw2=2.0, nl2=3.0, eta=1.0, beta=1.0)
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


def test_table_rows_carry_the_trl_record():
    row = symbolic.derive("ipo_norm").row()
    assert row["trl"]["trainer"] == "DPOTrainer" and row["trl"]["loss_type"] == "ipo"
    assert row["trl"]["params"] == {"tau": "beta"} and row["trl"]["version"] == losses.TRL_VERSION
    assert symbolic.derive("kto").row()["trl"]["scale"] == 0.5
    assert symbolic.derive("rpo_trl").row()["trl"]["loss_type"] == ["sigmoid", "sft"]
    assert symbolic.derive("slic_hf").row()["trl"] is None
    assert '"trl": null' in symbolic.table(["slic_hf"], fmt="json")


@pytest.mark.parametrize("name", losses.names())
def test_loss_weights_by_autograd_equal_the_closed_forms(name):
    """Loss.weights (the one autograd copy, used by the simulator's reference loop, PNGD and
    Fish) equals the symbolic closed forms of every registered loss on a batch of pairs."""
    import torch

    rng = np.random.default_rng(3)
    pt = {"lw": -rng.uniform(1, 20, 6), "ll": -rng.uniform(1, 20, 6), "lw_ref": -rng.uniform(1, 20, 6),
          "ll_ref": -rng.uniform(1, 20, 6), "len_w": rng.integers(1, 30, 6).astype(float),
          "len_l": rng.integers(1, 30, 6).astype(float)}
    want = symbolic.derive(name).weights(*pt.values())
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in pt.items()}
    got = losses.get(name).weights(*t.values())
    for g, w in zip(got, want):
        assert g.shape == (6,) and not g.requires_grad
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12)
