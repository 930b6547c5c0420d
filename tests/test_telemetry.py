"""The training-step recorder (gesim.probe.telemetry): per-pair row Grams read from the
training backward equal the probe's reference (fp64, 1e-10) on gesim's GPT, HF GPT-2 (tied),
Llama-shaped models and LoRA; the own-step regime from signs only equals the symbolic
prediction; the batch first-order prediction matches a realised SGD step to O(eta^2); the
recorder changes no gradient and no parameter."""

import warnings

import numpy as np
import pytest
import torch

from gesim import GesimError, dynamics, lm, losses, probe, regimes
from gesim.encode import collate, encode_rows
from gesim.probe import StepTelemetry, loss_weights, toy
from gesim.probe.telemetry import UNKNOWN

warnings.filterwarnings("ignore", message=".*(batching rule|fallback).*")
RTOL = 1e-10


def _batch(n=4, seed=0):
    rows = [dict(r, index=i) for i, r in enumerate(toy.toy_rows(n, seed))]
    return collate(encode_rows(rows, toy.build_tokenizer(), 64).pairs)


def _model(arch, tied=True, lora=False, seed=0):
    torch.manual_seed(seed)
    vocab = len(toy.build_tokenizer())
    if arch == "gesim-gpt":
        from gesim.transformer.model import GPT, GPTConfig
        return GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=16,
                             tie_weights=tied)).double()
    m = toy.build_model(arch, vocab_size=vocab, d=16, tied=tied).double()
    for mod in m.modules():  # train() must not switch dropout on: the reference runs without it
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    if lora:
        import peft
        targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
        m = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=targets, lora_dropout=0.0,
                                                   fan_in_fan_out=arch == "gpt2", init_lora_weights=False))
    return m


def _refs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(batch)
    refs = torch.randn(2, B, generator=g, dtype=torch.float64) - 20
    return (refs[0], refs[1], batch.chosen_mask.sum(1).double(), batch.rejected_mask.sum(1).double())


def _step(model, batch, tel, loss="dpo", params=None, rows=None):
    """One recorded training forward + backward; returns (RowGram, d_w, d_l, B, lw, ll)."""
    B = len(batch)
    cw, rj = rows if rows is not None else (torch.arange(B), torch.arange(B, 2 * B))
    with tel.record(cw, rj):
        lw, ll = lm.pair_logps(model, batch)
        L = losses.get(loss)("torch", lw, ll, *_refs(batch), **(params or {})).mean()
        d_w, d_l, BB = loss_weights(L, lw, ll)
        L.backward()
    return tel.pop(), d_w, d_l, BB, lw.detach(), ll.detach()


def _close(a, b, keys=("ip", "nw2", "nl2", "cos"), rtol=RTOL):
    for k in keys:
        scale = b[k].abs().max().clamp_min(1e-30)
        assert float((a[k] - b[k]).abs().max() / scale) < rtol, k


MODELS = [("gesim-gpt", True, False), ("gesim-gpt", False, False), ("gpt2", True, False), ("llama", True, False),
          ("llama", False, False), ("gpt2", True, True), ("llama", False, True)]
# Llama's RMSNorm runs in float32 whatever the model's dtype, so its backward rounds the output
# gradient to float32: the gradient of the DPO loss is then not exactly (d_w/B) times the
# gradient of lw (relative 1e-8). Against the reference (gradients of lw, ll) Llama is compared
# at the float32 rounding; against the per-row gradients of the loss itself (what the training
# step computes) at 1e-10 (test_batch_gram_equals_gram_of_autograd_row_gradients).
FLOAT32_PARTS = {"llama": 1e-6}


