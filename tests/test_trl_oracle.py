"""trl's own loss code as the oracle for every registered loss with a ``trl`` record.

Each trainer's loss method runs on a minimally built trainer (``__new__`` plus the attributes
its ``__init__`` sets from the config) and a stand-in model whose per-token log-probs are
differentiable functions of leaf tensors ``lw`` (B,) and ``ll`` (B,): the chosen response's
tokens carry ``lw_i * frac_it`` (random positive fractions summing to 1), so trl's gradient
with respect to ``lw_i`` is exactly d(trl loss)/d(lw_i). Random batches, B = 4, unequal
lengths, float64 (float32 where trl itself computes in float32). For each loss:

    trl value      = scale * mean_i L_gesim(pair i)
    -B/scale * d(trl)/d(lw_i) = d_w(pair i)   (gesim's symbolic weight)
     B/scale * d(trl)/d(ll_i) = d_l(pair i)

``TABLE`` collects the largest differences (printed with ``pytest -s``, quoted in the issue).
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import numpy as np
import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402

from gesim import losses, symbolic  # noqa: E402

B = 4
TRL_LOSSES = [n for n in losses.names() if losses.get(n).trl is not None]
#: trl computes these in float32 whatever the input dtype: the alpha-divergence casts with
#: .float() (and its clamp table has no float64 entry, so float32 inputs are needed); ORPO's odds
#: ratio casts with .float(); exo_pair makes label_smoothing a float32 tensor (log eps then
#: carries a float32 rounding error of ~1e-8 relative).
FLOAT32 = {"dpo_alpha_div": 1e-5, "orpo_trl": 1e-5}
TOL = {**FLOAT32, "exo_pair": 1e-7}
TABLE: dict[str, tuple] = {}


# ---- a random batch -------------------------------------------------------------------------

def make_batch(seed, uniform=False):
    rng = np.random.default_rng(seed)
    len_p = rng.integers(2, 5, B)
    len_w = rng.integers(1, 7, B)
    len_l = rng.integers(1, 7, B)
    while np.all(len_w == len_w[0]) or np.all(len_w == len_l):
        len_w = rng.integers(1, 7, B)

    def fracs(lengths):
        out = []
        for n in lengths:
            f = np.ones(n) if uniform else rng.uniform(0.2, 1.0, n)
            out.append(f / f.sum())
        return out

    return {
        "len_p": len_p, "len_w": len_w, "len_l": len_l,
        "frac_w": fracs(len_w), "frac_l": fracs(len_l),
        "lw": -rng.uniform(0.3, 1.5, B) * len_w, "ll": -rng.uniform(0.3, 1.5, B) * len_l,
        "lw_ref": -rng.uniform(0.3, 1.5, B) * len_w, "ll_ref": -rng.uniform(0.3, 1.5, B) * len_l,
        "prompt": [-rng.uniform(0.2, 2.0, n) for n in len_p],
    }


def token_rows(batch, totals, dtype):
    """(2B, T) per-token log-probs: prompt tokens, then the response tokens sum_t = totals."""
    lw, ll = totals
    T = int((batch["len_p"] + np.maximum(batch["len_w"], batch["len_l"])).max())
    rows, masks = [], []
    for tot, fr, lens in ((lw, batch["frac_w"], batch["len_w"]), (ll, batch["frac_l"], batch["len_l"])):
        for i in range(B):
            p, n = int(batch["len_p"][i]), int(lens[i])
            prompt = torch.tensor(batch["prompt"][i], dtype=dtype)
            resp = tot[i] * torch.tensor(fr[i], dtype=dtype)
            pad = torch.zeros(T - p - n, dtype=dtype)
            rows.append(torch.cat([prompt, resp, pad]))
            masks.append(torch.tensor([0] * p + [1] * n + [0] * (T - p - n)))
    return torch.stack(rows), torch.stack(masks), T


def leaves(batch, dtype):
    return (torch.tensor(batch["lw"], dtype=dtype, requires_grad=True),
            torch.tensor(batch["ll"], dtype=dtype, requires_grad=True))


class FusedHeadLM(torch.nn.Module):
    """Stands in for a model with trl's fused LM head: returns per-token log-probs (2B, T-1),
    zero off the completion (labels -100), as ``model(..., labels=..., fused_lm_head=True)``."""

    is_gradient_checkpointing = False

    def __init__(self, per_input):
        super().__init__()
        self.per_input = per_input  # id(input_ids) -> (token log-probs (2B, T), completion mask)

    def forward(self, input_ids=None, labels=None, **kwargs):
        q, mask = self.per_input[id(input_ids)]
        lp = (q * mask)[:, 1:]
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, log_sum_sq_probs=z, aux_loss=None,
                                     is_top1=torch.zeros_like(lp, dtype=torch.bool))


class LogitsLM(torch.nn.Module):
    """Stands in for a causal LM: two-token vocabulary, every real token is token 0, and the
    logits [a, 0] with a = q - log(1 - e^q) make log_softmax(logits)[0] = q exactly."""

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, input_ids=None, **kwargs):
        q = self.q[:, 1:]
        a = q - torch.log(-torch.expm1(q.clamp(max=-1e-6)))
        logits = torch.stack([a, torch.zeros_like(a)], dim=-1)
        logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)  # the last position predicts nothing
        return types.SimpleNamespace(logits=logits)


ACCEL = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


# ---- trl trainers built without __init__ ----------------------------------------------------

def trl_config(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def dpo_loss(record, cfg_kw, batch, dtype, tmp_path):
    from trl import DPOConfig, DPOTrainer

    cfg = trl_config(DPOConfig, tmp_path, **cfg_kw)
    tr = DPOTrainer.__new__(DPOTrainer)
    tr.args, tr.accelerator = cfg, ACCEL
    tr.beta, tr.precompute_ref_logps = cfg.beta, False  # the reference model runs, as by default
    tr.loss_types, tr.loss_weights = cfg.loss_type, cfg.loss_weights or [1.0] * len(cfg.loss_type)
    tr.ld_alpha, tr.f_divergence_type = cfg.ld_alpha, cfg.f_divergence_type
    tr.f_alpha_divergence_coef, tr.label_smoothing = cfg.f_alpha_divergence_coef, cfg.label_smoothing
    tr.use_weighting, tr.aux_loss_enabled = cfg.use_weighting, False
    tr._metrics, tr._total_train_tokens, tr._tp_size = {"train": defaultdict(list), "eval": defaultdict(list)}, 0, 1
    lw, ll = leaves(batch, dtype)
    q, mask, T = token_rows(batch, (lw, ll), dtype)
    q_ref, _, _ = token_rows(batch, (torch.tensor(batch["lw_ref"], dtype=dtype),
                                     torch.tensor(batch["ll_ref"], dtype=dtype)), dtype)
    ids = torch.zeros(2 * B, T, dtype=torch.long)
    tr.model = FusedHeadLM({id(ids): (q, mask)}).train()
    tr.ref_model = FusedHeadLM({id(ids): (q_ref.detach(), mask)}).eval()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}
    value = DPOTrainer._compute_loss(tr, tr.model, inputs, return_outputs=False)
    return value, lw, ll


def kto_loss(record, cfg_kw, batch, dtype, tmp_path, kl=None):
    from trl import KTOConfig, KTOTrainer

    cfg = trl_config(KTOConfig, tmp_path, per_device_train_batch_size=2, **cfg_kw)
    tr = KTOTrainer.__new__(KTOTrainer)
    tr.args, tr.accelerator = cfg, ACCEL
    tr.beta, tr.loss_type = cfg.beta, cfg.loss_type
    tr.desirable_weight, tr.undesirable_weight = cfg.desirable_weight, cfg.undesirable_weight
    tr.calculate_KL, tr.precompute_ref_logps, tr.aux_loss_enabled = kl is not None, True, False
    tr._metrics, tr._total_train_tokens, tr._tp_size = {"train": defaultdict(list), "eval": defaultdict(list)}, 0, 1
    lw, ll = leaves(batch, dtype)
    q, mask, T = token_rows(batch, (lw, ll), dtype)
    ids = torch.zeros(2 * B, T, dtype=torch.long)
    per_input = {id(ids): (q, mask)}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "label": torch.tensor([True] * B + [False] * B),
              "ref_logps": torch.tensor(np.concatenate([batch["lw_ref"], batch["ll_ref"]]), dtype=dtype)}
    if kl is not None:  # the mismatched (KL) completions: their log-probs and the reference's
        kl_ids = torch.zeros(2 * B, 2, dtype=torch.long)
        kl_q = torch.tensor(np.stack([[0.0, v] for v in kl[0]]), dtype=dtype)
        per_input[id(kl_ids)] = (kl_q, torch.ones_like(kl_ids))
        inputs |= {"KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
                   "KL_completion_mask": torch.ones_like(kl_ids), "ref_KL_logps": torch.tensor(kl[1], dtype=dtype)}
    tr.model = FusedHeadLM(per_input).train()
    tr.ref_model = None
    value = KTOTrainer._compute_loss(tr, tr.model, inputs, return_outputs=False)
    return value, lw, ll


def seq_batch(batch, q):
    """trl's tokenised CPO/ORPO batch: chosen and rejected rows, prompt masked in the labels."""
    n = 2 * B
    T = q.shape[1]
    lens = np.concatenate([batch["len_p"] + batch["len_w"], batch["len_p"] + batch["len_l"]])
    attn = torch.tensor([[1] * int(k) + [0] * (T - int(k)) for k in lens])
    lab = torch.zeros(n, T, dtype=torch.long)
    lab[attn == 0] = -100
    for r in range(n):
        lab[r, : int(batch["len_p"][r % B])] = -100
    ids = torch.zeros(n, T, dtype=torch.long)
    out = {}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, n))):
        out |= {f"{side}_input_ids": ids[rows], f"{side}_attention_mask": attn[rows], f"{side}_labels": lab[rows]}
    return out


