"""The fast probe's cost choices (gesim.probe.fast, gesim.probe.layers): every path each choice
can take (ghost or materialised for linear maps, embeddings and tied weights; small per-sample
gradients joined into one pair Gram or taken one by one; the (B, 2, P) pair Gram) equals the
plain two-backward method in float64 to 1e-10, and the rules pick what their docstrings say."""

import warnings

import pytest
import torch

from gesim import probe
from gesim.encode import collate, encode_rows
from gesim.probe import fast, layers, products, rows, toy

warnings.filterwarnings("ignore", message=".*(batching rule|fallback).*")
RTOL = 1e-10


def _batch(n=4, seed=0):
    rows = [dict(r, index=i) for i, r in enumerate(toy.toy_rows(n, seed))]
    return collate(encode_rows(rows, toy.build_tokenizer(), 64).pairs)


def _model(arch, tied=True):
    return toy.build_model(arch, vocab_size=len(toy.build_tokenizer()), d=16, tied=tied).double()


def _close(a, b):
    for k in ("ip", "nw2", "nl2"):
        assert float((a[k] - b[k]).abs().max() / b[k].abs().max()) < RTOL, k


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("llama", True), ("llama", False)])
@pytest.mark.parametrize("ghost", [True, False])
def test_every_ghost_or_materialised_choice_matches_reference_fp64(monkeypatch, arch, tied, ghost):
    m, b = _model(arch, tied), _batch()
    ref = probe.pair_stats(m, b, backend="reference")
    monkeypatch.setattr(layers.LinearRule, "cost_prefers_ghost", lambda self, use: ghost)
    monkeypatch.setattr(layers.EmbeddingRule, "cost_prefers_ghost", lambda self, use: ghost)
    monkeypatch.setattr(fast, "tied_materialise_cheaper", lambda uses, p, N: not ghost)
    _close(probe.pair_stats(m, b, backend="fast"), ref)
    _close(probe.pair_stats(m, b, backend="fast", per_layer=True), ref)


@pytest.mark.parametrize("split", [1, 10**9])
def test_self_grams_split_in_half_blocks_or_whole_match_reference_fp64(monkeypatch, split):
    """ghost_pair's symmetric half blocks (forced from 1 position) and the whole T x T Grams."""
    m, b = _model("gpt2"), _batch()
    monkeypatch.setattr(rows, "SPLIT_T", split)
    monkeypatch.setattr(layers.LinearRule, "cost_prefers_ghost", lambda self, use: True)
    _close(probe.pair_stats(m, b, backend="fast"), probe.pair_stats(m, b, backend="reference"))


@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 130])
def test_ghost_pair_equals_materialised_per_row_gradients(T):
    """ip = <G_w^T A_w, G_l^T A_l>, own = ||G_i^T A_i||^2, whether or not T reaches SPLIT_T."""
    gen = torch.Generator().manual_seed(T)
    A = torch.randn(6, T, 5, dtype=torch.float64, generator=gen)
    G = torch.randn(6, T, 7, dtype=torch.float64, generator=gen)
    g = torch.bmm(G.transpose(1, 2), A).reshape(6, -1)
    ip, own = rows.ghost_pair(A, G, 3)
    assert torch.allclose(ip, (g[:3] * g[3:]).sum(1), rtol=1e-12)
    assert torch.allclose(own, (g * g).sum(1), rtol=1e-12)


@pytest.mark.parametrize("small", [0, 10**9])
def test_small_gradients_joined_or_one_by_one_match_reference_fp64(monkeypatch, small):
    m, b = _model("gpt2"), _batch(3)
    monkeypatch.setattr(products, "SMALL", small)
    _close(probe.pair_stats(m, b, backend="fast"), probe.pair_stats(m, b, backend="reference"))


def test_pair_gram_equals_row_dots():
    g = torch.randn(6, 5, 7, dtype=torch.float64)
    P = torch.rand(5, 7, dtype=torch.float64)
    ip, nw2, nl2 = rows.pair_gram(g, g * P, 3)
    flat, pflat = g.reshape(6, -1), (g * P).reshape(6, -1)
    assert torch.allclose(ip, (flat[:3] * pflat[3:]).sum(1), rtol=1e-14)
    assert torch.allclose(nw2, (flat[:3] * pflat[:3]).sum(1), rtol=1e-14)
    assert torch.allclose(nl2, (flat[3:] * pflat[3:]).sum(1), rtol=1e-14)
    assert torch.allclose(rows.rowdot(g, g * P), (flat * pflat).sum(1), rtol=1e-14)