@pytest.mark.parametrize("batch_gram", [False, True], ids=["pairs", "batch_gram"])
@pytest.mark.parametrize("arch,tied,lora", MODELS)
def test_row_gram_pair_stats_equal_probe_reference_fp64(arch, tied, lora, batch_gram):
    m, b = _model(arch, tied, lora), _batch()
    select = "lora" if lora else "all"
    want = probe.pair_stats(m, b, select=select, backend="reference")
    m.train()
    rg, d_w, d_l, B, _, _ = _step(m, b, StepTelemetry(m, select=select, batch_gram=batch_gram))
    assert rg.rw2.dtype == torch.float64 and (rg.gram is not None) == batch_gram
    rtol = FLOAT32_PARTS.get(arch, RTOL)
    _close(rg.pair_stats(d_w, d_l, B), want, rtol=rtol)
    assert torch.allclose(rg.cos(), want["cos"], rtol=rtol, atol=1e-12)  # d_w, d_l > 0 for DPO


def _row_grads(model, batch, loss="dpo"):
    """Per-row contributions r_i = grad (c_i s_i), c_i = dL/ds_i held fixed, by plain autograd,
    one backward per row (the training step's own arithmetic, float32 parts included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask = batch.stacked()
    s = lm.response_logps(model, ids, mask)
    B = len(batch)
    L = losses.get(loss)("torch", s[:B], s[B:], *_refs(batch)).mean()
    coef = torch.autograd.grad(L, s, retain_graph=True)[0]
    rows = []
    for i in range(len(s)):
        g = torch.autograd.grad(coef[i].detach() * s[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                         for x, p in zip(g, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("arch,tied,lora", [("gesim-gpt", True, False), ("gpt2", True, False), ("llama", True, False),
                                             ("llama", False, True)])
def test_batch_gram_equals_gram_of_autograd_row_gradients(arch, tied, lora):
    m, b = _model(arch, tied, lora), _batch(3)
    R = _row_grads(m, b)
    m.zero_grad()
    rg, *_ = _step(m, b, StepTelemetry(m, select="lora" if lora else "all", batch_gram=True))
    want = R @ R.T
    assert float((rg.gram - want).abs().max() / want.abs().max()) < RTOL
    P = len(b)
    within = StepTelemetry(m, select="lora" if lora else "all")
    rg2, *_ = _step(m, b, within)
    for got, k in ((rg2.rw2, torch.arange(P)), (rg2.rl2, torch.arange(P, 2 * P))):
        assert torch.allclose(got, want[k, k], rtol=RTOL, atol=0)
    assert torch.allclose(rg2.rwl, want[torch.arange(P), torch.arange(P, 2 * P)], rtol=RTOL, atol=0)


def test_rows_in_any_order_and_subset():
    """Row indices are read as given: pairs (1, 5) and (3, 4) of a forward of 6 rows."""
    m, b = _model("gesim-gpt"), _batch(3)
    R = _row_grads(m, b)
    m.zero_grad()
    rg, *_ = _step(m, b, StepTelemetry(m, batch_gram=True), rows=(torch.tensor([1, 2]), torch.tensor([5, 4])))
    idx = torch.tensor([1, 2, 5, 4])
    want = R[idx] @ R[idx].T
    assert float((rg.gram - want).abs().max() / want.abs().max()) < RTOL
    assert torch.allclose(rg.rwl, torch.stack([R[1] @ R[5], R[2] @ R[4]]), rtol=RTOL, atol=0)


def _train(model, batch, steps, tel=None, opt="adamw"):
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2) if opt == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optim.zero_grad()
        if tel is None:
            lw, ll = lm.pair_logps(model, batch)
            losses.get("dpo")("torch", lw, ll, *_refs(batch)).mean().backward()
        else:
            _step(model, batch, tel)
        optim.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,batch_gram", [("gesim-gpt", False), ("gesim-gpt", True), ("gpt2", False)])
def test_parameters_after_n_steps_identical_with_and_without_recorder(arch, batch_gram):
    b = _batch()
    plain = _train(_model(arch), b, 4)
    m = _model(arch)
    recorded = _train(m, b, 4, StepTelemetry(m, batch_gram=batch_gram))
    assert plain.keys() == recorded.keys()
    assert all(torch.equal(plain[k], recorded[k]) for k in plain)  # bit for bit


@pytest.mark.parametrize("loss,params", [("dpo", {}), ("cpo", {"alpha": 5.0}), ("simpo", {}), ("ipo", {}),
                                         ("slic_hf", {"delta": 1e-9})])
def test_own_step_regime_from_signs_equals_symbolic_prediction(loss, params):
    """The regime of each pair's own step from the row Gram and the signs of d_w, d_l only
    equals gesim.symbolic's prediction from (ip, nw2, nl2) of the reference probe."""
    codes, want = [], []
    for seed in range(4):
        m, b = _model("gesim-gpt", seed=seed), _batch(6, seed)
        ref = probe.pair_stats(m, b, backend="reference")
        rg, d_w, d_l, _, lw, ll = _step(m, b, StepTelemetry(m), loss, params)
        lw_ref, ll_ref, len_w, len_l = _refs(b)
        pred = dynamics.predict(loss, lw=lw.numpy(), ll=ll.numpy(), ip=ref["ip"].numpy(),
                                             nw2=ref["nw2"].numpy(), nl2=ref["nl2"].numpy(), lw_ref=lw_ref.numpy(),
                                             ll_ref=ll_ref.numpy(), len_w=len_w.numpy(), len_l=len_l.numpy(), **params)
        got = rg.own_step_regimes(torch.sign(d_w), torch.sign(d_l))
        one_zero = (pred["d_w"] == 0) != (pred["d_l"] == 0)
        assert np.all(got[one_zero] == UNKNOWN)
        codes += got[~one_zero].tolist()
        want += [regimes.REGIMES.index(r) for r in np.asarray(pred["regime"])[~one_zero]]
    assert codes == want
    assert codes or loss == "slic_hf"


