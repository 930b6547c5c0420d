"""TrainEntanglementCallback inside real trl DPOTrainer runs on CPU (tiny models from configs):
per-pair numbers of the trained batches, exact against gesim.probe's reference backend, trl's
own logs untouched, unreadable layouts refused."""

import copy

import pytest

pytest.importorskip("trl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gesim import GesimError, lm, probe, regimes, symbolic  # noqa: E402
from gesim.integrations import trl_layout  # noqa: E402
from gesim.integrations.trl_train import LOG_KEYS, PREFIX, TrainEntanglementCallback  # noqa: E402
from gesim.output import read_rows  # noqa: E402
from gesim.probe import toy  # noqa: E402

TRAINER_KEYS = ("loss", "grad_norm", "learning_rate", "epoch", "entropy", "num_tokens", "mean_token_accuracy")


ARCH = {"arch": "gpt2"}  # the toy architecture _trainer and _fresh build (a test may switch it)


def _model(arch=None, dtype=torch.float32, lora=False):
    tok = toy.build_tokenizer()
    arch = arch or ARCH["arch"]
    model = toy.build_model(arch, vocab_size=len(tok), d=16, seed=0, tied=arch == "gpt2").to(dtype)
    return tok, model


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM",
                      fan_in_fan_out=True, init_lora_weights=False)


def _trainer(tmp_path, steps=4, batch=2, ga=1, dtype=torch.float32, lora=False, n_rows=16, logging_steps=1,
             lr=1e-3, collator=None, **cfg):
    import datasets
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok, model = _model(dtype=dtype)
    rows = toy.toy_rows(n_rows, seed=1)
    config = DPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch,
                       gradient_accumulation_steps=ga, learning_rate=lr, logging_steps=logging_steps, report_to=[],
                       save_strategy="no", use_cpu=True, seed=0, **cfg)
    kw = {"peft_config": _lora_config()} if lora else {"ref_model": copy.deepcopy(model).eval()}
    return DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tok, data_collator=collator, **kw)


def _capture(trainer):
    """Wrap training_step (outside the callback's wrapper): the parameters and batch of every micro-batch."""
    seen, inner = [], trainer.training_step

    def step(model, inputs, *args, **kwargs):
        seen.append(({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                     {k: v.clone() if hasattr(v, "clone") else v for k, v in inputs.items()}))
        return inner(model, inputs, *args, **kwargs)

    trainer.training_step = step
    return seen


def _pair_batch(inputs):
    """trl's micro-batch as gesim pairs: rows b and b + B, response = completion_mask."""
    ids, comp = inputs["input_ids"], inputs["completion_mask"]
    B = len(ids) // 2
    return lm.PairBatch(ids[:B], ids[B:], comp[:B], comp[B:])


def _fresh(state, dtype, lora=False):
    """A model without trl's patches, at the captured parameters."""
    _, model = _model(dtype=dtype)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config())
    missing = set(dict(model.named_parameters())) ^ set(state)
    assert not missing, missing
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    return model


def _trainer_part(row):
    return {k: v for k, v in row.items() if k in TRAINER_KEYS or k.startswith(("rewards/", "logps/", "logits/"))}


# ---- the Done-when run ------------------------------------------------------------------------

