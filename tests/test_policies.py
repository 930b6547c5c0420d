"""Synthetic policies: closed forms of theory.md section 4 against autograd and finite differences."""

import numpy as np
import pytest
import torch

from gesim import dynamics, policies, registries
from gesim.errors import GesimError
from gesim.policies import pairs as P

POLICY_CASES = {
    "single_token": (policies.SingleToken(vocab=7, dim=5, init_scale=1.0), dict(prefix=0, differ=1, suffix=0)),
    "learnable_logits": (policies.SingleToken(vocab=7, learnable_logits=True), dict(prefix=0, differ=1, suffix=0)),
    "free_logits": (policies.FreeLogits(vocab=7), dict(prefix=2, differ=2, suffix=3)),
    "context": (policies.Context(vocab=9, dim=6, init_scale=0.5), dict(prefix=1, differ_w=2, differ_l=3, suffix=4)),
    "context_tanh": (policies.Context(vocab=9, dim=6, activation="tanh", contraction=0.5), dict(differ=1, suffix=3)),
}


def setup(case, n=6, seed=0):
    pol, structure = POLICY_CASES[case]
    rng = np.random.default_rng(seed)
    pr = P.blocks(rng, n, pol.vocab, **structure)
    inst = pol.init(rng, n, pr.chosen_ids.shape[1])
    t = torch.as_tensor
    yw, yl = t(pr.chosen_ids), t(pr.rejected_ids)
    mw, ml = t(pr.chosen_mask), t(pr.rejected_mask)
    return pol, inst, pr, (yw, mw, pol.features(inst, yw)), (yl, ml, pol.features(inst, yl))


def autograd_grad(W, H, ids, mask):
    """The plainest gradient: autograd through log_softmax, one instance at a time."""
    out = []
    for i in range(W.shape[0]):
        w = W[i].clone().requires_grad_(True)
        logp = torch.log_softmax(H[i] @ w.T, dim=-1)  # (T, V)
        lp = (logp.gather(-1, ids[i].unsqueeze(-1)).squeeze(-1) * mask[i]).sum()
        out.append(torch.autograd.grad(lp, w)[0])
    return torch.stack(out)


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_closed_form_gradient_equals_autograd(case):
    _, inst, _, (yw, mw, H_w), (yl, ml, H_l) = setup(case)
    for ids, mask, H in ((yw, mw, H_w), (yl, ml, H_l)):
        lp, g = policies.grad(inst.W0, H, ids, mask)
        torch.testing.assert_close(g, autograd_grad(inst.W0, H, ids, mask), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lp, policies.logps(inst.W0, H, ids, mask))