def test_own_step_regime_matches_realised_tiny_step_of_that_pair():
    """Apply exactly one pair's own share -eta (r_w + r_l) of the step: the realised signs of
    delta lw, delta ll are the predicted regime."""
    m, b = _model("gesim-gpt"), _batch(4)
    R = _row_grads(m, b, "cpo")
    rg, d_w, d_l, *_ = _step(m, b, StepTelemetry(m), "cpo")
    codes = rg.own_step_regimes(torch.sign(d_w), torch.sign(d_l))
    params = [p for p in m.parameters()]
    theta = torch.nn.utils.parameters_to_vector(params).detach()
    with torch.no_grad():
        lw0, ll0 = lm.pair_logps(m, b)
        for i in range(len(b)):
            torch.nn.utils.vector_to_parameters(theta - 1e-4 * (R[i] + R[len(b) + i]), params)
            lw1, ll1 = lm.pair_logps(m, b)
            real = regimes.regime_codes(float(lw1[i] - lw0[i]), float(ll1[i] - ll0[i]))
            assert int(real) == int(codes[i])
        torch.nn.utils.vector_to_parameters(theta, params)


def test_batch_first_order_matches_sgd_step_error_shrinks_like_eta_squared():
    m, b = _model("gpt2"), _batch(4)
    rg, d_w, d_l, B, lw0, ll0 = _step(m, b, StepTelemetry(m, batch_gram=True))
    grads = [p.grad.clone() for p in m.parameters()]
    theta = [p.detach().clone() for p in m.parameters()]
    errs = []
    for eta in (1e-2, 1e-3, 1e-4):
        pred_w, pred_l = rg.batch_first_order(d_w, d_l, B, eta)
        with torch.no_grad():
            for p, t, g in zip(m.parameters(), theta, grads):
                p.copy_(t - eta * g)
            lw1, ll1 = lm.pair_logps(m, b)
        errs.append(float(torch.cat([lw1 - lw0 - pred_w, ll1 - ll0 - pred_l]).abs().max()))
        assert float(torch.cat([pred_w, pred_l]).abs().max()) > 10 * errs[-1]
    assert errs[1] < errs[0] / 50 and errs[2] < errs[1] / 50  # O(eta^2): x100 per decade


