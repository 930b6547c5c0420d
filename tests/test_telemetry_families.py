"""The training-pair recorder (StepTelemetry, used by the trl callback) on every causal-LM family
transformers offers, built tiny from its config (float64): the batch Gram of one recorded DPO-shaped
step equals the Gram of per-row autograd gradients to 1e-10 (float32-part families to their rounding),
or the recorder refuses with a GesimError (the families in ``families.TELEMETRY_REFUSED``); never a raw
exception. Six rows of different lengths, right-padded.

Found by this test: the first-block check (hooked uses add up to each gradient) compared a parameter's
difference with its own gradient's norm, so an attention key's bias, whose gradient is exactly zero
(softmax ignores a shift shared by all keys), failed on rounding noise and refused OPT, BART, BERT-like
and 22 more families; and a learned position table returning (T, d) without a batch axis (Blenderbot,
BigBird-Pegasus) raised a RuntimeError."""

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gesim import GesimError, lm  # noqa: E402
from gesim.probe import families  # noqa: E402
from gesim.probe.telemetry import StepTelemetry  # noqa: E402

warnings.filterwarnings("ignore")
RTOL = 1e-10
SLOW_HERE = {*families.SLOW, "bailing_hybrid", "nemotron_h", "gemma3"}  # over 5 s each in this test


def _rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, families.VOCAB - 6, (6, 14), generator=g)
    mask = torch.zeros_like(ids)
    for i, (a, b) in enumerate([(4, 14), (5, 10), (3, 12), (6, 14), (4, 9), (5, 13)]):
        mask[i, a:b] = 1
        ids[i, b:] = 0
    return ids, mask


def _names():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_HERE else n for n in families.built()]


def test_telemetry_refused_list_names_built_families_only():
    assert set(families.TELEMETRY_REFUSED) <= set(families.built())


@pytest.mark.parametrize("name", _names())
def test_family_recorder_rows_equal_row_autograd_or_refused(name, one_thread):
    m = families.build_tiny(name)
    ids, mask = _rows()
    coef = torch.linspace(1.0, -0.5, len(ids), dtype=torch.float64)
    tel = StepTelemetry(m, batch_gram=True)
    if name in families.TELEMETRY_REFUSED:
        with pytest.raises(GesimError):
            with tel.record(torch.arange(3), torch.arange(3, 6)):
                (coef * lm.response_logps(m, ids, mask)).sum().backward()
        return
    params = [p for p in m.parameters() if p.requires_grad]
    s = lm.response_logps(m, ids, mask)
    R = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(
        torch.autograd.grad(coef[i] * s[i], params, retain_graph=True, allow_unused=True), params)])
        for i in range(len(s))])
    m.zero_grad(set_to_none=True)
    with tel.record(torch.arange(3), torch.arange(3, 6)):
        (coef * lm.response_logps(m, ids, mask)).sum().backward()
    got, want = tel.pop().gram, R @ R.T
    assert torch.isfinite(got).all()
    tol = max(RTOL, families.FLOAT32_PARTS.get(name, 0.0))
    assert float((got - want).abs().max() / want.abs().max()) < tol
