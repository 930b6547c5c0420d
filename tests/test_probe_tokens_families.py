"""The token Gram on every causal-LM family transformers offers (built tiny from its config, float64):
the layer-wise fast path (gesim.probe.tokens) equals one backward per token to 1e-10 on the families
listed in ``families.TOKEN_FAST``, and refuses every other built family with a GesimError (never a raw
exception, never a silently different Gram). Rows of different lengths, one right-padded; all parameters.

Found by this test: a per-head LayerNorm (persimmon's q/k norms, normalised over head_dim on
(heads, T, head_dim) states) had its per-token vectors split by position instead of summed over heads
(blocks off by 24-82%, the whole Gram by 4e-6); a positional embedding called on a shape, not on ids
(blenderbot), raised an AttributeError; a rule's refusal was reported as "the model does not run its
head on m positions"."""

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gesim import GesimError, probe  # noqa: E402
from gesim.probe import families  # noqa: E402
from gesim.probe.reference import reference_token_gram  # noqa: E402
from gesim.probe.tokens import fast_token_gram  # noqa: E402

warnings.filterwarnings("ignore")
RTOL = 1e-10


def _rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, families.VOCAB - 6, (2, 12), generator=g)
    mask = torch.zeros_like(ids)
    mask[0, 5:12] = 1
    mask[1, 4:9] = 1
    ids[1, 9:] = 0  # right padding after the second row's response
    return ids, mask


def test_token_fast_list_names_built_families_only():
    assert set(families.TOKEN_FAST) <= set(families.built())
    assert set(families.TOKEN_FLOAT32) <= set(families.TOKEN_FAST)


@pytest.mark.parametrize("name", families.built())
def test_family_token_gram_fast_is_exact_or_refused(name, one_thread):
    model = families.build_tiny(name).eval()
    ids, mask = _rows()
    if name not in families.TOKEN_FAST:
        with pytest.raises(GesimError):
            fast_token_gram(model, ids, mask, "all")
        return
    got, index = fast_token_gram(model, ids, mask, "all")
    want, want_index = reference_token_gram(model, ids, mask, "all")
    assert index == want_index
    assert torch.isfinite(got).all()
    err = float((got - want).abs().max() / want.abs().max())
    tol = max(RTOL, families.TOKEN_FLOAT32.get(name, 0.0), families.FLOAT32_PARTS.get(name, 0.0))
    assert err < tol, err


def test_per_head_layernorm_blocks_are_summed_over_heads(one_thread):
    """persimmon's q/k LayerNorms alone: each parameter's block equals the per-token loop's."""
    model = families.build_tiny("persimmon").eval()
    ids, mask = _rows()
    norms = [p for n, p in model.named_parameters() if "q_layernorm" in n or "k_layernorm" in n]
    assert norms
    for p in norms:
        sel = lambda n, q, p=p: q is p  # noqa: E731
        got = probe.token_gram(model, ids, mask, sel, backend="fast").K
        want = probe.token_gram(model, ids, mask, sel, backend="reference").K
        assert float((got - want).abs().max() / want.abs().max()) < RTOL


def test_a_rule_refusal_names_the_module_not_the_head(one_thread):
    model = families.build_tiny("blenderbot").eval()
    ids, mask = _rows()
    with pytest.raises(GesimError, match="embed_positions") as err:
        fast_token_gram(model, ids, mask, "all")
    assert "does not run its head" not in str(err.value)
    auto = probe.token_gram(model, ids, mask)  # "auto": the per-token loop, exact, and it says so
    assert torch.allclose(auto.K, reference_token_gram(model, ids, mask, "all")[0], rtol=0, atol=0)
    assert auto.backend == "reference" and "embed_positions" in auto.why
    fast = probe.token_gram(families.build_tiny("gpt2").eval(), ids, mask)
    assert fast.backend == "fast" and fast.why == ""