@pytest.mark.parametrize("ia,ib", [(slice(0, 3), slice(3, 6)), (slice(1, 4), slice(2, 5)),
                                   (slice(3, 6), slice(0, 3)), (slice(0, 6, 2), slice(1, 6, 2)),
                                   (torch.tensor([4, 0, 2]), torch.tensor([1, 5, 2]))])
@pytest.mark.parametrize("contiguous", [True, False])
def test_pair_gram_rows_equals_row_dots_for_views_and_index_rows(ia, ib, contiguous):
    """The recorder's stacked pair Gram: a strided view for step-1 slices of a contiguous g
    (overlapping rows included), a stacked gather otherwise; both equal the per-key row dots."""
    g = torch.randn(6, 5, 7, dtype=torch.float64)
    if not contiguous:
        g = torch.randn(7, 5, 6, dtype=torch.float64).transpose(0, 2)[:6]
    flat = g.reshape(6, -1)
    ab, aa, bb = rows.pair_gram_rows(g, ia, ib)
    assert torch.allclose(ab, (flat[ia] * flat[ib]).sum(1), rtol=1e-14)
    assert torch.allclose(aa, (flat[ia] * flat[ia]).sum(1), rtol=1e-14)
    assert torch.allclose(bb, (flat[ib] * flat[ib]).sum(1), rtol=1e-14)


@pytest.mark.parametrize("T,d_in,d_out,ghost", [(32, 64, 192, True), (64, 128, 384, True), (64, 64, 192, False),
                                                (32, 64, 64, False), (64, 128, 512, True), (128, 128, 512, False),
                                                (64, 170, 170, True)])
@pytest.mark.parametrize("split", [64, 10**9])
def test_linear_cost_rule_counts_the_pair_gram_the_row_dots_and_split_self_grams(monkeypatch, T, d_in, d_out, ghost,
                                                                                 split):
    """Ghost iff c T^2 (d_in + d_out) + 6 T^2 < 4 T d_in d_out + 8 d_in d_out per pair, c = 5 when
    ghost_pair splits the self Grams (T >= SPLIT_T), else 6 (the docstring's count); the first two
    shapes tie on the GEMM FLOPs alone (3 T (d_in + d_out) = 2 d_in d_out); the last is ghost only
    with split self Grams."""
    monkeypatch.setattr(rows, "SPLIT_T", split)
    use = layers.Use("x", layers.LinearRule(), None, {})
    use.a, use.b = torch.zeros(2, T, d_in), torch.zeros(2, T, d_out)
    c = 5 if T >= split else 6
    want = c * T * T * (d_in + d_out) + 6 * T * T < 4 * T * d_in * d_out + 8 * d_in * d_out
    assert use.rule.cost_prefers_ghost(use) is want
    assert want is (ghost if (T, d_in) != (64, 170) else split == 64)


def _tied_choice(d, T, V, B=2):
    m = toy.build_model("gpt2", vocab_size=V, d=d, layers=1, heads=1, positions=max(T, 8)).double()
    ids = torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(0))
    engine = fast._Engine(m, "all", 2 * B, {"ip": (slice(0, B), slice(B, 2 * B)), "nw2": (slice(0, B),) * 2,
                                            "nl2": (slice(B, 2 * B),) * 2})
    engine.run(ids, torch.ones_like(ids))
    return engine.tied_mode[id(m.get_input_embeddings().weight)]


def test_tied_weight_rule_materialises_when_cheaper_and_no_larger_than_the_logits_gradient():
    """True = ghost. d <= T: the (N, V, d) sum is no larger than the (N, T, V) logits gradient and
    costs 4 T d V < 6 T^2 (d + V) per pair: materialised. d > T with a large vocabulary (GPT-2's
    regime): ghost (memory cap)."""
    assert _tied_choice(d=16, T=32, V=300) is False
    assert _tied_choice(d=64, T=8, V=2000) is True