def test_gradient_accumulation_one_record_per_micro_batch():
    m, b = _model("gpt2"), _batch(4)
    halves = [b.take(torch.arange(s, s + 2)) for s in (0, 2)]
    tel = StepTelemetry(m)
    for h in halves:  # accumulate .grad over two micro-batches, one record block each
        with tel.record(torch.arange(2), torch.arange(2, 4)):
            lw, ll = lm.pair_logps(m, h)
            L = losses.get("dpo")("torch", lw, ll, *_refs(h)).mean() / 2
            d_w, d_l, _ = loss_weights(L, lw, ll)
            L.backward()
        _close(tel.pop().pair_stats(d_w, d_l, 2), probe.pair_stats(m, h, backend="reference"))
    assert tel.pending() == 0


def test_no_grad_forwards_in_block_are_ignored():
    m, b = _model("gesim-gpt"), _batch()
    tel = StepTelemetry(m)
    with tel.record(torch.arange(4), torch.arange(4, 8)):
        with torch.no_grad():
            lm.pair_logps(m, b)  # a reference forward of the same model (e.g. LoRA adapters off)
        lw, ll = lm.pair_logps(m, b)
        L = losses.get("dpo")("torch", lw, ll, *_refs(b)).mean()
        d_w, d_l, B = loss_weights(L, lw, ll)
        L.backward()
    _close(tel.pop().pair_stats(d_w, d_l, B), probe.pair_stats(m, b, backend="reference"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_gradient_checkpointing_recorded_once(reentrant, arch):
    """Activations recomputed in backward: a non-reentrant re-run is skipped (already recorded
    in the forward); a reentrant one (its forward ran without grad) is the one recorded. Llama:
    the RMSNorm rule's own re-run inside the checkpointed forward is not counted by torch as
    the checkpoint's saved tensors."""
    m, b = _model(arch), _batch()
    want = probe.pair_stats(m, b, backend="reference")
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.train()
    rg, d_w, d_l, B, _, _ = _step(m, b, StepTelemetry(m))
    _close(rg.pair_stats(d_w, d_l, B), want, rtol=FLOAT32_PARTS.get(arch, RTOL))


def test_bf16_model_grams_in_float32():
    m, b = _model("gesim-gpt"), _batch()
    want = probe.pair_stats(m, b, backend="reference")
    m = m.to(torch.bfloat16)
    rg, d_w, d_l, B, _, _ = _step(m, b, StepTelemetry(m))
    assert rg.rw2.dtype == torch.float32
    got = rg.pair_stats(d_w.float(), d_l.float(), B)
    assert float((got["cos"].double() - want["cos"]).abs().max()) < 0.05  # bf16 forward noise, not the Gram


class _FusedLogProbs(torch.autograd.Function):
    """An LM head read inside its own autograd Function, as trl's fused head reads it: the head
    module is never called, so no hook sees its weight (float64, no tiles)."""

    @staticmethod
    def forward(ctx, h, W, y):
        z = h @ W.T
        lse = torch.logsumexp(z, -1)
        ctx.save_for_backward(h, W, y, z, lse)
        return z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, g):
        h, W, y, z, lse = ctx.saved_tensors
        q = torch.exp(z - lse.unsqueeze(-1)).neg_().scatter_add_(-1, y.unsqueeze(-1), torch.ones_like(z[..., :1]))
        q = q * g.unsqueeze(-1)
        return q @ W, q.reshape(-1, q.shape[-1]).T @ h.reshape(-1, h.shape[-1]), None


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("llama", False)], ids=["gpt2_tied", "llama_untied"])
def test_a_head_read_inside_a_fused_function_is_recorded_through_external_use(arch, tied):
    """The recorder's external_use / deliver (how trl's fused head is read): the head's use is
    formed from its input h and dL/dz = dL/dlogp (e_y - p) (trl_layout.head_output_grad), with
    the tied embedding's cross terms, and the rows equal the reference probe's."""
    from gesim.integrations.trl_layout import head_output_grad

    m, b = _model(arch, tied), _batch()
    want = probe.pair_stats(m, b, backend="reference")
    ids, mask = b.stacked()
    labels = ids.masked_fill(mask == 0, -100)
    head, P = m.get_output_embeddings(), len(b)
    tel = StepTelemetry(m)
    rec = tel.recorder

    def fused_forward(input_ids):
        h = m.base_model(input_ids=input_ids).last_hidden_state
        use = rec.external_use(head, h)
        lp = _FusedLogProbs.apply(h[:, :-1], head.weight, labels[:, 1:].clamp(min=0))
        lp.register_hook(lambda g: rec.deliver(use, head_output_grad(h, head, labels, g, torch.float64)))
        return lp.masked_fill(labels[:, 1:] == -100, 0)

    m.forward = fused_forward
    try:
        with tel.record(torch.arange(P), torch.arange(P, 2 * P)):
            lw, ll = m(ids).sum(1).chunk(2)
            L = losses.get("dpo")("torch", lw, ll, *_refs(b)).mean()
            d_w, d_l, B = loss_weights(L, lw, ll)
            L.backward()
    finally:
        del m.forward
    _close(tel.pop().pair_stats(d_w, d_l, B), want, rtol=FLOAT32_PARTS.get(arch, RTOL))