def test_twenty_step_run_logs_fractions_writes_one_row_per_pair_per_step_and_keeps_trl_logs(tmp_path, one_thread):
    """float32 (bf16=False), 20 steps: the callback only reads (trl's fused head runs as it is),
    so every value trl logs is bitwise the value it logs without the callback."""
    plain = _trainer(tmp_path / "a", steps=20, bf16=False)
    plain.train()
    watched = _trainer(tmp_path / "b", steps=20, bf16=False)
    cb = TrainEntanglementCallback(out_dir=tmp_path / "pairs").attach(watched)
    watched.train()
    a, b = plain.state.log_history, watched.state.log_history
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no row added or removed
    train_rows = [r for r in a if "loss" in r]
    assert len(train_rows) == 20 and all("rewards/margins" in r and "logps/chosen" in r for r in train_rows)
    for ra, rb in zip(a, b):
        assert _trainer_part(ra).keys() == _trainer_part(rb).keys()
        assert not {k for k in rb if k not in ra} - {k for k in rb if k.startswith(PREFIX)}
        for k, v in _trainer_part(ra).items():
            assert rb[k] == v, (rb["step"], k, rb[k], v)
    logged = [r for r in b if f"{PREFIX}train_mean_cos" in r]
    assert [r["step"] for r in logged] == list(range(1, 21)) and all("loss" in r for r in logged)
    for r in logged:
        assert set(LOG_KEYS) <= set(r)
        assert sum(r[k] for k in LOG_KEYS if "_frac_" in k) == pytest.approx(1.0)
        assert r[f"{PREFIX}train_pairs"] == 2 and r[f"{PREFIX}train_steps"] == 1
    table = read_rows(tmp_path / "pairs")
    assert len(table["step"]) == 20 * 2  # one row per trained pair per step
    assert sorted(zip(table["step"].tolist(), table["pair"].tolist())) == [(s, p) for s in range(1, 21) for p in (0, 1)]
    assert set(table["regime_name"].tolist()) <= set(regimes.REGIMES) | {"unknown"}
    assert np.all(np.isfinite(table["ip"])) and np.all(table["nw2"] > 0) and np.all(table["d_w"] > 0)
    for r, h in zip(logged, cb.history):  # the logged fractions are the step's rows
        rows = table["step"] == r["step"]
        for code, name in enumerate(regimes.REGIMES):
            assert r[f"{PREFIX}train_frac_{name}"] == pytest.approx(np.mean(table["regime"][rows] == code))
        assert r[f"{PREFIX}train_mean_cos"] == pytest.approx(np.mean(table["cos"][rows]))
        assert h["step"] == r["step"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16_autocast", "float32"])
def test_training_with_the_callback_is_bitwise_training_without_it(tmp_path, one_thread, bf16, arch, monkeypatch):
    """The callback reads, it never changes the step: under trl's default bf16 autocast (CPU
    here) and in float32, three steps with gradient accumulation (and trl's default gradient
    checkpointing) end at bitwise the same parameters, with bitwise the same logged values, as
    the same run without the callback. (Until this release the callback ran the LM head as a
    module call, whose bf16 backward rounded otherwise than trl's float32-accumulating head.)"""
    monkeypatch.setitem(ARCH, "arch", arch)  # Llama: untied head, RMSNorm re-run under checkpointing
    runs = []
    for name, watch in (("plain", False), ("watched", True)):
        trainer = _trainer(tmp_path / name, steps=3, ga=2, bf16=bf16)
        assert trainer.args.gradient_checkpointing and (trainer.accelerator.mixed_precision == "bf16") == bf16
        if watch:
            cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
        trainer.train()
        runs.append(trainer)
    (a, b) = runs
    for (n, p), (n2, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    for ra, rb in zip(a.state.log_history, b.state.log_history):
        assert _trainer_part(ra) == _trainer_part(rb)
    assert len(cb.history) == 3 and all(np.isfinite(h[f"{PREFIX}train_mean_cos"]) for h in cb.history)


# ---- exactness (float64): the reference probe on the same batch and parameters ------------------

#: trl's fused head folds the log-probs' statistics in float32 and accumulates its backward in
#: float32 whatever the model's dtype; train mode runs that head unchanged, so a float64 run's
#: log-probs (and the d_w, d_l read from their gradient) agree with a float64 reference to float32
#: rounding only, and so does the body's gradient that flows back through trl's head
LOGP_RTOL = 1e-6


def _check_against_reference(trainer, cb, seen, params="all", lora=False, ref_model=None, tol=LOGP_RTOL,
                             logp_rtol=LOGP_RTOL):
    table = cb.table()
    m = trainer.args.gradient_accumulation_steps
    assert len(seen) == m * trainer.args.max_steps
    worst = 0.0
    for k, (state, inputs) in enumerate(seen):
        step, micro = k // m + 1, k % m
        rows = (table["step"] == step) & (table["micro"] == micro)
        pb = _pair_batch(inputs)
        assert rows.sum() == len(pb)
        ref = probe.pair_stats(_fresh(state, torch.float64, lora), pb, select=params, backend="reference")
        for key in ("ip", "nw2", "nl2"):
            want = ref[key].numpy()
            got = table[key][rows]
            worst = max(worst, float(np.max(np.abs(got - want) / np.abs(want).max())))
        np.testing.assert_allclose(table["lw"][rows], ref["lw"].numpy(), rtol=logp_rtol)
        np.testing.assert_allclose(table["ll"][rows], ref["ll"].numpy(), rtol=logp_rtol)
        # the row Gram's own-step regime = the symbolic one from (d_w, d_l, ip, nw2, nl2)
        d_w, d_l = table["d_w"][rows], table["d_l"][rows]
        dlw, dll = regimes.first_order(d_w, d_l, ref["ip"].numpy(), ref["nw2"].numpy(), ref["nl2"].numpy())
        np.testing.assert_array_equal(table["regime"][rows], regimes.regime_codes(dlw, dll, d_w, d_l))
        if ref_model is not None:  # gesim's DPO weights at trl's beta; reference log-probs by trl's own forward
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            with torch.no_grad():
                ref_logps = ref_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)
            lw_ref, ll_ref = ref_logps.double().chunk(2)
            want = symbolic.derive("dpo").weights(ref["lw"].numpy(), ref["ll"].numpy(), lw_ref, ll_ref,
                                                  beta=trainer.beta)
            np.testing.assert_allclose(d_w, want[0], rtol=logp_rtol)
            np.testing.assert_allclose(d_l, want[1], rtol=logp_rtol)
    print(f"largest ip/nw2/nl2 error: {worst:.1e}")
    assert worst < tol, worst
    print(f"largest ip/nw2/nl2 error against the reference probe, relative to the batch's largest: {worst:.1e}")
    return table


def test_float64_rows_equal_the_reference_probe_and_gesims_dpo_weights_with_accumulation(tmp_path, one_thread):
    """Two optimizer steps of two micro-batches of 3 pairs, gradient checkpointing on (trl's
    default): per pair ip, nw2, nl2 = gesim.probe's reference backend (one pair at a time, two
    backward passes) to float32 rounding (trl's fused head, which train mode leaves as it is,
    computes in float32 whatever the model's dtype: LOGP_RTOL; the recorder itself is exact to
    1e-10, tests/test_telemetry.py); d_w, d_l read from trl's backward = gesim's ``dpo`` weights
    at trl's beta (so the 1/m accumulation scaling is read right); the own-step regime = the
    symbolic one; lw, ll = the reference's and trl's logged ``logps/*``."""
    trainer = _trainer(tmp_path, steps=2, batch=3, ga=2, dtype=torch.float64, bf16=False, lr=1e-2)
    assert trainer.args.gradient_checkpointing
    cb = TrainEntanglementCallback(out_dir=tmp_path / "pairs").attach(trainer)
    seen = _capture(trainer)
    trainer.train()
    table = _check_against_reference(trainer, cb, seen, ref_model=trainer.ref_model)
    assert len(cb.parts) == 1 and len(read_rows(tmp_path / "pairs")["step"]) == 2 * 2 * 3
    for r in (r for r in trainer.state.log_history if "loss" in r):
        rows = table["step"] == r["step"]
        assert r["logps/chosen"] == pytest.approx(table["lw"][rows].mean(), rel=1e-5)
        assert r["logps/rejected"] == pytest.approx(table["ll"][rows].mean(), rel=1e-5)
        assert r[f"{PREFIX}train_pairs"] == 6


def test_float64_lora_rows_equal_the_reference_probe_on_the_adapter(tmp_path, one_thread):
    """LoRA through trl's peft_config: the reference is the policy with its adapter disabled
    under no_grad (not recorded); the adapter's parameters are the trainable ones."""
    trainer = _trainer(tmp_path, steps=2, batch=2, dtype=torch.float64, lora=True, bf16=False, lr=1e-2)
    assert trainer.ref_model is None and hasattr(trainer.model, "peft_config")
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    seen = _capture(trainer)
    trainer.train()
    table = _check_against_reference(trainer, cb, seen, params="lora", lora=True)
    assert len(table["step"]) == 4 and not cb.parts


# ---- trl's fused head, read: its logits' gradient from dL/dlogp ------------------------------------

def test_head_output_grad_equals_autograd_through_a_module_called_head():
    """dL/dz from dL/dlogp (what the callback hands the recorder for trl's fused head) equals
    autograd through ``log_softmax(W h).gather(labels)`` zeroed off the labels, float64 to
    1e-15, including a gradient that reaches the zeroed (-100) positions and a head bias."""
    torch.manual_seed(0)
    N, T, d, V = 4, 7, 5, 11
    h, head = torch.randn(N, T, d, dtype=torch.float64), torch.nn.Linear(d, V).double()
    labels = torch.randint(0, V, (N, T))
    labels[:, :3] = -100
    z = head(h).detach().requires_grad_(True)
    keep = labels[:, 1:] != -100
    lp = torch.log_softmax(z[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    g = torch.randn(N, T - 1, dtype=torch.float64)  # nonzero on the -100 positions too
    (lp.masked_fill(~keep, 0) * g).sum().backward()
    got = trl_layout.head_output_grad(h, head, labels, g, torch.float64)
    assert float((got - z.grad).abs().max()) < 1e-15 * float(z.grad.abs().max()) + 1e-16
    assert torch.equal(got[:, -1], torch.zeros(N, V, dtype=torch.float64))


def test_watch_fused_head_hands_trls_own_outputs_and_hidden_states(tmp_path, one_thread):
    """Inside the block trl's forward runs unchanged (same outputs, bitwise), the callback sees
    the backbone's last hidden states and trl's log_probs; no-grad calls pass through unseen;
    trl's forward is back afterwards."""
    trainer = _trainer(tmp_path, steps=1, batch=3, dtype=torch.float64, bf16=False)
    model = trainer.model
    inputs = next(iter(trainer.get_train_dataloader()))
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels,
          "fused_lm_head": True}
    want = model(**kw)
    trls, seen = model.__dict__["forward"], []
    with trl_layout.watch_fused_head(model, lambda h, y, out, cd: seen.append((h, y, out, cd))):
        got = model(**kw)
        with torch.no_grad():
            model(**kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # trl's head then forms its logits in bf16
            model(**kw)
    assert len(seen) == 2 and seen[0][2] is got and seen[0][1] is labels and seen[0][3] == torch.float64
    assert seen[1][3] == torch.bfloat16
    assert torch.equal(got.log_probs, want.log_probs) and torch.equal(got.entropy, want.entropy)
    hidden = model.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.equal(seen[0][0], hidden.last_hidden_state)
    assert model.__dict__["forward"] is trls


# ---- what train mode refuses ---------------------------------------------------------------------

class Interleaved:
    """A collator laying trl's rows out [c0, r0, c1, r1, ...] (a layout train mode must not misread)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        out = self.inner(examples)
        n = len(out["input_ids"]) // 2
        order = torch.stack([torch.arange(n), torch.arange(n, 2 * n)], 1).reshape(-1)
        return {k: v[order] if v.ndim == 2 else v for k, v in out.items()}


def test_an_interleaved_batch_is_refused_not_misread(tmp_path, one_thread):
    trainer = _trainer(tmp_path, steps=1, batch=2)
    trainer.data_collator = Interleaved(trainer.data_collator)
    TrainEntanglementCallback(out_dir=False).attach(trainer)
    with pytest.raises(GesimError, match="do not share a prompt"):
        trainer.train()


def _batch(rows_ids, prompt_lens, pad=0):
    T = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), T), pad)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for i, (r, p) in enumerate(zip(rows_ids, prompt_lens)):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        comp[i, p:len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def test_read_layout_accepts_trls_layout_and_refuses_the_others():
    good = _batch([[5, 6, 7, 8], [9, 10, 11], [5, 6, 12], [9, 10, 13, 14]], [2, 2, 2, 2])
    assert trl_layout.read_layout(good) == 2
    packed = dict(good, position_ids=torch.arange(4).repeat(4, 1))
    with pytest.raises(GesimError, match="padding-free"):
        trl_layout.read_layout(packed)
    with pytest.raises(GesimError, match="2B"):
        trl_layout.read_layout({k: v[:3] for k, v in good.items()})
    left = {k: v.flip(1) for k, v in good.items()}
    with pytest.raises(GesimError, match="right-padded"):
        trl_layout.read_layout(left)
    holes = {k: v.clone() for k, v in good.items()}
    holes["completion_mask"][0] = torch.tensor([0, 1, 0, 1])
    with pytest.raises(GesimError, match="one block"):
        trl_layout.read_layout(holes)
    swapped = _batch([[5, 6, 7, 8], [9, 10, 11], [9, 10, 13, 14], [5, 6, 12]], [2, 2, 2, 2])
    with pytest.raises(GesimError, match="rows 0 and 2 do not share a prompt"):
        trl_layout.read_layout(swapped)
    with pytest.raises(GesimError, match="no 'completion_mask'"):
        trl_layout.read_layout({k: v for k, v in good.items() if k != "completion_mask"})


def test_row_weights_read_c_and_refuse_a_per_token_gradient():
    comp = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1]]).bool()
    c = torch.tensor([-0.3, -0.1, 0.2, 0.4], dtype=torch.float64)
    w = trl_layout.token_weights(comp, dtype=torch.float64)
    grad = c[:, None] * w + 7.0 * (~comp)  # off the response: anything (the head zeroes it)
    torch.testing.assert_close(trl_layout.row_weights(grad, w), c)
    bad = grad.clone()
    bad[0, 2] *= 2  # one token weighted otherwise: the row gradient is not c grad lw
    with pytest.raises(GesimError, match="not c_b x"):
        trl_layout.row_weights(bad, w)
    # LD-DPO: tokens past the shorter response of the pair (rows b, b + B) weigh ld_alpha
    ld = trl_layout.token_weights(comp, ld_alpha=0.5, dtype=torch.float64)
    assert ld[0].tolist() == [0, 1, 1, 0.5] and ld[2].tolist() == [0, 0, 1, 1] and ld[1].tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(trl_layout.row_weights(c[:, None] * ld, ld), c)


def test_trainers_train_mode_cannot_read_are_refused(tmp_path):
    class KTOTrainer:
        pass

    with pytest.raises(GesimError, match="CPOTrainer layouts; got KTOTrainer"):
        trl_layout.check_trainer(KTOTrainer())
    trainer = _trainer(tmp_path, steps=1)
    trainer.padding_free = True
    with pytest.raises(GesimError, match="padding_free"):
        TrainEntanglementCallback().attach(trainer)
    trainer.padding_free = False
    trainer.args.torch_compile = True
    with pytest.raises(GesimError, match="torch_compile"):
        TrainEntanglementCallback().attach(trainer)
    trainer.args.torch_compile = False
    cb = TrainEntanglementCallback().attach(trainer)
    with pytest.raises(GesimError, match="already attached"):
        TrainEntanglementCallback().attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    with pytest.raises(GesimError, match="flush_every"):
        TrainEntanglementCallback(flush_every=0)


def test_readme_trl_section_runs(tmp_path):
    """The README's "Watch entanglement in your own trl run" snippet runs as written."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    body = (root / "README.md").read_text().split("## Watch entanglement in your own trl run", 1)[1]
    code = "\n".join(re.findall(r"```python\n(.*?)```", body.split("\n## ", 1)[0], flags=re.S))
    assert "TrainEntanglementCallback" in code
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "80 " in proc.stdout  # 20 steps x 4 pairs


@pytest.mark.slow
def test_ddp_under_accelerate_launch_each_process_writes_its_own_exact_rows(tmp_path):
    """Two CPU processes (``accelerate launch --multi_gpu``: torchrun, gloo, the trainer's model in
    DistributedDataParallel), 3 steps of 2 pairs each: every process writes its own rows, which
    equal the reference probe on its own batch and parameters (tests/trl_ddp_worker.py)."""
    import json
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("accelerate") is None:
        pytest.skip("no accelerate command")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "tests" / "trl_ddp_worker.py"),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2] and {i["backend"] for i in info} == {"gloo"}
    assert {i["wrapped"] for i in info} == {"DistributedDataParallel"}
    assert info[0]["first_ids"] != info[1]["first_ids"]  # each process trains its own pairs
    assert all(i["worst"] < LOGP_RTOL and i["steps"] == 3 and i["logged"] == [2, 2, 2] for i in info), info
    table = read_rows(tmp_path / "pairs")
    assert sorted({p.name for p in (tmp_path / "pairs").iterdir()}) == [
        "train_pairs_rank000_00000001.parquet", "train_pairs_rank001_00000001.parquet"]
    for r in (0, 1):
        mine = table["rank"] == r
        assert sorted(zip(table["step"][mine].tolist(), table["pair"][mine].tolist())) == [
            (s, p) for s in (1, 2, 3) for p in (0, 1)]


# ---- the read-out loss weights are gesim's registered losses, for trl's other loss types ---------

DPO_RECORDS = [n for n in __import__("gesim").losses.names()
               if (r := __import__("gesim").losses.get(n).trl) is not None and r.trainer == "DPOTrainer"
               and n not in ("dpo", "ld_dpo", "wpo", "dpo_alpha_div")]  # ld/wpo: not per pair; alpha: float32 in trl
QUICK = ("ipo_norm", "rpo_trl", "robust")


def _record_config(name):
    """gesim parameters (non-default, so a wrong mapping shows) and the DPOConfig fields carrying them."""
    from gesim import losses

    loss, rec = losses.get(name), losses.get(name).trl
    params = {p: rec.requires[p] if p in rec.requires else round(v * 1.37 if v else 0.13, 6)
              for p, v in loss.defaults.items() if p != losses.LEN_BAR and (p in rec.params or p in rec.requires)}
    cfg = {"loss_type": list(rec.loss_type) if isinstance(rec.loss_type, tuple) else [rec.loss_type], **rec.fixed}
    for p, field in rec.params.items():
        if field == "loss_weights[1]":
            cfg["loss_weights"] = [1.0, params[p]]
        else:
            cfg[field] = params[p]
    return params, cfg


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in DPO_RECORDS])
def test_read_out_weights_are_gesims_loss_for_trls_loss_type(name, tmp_path, one_thread):
    """d_w, d_l read from trl's backward (any loss_type, loss_weights mix) = gesim's symbolic
    weights of the registered loss with trl's parameters, pair by pair, to float32 rounding
    (trl computes its loss from its fused head's float32 log-probs, even in a float64 model;
    the losses themselves are checked against trl's code to 1e-10 in test_trl_oracle.py). Three loss types by
    default, all 14 DPOTrainer records with the slow checks."""
    from gesim import losses

    params, cfg = _record_config(name)
    trainer = _trainer(tmp_path, steps=2, batch=3, dtype=torch.float64, bf16=False, lr=1e-2, **cfg)
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    seen = _capture(trainer)
    trainer.train()
    table = cb.table()
    for k, (_, inputs) in enumerate(seen):
        rows = table["step"] == k + 1
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        with torch.no_grad():
            ref = trainer.ref_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1).double()
        len_w, len_l = table["len_w"][rows], table["len_l"][rows]
        extra = losses.trl_batch_params(name, len_w)
        d_w, d_l = symbolic.derive(name).weights(table["lw"][rows], table["ll"][rows], *ref.chunk(2), len_w, len_l,
                                                 **params, **extra)
        tol = LOGP_RTOL  # trl's fused head returns float32 log-probs: trl's loss (and d_w, d_l) is float32
        scale = max(np.abs(d_w).max(), np.abs(d_l).max())
        np.testing.assert_allclose(table["d_w"][rows], d_w, rtol=0, atol=tol * scale, err_msg=name)
        np.testing.assert_allclose(table["d_l"][rows], d_l, rtol=0, atol=tol * scale, err_msg=name)


