"""The simulator: fast path = plain loop, first-order agreement, determinism, sweeps, command line."""

import dataclasses
import json

import numpy as np
import pytest

from gesim import losses
from gesim.cli import main
from gesim.errors import GesimError
from gesim.simulate import FIELDS, SimConfig, simulate, simulate_loop, sweeps

SMALL = SimConfig(instances=60, steps=3, vocab=24, dim=8, suffix=6)


@pytest.mark.parametrize("policy, rule, loss", [
    ("context", "sgd", "dpo"), ("context", "adam", "simpo"), ("free_logits", "sgd", "ipo"),
    ("free_logits", "adam", "dpo"), ("single_token", "sgd", "cpo")])
def test_vectorised_results_equal_the_per_instance_autograd_loop(policy, rule, loss):
    suffix = 0 if policy == "single_token" else 3
    cfg = dataclasses.replace(SMALL, policy=policy, rule=rule, loss=loss, instances=4, chunk=3,
                              suffix=suffix, differ_l=None if policy == "single_token" else 2, eta=0.05)
    fast, plain = simulate(cfg).arrays, simulate_loop(cfg).arrays
    for key in FIELDS:
        np.testing.assert_allclose(fast[key], plain[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_determinism_under_seed():
    a, b = simulate(SMALL).arrays, simulate(SMALL).arrays
    c = simulate(dataclasses.replace(SMALL, seed=1)).arrays
    for key in FIELDS:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["ip"], c["ip"])


@pytest.mark.parametrize("rule, eta", [("sgd", 1e-3), ("adam", 1e-4)])
def test_regime_agreement_at_small_eta_for_every_loss(rule, eta):
    """theory.md prediction 2: realised signs match the first-order regime for every loss.

    Points with a weight exactly zero (Heaviside kinks) are 'stalled' in both prediction and
    realisation, so they are counted honestly, not dropped."""
    cfg = dataclasses.replace(SMALL, instances=100, steps=2, eta=eta, rule=rule, suffix=8)
    low = {}
    for name in losses.names():
        s = simulate(dataclasses.replace(cfg, loss=name)).summary()
        if s["regime_agreement"] < 0.99:
            low[name] = s["regime_agreement"]
    assert not low


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_first_order_error_shrinks_like_eta_squared(rule):
    """theory.md prediction 1 (and section 3 for Adam's preconditioned products)."""
    out = sweeps.eta_sweep(dataclasses.replace(SMALL, rule=rule), [1e-4, 1e-3, 1e-2])
    assert out["slope"] == pytest.approx(2.0, abs=0.15)
    assert out["rows"][0]["median_relative_error"] < 1e-3


def test_adam_first_order_uses_the_preconditioned_inner_products():
    """With Adam, the plain ip/nw2/nl2 mispredict the realised change; the P-weighted ones do not."""
    import torch

    from gesim import policies
    from gesim.simulate import engine, optim

    cfg = dataclasses.replace(SMALL, rule="adam", eta=1e-5, instances=50)
    pol, inst, pairs = engine.make_data(cfg, 0, cfg.instances)
    yw, mw, yl, ml = engine._tensors(pairs, torch.float64)
    H_w, H_l = pol.features(inst, yw), pol.features(inst, yl)
    lw, g_w = policies.grad(inst.W0, H_w, yw, mw)
    ll, g_l = policies.grad(inst.W0, H_l, yl, ml)
    d = torch.ones(cfg.instances, dtype=torch.float64) * 0.05
    upd = optim.make("adam", cfg.eta).step(g_w, g_l, d, d)
    real = (policies.logps(inst.W0 + upd.u, H_w, yw, mw) - lw).numpy()
    ip, nw2, _ = (x.numpy() for x in optim.geometry(g_w, g_l, upd.precond))
    ip0, nw20, _ = (x.numpy() for x in optim.geometry(g_w, g_l))
    pred = cfg.eta * 0.05 * (nw2 - ip)
    plain = cfg.eta * 0.05 * (nw20 - ip0)
    np.testing.assert_allclose(real, pred, rtol=1e-3)
    assert np.median(np.abs(plain - real) / np.abs(real)) > 0.1


def test_context_policy_cos_and_chosen_down_grow_with_shared_suffix():
    """theory.md prediction 10: mean cos and P(chosen down) grow with the shared-suffix length."""
    rows = sweeps.suffix_sweep(SimConfig(instances=400, steps=1), [0, 2, 8, 32])
    cos = [r["mean_cos"] for r in rows]
    assert all(a < b for a, b in zip(cos, cos[1:]))
    assert rows[-1]["p_chosen_down"] > rows[0]["p_chosen_down"] == 0.0
    assert all(r["regime_agreement"] >= 0.99 for r in rows)


def test_single_token_dpo_never_moves_chosen_down_or_rejected_up():
    s = simulate(SimConfig(policy="single_token", instances=500, steps=5, eta=0.5, vocab=16, dim=8)).summary()
    assert s["p_chosen_down"] == 0 and s["p_rejected_up"] == 0 and s["realised_regimes"]["ideal"] == 1.0


def test_simpo_weight_ratio_is_the_length_ratio():
    """theory.md prediction 6: for SimPO, k = d_w / d_l = len_l / len_w."""
    rows = sweeps.length_ratio_sweep(dataclasses.replace(SMALL, loss="simpo", instances=20, steps=1), gaps=(-2, 0, 3))
    for r in rows:
        assert r["median_k"] == pytest.approx(r["len_l"] / r["len_w"], rel=1e-9)


def test_records_are_tidy():
    pd = pytest.importorskip("pandas")
    res = simulate(dataclasses.replace(SMALL, instances=5, steps=2))
    df = pd.DataFrame(res.records())
    assert len(df) == 10 and {"step", "instance", *FIELDS} <= set(df.columns)
    assert set(df["pred_regime"]) <= {"ideal", "both_down", "both_up", "chosen_down_rejected_up", "stalled"}
    np.testing.assert_allclose(df["margin"], df["lw"] - df["ll"])


def test_boundary_separates_simulated_regimes():
    """Points on the chosen-up side of the symbolic boundary rho = cos / k are realised chosen up."""
    pts = sweeps.regime_points(dataclasses.replace(SMALL, instances=80, steps=1, eta=1e-3), suffixes=(0, 8, 32))
    rho_c, _ = sweeps.boundary(pts["k"], pts["cos"])
    chosen_up_pred = ~(pts["cos"] > 0) | (pts["rho"] > rho_c)
    chosen_down_real = np.isin(pts["real_regime"], [1, 3])  # both_down, chosen_down_rejected_up
    assert np.mean(chosen_up_pred != chosen_down_real) >= 0.99


@pytest.mark.parametrize("cfg, match", [
    (SimConfig(loss="nope"), "unknown loss"), (SimConfig(rule="lion"), "unknown update rule"),
    (SimConfig(eta=-1.0), "eta"), (SimConfig(policy="single_token", suffix=3), "one-token"),
    (SimConfig(instances=0), "instances"), (SimConfig(params={"beta": -1}), "out of range")])
def test_bad_config_raises_gesim_error(cfg, match):
    with pytest.raises(GesimError, match=match):
        simulate(cfg)


def test_cli_simulate_json(capsys):
    assert main(["simulate", "--policy", "context", "--suffix", "0,32", "--instances", "200", "--steps", "1",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["suffix"] for r in rows] == [0, 32]
    for r in rows:
        assert {"suffix", "instances", "mean_cos", "p_chosen_down", "p_rejected_up", "regime_agreement"} <= set(r)
    assert rows[1]["mean_cos"] > rows[0]["mean_cos"]
    assert main(["simulate", "--policy", "single_token", "--instances", "100", "--format", "json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["p_chosen_down"] == 0 and r["p_rejected_up"] == 0


def test_cli_simulate_bad_input_is_one_line(capsys):
    assert main(["simulate", "--loss", "dpo_x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown loss 'dpo_x'" in err and "simpo" in err
    assert main(["simulate", "--policy", "single_token", "--suffix", "2"]) == 2


# ---- the logit-space engine (issue 17): fast = weight space = plain loop ----------------------------

def _three_engines_agree(cfg):
    """The logit-space engine = the weight-space engine (1e-9) = the per-instance autograd loop (1e-6)."""
    fast = simulate(cfg, engine="logit").arrays
    slow = simulate(cfg, engine="weights").arrays
    plain = simulate_loop(cfg).arrays
    for key in FIELDS:
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-9, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(fast[key], plain[key], rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("policy, loss, shape", [
    ("context", "dpo", dict(prefix=2, differ=1, suffix=5)),
    ("context", "simpo", dict(differ_w=1, differ_l=3, suffix=4, tail_w=2)),
    ("context", "ipo", dict(differ=2, suffix=0)),
    ("free_logits", "dpo", dict(prefix=1, differ=2, suffix=3)),
    ("free_logits", "simpo", dict(differ_w=2, differ_l=1, suffix=2)),
    ("single_token", "cpo", dict(differ=1))])
def test_logit_space_engine_equals_weight_space_engine_and_loop(policy, loss, shape):
    """The logit-space update Delta Z = eta (a K_w C_w - b K_l C_l) is the weight-space step exactly."""
    cfg = SimConfig(policy=policy, loss=loss, instances=14, chunk=11, steps=4, vocab=24, dim=8, eta=0.3, **shape)
    _three_engines_agree(cfg)


@pytest.mark.parametrize("policy, shape", [
    ("context", dict(suffix=5)), ("free_logits", dict(suffix=5)), ("single_token", dict(suffix=0))])
def test_fused_tiles_equal_the_unfused_step(monkeypatch, policy, shape):
    """SGD's weights ignore the geometry, so a whole step runs tile by tile (serpentine order);
    a rule without that promise takes the two-pass path; one tile is the plain whole-block
    step: same numbers, every policy (separate logits, shared logits with K = I, T = 1)."""
    from gesim.simulate import engine, logit, optim

    cfg = dataclasses.replace(SMALL, policy=policy, instances=30, chunk=30, steps=4, **shape)
    R = 1 if policy == "single_token" else 2 * 6 if policy == "context" else 6
    per_instance = 2 * R * 24 * 8  # B holds 2 x R x V float64 per instance
    monkeypatch.setattr(engine, "BLOCK_BYTES", 2**30)  # one block of 30
    monkeypatch.setattr(logit, "TILE_BYTES", 2**30)  # one tile: the whole block
    whole = simulate(cfg).arrays
    monkeypatch.setattr(logit, "TILE_BYTES", 10 * per_instance)  # three tiles of 10
    fused = simulate(cfg).arrays
    monkeypatch.setattr(logit, "TILE_BYTES", 7 * per_instance)  # tiles of 7: the last one ragged
    ragged = simulate(cfg).arrays
    monkeypatch.setattr(optim.SGD, "geometry_free", False)
    unfused = simulate(cfg).arrays
    for key in FIELDS:
        for name, got in (("fused", fused), ("ragged", ragged), ("unfused", unfused)):
            np.testing.assert_allclose(got[key], whole[key], rtol=1e-12, atol=1e-14, err_msg=f"{name} {key}")


class _GeometryRule:
    """A test rule whose weights read the geometry (b = d_l nw2 / nl2), in both protocols."""

    def __init__(self, eta):
        self.eta = eta

    def weights(self, d_w, d_l, ip, nw2, nl2):
        return d_w, d_l * nw2 / nl2

    def step(self, g_w, g_l, d_w, d_l):
        from gesim.simulate import optim

        a, b = self.weights(d_w, d_l, *optim.geometry(g_w, g_l))
        return optim.Update(optim.direction(g_w, g_l, a, b).mul_(self.eta), d_w=a, d_l=b)


@pytest.mark.parametrize("policy, suffix", [("context", 5), ("free_logits", 5), ("single_token", 0)])
def test_rule_reading_the_geometry_runs_the_two_pass_step_exactly(monkeypatch, policy, suffix):
    """A rule whose weights need the block's geometry first (no ``geometry_free``) takes the
    logit engine's two-pass step, over several tiles: it equals the weight-space engine and
    the per-instance loop, and predictions use the rule's weights."""
    from gesim.simulate import logit, optim

    monkeypatch.setitem(optim.RULES, "geometry_test", _GeometryRule)
    monkeypatch.setattr(logit, "TILE_BYTES", 1)  # tiles of one instance
    cfg = dataclasses.replace(SMALL, policy=policy, rule="geometry_test", instances=7, chunk=5, steps=3,
                              suffix=suffix, eta=0.2)
    _three_engines_agree(cfg)


@pytest.mark.parametrize("policy", ["context", "free_logits", "single_token"])
def test_logit_engine_geometry_equals_the_pair_double_sums(policy):
    """The stacked dot product <C'_a, (K C')_b> of the logit engine is the plainest formula,
    ip = sum_{t,s} (C^w_t . C^l_s)(h^w_t . h^l_s) (:func:`gesim.policies.pair_ip`), at step 0."""
    import torch

    from gesim import policies
    from gesim.simulate import engine

    suffix = 0 if policy == "single_token" else 4
    cfg = dataclasses.replace(SMALL, policy=policy, instances=9, steps=1, suffix=suffix, tail_w=0)
    pol, inst, pairs = engine.make_data(cfg, 0, cfg.instances)
    yw, mw, yl, ml = engine._tensors(pairs, torch.float64)
    H_w, H_l = pol.features(inst, yw), pol.features(inst, yl)
    ip, nw2, nl2 = (x.numpy() for x in policies.pair_ip(inst.W0, H_w, yw, mw, H_l, yl, ml))
    fast = engine.run_chunk(cfg, pol, inst, pairs, engine="logit")
    np.testing.assert_allclose(fast["ip"][0], ip, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(fast["nw2"][0], nw2, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(fast["nl2"][0], nl2, rtol=1e-10, atol=1e-13)


def test_unchecked_loss_weights_equal_the_checked_ones():
    """The simulator skips the data checks after its first step: same weights, and the
    checked call still refuses data no pair can have."""
    from gesim import symbolic

    rng = np.random.default_rng(0)
    lw, ll, lw_ref, ll_ref = (-rng.random(7) * 20 for _ in range(4))
    len_w, len_l = rng.integers(1, 9, 7).astype(float), rng.integers(1, 9, 7).astype(float)
    for name in ("dpo", "simpo", "ipo", "cpo"):
        d = symbolic.derive(name)
        checked = d.weights(lw, ll, lw_ref, ll_ref, len_w, len_l)
        unchecked = d.weights(lw, ll, lw_ref, ll_ref, len_w, len_l, check=False)
        np.testing.assert_array_equal(checked[0], unchecked[0])
        np.testing.assert_array_equal(checked[1], unchecked[1])
    with pytest.raises(GesimError, match="lw is a summed log-probability"):
        symbolic.derive("dpo").weights(-lw, ll, lw_ref, ll_ref, len_w, len_l)


def test_float32_logit_engine_keeps_the_regimes_of_the_weight_space_engine():
    cfg = dataclasses.replace(SMALL, instances=40, steps=5, dtype="float32", eta=0.2, suffix=8)
    fast, slow = simulate(cfg, engine="logit").arrays, simulate(cfg, engine="weights").arrays
    for key in ("pred_regime", "real_regime"):
        np.testing.assert_array_equal(fast[key], slow[key])
    np.testing.assert_allclose(fast["lw"], slow["lw"], rtol=1e-5)


def test_results_do_not_depend_on_workers_or_block_size(monkeypatch):
    from gesim.simulate import engine

    cfg = dataclasses.replace(SMALL, instances=50, chunk=30)
    one = simulate(cfg, workers=1).arrays
    two = simulate(cfg, workers=2).arrays
    monkeypatch.setattr(engine, "BLOCK_BYTES", 1)  # blocks of 8 instances
    small = simulate(cfg, workers=2).arrays
    for key in FIELDS:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
        np.testing.assert_allclose(one[key], small[key], rtol=1e-12, atol=1e-14, err_msg=key)


def test_logit_engine_survives_probabilities_that_underflow():
    """Huge logits: p_y underflows float32, so log p_y comes from log-sum-exp (the safe rerun)."""
    import torch

    from gesim.simulate import engine

    cfg = dataclasses.replace(SMALL, instances=6, steps=2, dtype="float32", eta=1e-3)
    pol, inst, pairs = engine.make_data(cfg, 0, cfg.instances)
    inst = dataclasses.replace(inst, W0=inst.W0 * 400)
    fast = engine.run_chunk(cfg, pol, inst, pairs, engine="logit")
    slow = engine.run_chunk(cfg, pol, inst, pairs, engine="weights")
    assert np.isfinite(fast["lw"]).all() and (fast["lw"] < -80).any()  # p_y below float32's tiny
    np.testing.assert_allclose(fast["lw"], slow["lw"], rtol=1e-5)
    torch.testing.assert_close(torch.as_tensor(fast["ll"]), torch.as_tensor(slow["ll"]), rtol=1e-5, atol=1e-3)


def test_floor_counts_the_cheaper_of_logit_and_weight_space_gemms():
    from gesim.simulate import logit

    T, V = 32, 256
    ctx = logit.floor("context", T, V, 64)
    assert ctx["gemm_flops"] == 2 * (2 * T) ** 2 * V < 2 * 2 * (2 * T) * 64 * V  # half the weight-space GEMMs
    assert logit.floor("context", T, V, 8)["gemm_flops"] == 2 * 2 * (2 * T) * 8 * V  # d < T: weight space
    assert logit.floor("context", T, V, T)["gemm_flops"] == 2 * (2 * T) ** 2 * V  # d = T: a tie
    assert logit.floor("context", T, V, 512)["gemm_flops"] == 2 * (2 * T) ** 2 * V
    assert logit.floor("free_logits", T, V, T)["gemm_flops"] == 0
    assert ctx["exps"] == 2 * T * V and logit.floor("free_logits", T, V, T)["exps"] == T * V
    assert ctx["flops"] == ctx["gemm_flops"] + ctx["elementwise_flops"]


def test_engine_choice_is_checked():
    with pytest.raises(GesimError, match="SGD-family"):
        simulate(dataclasses.replace(SMALL, rule="adam"), engine="logit")
    with pytest.raises(GesimError, match="unknown engine"):
        simulate(SMALL, engine="gpu")


def test_optimizer_is_the_deprecated_name_of_the_update_rule():
    """SimConfig's update rule is ``rule`` (a torch optimiser is TrainConfig.optimizer); the
    former keyword still works, with a DeprecationWarning, and is not a field."""
    with pytest.warns(DeprecationWarning, match="rule"):
        old = SimConfig(optimizer="adam")
    assert old == SimConfig(rule="adam") and "optimizer" not in dataclasses.asdict(old)
