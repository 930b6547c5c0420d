"""Online Merging Optimizer (Lu et al., arXiv 2405.17931): merges by hand, AdamW as the limit."""

import copy

import pytest
import torch

from gesim.errors import GesimError
from gesim.methods.omo import OnlineMerging, merge_update
from gesim.transformer.model import GPT, GPTConfig

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)).to(DT)


def _ids(step):
    return torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(100 + step))


def _train(model, opt, steps=5):
    """``steps`` next-token steps on fixed batches; returns the parameters after each step."""
    path = []
    for t in range(steps):
        ids = _ids(t)
        logits = model(ids)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        path.append([w.detach().clone() for w in model.parameters()])
    return path


def _deltas(model, seed=1):
    """A base theta_b and an SFT model theta_r = theta_b + tau_r near the model's parameters."""
    gen = torch.Generator().manual_seed(seed)
    base = [w.detach() + 0.01 * torch.randn(w.shape, generator=gen, dtype=DT) for w in model.parameters()]
    ref = [b + 0.01 * torch.randn(b.shape, generator=gen, dtype=DT) for b in base]
    return base, ref


@pytest.mark.parametrize("method", ["dare", "ties"])
@pytest.mark.parametrize("every", [1, 3])
def test_alpha0_p1_is_adamw_exactly(method, every):
    model = _gpt()
    twin = copy.deepcopy(model)
    base, ref = _deltas(model)
    opt = OnlineMerging(model.parameters(), base, ref, lr=1e-2, weight_decay=0.1, method=method,
                        alpha=0.0, p=1.0, every=every, seed=0)
    path = _train(model, opt)
    path_adamw = _train(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1))
    for step, step_adamw in zip(path, path_adamw):
        assert all(torch.equal(w, v) for w, v in zip(step, step_adamw))


def test_dare_by_hand_with_a_fixed_mask():
    dtheta = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0], dtype=DT)
    tau = torch.tensor([0.5, 0.5, -0.5, -0.5, 1.0, -1.0], dtype=DT)
    gen = torch.Generator().manual_seed(0)
    # the masks this seed draws (dtheta's first): keep d at 0, 2, 3, 4 and t at 0, 2, 4, 5
    assert (torch.rand(6, generator=gen) < 0.5).tolist() == [True, False, True, True, True, False]
    assert (torch.rand(6, generator=gen) < 0.5).tolist() == [True, False, True, False, True, True]
    # 0.75 * [1, 0, 3, -4, 5, 0] + 0.25 * [0.5, 0, -0.5, 0, 1, -1]
    expected = [0.875, 0.0, 2.125, -3.0, 4.0, -0.25]
    out = merge_update(dtheta, tau, "dare", alpha=0.25, p=0.5, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == expected
    rescaled = merge_update(dtheta, tau, "dare", alpha=0.25, p=0.5, rescale=True,
                            generator=torch.Generator().manual_seed(0))
    assert rescaled.tolist() == [2 * e for e in expected]
    # a mask on tau fixed in advance (mask_once): only dtheta's mask is drawn
    fixed = merge_update(dtheta, tau, "dare", alpha=0.25, p=0.5, generator=torch.Generator().manual_seed(0),
                         tau_mask=torch.tensor([False, True, False, False, False, True]))
    assert fixed.tolist() == [0.75, 0.125, 2.25, -3.0, 3.75, -0.25]


def test_ties_by_hand():
    # top-3 by magnitude: F(dtheta) = [3, 0, 0, -2, 4, 0], F(tau) = [0, 0, -3, 5, 4, 0]
    dtheta = torch.tensor([3.0, -1.0, 0.5, -2.0, 4.0, -0.2], dtype=DT)
    tau = torch.tensor([-1.0, 2.0, -3.0, 5.0, 4.0, 1.0], dtype=DT)
    # x = 0.75 F(dtheta) = [2.25, 0, 0, -1.5, 3, 0], y = 0.25 F(tau) = [0, 0, -0.75, 1.25, 1, 0]
    # only x | neither | only y | disagree: larger |.| is x | agree: add | neither
    out = merge_update(dtheta, tau, "ties", alpha=0.25, p=0.5)
    assert out.tolist() == [2.25, 0.0, -0.75, -1.5, 4.0, 0.0]
    # the public code's unweighted vote: sign(-2 + 5) > 0 elects tau_r's term at coordinate 3
    out = merge_update(dtheta, tau, "ties", alpha=0.25, p=0.5, sign_vote="unweighted")
    assert out.tolist() == [2.25, 0.0, -0.75, 1.25, 4.0, 0.0]
    # rescale by 1/p: x = [4.5, 0, 0, -3, 6, 0], y = [0, 0, -1.5, 2.5, 2, 0]
    out = merge_update(dtheta, tau, "ties", alpha=0.25, p=0.5, rescale=True)
    assert out.tolist() == [4.5, 0.0, -1.5, -3.0, 8.0, 0.0]


def test_ties_keeps_every_entry_tied_at_the_threshold():
    x = torch.tensor([1.0, -1.0, 1.0, 0.5], dtype=DT)
    assert merge_update(x, torch.zeros_like(x), "ties", p=0.5).tolist() == [1.0, -1.0, 1.0, 0.0]


def test_rescaled_dare_is_unbiased():
    """With 1/p rescaling E[merge] = (1 - alpha) dtheta + alpha tau (Monte Carlo, 4e5 draws a coordinate)."""
    dtheta = torch.tensor([1.0, -2.0, 3.0], dtype=DT).repeat(400_000, 1)  # (draws, 3)
    tau = torch.tensor([0.5, 4.0, -1.0], dtype=DT).repeat(400_000, 1)
    out = merge_update(dtheta, tau, "dare", alpha=0.3, p=0.2, rescale=True, generator=torch.Generator().manual_seed(1))
    expected = 0.7 * dtheta[0] + 0.3 * tau[0]
    assert torch.allclose(out.mean(0), expected, atol=0.03)  # standard error about 0.005


def test_one_omo_step_is_adamw_step_plus_weighted_delta():
    model = _gpt()
    twin = copy.deepcopy(model)
    base, ref = _deltas(model)
    start = [w.detach().clone() for w in model.parameters()]
    opt = OnlineMerging(model.parameters(), base, ref, lr=1e-2, method="dare", alpha=0.3, p=1.0)
    (after,) = _train(model, opt, steps=1)
    (adamw,) = _train(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0), steps=1)
    for w, w0, v, b, r in zip(after, start, adamw, base, ref):
        assert torch.allclose(w, w0 + 0.7 * (v - w0) + 0.3 * (r - b), atol=1e-14)


