"""Mitigations: each update rule against a hand-written step, PNGD's first-order guarantee,
OMO's reduction to AdamW, averaging's end points, HMA's mean ratio, token masking and the
Fish-sequenced objective on the small GPT."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gesim import lm, losses
from gesim.errors import GesimError
from gesim.methods import fish, masking, pairwise
from gesim.simulate import SimConfig, optim, simulate
from gesim.transformer import GPT, GPTConfig, data
from gesim.transformer.measure import method_pair_check


def _grads(seed, n=5, shape=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    g_w = base + 0.3 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    g_l = base * torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 3 + 0.3 * torch.randn(
        n, *shape, generator=g, dtype=torch.float64)
    return g_w, g_l


def test_pngd_rule_is_the_hand_written_step():
    g_w, g_l = _grads(0)
    d_w, d_l = torch.full((5,), 0.3, dtype=torch.float64), torch.full((5,), 0.7, dtype=torch.float64)
    upd = pairwise.PNGD(0.1, scale="none").step(g_w, g_l, d_w, d_l)
    nw, nl = g_w.flatten(1).norm(dim=1), g_l.flatten(1).norm(dim=1)
    assert torch.allclose(upd.u, 0.1 * (g_w / nw[:, None, None] - g_l / nl[:, None, None]))
    upd = pairwise.PNGD(0.1).step(g_w, g_l, d_w, d_l)  # mean_norm: c = (d_w + d_l)/2 (|g_w| + |g_l|)/2
    c = 0.5 * (nw + nl) / 2
    assert torch.allclose(upd.u, 0.1 * c[:, None, None] * (g_w / nw[:, None, None] - g_l / nl[:, None, None]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from(pairwise.SCALES),
       dw=st.floats(1e-3, 5.0), dl=st.floats(1e-3, 5.0))
def test_pngd_is_ideal_to_first_order_on_random_geometries(seed, scale, dw, dl):
    g_w, g_l = _grads(seed)
    d_w, d_l = torch.full((5,), dw, dtype=torch.float64), torch.full((5,), dl, dtype=torch.float64)
    u = pairwise.PNGD(0.01, scale).step(g_w, g_l, d_w, d_l).u
    delta_lw, delta_ll = (g_w * u).flatten(1).sum(1), (g_l * u).flatten(1).sum(1)
    assert torch.all(delta_lw >= -1e-12) and torch.all(delta_ll <= 1e-12)


def test_calibration_moves_k_into_the_band_and_leaves_ideal_pairs_alone():
    g_w, g_l = _grads(1, n=200)
    d_w, d_l = torch.rand(200, dtype=torch.float64) + 0.1, torch.rand(200, dtype=torch.float64) + 0.1
    upd = pairwise.Calibrated(0.01).step(g_w, g_l, d_w, d_l)
    lw, ll = (g_w * upd.u).flatten(1).sum(1), (g_l * upd.u).flatten(1).sum(1)
    assert torch.all(lw >= -1e-12) and torch.all(ll <= 1e-12)
    ip, nw2, nl2 = optim.geometry(g_w, g_l)
    inside = (d_w * nw2 - d_l * ip >= 0) & (d_w * ip - d_l * nl2 <= 0)
    assert inside.any() and (~inside).any()
    assert torch.equal(upd.d_w[inside], d_w[inside]) and torch.equal(upd.d_l, d_l)


def test_simulator_runs_pngd_and_every_step_is_ideal():
    dpo = simulate(SimConfig(policy="context", suffix=32, instances=200, steps=3, eta=0.01, seed=0)).summary()
    pngd = simulate(SimConfig(policy="context", suffix=32, instances=200, steps=3, eta=0.01, seed=0,
                              optimizer="pngd")).summary()
    assert dpo["realised_regimes"]["ideal"] < 1
    assert pngd["realised_regimes"]["ideal"] == 1.0 and pngd["regime_agreement"] == 1.0


def _tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=len(data.Language()), block_size=64, n_layer=2, n_head=2, n_embd=16)).double()


def test_token_mask_at_full_weight_is_the_plain_loss():
    model, ref = _tiny(0), _tiny(0).requires_grad_(False)
    batch = data.pairs("short-suffix", 4, 0).batch
    mask = masking.TokenMask(len(data.Language()), init=60.0, lam=0.0)  # sigmoid(60) = 1 in float64
    mask.double()
    lw, ll = lm.pair_logps(model, batch)
    rw, rl = lm.pair_logps(ref, batch)
    dpo = losses.get("dpo")("torch", lw, ll, rw, rl, 1, 1).mean()
    assert float(mask.objective(ref_model=ref)(model, batch, rw, rl, 1, 1)) == pytest.approx(float(dpo), abs=1e-12)


def test_pngd_objective_gives_ideal_one_pair_steps_and_fish_tends_to_dpo():
    model = _tiny(0).float()
    evals = data.pairs("long-suffix", 4, 2).batch
    with torch.no_grad():
        ref = lm.pair_logps(model, evals)
    out = method_pair_check(model, evals, pairwise.pngd_objective(), ref)
    assert (out["real"] == 0).all() and (out["pred"] == 0).all()
    plain = method_pair_check(model, evals, fish.disentangle_objective(alpha=1e-9), ref)
    dpo = method_pair_check(model, evals, lambda m, b, *r: losses.get("dpo")("torch", *lm.pair_logps(m, b), *r).mean(),
                            ref)
    assert np.allclose(plain["pred_dlw"] / plain["eta"], dpo["pred_dlw"] / dpo["eta"], rtol=1e-4)


def test_fish_objective_rejects_a_nonpositive_alpha():
    with pytest.raises(GesimError):
        fish.disentangle_objective(alpha=0.0)