def cpo_loss(record, cfg_kw, batch, dtype, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = trl_config(CPOConfig, tmp_path, **cfg_kw)
    tr = CPOTrainer.__new__(CPOTrainer)
    tr.args, tr.accelerator, tr.is_encoder_decoder, tr.pad_token_id, tr.aux_loss_enabled = cfg, ACCEL, False, 1, False
    for k in ("beta", "label_smoothing", "loss_type", "cpo_alpha", "simpo_gamma", "alpha"):
        setattr(tr, k, getattr(cfg, k))
    lw, ll = leaves(batch, dtype)
    q, _, _ = token_rows(batch, (lw, ll), dtype)
    value, _ = CPOTrainer.get_batch_loss_metrics(tr, LogitsLM(q), seq_batch(batch, q))
    return value, lw, ll


def orpo_loss(record, cfg_kw, batch, dtype, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg = trl_config(ORPOConfig, tmp_path, **{k: v for k, v in cfg_kw.items() if k != "loss_type"})
    tr = ORPOTrainer.__new__(ORPOTrainer)
    tr.args, tr.accelerator, tr.is_encoder_decoder, tr.padding_value, tr.aux_loss_enabled = cfg, ACCEL, False, 1, False
    tr.beta = cfg.beta
    lw, ll = leaves(batch, dtype)
    q, _, _ = token_rows(batch, (lw, ll), dtype)
    value, _ = ORPOTrainer.get_batch_loss_metrics(tr, LogitsLM(q), seq_batch(batch, q))
    return value, lw, ll


RUNNERS = {"DPOTrainer": dpo_loss, "KTOTrainer": kto_loss, "CPOTrainer": cpo_loss, "ORPOTrainer": orpo_loss}
FACTORS = (1.37, 0.71, 1.13, 0.83)


def oracle_params(name):
    """Non-default parameter values (so a wrong mapping shows), gesim's and trl's config."""
    loss, rec = losses.get(name), losses.get(name).trl
    g = {}
    for k, (p, default) in enumerate(loss.defaults.items()):
        if p in rec.requires:
            g[p] = rec.requires[p]
        elif p != losses.LEN_BAR and p in rec.params:
            g[p] = default * FACTORS[k % 4] if default else 0.13
    cfg = {"loss_type": list(rec.loss_type) if isinstance(rec.loss_type, tuple) else rec.loss_type, **rec.fixed}
    for p, field in rec.params.items():
        if field == "loss_weights[1]":
            cfg["loss_weights"] = [1.0, g[p]]
        else:
            cfg[field] = g[p]
    return loss.params(**g), cfg


def compare(name, batch, tmp_path, **runner_kw):
    loss, rec = losses.get(name), losses.get(name).trl
    dtype = torch.float32 if name in FLOAT32 else torch.float64
    g, cfg = oracle_params(name)
    value, lw, ll = RUNNERS[rec.trainer](rec, cfg, batch, dtype, tmp_path, **runner_kw)
    g_lw, g_ll = torch.autograd.grad(value, (lw, ll))
    len_p = batch["len_p"] - 1 if rec.trainer == "ORPOTrainer" else None  # predicted prompt tokens
    g |= losses.trl_batch_params(name, batch["len_w"], len_p)
    data = {k: np.asarray(batch[k], float) for k in ("lw", "ll", "lw_ref", "ll_ref", "len_w", "len_l")}
    ours = np.asarray(loss("numpy", *data.values(), **g), float)
    extra = 0.0
    if rec.trainer == "ORPOTrainer":  # the prompt tokens' NLL, outside the per-pair loss (see orpo_trl)
        extra = -sum(p[1:].sum() for p in batch["prompt"]) / g[losses.LEN_BAR] / B
    d_w, d_l = symbolic.derive(name).weights(*data.values(), **g)
    return (abs(float(value.detach()) - (rec.scale * ours.mean() + extra)),
            np.abs(-B / rec.scale * g_lw.double().numpy() - d_w).max(),
            np.abs(B / rec.scale * g_ll.double().numpy() - d_l).max(),
            float(np.abs(ours).max() + np.abs(d_w).max() + np.abs(d_l).max()))


@pytest.mark.parametrize("name", TRL_LOSSES)
def test_gesim_equals_trl_value_and_both_gradients(name, tmp_path):
    tol = TOL.get(name, 1e-12)
    worst = np.zeros(3)
    for seed in range(3):
        batch = make_batch(seed, uniform=(name == "ld_dpo"))
        *diffs, scale = compare(name, batch, tmp_path)
        worst = np.maximum(worst, diffs)
        assert max(diffs) <= tol * max(1.0, scale), (name, seed, diffs)
    rec = losses.get(name).trl
    TABLE[name] = (rec.trainer, rec.loss_type, dict(rec.params), dict(rec.fixed), rec.scale, *worst)


def test_kto_reference_point_is_trls_clamped_kl_estimate(tmp_path):
    """z0 = clamp(mean(KL completions' log-ratios), min=0), detached: trl's KL estimate."""
    batch = make_batch(7)
    rng = np.random.default_rng(7)
    kl_pol, kl_ref = -rng.uniform(1, 3, 2 * B), -rng.uniform(1, 3, 2 * B) - 0.5
    z0 = max(float(np.mean(kl_pol - kl_ref)), 0.0)
    assert z0 > 0
    g, cfg = oracle_params("kto")
    value, lw, ll = kto_loss(None, cfg, batch, torch.float64, tmp_path, kl=(kl_pol, kl_ref))
    g_lw, g_ll = torch.autograd.grad(value, (lw, ll))
    data = [np.asarray(batch[k], float) for k in ("lw", "ll", "lw_ref", "ll_ref", "len_w", "len_l")]
    g["z0"] = z0
    ours = losses.get("kto")("numpy", *data, **g)
    d_w, d_l = symbolic.derive("kto").weights(*data, **g)
    assert float(value) == pytest.approx(0.5 * ours.mean(), abs=1e-14)
    np.testing.assert_allclose(-2 * B * g_lw.numpy(), d_w, atol=1e-14)
    np.testing.assert_allclose(2 * B * g_ll.numpy(), d_l, atol=1e-14)


@pytest.mark.parametrize("unpaired", [False, True])
def test_aot_batch_weights_equal_trls_gradients(unpaired, tmp_path):
    """gesim.losses.aot_weights = trl's 'aot' / 'aot_unpaired' gradients (a batch loss)."""
    batch = make_batch(11)
    beta, eps = 0.3, 0.1
    cfg = {"loss_type": "aot_unpaired" if unpaired else "aot", "beta": beta, "label_smoothing": eps}
    value, lw, ll = dpo_loss(None, cfg, batch, torch.float64, tmp_path)
    g_lw, g_ll = torch.autograd.grad(value, (lw, ll))
    d_w, d_l = losses.aot_weights(batch["lw"], batch["ll"], batch["lw_ref"], batch["ll_ref"], beta=beta, eps=eps,
                                  unpaired=unpaired)
    np.testing.assert_allclose(-g_lw.numpy(), d_w, atol=1e-15)
    np.testing.assert_allclose(g_ll.numpy(), d_l, atol=1e-15)


def test_batch_normalised_forms_differ_from_per_pair_forms_with_unequal_lengths():
    """rpo vs rpo_trl (and sft, cpo, orpo): equal for one pair, different for a batch of
    unequal lengths: that is why both are registered."""
    batch = make_batch(3)
    data = [np.asarray(batch[k], float) for k in ("lw", "ll", "lw_ref", "ll_ref", "len_w", "len_l")]
    bar = losses.trl_batch_params("rpo_trl", batch["len_w"])
    per_pair = symbolic.derive("rpo").weights(*data)[0]
    batch_form = symbolic.derive("rpo_trl").weights(*data, **bar)[0]
    assert not np.allclose(per_pair, batch_form)
    one = [a[:1] for a in data]
    assert symbolic.derive("rpo").weights(*one)[0] == pytest.approx(
        symbolic.derive("rpo_trl").weights(*one, len_bar=float(one[4][0]))[0])


def test_every_trl_record_names_real_parameters_and_the_tested_version():
    assert set(TRL_LOSSES) >= {"dpo", "ipo_norm", "hinge", "simpo", "cpo", "kto", "exo_pair", "nca_pair", "robust",
                               "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
                               "alphapo", "sft_trl", "rpo_trl", "cpo_trl", "orpo_trl", "dpo_forward_kl", "dpo_js",
                               "dpo_alpha_div", "ld_dpo", "wpo", "apo_zero_unpaired", "alphapo_sum"}
    major_minor = ".".join(trl.__version__.split(".")[:2])
    for name in TRL_LOSSES:
        rec = losses.get(name).trl
        assert rec.version == losses.TRL_VERSION == major_minor
        assert set(rec.params) | set(rec.requires) <= set(losses.get(name).defaults)


def test_zz_print_table():
    """The comparison table (run with -s to see it)."""
    if not TABLE:
        pytest.skip("run with the comparisons")
    print(f"\ntrl {trl.__version__}\n| gesim loss | trl trainer, loss_type | mapping (gesim = trl) | scale "
          "| value | d/dlw | d/dll |")
    for name, (trainer, lt, params, fixed, scale, dv, dw, dl) in TABLE.items():
        mapping = ", ".join([f"{a}={b}" for a, b in params.items()] + [f"{a}={b}" for a, b in fixed.items()])
        print(f"| {name} | {trainer} {lt} | {mapping} | {scale:g} | {dv:.1e} | {dw:.1e} | {dl:.1e} |")
    assert all(math.isfinite(x) for row in TABLE.values() for x in row[-3:])