@pytest.mark.parametrize("bf16", [False, True], ids=["float64", "bf16"])
def test_a_tied_head_read_inside_a_fused_function_without_external_use_is_refused(bf16):
    """The silent case: GPT-2's head weight is the input embedding; a fused head Function reads it
    where no hook sees it, and the embedding's hooked use makes the weight look covered. The
    first record block checks that the tied weight's recorded uses add up to its gradient and
    refuses by name (before this check the rows silently lacked the head's share)."""
    m, b = _model("gpt2"), _batch()
    if bf16:
        m = m.to(torch.bfloat16)
    ids, mask = b.stacked()
    labels = ids.masked_fill(mask == 0, -100)
    head, P = m.get_output_embeddings(), len(b)
    tel = StepTelemetry(m)

    def fused_forward(input_ids):
        h = m.base_model(input_ids=input_ids).last_hidden_state.double()
        lp = _FusedLogProbs.apply(h[:, :-1], head.weight.double(), labels[:, 1:].clamp(min=0))
        return lp.masked_fill(labels[:, 1:] == -100, 0)

    m.forward = fused_forward
    try:
        with pytest.raises(GesimError, match="transformer.wte.weight|lm_head.weight"):
            with tel.record(torch.arange(P), torch.arange(P, 2 * P)):
                lw, ll = m(ids).sum(1).chunk(2)
                losses.get("dpo")("torch", lw, ll, *_refs(b)).mean().backward()
    finally:
        del m.forward


class _Functional(torch.nn.Module):
    """A model using a module's weight functionally (the module itself is never called)."""

    def __init__(self):
        super().__init__()
        self.gpt = _model("gesim-gpt")
        self.mix = torch.nn.Linear(self.gpt.config.vocab_size, self.gpt.config.vocab_size).double()

    def forward(self, ids):
        return torch.nn.functional.linear(self.gpt(ids), self.mix.weight)


def test_parameter_outside_the_layer_rules_is_refused_by_name():
    m, b = _Functional(), _batch()
    with pytest.raises(GesimError, match="mix.weight"):
        _step(m, b, StepTelemetry(m))


