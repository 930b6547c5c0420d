"""EntanglementCallback inside a real trl DPOTrainer run on CPU (tiny GPT-2 from a config):
it adds its metrics to the trainer's rows and removes nothing."""

import copy

import pytest

pytest.importorskip("trl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gesim import GesimError, probe, regimes  # noqa: E402
from gesim.integrations.trl import EntanglementCallback  # noqa: E402
from gesim.probe import toy  # noqa: E402

TRAINER_KEYS = ("loss", "grad_norm", "learning_rate", "epoch")


def _train(tmp_path, callback: bool, steps=4, every=2, logging_steps=2, lr=1e-3, dtype=torch.float32):
    import datasets
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    model = toy.build_model("gpt2", vocab_size=len(tok), d=16).to(dtype)
    rows = toy.toy_rows(8, seed=1)
    config = DPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=lr,
                       logging_steps=logging_steps, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=config,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    cb = None
    if callback:
        cb = EntanglementCallback(rows[:3], tok, every=every, loss="dpo", loss_params={"beta": 0.1}).attach(trainer)
    return trainer, cb


def _trainer_part(row):
    return {k: v for k, v in row.items() if k in TRAINER_KEYS or k.startswith(("rewards/", "logps/", "logits/"))}


def test_callback_adds_to_the_trainers_log_rows_and_removes_nothing(tmp_path, one_thread):
    plain, _ = _train(tmp_path / "a", callback=False)
    plain.train()
    probed, cb = _train(tmp_path / "b", callback=True)
    before = probe.pair_stats(probed.model, cb.batch)
    probed.train()
    a, b = plain.state.log_history, probed.state.log_history
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no row added or removed
    assert any("loss" in r and "rewards/chosen" in r and "logps/chosen" in r for r in a)
    for ra, rb in zip(a, b):
        assert _trainer_part(ra).keys() == _trainer_part(rb).keys()
        for k, v in _trainer_part(ra).items():
            assert np.isclose(rb[k], v, rtol=1e-9, atol=0), k
    logged = [r for r in b if "entanglement/mean_cos" in r]
    assert [r["entanglement/step"] for r in logged] == [2, 4] and all("loss" in r for r in logged)
    last = logged[-1]
    assert abs(sum(last[f"entanglement/frac_{k}"] for k in regimes.REGIMES) - 1) < 1e-12
    assert last["entanglement/preconditioned"] == 1.0  # AdamW state exists after the first step
    after = probe.pair_stats(probed.model, cb.batch)
    assert np.isclose(last["entanglement/mean_cos"], float(after["cos"].mean()), rtol=1e-5)
    assert not torch.allclose(before["cos"], after["cos"])  # training moved the model
    assert all(p.requires_grad for p in probed.model.parameters())  # probe restored the flags


def test_one_step_prediction_matches_the_realised_change(tmp_path, one_thread):
    """pred_delta_*_batch is the first-order prediction of real_delta_* (the same step): at a
    small learning rate they agree to 1% (sign and value)."""
    trainer, cb = _train(tmp_path, callback=True, steps=3, every=1, logging_steps=1, lr=1e-4,
                         dtype=torch.float64)  # a float32 lw moves by ~1e-3 in rounding alone
    trainer.train()
    rows = [r for r in trainer.state.log_history if "entanglement/real_delta_lw" in r]
    assert rows
    for r in rows:
        for key in ("lw", "ll"):
            real, pred = r[f"entanglement/real_delta_{key}"], r[f"entanglement/pred_delta_{key}_batch"]
            assert abs(real - pred) <= 0.01 * abs(real), (key, real, pred)


def test_adam_preconditioner_is_read_from_the_optimizer_state():
    tok = toy.build_tokenizer()
    model = toy.build_model("gpt2", vocab_size=len(tok), d=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    cb = EntanglementCallback(toy.toy_rows(2), tok)
    assert cb._precond(model, opt) is None  # no step taken: no second moment yet
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    opt.step()
    P = cb._precond(model, opt)
    p = next(model.parameters())
    v = opt.state[p]["exp_avg_sq"]
    assert torch.allclose(P[p], 1 / ((v / (1 - 0.99 ** 2)).sqrt() + 1e-8))


def test_callback_bad_input():
    with pytest.raises(GesimError, match="rows need a tokenizer"):
        EntanglementCallback(toy.toy_rows(2))
    with pytest.raises(GesimError, match="every must be a positive"):
        EntanglementCallback(toy.toy_rows(2), toy.build_tokenizer(), every=0)
    with pytest.raises(GesimError, match="unknown loss"):
        EntanglementCallback(toy.toy_rows(2), toy.build_tokenizer(), loss="dpoo")