def test_rows_of_an_earlier_run_in_out_dir_are_refused_not_mixed(tmp_path, one_thread):
    trainer = _trainer(tmp_path / "run0", steps=1, batch=2)
    TrainEntanglementCallback(out_dir=tmp_path / "pairs").attach(trainer)
    trainer.train()
    with pytest.raises(GesimError, match="already holds per-pair rows"):  # at attach, before any training
        TrainEntanglementCallback(out_dir=tmp_path / "pairs").attach(_trainer(tmp_path / "run1", steps=1, batch=2))
    assert len(read_rows(tmp_path / "pairs")["step"]) == 2


def test_with_logging_every_two_steps_each_row_covers_the_steps_since_the_last(tmp_path, one_thread):
    """logging_steps=2, 5 steps: the fractions in a row are over the pairs of the steps since the
    previous row; every trained pair is counted in exactly one row (the last step's in a row of
    its own if the trainer logs no row after it); cb.history keeps every step."""
    trainer = _trainer(tmp_path, steps=5, batch=2, logging_steps=2)
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    trainer.train()
    rows = [r for r in trainer.state.log_history if f"{PREFIX}train_pairs" in r]
    assert sum(r[f"{PREFIX}train_pairs"] for r in rows) == 5 * 2
    assert sum(r[f"{PREFIX}train_steps"] for r in rows) == 5 and [h["step"] for h in cb.history] == [1, 2, 3, 4, 5]
    table = cb.table()
    first = rows[0]
    assert first["step"] == 2 and first[f"{PREFIX}train_steps"] == 2
    assert first[f"{PREFIX}train_mean_cos"] == pytest.approx(np.mean(table["cos"][table["step"] <= 2]))