def test_misuse_is_refused():
    m, b = _model("gesim-gpt"), _batch()
    tel = StepTelemetry(m)
    with pytest.raises(GesimError, match="outside"):
        with tel.record(torch.tensor([0]), torch.tensor([9])):
            lm.pair_logps(m, b)
    with pytest.raises(GesimError, match="second grad-enabled forward"):
        with tel.record(torch.arange(4), torch.arange(4, 8)):
            lm.pair_logps(m, b)
            lm.pair_logps(m, b)
    with pytest.raises(GesimError, match="no backward"):
        with tel.record(torch.arange(4), torch.arange(4, 8)):
            lm.pair_logps(m, b)
    with pytest.raises(GesimError, match="nothing recorded"):
        tel.pop()
    with pytest.raises(GesimError, match="batch_gram=True"):
        _step(m, b, tel)[0].batch_first_order(1.0, 1.0, 4)


def test_pair_rows_and_step_fractions_agree_with_row_gram():
    m, b = _model("gesim-gpt"), _batch(6)
    want = probe.pair_stats(m, b, backend="reference")
    from gesim.probe.telemetry import FRACTION_KEYS, pair_rows, step_fractions
    rg, d_w, d_l, B, _, _ = _step(m, b, StepTelemetry(m, batch_gram=True), "cpo")
    rows = pair_rows(rg, d_w, d_l, B)
    assert np.allclose(rows["ip"], want["ip"].numpy(), rtol=RTOL, atol=0)
    assert np.allclose(rows["rho"], np.sqrt(want["nw2"].numpy() / want["nl2"].numpy()), rtol=RTOL)
    assert np.array_equal(rows["regime"], rg.own_step_regimes(torch.sign(d_w), torch.sign(d_l)))
    assert {len(v) for v in rows.values()} == {len(b)}
    fr = step_fractions(rows)
    assert set(fr) == set(FRACTION_KEYS)
    assert abs(sum(v for k, v in fr.items() if k.startswith("train_frac_")) - 1) < 1e-12
    assert abs(fr["train_mean_cos"] - float(want["cos"].mean())) < 1e-10
    unknown_loss = pair_rows(rg)  # loss unknown: weights taken positive
    assert np.isnan(unknown_loss["ip"]).all() and np.allclose(unknown_loss["cos"], rg.cos().numpy())


def test_write_rows_parts_round_trip(tmp_path):
    from gesim.output import read_rows, write_rows
    write_rows(tmp_path, "step-000000", {"step": [0, 0], "cos": [0.5, float("nan")], "structure": ["1t", "1t"]})
    write_rows(tmp_path, "step-000001", {"step": [1], "cos": [-0.25], "structure": ["1t"]})
    got = read_rows(tmp_path)
    assert got["step"].tolist() == [0, 0, 1] and np.isnan(got["cos"][1]) and got["cos"][2] == -0.25
    csv_dir = tmp_path / "csv"
    write_rows(csv_dir, "rank0", {"step": [3], "cos": [0.125]}, fmt="csv")
    assert read_rows(csv_dir)["cos"].tolist() == [0.125]
    with pytest.raises(GesimError, match="different lengths"):
        write_rows(tmp_path, "bad", {"a": [1, 2], "b": [1]})


def test_left_padding_with_attention_mask_exact_against_row_autograd():
    """Left-padded rows with an attention mask and per-row positions (trl's layout for some
    models): the recorder reads whatever gradient the step computes, pads included."""
    m, b = _model("gpt2"), _batch(3)
    ids, mask = b.stacked()
    keep = mask.flip(1).cumsum(1).flip(1) > 0  # real tokens: up to each row's last response token
    shift = (~keep).sum(1)
    ids = torch.stack([torch.roll(r, int(s)) for r, s in zip(ids, shift)])  # right -> left padding
    mask = torch.stack([torch.roll(r, int(s)) for r, s in zip(mask, shift)])
    attn = torch.stack([torch.roll(r, int(s)) for r, s in zip(keep.long(), shift)])
    pos = (attn.cumsum(1) - 1).clamp_min(0)

    def seq_logps():
        logits = m(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        return (lm.token_logps(logits, ids) * mask).sum(1)

    params = list(m.parameters())
    s = seq_logps()
    coef = torch.linspace(0.5, -1.5, len(s), dtype=s.dtype)
    rows = []
    for i in range(len(s)):
        g = torch.autograd.grad(coef[i] * s[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)]))
    R = torch.stack(rows)
    tel = StepTelemetry(m, batch_gram=True)
    P = len(b)
    with tel.record(torch.arange(P), torch.arange(P, 2 * P)):
        (coef * seq_logps()).sum().backward()
    got = tel.pop().gram
    want = R @ R.T
    assert float((got - want).abs().max() / want.abs().max()) < RTOL


