"""The architecture matrix: every causal-LM family transformers offers, built tiny from its
config (gesim.probe.families, the one list), fast probe against the two-backward reference in
float64 on padded pairs (right padding longer than the sliding window), full parameters and
LoRA: exact to 1e-10 (ip relative to sqrt(nw2 nl2), i.e. as a cosine; the others relative), or
refused with a GesimError naming what is missing; never NaN."""

import copy
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gesim import GesimError, lm, probe  # noqa: E402
from gesim.probe import families  # noqa: E402

warnings.filterwarnings("ignore")
RTOL = 1e-10


def _batch():
    """3 pairs over the tiny vocabulary, prompts 3-5 tokens, responses 2-9: padding up to 7 > window 4."""
    g = torch.Generator().manual_seed(0)
    rows = [[torch.randint(3, families.VOCAB - 6, (n,), generator=g) for n in lens] for lens in ((3, 9, 2), (5, 2, 8),
                                                                                                   (4, 6, 6))]

    def side(k):
        T = max(len(r[0]) + len(r[k]) for r in rows)
        ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r[0]) + len(r[k])
            ids[i, :n], mask[i, len(r[0]):n] = torch.cat([r[0], r[k]]), 1
        return ids, mask
    (cw, mw), (cl, ml) = side(1), side(2)
    return lm.PairBatch(cw, cl, mw, ml)


def _lora(model):
    import peft
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0,
                                                                     init_lora_weights=False))


def _check(model, params, rtol, b=None):
    b = _batch() if b is None else b
    ref = probe.pair_stats(model, b, params, backend="reference")
    got = probe.pair_stats(model, b, params, backend="fast")
    scale = {"ip": (ref["nw2"] * ref["nl2"]).sqrt().max()}  # ip can cancel to ~0: its error is a cosine error
    for k in ("ip", "nw2", "nl2", "lw", "ll"):
        assert torch.isfinite(got[k]).all(), k
        err = float((got[k] - ref[k]).abs().max() / scale.get(k, ref[k].abs().max()))
        assert err < rtol, (k, err)


def test_every_causal_lm_family_is_listed():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    listed = families.listed()
    assert len(listed) == sum(len(x) for x in families.ALL_LISTS)  # each family in one list only
    assert listed <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert not families.unchecked(), "new families: classify them in gesim/probe/families.py"


def _names(*groups):
    """Family names as parameters; the few slow ones (over 20 s on one CPU) marked ``slow``."""
    names = sorted({n for g in groups for n in g})
    return [pytest.param(n, marks=pytest.mark.slow) if n in families.SLOW else n for n in names]


@pytest.mark.parametrize("name", _names(families.EXACT, families.LORA_REFUSED, families.FULL_ONLY))
def test_family_exact_full_parameters(name, one_thread):
    _check(families.build_tiny(name), "all", families.FLOAT32_PARTS.get(name, RTOL))


@pytest.mark.parametrize("name", _names(families.EXACT))
def test_family_exact_lora(name, one_thread):
    _check(_lora(families.build_tiny(name)), "lora", families.FLOAT32_PARTS.get(name, RTOL))


@pytest.mark.parametrize("name", families.FUNC)
def test_family_func_backend_matches_reference(name, one_thread):
    m, b = families.build_tiny(name), _batch()
    got, ref = probe.pair_stats(m, b, backend="func"), probe.pair_stats(m, b, backend="reference")
    for k in ("ip", "nw2", "nl2"):
        assert float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) < RTOL, k


@pytest.mark.parametrize("name", sorted(families.LORA_REFUSED))
def test_family_lora_refused_with_reason(name, one_thread):
    with pytest.raises(GesimError, match=families.LORA_REFUSED[name][1]):
        probe.pair_stats(_lora(families.build_tiny(name)), _batch(), "lora")


@pytest.mark.parametrize("name", sorted(families.REFUSED))
def test_family_refused_with_reason(name, one_thread):
    with pytest.raises(GesimError, match=families.REFUSED[name][1]):
        probe.pair_stats(families.build_tiny(name), _batch())


@pytest.mark.parametrize("name", sorted(families.FAILING))
def test_family_known_failure_still_fails(name, one_thread):
    """Known open failures (raw exceptions): strict, so a fix shows up here and moves the family."""
    with pytest.raises(Exception) as info:
        probe.pair_stats(families.build_tiny(name), _batch())
    assert not isinstance(info.value, GesimError)


def test_readme_family_table_is_current():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert families.markdown_table() in readme, "regenerate: python -c 'from gesim.probe import families; " \
                                                "print(families.markdown_table())'"


def test_xglm_scaled_embedding_in_float32(one_thread):
    """XGLM (scaled word embeddings) cannot run in float64 here (transformers' eager attention
    overflows), so it is checked in float32: a missed embed_scale would be off by 30-55%."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(families.tiny_config("xglm"), attn_implementation="eager").eval()
    assert getattr(m.get_input_embeddings(), "embed_scale", 1.0) != 1.0
    _check(m, "all", 1e-4)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sliding_window_with_right_padding_longer_than_the_window_has_no_nan(name, one_thread):
    """Eager attention, window 2, a pair padded by 8 tokens: pad query rows would see no key
    under a padding mask (NaN rows); the probe's all-ones mask and NaN-safe sums stay exact."""
    cfg = families.tiny_config(name)
    cfg.sliding_window = 2
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()
    ids = torch.randint(3, 90, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, 2:12], mask[1, 2:4] = 1, 1  # row 1: 8 pad tokens after its response
    b = lm.PairBatch(ids, ids.flip(0), mask, mask.flip(0))
    all_ids, all_mask = b.stacked()
    last = torch.where(all_mask.bool(), torch.arange(12), -1).max(1).values
    padding_mask = (torch.arange(12)[None] <= last[:, None]).long()
    old = m(input_ids=all_ids, attention_mask=padding_mask, position_ids=torch.arange(12).expand(4, 12)).logits
    assert torch.isnan(old).any()  # the hazard: a padding mask leaves pad rows with no key
    assert torch.isfinite(lm.logits(m, all_ids, all_mask)).all()
    _check(m, "all", RTOL, b)