def test_closed_form_gradient_matches_finite_differences():
    _, inst, _, (yw, mw, H_w), _ = setup("context", n=1)
    _, g = policies.grad(inst.W0, H_w, yw, mw)
    rng = np.random.default_rng(1)
    for _ in range(5):
        v = torch.as_tensor(rng.standard_normal(inst.W0.shape))
        h = 1e-6
        fd = (policies.logps(inst.W0 + h * v, H_w, yw, mw) - policies.logps(inst.W0 - h * v, H_w, yw, mw)) / (2 * h)
        assert float(fd) == pytest.approx(float((g * v).sum()), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_pair_double_sum_equals_gradient_inner_products(case):
    _, inst, _, (yw, mw, H_w), (yl, ml, H_l) = setup(case)
    ip, nw2, nl2 = policies.pair_ip(inst.W0, H_w, yw, mw, H_l, yl, ml)
    _, g_w = policies.grad(inst.W0, H_w, yw, mw)
    _, g_l = policies.grad(inst.W0, H_l, yl, ml)
    torch.testing.assert_close(ip, (g_w * g_l).sum((1, 2)))
    torch.testing.assert_close(nw2, (g_w * g_w).sum((1, 2)))
    torch.testing.assert_close(nl2, (g_l * g_l).sum((1, 2)))


@pytest.mark.parametrize("case", ["single_token", "learnable_logits"])
def test_single_token_ip_closed_form_and_always_ideal_under_dpo(case):
    """theory.md section 4 / prediction 8: ip = ||h||^2 (||p||^2 - p_w - p_l),
    nw2 - ip = ||h||^2 (1 - p_w + p_l) > 0, so DPO is always ideal; ip < 0 iff ||p||^2 < p_w + p_l."""
    _, inst, pr, (yw, mw, H_w), (yl, ml, H_l) = setup(case, n=200, seed=3)
    ip, nw2, nl2 = (x.numpy() for x in policies.pair_ip(inst.W0, H_w, yw, mw, H_l, yl, ml))
    p = policies.token_probs(inst.W0, H_w)[:, 0].numpy()  # (N, V)
    h2 = (H_w[:, 0] ** 2).sum(-1).numpy()
    n = np.arange(len(p))
    p_w, p_l, pp = p[n, pr.chosen_ids[:, 0]], p[n, pr.rejected_ids[:, 0]], (p**2).sum(-1)
    np.testing.assert_allclose(ip, h2 * (pp - p_w - p_l), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nw2 - ip, h2 * (1 - p_w + p_l), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nl2 - ip, h2 * (1 - p_l + p_w), rtol=1e-10, atol=1e-12)
    assert np.array_equal(ip < 0, pp < p_w + p_l)
    assert (ip < 0).any() and (ip > 0).any()  # both signs occur: the test can tell them apart
    reg = dynamics.predict("dpo", lw=np.log(p_w), ll=np.log(p_l), lw_ref=-1.0, ll_ref=-2.0,
                                         ip=ip, nw2=nw2, nl2=nl2, eta=0.1)["regime"]
    assert set(reg) == {"ideal"}


def test_free_logits_difference_norm_is_twice_hamming_and_dpo_ideal():
    """theory.md section 4 / prediction 9: ||g_w - g_l||^2 = 2 Hamming(y_w, y_l) and
    nw2 - ip = sum over differing positions of (1 - p_t(w_t) + p_t(l_t)) > 0."""
    pol = policies.FreeLogits(vocab=11)
    rng = np.random.default_rng(4)
    for distance in (0, 1, 3, 7):
        pr = P.hamming(rng, 50, pol.vocab, 8, distance)
        inst = pol.init(rng, 50, 8)
        yw, yl, m = torch.as_tensor(pr.chosen_ids), torch.as_tensor(pr.rejected_ids), torch.as_tensor(pr.chosen_mask)
        H = pol.features(inst, yw)
        _, g_w = policies.grad(inst.W0, H, yw, m)
        _, g_l = policies.grad(inst.W0, H, yl, m)
        np.testing.assert_allclose(((g_w - g_l) ** 2).sum((1, 2)).numpy(), 2.0 * P.distance(pr), atol=1e-10)
        p = policies.token_probs(inst.W0, H).numpy()  # (N, T, V)
        i, t = np.meshgrid(np.arange(50), np.arange(8), indexing="ij")
        D = pr.chosen_ids != pr.rejected_ids
        expected = ((1 - p[i, t, pr.chosen_ids] + p[i, t, pr.rejected_ids]) * D).sum(-1)
        ip, nw2 = (g_w * g_l).sum((1, 2)).numpy(), (g_w * g_w).sum((1, 2)).numpy()
        np.testing.assert_allclose(nw2 - ip, expected, atol=1e-10)
        if distance:
            assert (nw2 - ip > 0).all()


def test_free_logits_cosine_rises_with_shared_over_differing():
    pol = policies.FreeLogits(vocab=32)
    rng = np.random.default_rng(5)
    cos = []
    for suffix in (0, 4, 16, 64):
        pr = P.blocks(rng, 100, pol.vocab, differ=2, suffix=suffix)
        inst = pol.init(rng, 100, pr.chosen_ids.shape[1])
        yw, yl, m = torch.as_tensor(pr.chosen_ids), torch.as_tensor(pr.rejected_ids), torch.as_tensor(pr.chosen_mask)
        H = pol.features(inst, yw)
        ip, nw2, nl2 = policies.pair_ip(inst.W0, H, yw, m, H, yl, m)
        cos.append(float((ip / torch.sqrt(nw2 * nl2)).mean()))
    assert all(a < b for a, b in zip(cos, cos[1:])) and cos[-1] > 0.9


def test_context_features_share_prefix_and_converge_on_shared_suffix():
    pol = policies.Context(vocab=20, dim=8)
    rng = np.random.default_rng(6)
    pr = P.blocks(rng, 10, pol.vocab, prefix=3, differ=1, suffix=20)
    inst = pol.init(rng, 10, pr.chosen_ids.shape[1])
    H_w = pol.features(inst, torch.as_tensor(pr.chosen_ids))
    H_l = pol.features(inst, torch.as_tensor(pr.rejected_ids))
    gap = (H_w - H_l).norm(dim=-1).numpy()  # (N, T)
    assert np.all(gap[:, :4] == 0)  # prefix and the differing position see the same context
    # a linear recurrence: the perturbation shrinks by exactly the contraction per token
    np.testing.assert_allclose(gap[:, 6:] / gap[:, 5:-1], pol.contraction, rtol=1e-9)


def test_pair_generators_structure():
    rng = np.random.default_rng(7)
    pr = P.blocks(rng, 20, 50, prefix=2, differ_w=1, differ_l=3, suffix=4)
    assert pr.len_w.tolist() == [7] * 20 and pr.len_l.tolist() == [9] * 20
    assert (pr.chosen_ids[:, :2] == pr.rejected_ids[:, :2]).all()
    assert (pr.chosen_ids[:, 2] != pr.rejected_ids[:, 2]).all()
    assert (pr.chosen_ids[:, 3:7] == pr.rejected_ids[:, 5:9]).all()  # the shared suffix
    assert (pr.chosen_ids[pr.chosen_mask == 0] == 0).all() and (pr.chosen_ids[pr.chosen_mask == 1] > 0).all()
    for where in ("random", "start", "end"):
        h = P.hamming(rng, 30, 5, 6, 4, where)
        assert (P.distance(h) == 4).all()
    for name in P.LABEL_FIRST:
        s = P.structure(rng, 5, 10, name)
        assert (s.len_w == 1 + registries.STRUCTURES[name]).all() and (P.distance(s) == 1).all()


@pytest.mark.parametrize("call, match", [
    (lambda: P.blocks(np.random.default_rng(0), 3, 2), "vocab"),
    (lambda: P.blocks(np.random.default_rng(0), 3, 10, differ=0), "at least one token"),
    (lambda: P.hamming(np.random.default_rng(0), 3, 10, 4, 5), "distance"),
    (lambda: P.hamming(np.random.default_rng(0), 3, 10, 4, 2, "middle"), "position rule"),
    (lambda: P.structure(np.random.default_rng(0), 3, 10, "mid"), "synthetic pair structure"),
    (lambda: policies.make("gpt"), "unknown policy"),
    (lambda: policies.make("context", contraction=1.5), "contraction"),
    (lambda: policies.make("context", depth=3), "depth"),
])
def test_bad_input_raises_gesim_error(call, match):
    with pytest.raises(GesimError, match=match):
        call()