def test_embedding_rule_materialises_a_table_with_no_more_rows_than_positions():
    m = _model("gpt2")
    use = layers.Use("wpe", layers.EmbeddingRule(), m.transformer.wpe, {"weight": m.transformer.wpe.weight})
    use.a = torch.zeros(2, m.transformer.wpe.weight.shape[0], dtype=torch.long)
    assert not use.rule.cost_prefers_ghost(use)
    use.a = torch.zeros(2, 8, dtype=torch.long)
    assert use.rule.cost_prefers_ghost(use)


def test_layer_norm_input_modified_in_place_after_the_call_is_refused():
    """LayerNormRule recomputes xhat from the kept input when the gradient arrives: an input
    changed in place after the call must be refused, never measured on the new values."""
    ln = torch.nn.LayerNorm(4, dtype=torch.float64)
    use = layers.Use("ln", layers.LayerNormRule(), ln, {"weight": ln.weight})

    class Host(layers.RuleHost):
        N, T, dtype = 2, 3, torch.float64
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    use.rule.capture(use, Host(), (x,), {}, ln(x))
    use.b = torch.ones(2, 3, 4, dtype=torch.float64)
    assert torch.allclose(use.rule.per_sample(use, "weight"), (ln(x) - ln.bias).detach().sum(1) / ln.weight.detach())
    x.mul_(2.0)
    with pytest.raises(layers.GesimError, match="modified in place"):
        use.rule.per_sample(use, "weight")


@pytest.mark.parametrize("ghost", [True, False])
def test_fast_row_gram_equals_gram_of_torch_func_per_row_gradients_fp64(monkeypatch, ghost):
    """The full (N, N) Gram (flattened Grams for a use with itself, no N^2 gathers) against
    G G^T of torch.func's per-row gradients, ghost and materialised."""
    from gesim.probe.func import per_sample_grads
    m = _model("gpt2")
    ids, mask = _batch(3).stacked()
    monkeypatch.setattr(layers.LinearRule, "cost_prefers_ghost", lambda self, use: ghost)
    monkeypatch.setattr(layers.EmbeddingRule, "cost_prefers_ghost", lambda self, use: ghost)
    monkeypatch.setattr(fast, "tied_materialise_cheaper", lambda uses, p, N: not ghost)
    G = per_sample_grads(m, ids, mask)
    want = G @ G.T
    got = fast.fast_row_gram(m, ids, mask)
    assert float((got - want).abs().max() / want.abs().max()) < RTOL


def test_linear_input_modified_in_place_after_the_call_is_refused():
    """LinearRule keeps the model's own input tensor (no copy): an input changed in place after
    the call (invisible to autograd when the weights are frozen) must be refused."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 4, dtype=torch.float64)
            self.fc = torch.nn.Linear(4, 7, dtype=torch.float64)

        def forward(self, ids):
            h = self.emb(ids) * 1.0
            out = self.fc(h)
            h.mul_(2.0)
            return out

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(layers.GesimError, match="modified in place"):
        probe.pair_stats(Net(), _pairs(ids))


def _pairs(ids):
    from gesim import lm
    mask = torch.ones_like(ids)
    return lm.PairBatch(ids[:1], ids[1:], mask[:1], mask[1:])


def test_fast_probe_does_not_hold_the_logits_through_the_backward(monkeypatch):
    """The in-place check of hooked outputs needs them only until the forward ends: the head's
    output (N x T x V, the largest tensor of a real LM) is released before the backward, so the
    probe's peak memory is not one logits tensor above a training step's."""
    import weakref

    m, b = _model("gpt2"), _batch()
    seen, alive = [], []
    m.lm_head.register_forward_hook(lambda mod, args, out: seen.append(weakref.ref(out)))
    on_grad = fast._Engine._on_grad

    def spy(self, use, g):
        alive.append(seen[-1]() is not None)
        return on_grad(self, use, g)

    monkeypatch.setattr(fast._Engine, "_on_grad", spy)
    _close(probe.pair_stats(m, b, backend="fast"), probe.pair_stats(m, b, backend="reference"))
    assert alive and not any(alive)