def test_step_k_merges_the_accumulated_adamw_change():
    model = _gpt()
    base, ref = _deltas(model)
    start = [w.detach().clone() for w in model.parameters()]
    k1, k1_default = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(lr=1e-2, method="dare", alpha=0.3, p=1.0)
    path = _train(k1, OnlineMerging(k1.parameters(), base, ref, every=1, **kw), steps=3)
    assert all(torch.equal(w, v) for w, v in zip(path[-1], _train(
        k1_default, OnlineMerging(k1_default.parameters(), base, ref, **kw), steps=3)[-1]))
    twin = copy.deepcopy(model)
    path = _train(model, OnlineMerging(model.parameters(), base, ref, every=2, **kw), steps=2)
    adamw = _train(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0), steps=2)
    assert all(torch.equal(w, v) for w, v in zip(path[0], adamw[0]))  # inside the window: plain AdamW
    for w0, w, v, b, r in zip(start, path[1], adamw[1], base, ref):
        assert torch.allclose(w, w0 + 0.7 * (v - w0) + 0.3 * (r - b), atol=1e-14)


def test_mask_once_reuses_the_tau_mask():
    """alpha = 1 and lr = 0 leave only F_R(tau_r): the same step every time iff the mask is drawn once."""
    model = _gpt()
    base, ref = _deltas(model)
    for once in (True, False):
        m = copy.deepcopy(model)
        opt = OnlineMerging(m.parameters(), base, ref, lr=0.0, weight_decay=0.0, alpha=1.0, p=0.5,
                            mask_once=once, seed=3)
        path = _train(m, opt, steps=3)
        steps = [path[1][0] - path[0][0], path[2][0] - path[1][0]]
        assert torch.allclose(*steps, rtol=0, atol=1e-15) == once