def test_logits_to_keep_head_on_fewer_positions_exact_against_row_autograd():
    """trl may call the model with logits_to_keep: the tied head then sees fewer positions than
    the embedding (the embedding x head cross term spans both lengths)."""
    m, b = _model("gpt2"), _batch(3)
    ids, mask = b.stacked()
    K = ids.shape[1] // 2

    def seq_logps():
        logits = m(input_ids=ids, logits_to_keep=K + 1).logits  # (N, K + 1, V): the last K + 1 positions
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, -K:, None]).squeeze(-1)
        return (logp * mask[:, -K:]).sum(1)

    params = list(m.parameters())
    s = seq_logps()
    coef = torch.linspace(1.0, -0.5, len(s), dtype=s.dtype)
    R = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(coef[i] * s[i], params, retain_graph=True)])
                     for i in range(len(s))])
    for batch_gram in (False, True):
        tel = StepTelemetry(m, batch_gram=batch_gram)
        P = len(b)
        with tel.record(torch.arange(P), torch.arange(P, 2 * P)):
            (coef * seq_logps()).sum().backward()
        rg = tel.pop()
        want = R @ R.T
        assert torch.allclose(rg.rwl, want[torch.arange(P), torch.arange(P, 2 * P)], rtol=RTOL, atol=0)
        assert torch.allclose(rg.rw2, want.diagonal()[:P], rtol=RTOL, atol=0)
        if batch_gram:
            assert float((rg.gram - want).abs().max() / want.abs().max()) < RTOL


FAMILIES = ["gemma", "bloom", "qwen2_moe", "cohere", "gpt_neo", "falcon"]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_families_batch_gram_equals_row_autograd(family, checkpointing):
    """Families through every rule: RMSNorm (elementwise), MoE experts and Falcon's Linear
    subclass (row replay; Falcon also updates a hooked output in place), fused QKV, ALiBi;
    also under non-reentrant gradient checkpointing (the rules' re-runs inside the checkpointed
    forward must not be counted as its saved tensors)."""
    from gesim.probe import families
    m = families.build_tiny(family)
    b = _batch(3)
    ids, mask = b.stacked()
    ids = ids % families.VOCAB
    params = [p for p in m.parameters() if p.requires_grad]
    s = lm.response_logps(m, ids, mask)
    coef = torch.linspace(1.0, -0.5, len(s), dtype=s.dtype)
    R = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(
        torch.autograd.grad(coef[i] * s[i], params, retain_graph=True, allow_unused=True), params)])
        for i in range(len(s))])
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()  # transformers checkpoints only in training mode (the tiny models have no dropout)
    tel = StepTelemetry(m, batch_gram=True)
    with tel.record(torch.arange(3), torch.arange(3, 6)):
        (coef * lm.response_logps(m, ids, mask)).sum().backward()
    want = R @ R.T
    tol = max(RTOL, families.FLOAT32_PARTS.get(family, 0))
    assert float((tel.pop().gram - want).abs().max() / want.abs().max()) < tol


def test_parameters_used_functionally_refused_by_name_mamba():
    from gesim.probe import families
    m = families.build_tiny("mamba")
    ids, mask = _batch(2).stacked()
    tel = StepTelemetry(m)
    with pytest.raises(GesimError, match="conv1d.weight"):
        with tel.record(torch.arange(2), torch.arange(2, 4)):
            lm.response_logps(m, ids % families.VOCAB, mask).sum().backward()
