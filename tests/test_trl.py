"""EntanglementCallback inside a real trl DPOTrainer run on CPU (tiny GPT-2 from a config)."""

import copy

import pytest

pytest.importorskip("trl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gesim import GesimError, probe, regimes  # noqa: E402
from gesim.integrations.trl import EntanglementCallback  # noqa: E402
from gesim.probe import toy  # noqa: E402


def test_callback_logs_diagnostics_during_dpo_training(tmp_path):
    import datasets
    from trl import DPOConfig, DPOTrainer

    tok = toy.build_tokenizer()
    model = toy.build_model("gpt2", vocab_size=len(tok), d=16)
    rows = toy.toy_rows(8, seed=1)
    config = DPOConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=config,
                         train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    cb = EntanglementCallback(rows[:3], tok, every=2, loss="dpo", loss_params={"beta": 0.1}).attach(trainer)
    before = probe.pair_stats(trainer.model, cb.batch)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "entanglement/mean_cos" in h]
    assert [h["step"] for h in logged] == [2, 4] and [h["step"] for h in cb.history] == [2, 4]
    last = logged[-1]
    assert abs(sum(last[f"entanglement/frac_{k}"] for k in regimes.REGIMES) - 1) < 1e-12
    assert -1 <= last["entanglement/mean_cos"] <= 1 and "entanglement/real_delta_lw" in last
    assert "entanglement/real_delta_lw" not in logged[0]
    after = probe.pair_stats(trainer.model, cb.batch)
    assert np.isclose(last["entanglement/mean_cos"], float(after["cos"].mean()), rtol=1e-5)
    assert not torch.allclose(before["cos"], after["cos"])  # training moved the model
    assert all(p.requires_grad for p in trainer.model.parameters())  # probe restored the flags


def test_callback_bad_input():
    with pytest.raises(GesimError, match="rows need a tokenizer"):
        EntanglementCallback(toy.toy_rows(2))
    with pytest.raises(GesimError, match="every must be a positive"):
        EntanglementCallback(toy.toy_rows(2), toy.build_tokenizer(), every=0)
    with pytest.raises(GesimError, match="unknown loss"):
        EntanglementCallback(toy.toy_rows(2), toy.build_tokenizer(), loss="dpoo")