def test_named_parameters_with_state_dicts_and_resume():
    model = _gpt()
    base = {n: w.detach() - 0.01 for n, w in model.named_parameters()}
    ref = {n: w.detach() + 0.01 for n, w in model.named_parameters()}
    kw = dict(lr=1e-2, method="ties", alpha=0.1, p=0.5)
    straight = copy.deepcopy(model)
    path = _train(straight, OnlineMerging(straight.named_parameters(), base, ref, **kw), steps=4)
    opt = OnlineMerging(model.named_parameters(), base, ref, **kw)
    _train(model, opt, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    resumed = OnlineMerging(model.named_parameters(), base, ref, **kw)
    resumed.load_state_dict(saved)
    assert resumed.adamw.param_groups is resumed.param_groups  # LR schedulers reach the inner AdamW
    for t in (2, 3):
        ids = _ids(t)
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
        resumed.zero_grad()
        loss.backward()
        resumed.step()
    assert all(torch.allclose(w, v, rtol=0, atol=1e-14) for w, v in zip(model.parameters(), path[-1]))


@pytest.mark.parametrize("kwargs", [dict(p=0.0), dict(p=1.5), dict(alpha=-0.1), dict(alpha=2.0), dict(every=0),
                                    dict(every=1.5), dict(method="dora"), dict(sign_vote="weighted")])
def test_bad_arguments_raise(kwargs):
    model = _gpt()
    base, ref = _deltas(model)
    with pytest.raises(GesimError):
        OnlineMerging(model.parameters(), base, ref, **kwargs)


def test_misaligned_base_raises():
    model = _gpt()
    base, ref = _deltas(model)
    with pytest.raises(GesimError, match="tensors for"):
        OnlineMerging(model.parameters(), base[:-1], ref)
    with pytest.raises(GesimError, match="shape"):
        OnlineMerging(model.parameters(), [b.reshape(-1) for b in base], ref)
    with pytest.raises(GesimError, match="named_parameters"):
        OnlineMerging(model.parameters(), dict(model.named_parameters()), ref)
    with pytest.raises(GesimError, match="shape"):
        merge_update(torch.zeros(3), torch.zeros(4))


# ---- the reference code's behaviours, one switch each, against hand-written steps ------------

def test_clamp_switch_clamps_the_rescaled_tau_and_an_l1_rescaled_update():
    dtheta = torch.tensor([0.2, -0.4, 0.6, -0.8], dtype=DT)
    tau = torch.tensor([0.3, -0.05, 0.9, 0.02], dtype=DT)
    mask = torch.tensor([True, True, False, True])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    keep_d = torch.rand(4, generator=gen()) < 0.5
    # rescale by 1/p = 2: tau kept [0.6, -0.1, 0, 0.04] -> clamp at 0.5: [0.5, -0.1, 0, 0.04]
    t = torch.tensor([0.5, -0.1, 0.0, 0.04], dtype=DT)
    d = torch.where(keep_d, 2 * dtheta, torch.zeros_like(dtheta))  # the update is not clamped (no L1 rescale)
    out = merge_update(dtheta, tau, "dare", alpha=0.25, p=0.5, rescale=True, clamp=0.5, tau_mask=mask,
                       generator=gen())
    assert torch.allclose(out, 0.75 * d + 0.25 * t, rtol=0, atol=1e-15)
    # with the L1 rescale the update is rescaled to its L1 norm, then clamped too
    kept = torch.where(keep_d, dtheta, torch.zeros_like(dtheta))
    d = (kept * dtheta.abs().sum() / kept.abs().sum()).clamp(-0.5, 0.5)
    out = merge_update(dtheta, tau, "dare", alpha=0.25, p=0.5, rescale=True, l1_rescale=True, clamp=0.5,
                       tau_mask=mask, generator=gen())
    assert torch.allclose(out, 0.75 * d + 0.25 * t, rtol=0, atol=1e-15)


def test_topk_floor_keeps_int_p_n_and_skips_masking_below_one():
    x = torch.tensor([3.0, -1.0, 0.5, -2.0, 4.0, -0.2], dtype=DT)
    zero = torch.zeros_like(x)
    # p = 0.4, n = 6: ceil(2.4) = 3 entries (gesim), int(2.4) = 2 entries (code)
    assert merge_update(x, zero, "ties", p=0.4).tolist() == [3.0, 0.0, 0.0, -2.0, 4.0, 0.0]
    assert merge_update(x, zero, "ties", p=0.4, topk="floor").tolist() == [3.0, 0.0, 0.0, 0.0, 4.0, 0.0]
    # p = 0.1: ceil(0.6) = 1 entry (gesim); int(0.6) = 0 < 1, so the code keeps everything
    assert merge_update(x, zero, "ties", p=0.1).tolist() == [0.0, 0.0, 0.0, 0.0, 4.0, 0.0]
    assert merge_update(x, zero, "ties", p=0.1, topk="floor").tolist() == x.tolist()


def test_ties_l1_rescale_restores_each_terms_l1_norm():
    dtheta = torch.tensor([3.0, -1.0, 0.5, -2.0, 4.0, -0.2], dtype=DT)  # |.|_1 = 10.7, top 3: 3, -2, 4 (9)
    tau = torch.tensor([-1.0, 2.0, -3.0, 5.0, 4.0, 1.0], dtype=DT)  # |.|_1 = 16, top 3: -3, 5, 4 (12)
    d = torch.tensor([3.0, 0, 0, -2.0, 4.0, 0], dtype=DT) * 10.7 / 9
    t = torch.tensor([0, 0, -3.0, 5.0, 4.0, 0], dtype=DT) * 16 / 12
    x, y = 0.75 * d, 0.25 * t
    gamma = torch.sign(x + y)
    expected = torch.where(torch.sign(x) == gamma, x, 0 * x) + torch.where(torch.sign(y) == gamma, y, 0 * y)
    out = merge_update(dtheta, tau, "ties", alpha=0.25, p=0.5, l1_rescale=True)
    assert torch.allclose(out, expected, rtol=0, atol=1e-14)


def test_unweighted_vote_counts_a_zero_sum_as_positive_like_the_code():
    d, t = torch.tensor([1.0, -1.0], dtype=DT), torch.tensor([-1.0, 1.0], dtype=DT)
    # d + t = 0 at both: the code elects +, keeping the positive term (weighted by 0.5 each here)
    assert merge_update(d, t, "ties", alpha=0.5, p=1.0, sign_vote="unweighted").tolist() == [0.5, 0.5]
    assert merge_update(d, t, "ties", alpha=0.5, p=1.0).tolist() == [0.0, 0.0]  # the paper's vote: a tie


def _hand_adam(w, grads_fn, steps, lr, wd, merge, every, decay_after_merge, betas=(0.9, 0.999), eps=1e-8):
    """Adam written out by hand, with decoupled decay before the step (AdamW) or after the merge (code),
    and a merge of the K-step change every ``every`` steps."""
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    cached, anchor = torch.zeros_like(w), w.clone()
    path = []
    for t in range(1, steps + 1):
        g = grads_fn(w)
        if not decay_after_merge:
            w = w * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step = -lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        w = w + step
        cached = cached + step
        if t % every == 0:
            dtheta = cached if decay_after_merge else w - anchor
            w = w - dtheta + merge(dtheta)
            cached, anchor = torch.zeros_like(w), None
        if decay_after_merge:
            w = w * (1 - lr * wd)
        if anchor is None:
            anchor = w.clone()
        path.append(w.clone())
    return path


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("after", [False, True])
def test_weight_decay_before_the_step_or_after_the_merge_against_a_hand_written_adam(every, after):
    target = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    w0 = torch.tensor([1.0, 0.3, -0.7], dtype=DT)
    base, ref = torch.tensor([0.1, 0.0, -0.2], dtype=DT), torch.tensor([0.4, -0.3, 0.1], dtype=DT)
    alpha, lr, wd = 0.3, 0.05, 0.2
    grads = lambda w: 2 * (w - target)  # noqa: E731  gradient of ||w - target||^2
    hand = _hand_adam(w0.clone(), grads, 5, lr, wd, lambda d: (1 - alpha) * d + alpha * (ref - base), every, after)
    w = torch.nn.Parameter(w0.clone())
    opt = OnlineMerging([w], [base], [ref], lr=lr, weight_decay=wd, method="dare", alpha=alpha, p=1.0, every=every,
                        decay_after_merge=after)
    for expected in hand:
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-13)


def test_code_variant_switches():
    from gesim.methods.omo import code_variant

    assert code_variant("dare") == dict(rescale=True, clamp=1.0, mask_once=True, decay_after_merge=True)
    assert code_variant("ties")["topk"] == "floor" and code_variant("ties")["sign_vote"] == "unweighted"
    model = _gpt()
    base, ref = _deltas(model)
    for method in ("dare", "ties"):  # the optimizer accepts them and trains
        m = copy.deepcopy(model)
        _train(m, OnlineMerging(m.parameters(), base, ref, lr=1e-2, method=method, alpha=0.1, p=0.5, seed=0,
                                **code_variant(method)), steps=2)
    with pytest.raises(GesimError):
        code_variant("dora")
    with pytest.raises(GesimError):
        OnlineMerging(model.parameters(), base, ref, topk="round")
    with pytest.raises(GesimError):
        OnlineMerging(model.parameters(), base, ref, clamp=-1.0)