@pytest.fixture
def llama():
    ARCH["arch"] = "llama"
    yield
    ARCH["arch"] = "gpt2"


def test_float64_llama_untied_head_rows_equal_the_reference_probe(tmp_path, one_thread, llama):
    """A Llama-shaped model (RMSNorm, rotary positions, grouped KV heads, untied head), without
    gradient checkpointing, against the reference probe (one trimmed pair at a time). transformers'
    Llama computes RMSNorm and the rotary tables in float32 even in a float64 model, so the padded
    batch and the trimmed pair round differently there: agreement to float32 rounding (measured
    3.5e-8), not 1e-15 as for GPT-2."""
    trainer = _trainer(tmp_path, steps=2, batch=2, dtype=torch.float64, bf16=False, lr=1e-2,
                       gradient_checkpointing=False)
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    seen = _capture(trainer)
    trainer.train()
    _check_against_reference(trainer, cb, seen, ref_model=trainer.ref_model, tol=1e-6)


def test_float64_llama_under_gradient_checkpointing_rows_equal_the_reference_probe(tmp_path, one_thread, llama):
    """Gradient checkpointing on (non-reentrant, trl's default) with a Llama-shaped model: the
    recorder's re-run of RMSNorm (to read its per-row gradient) is shielded from checkpointing's
    saved-tensor hooks, so torch no longer refuses the recomputation (it once did: "a different
    number of tensors was saved"), and the rows still equal the reference probe's."""
    trainer = _trainer(tmp_path, steps=2, batch=2, dtype=torch.float64, bf16=False, lr=1e-2)
    assert trainer.args.gradient_checkpointing and type(trainer.model).__name__ == "LlamaForCausalLM"
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    seen = _capture(trainer)
    trainer.train()
    _check_against_reference(trainer, cb, seen, ref_model=trainer.ref_model, tol=1e-6)


