"""Model averaging and HMA (Lin et al., arXiv 2309.06256): the ratio weights the aligned model."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gesim import lm
from gesim.errors import GesimError
from gesim.methods.averaging import (
    average,
    average_blocks,
    blocks,
    fit_hma,
    hma_ratios,
    linear_names,
)
from gesim.transformer.model import GPT, GPTConfig

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt(seed, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=n_layer, n_head=2, n_embd=8)).to(DT)


@pytest.fixture(scope="module")
def pair():
    """theta_0 (before alignment) and theta (after): two GPTs with different weights everywhere."""
    m0, m = _gpt(0, n_layer=3), _gpt(1, n_layer=3)
    with torch.no_grad():
        for w in m.parameters():
            w.add_(0.1)  # LayerNorm weights and biases differ too
    return m0, m


def test_endpoints_are_exact(pair):
    m0, m = pair
    theta0, theta = m0.state_dict(), m.state_dict()
    for a, target in ((0.0, theta0), (1.0, theta)):
        out = average(theta0, theta, a)
        assert out.keys() == theta.keys()
        assert all(torch.equal(out[n], target[n]) for n in theta)


def test_midpoint_and_modules(pair):
    m0, m = pair
    out = average(m0, m, 0.3)
    for n, t in m.state_dict().items():
        assert torch.allclose(out[n], 0.7 * m0.state_dict()[n] + 0.3 * t, rtol=0, atol=1e-15)


def test_linear_only_leaves_the_rest_aligned(pair):
    m0, m = pair
    theta0, theta = m0.state_dict(), m.state_dict()
    linear = linear_names(m)
    assert "blocks.0.mlp.c_fc.weight" in linear and "blocks.1.attn.c_attn.bias" in linear
    assert not {"wte.weight", "wpe.weight", "lm_head.weight", "blocks.0.ln_1.weight", "ln_f.bias"} & linear
    out = average(theta0, theta, 0.25, select="linear", model=m)
    assert out.keys() == theta.keys()
    for n in theta:
        expected = 0.75 * theta0[n] + 0.25 * theta[n] if n in linear else theta[n]
        assert torch.equal(out[n], expected)
    assert all(torch.equal(out[n], average(m0, m, 0.25, select="linear")[n]) for n in theta)


def test_select_predicate_and_errors(pair):
    m0, m = pair
    theta0, theta = m0.state_dict(), m.state_dict()
    out = average(theta0, theta, 0.0, select=lambda n: n.startswith("blocks.1."))
    assert all(torch.equal(out[n], (theta0 if n.startswith("blocks.1.") else theta)[n]) for n in theta)
    by_name = average(theta0, theta, 0.0, select="linear")  # no module: names and shapes
    linear = linear_names(m)
    assert all(torch.equal(by_name[n], (theta0 if n in linear else theta)[n]) for n in theta)
    with pytest.raises(GesimError, match="select"):
        average(theta0, theta, 0.5, select="lineer")
    with pytest.raises(GesimError, match="no entry"):
        average({}, theta, 0.5)


def test_gpt6_blocks_are_three_contiguous_pairs_of_layers():
    model = _gpt(0, n_layer=6)
    names = [n for n, _ in model.named_parameters()]
    block_of = blocks(names, k=3)
    assert [block_of[n] for n in names] == sorted(block_of[n] for n in names)  # contiguous, in order
    for layer in range(6):
        assert block_of[f"blocks.{layer}.attn.c_attn.weight"] == layer // 2
    assert block_of["wte.weight"] == block_of["wpe.weight"] == 0
    assert block_of["ln_f.weight"] == block_of["ln_f.bias"] == 2
    tied = blocks(model)  # state-dict names: the tied head follows the embedding
    assert tied["lm_head.weight"] == tied["wte.weight"] == 0


def test_blocks_on_hf_style_names():
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(7)] + [
        "model.norm.weight", "lm_head.weight"]
    block_of = blocks(names, k=3)
    assert [block_of[n] for n in names] == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert blocks(["wte.weight", "h.0.w", "h.1.w", "ln_f.weight"], k=3) == {  # more blocks than layers
        "wte.weight": 0, "h.0.w": 0, "h.1.w": 1, "ln_f.weight": 2}
    with pytest.raises(GesimError, match="number of blocks"):
        blocks(names, k=0)
    with pytest.raises(GesimError, match="no layer index"):
        blocks(["wte.weight", "ln_f.weight"])


@given(st.lists(st.floats(-30, 30), min_size=1, max_size=8), st.floats(0, 1))
def test_hma_ratios_mean_is_a(s, a):
    ratios = hma_ratios(torch.tensor(s, dtype=DT), a)
    assert abs(float(ratios.mean()) - a) <= 1e-12
    assert bool((ratios >= 0).all())


def test_equal_logits_give_plain_averaging(pair):
    m0, m = pair
    assert hma_ratios(torch.zeros(3, dtype=DT), 0.4).tolist() == pytest.approx([0.4] * 3, abs=1e-15)
    block_of = blocks(m)
    out = average_blocks(m0.state_dict(), m.state_dict(), [0.4] * 3, block_of)
    plain = average(m0, m, 0.4)
    assert all(torch.equal(out[n], plain[n]) for n in plain)
    with pytest.raises(GesimError, match="ratios"):
        average_blocks(m0.state_dict(), m.state_dict(), [0.4, 0.4], block_of)


def _nll(model, state, ids, mask):
    """Mean per-token NLL of (ids, mask) under ``model`` loaded with ``state``: the plainest way."""
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return float(-lm.response_logps(model, ids, mask).sum() / mask[:, 1:].sum())


@pytest.fixture(scope="module")
def hma_problem():
    """Two 6-layer GPTs and 8 samples whose last 5 tokens count."""
    m0, m = _gpt(0, n_layer=6), _gpt(1, n_layer=6)
    theta0 = {n: w.detach().clone() for n, w in m0.named_parameters()}
    theta = {n: w.detach().clone() for n, w in m.named_parameters()}
    ids = torch.randint(0, 13, (8, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(ids)
    mask[:, 3:] = 1
    return m0, theta0, theta, ids, mask


def test_fit_hma_keeps_the_mean_and_does_not_lose_likelihood(hma_problem):
    m0, theta0, theta, ids, mask = hma_problem
    a = 0.3
    fit = fit_hma(m0, theta0, theta, ids, mask, a, k=3, steps=30, lr=0.1)
    assert len(fit["ratios"]) == 3 and abs(sum(fit["ratios"]) / 3 - a) < 1e-12
    assert len(fit["nll"]) == 31 and len(fit["loss"]) == 30
    probe = _gpt(5, n_layer=6)
    at_equal = _nll(probe, average(theta0, theta, a), ids, mask)
    at_fit = _nll(probe, fit["state"], ids, mask)
    assert fit["nll"][0] == pytest.approx(at_equal, rel=1e-12)
    assert fit["nll"][-1] == pytest.approx(at_fit, rel=1e-12)
    assert at_fit < at_equal
    with pytest.raises(GesimError, match="mean ratio"):
        fit_hma(m0, theta0, theta, ids, mask, 1.5)


def test_fit_hma_l1_holds_the_middle_block_and_minibatches_run(hma_problem):
    m0, theta0, theta, ids, mask = hma_problem
    free = fit_hma(m0, theta0, theta, ids, mask, 0.3, steps=10)
    held = fit_hma(m0, theta0, theta, ids, mask, 0.3, steps=10, l1=100.0)
    assert abs(held["ratios"][1] - 0.3) < abs(free["ratios"][1] - 0.3)
    small = fit_hma(m0, theta0, theta, ids, mask, 0.3, steps=5, batch_size=3, seed=1)
    assert len(small["nll"]) == 6 and abs(sum(small["ratios"]) / 3 - 0.3) < 1e-12
