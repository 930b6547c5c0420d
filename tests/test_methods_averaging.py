"""Model averaging and HMA (Lin et al., arXiv 2309.06256): the ratio weights the aligned model."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gesim import lm
from gesim.errors import GesimError
from gesim.methods.averaging import (
    author_blocks,
    average,
    average_blocks,
    blocks,
    fit_hma,
    fit_hma_authors,
    hma_ratios,
    hma_ratios_authors,
    linear_names,
    merge_authors,
    text_mask,
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


# ---- HMA as the authors' code defines it ------------------------------------------------------

def test_author_blocks_split_as_the_authors_code():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(26)] + ["model.embed_tokens.weight"]
    b3 = author_blocks(names)  # 26 layers: < 8, < 16, rest
    assert [b3[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(26)] == [0] * 8 + [1] * 8 + [2] * 10
    assert "model.embed_tokens.weight" not in b3
    deep = author_blocks([f"h.{i}.w" for i in range(40)])  # more than 30 layers: < 11, < 21, rest
    assert [deep[f"h.{i}.w"] for i in range(40)] == [0] * 11 + [1] * 10 + [2] * 19
    b4 = author_blocks(names, "block4")  # int(26 / 4) = 6 layers each, the remainder to the last
    assert [b4[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(26)] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 8
    assert author_blocks(["h.0.w", "h.1.w", "h.2.w"], "layerwise") == {"h.0.w": 0, "h.1.w": 1, "h.2.w": 2}
    assert author_blocks(["h.0.w", "h.1.w", "h.2.w"], (1, 2)) == {"h.0.w": 0, "h.1.w": 1, "h.2.w": 2}
    for bad in ("block0", "blocks", (3, 1), "thirds"):
        with pytest.raises(GesimError, match="block scheme"):
            author_blocks(names, bad)


@given(st.lists(st.floats(-30, 30), min_size=1, max_size=8), st.floats(0.01, 0.99))
def test_authors_ratios_keep_the_mean_and_stay_in_their_range(s, a):
    """Mean a exactly; the SFT weight w_k = 1 - a_k lies in (0, K (1 - a)), so a_k in (1 - K (1 - a), 1]."""
    ratios = hma_ratios_authors(torch.tensor(s, dtype=DT), a)
    K = len(s)
    assert abs(float(ratios.mean()) - a) <= 1e-12
    assert bool((ratios <= 1).all()) and bool((ratios >= 1 - K * (1 - a) - 1e-12).all())
    by_hand = [1 - (1 - a) * K * (1 / (1 + torch.exp(torch.tensor(-x, dtype=DT))) + 1e-6)
               / sum(1 / (1 + torch.exp(torch.tensor(-y, dtype=DT))) + 1e-6 for y in s) for x in s]
    assert torch.allclose(ratios, torch.stack(by_hand), rtol=0, atol=1e-12)


def test_authors_merge_moves_only_the_linear_layers(pair):
    m0, m = pair
    theta0, theta = dict(m0.named_parameters()), dict(m.named_parameters())
    linear = linear_names(m)
    block_of = author_blocks(sorted(linear), (1, 2))  # GPT with 3 layers: one block per layer
    out = merge_authors(theta0, theta, [0.2, 0.5, 0.9], block_of)
    for n in theta:
        if n in block_of:
            r = [0.2, 0.5, 0.9][int(n.split(".")[1])]
            assert torch.equal(out[n], (1 - r) * theta0[n] + r * theta[n])
        else:  # embeddings, LayerNorms and the tied head stay before alignment
            assert torch.equal(out[n], theta0[n])
    assert {"wte.weight", "blocks.0.ln_1.weight", "ln_f.bias"} <= set(theta) - set(block_of)
    fixed = merge_authors(theta0, theta, [0.2, 0.5, 0.9], block_of, fixed=["ln_f.weight"], a=0.7)
    assert torch.equal(fixed["ln_f.weight"], 0.3 * theta0["ln_f.weight"] + 0.7 * theta["ln_f.weight"])


def _authors_penalty(ratios, block_of, a):
    """sum over Linear modules m of 25 / (|layer_m - L // 2| + 1) |w_k(m) - w|, written out."""
    modules = {}
    for n, k in block_of.items():
        modules[n.rsplit(".", 1)[0]] = (int(n.split(".")[1]), k)
    L = 1 + max(i for i, _ in modules.values())
    return sum(25 / (abs(i - L // 2) + 1) * abs((1 - ratios[k]) - (1 - a)) for i, k in modules.values())


def test_fit_hma_authors_objective_is_the_causal_lm_loss_plus_the_distance_weighted_penalty(hma_problem):
    m0, theta0, theta, ids, _ = hma_problem
    full = torch.ones_like(ids)  # the collected text: every token counts
    a, reg = 0.8, 1e-2
    two = fit_hma_authors(m0, theta0, theta, ids, full, a, blocks=(2, 4), steps=2, lr=0.5, reg=reg)
    one = fit_hma_authors(m0, theta0, theta, ids, full, a, blocks=(2, 4), steps=1, lr=0.5, reg=reg)
    probe = _gpt(5, n_layer=6)
    plain = average(theta0, theta, a, select="linear", model=m0)  # Linear-only averaging at a ...
    plain = {n: plain[n] if n in two["blocks"] else theta0[n] for n in theta}  # ... the rest before alignment
    assert two["loss"][0] == pytest.approx(_nll(probe, plain, ids, full), rel=1e-12)  # penalty 0 at the start
    r1 = one["ratios"]
    expected = _nll(probe, one["state"], ids, full) + reg * _authors_penalty(r1, two["blocks"], a)
    assert two["loss"][1] == pytest.approx(expected, rel=1e-12)
    assert abs(sum(two["ratios"]) / 3 - a) < 1e-12 and max(two["ratios"]) <= 1
    assert all(abs(w - (1 - r)) < 1e-15 for w, r in zip(two["sft_weights"], two["ratios"]))


def test_fit_hma_authors_lowers_the_loss_and_refuses_bad_input(hma_problem):
    m0, theta0, theta, ids, _ = hma_problem
    full = torch.ones_like(ids)
    fit = fit_hma_authors(m0, theta0, theta, ids, full, 0.6, blocks="layerwise", steps=20, lr=0.2, reg=0.0)
    assert len(fit["ratios"]) == 6 and fit["nll"][-1] < fit["nll"][0]
    assert min(fit["ratios"]) >= 1 - 6 * 0.4 - 1e-12 and max(fit["ratios"]) <= 1
    with pytest.raises(GesimError, match="mean ratio"):
        fit_hma_authors(m0, theta0, theta, ids, full, 1.0)
    with pytest.raises(GesimError, match="empty"):  # the code's block3 splits at layers 8 and 16
        fit_hma_authors(m0, theta0, theta, ids, full, 0.6, blocks="block3")


def test_text_mask_covers_prompt_and_response_up_to_the_last_response_token():
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    assert text_mask(mask).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