def test_float64_opt_rows_equal_the_reference_probe(tmp_path, one_thread):
    """OPT (learned positions offset by 2, biased q/k/v projections whose key bias has an exactly zero
    gradient, tied head) end to end in trl, against the reference probe: a third family on the trl path
    (tests/test_telemetry_families.py runs the recorder on every family, where the key biases' zero
    gradients once made its first-block check refuse OPT on rounding noise; on this trl run the old check
    happened to pass)."""
    ARCH["arch"] = "opt"
    try:
        trainer = _trainer(tmp_path, steps=2, batch=2, dtype=torch.float64, bf16=False, lr=1e-2)
        assert type(trainer.model).__name__ == "OPTForCausalLM"
        cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
        seen = _capture(trainer)
        trainer.train()
        _check_against_reference(trainer, cb, seen, ref_model=trainer.ref_model, tol=1e-6)
    finally:
        ARCH["arch"] = "gpt2"


# ---- CPOTrainer (trl.experimental.cpo): the model's own logits --------------------------------

def _cpo_trainer(tmp_path, steps=2, batch=3, **cfg):
    import datasets
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok, model = _model(dtype=torch.float64)
    config = CPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch, report_to=[],
                       use_cpu=True, logging_steps=1, save_strategy="no", bf16=False, learning_rate=1e-2, seed=0,
                       remove_unused_columns=False, **cfg)
    return CPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(toy.toy_rows(16, seed=1)),
                      processing_class=tok)


@pytest.mark.parametrize("name", ["simpo", "cpo_trl"])
def test_cpo_rows_equal_the_reference_probe_and_gesims_loss(name, tmp_path, one_thread):
    """CPOTrainer (SimPO; CPO with its batch NLL term): d_w, d_l read from the logits' gradient
    equal gesim's registered loss with trl's parameters, ip/nw2/nl2 the reference probe (1e-10)."""
    from gesim import losses

    params, cfg = {"simpo": ({"beta": 2.0, "gamma": 0.5}, {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0,
                                                             "simpo_gamma": 0.5}),
                   "cpo_trl": ({"beta": 0.3, "alpha": 0.7, "eps": 0.1}, {"loss_type": "sigmoid", "cpo_alpha": 0.7,
                                                                       "beta": 0.3, "label_smoothing": 0.1})}[name]
    trainer = _cpo_trainer(tmp_path, **cfg)
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    seen = _capture(trainer)
    trainer.train()
    table = cb.table()
    for k, (state, inputs) in enumerate(seen):
        rows = table["step"] == k + 1
        B, ids, labels = trl_layout.read_cpo_layout(inputs)
        mask = (labels != -100).long()
        pb = lm.PairBatch(ids[:B], ids[B:], mask[:B], mask[B:])
        ref = probe.pair_stats(_fresh(state, torch.float64), pb, backend="reference")
        for key in ("ip", "nw2", "nl2", "lw", "ll"):
            want = ref[key].numpy()
            assert np.max(np.abs(table[key][rows] - want)) <= 1e-10 * np.abs(want).max(), key
        len_w, len_l = table["len_w"][rows], table["len_l"][rows]
        d_w, d_l = symbolic.derive(name).weights(table["lw"][rows], table["ll"][rows], 0.0, 0.0, len_w, len_l,
                                                 **params, **losses.trl_batch_params(name, len_w))
        np.testing.assert_allclose(table["d_w"][rows], d_w, rtol=1e-10)
        np.testing.assert_allclose(table["d_l"][rows], d_l, rtol=1e-10)


def test_logit_token_weights_read_k_and_refuse_other_logit_terms():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]])
    k_true = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.7, -0.1]], dtype=torch.float64)
    lp = torch.log_softmax(z[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels[:, 1:] != -100
    (g,) = torch.autograd.grad((lp * k_true * mask).sum(), z, retain_graph=True)
    torch.testing.assert_close(trl_layout.logit_token_weights(z, g, labels), k_true * mask)
    zs = z[:, :-1]
    entropy = -(torch.softmax(zs, -1) * torch.log_softmax(zs, -1)).sum()  # a term on other logits
    (g2,) = torch.autograd.grad((lp * k_true * mask).sum() + 0.1 * entropy, z, retain_graph=True)
    with pytest.raises(GesimError, match="not a multiple"):
        trl_layout.logit_token_weights(z, g2, labels)
    (g3,) = torch.autograd.grad((lp * k_true * mask).sum() + z[:, -1].sum(), z)
    with pytest.raises(GesimError, match="last position"):
        trl_layout.logit_token_weights(z, g3, labels)


def test_orpo_is_refused_its_nll_reaches_the_prompt():
    class ORPOTrainer:
        pass

    with pytest.raises(GesimError, match="prompt tokens"):
        trl_layout.check_trainer(ORPOTrainer())


def test_ld_dpo_rows_use_trls_length_desensitised_log_probs(tmp_path, one_thread):
    """ld_alpha: trl weighs the tokens past the shorter response of the pair by ld_alpha; the rows'
    lw, ll are those weighted log-probs (trl's logged logps/*), and d_w, d_l read from the
    backward are DPO's weights on them (the gradient r = c grad lw holds for the weighted lw)."""
    trainer = _trainer(tmp_path, steps=2, batch=3, dtype=torch.float64, bf16=False, lr=1e-2, ld_alpha=0.5)
    cb = TrainEntanglementCallback(out_dir=False).attach(trainer)
    seen = _capture(trainer)
    trainer.train()
    table = cb.table()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    for k, (_, inputs) in enumerate(seen):
        rows = table["step"] == k + 1
        assert logged[k]["logps/chosen"] == pytest.approx(table["lw"][rows].mean(), rel=1e-5)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        with torch.no_grad():
            lp = trainer.ref_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   labels=labels, fused_lm_head=True, use_cache=False).log_probs
        w = trl_layout.token_weights(inputs["completion_mask"][:, 1:].bool(), 0.5, torch.float64)
        assert set(torch.unique(w).tolist()) == {0.0, 0.5, 1.0}
        ref = (lp * (w == 1)).sum(1) + 0.5 * (lp * (w == 0.5)).sum(1)  # as trl sums them (float32)
        lw_ref, ll_ref = ref.double().chunk(2)
        d_w, d_l = symbolic.derive("dpo").weights(table["lw"][rows], table["ll"][rows], lw_ref, ll_ref,
                                                  beta=trainer.beta)
        np.testing.assert_allclose(table["d_w"][rows], d_w, rtol=LOGP_RTOL)  # trl's loss is float32
        np.testing.assert_allclose(table["d_l"][rows], d_l, rtol=LOGP_RTOL)
