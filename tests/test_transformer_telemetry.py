"""gesim's trainer with telemetry: every training pair of every step recorded, the training
itself unchanged, per-step fractions in metrics.csv, one row per pair per step on disk."""

import csv
import dataclasses

import numpy as np
import pytest

from gesim import GesimError, regimes
from gesim.output import read_rows
from gesim.probe.telemetry import FRACTION_KEYS
from gesim.transformer.train import TrainConfig, run

TINY = TrainConfig.fast(n_embd=24, sft_steps=40, n_train=64, n_eval=4, batch=8, pref_steps=5, eval_every=2,
                        token_pairs=1)


@pytest.mark.parametrize("mode", ["pairs", "batch"])
def test_telemetry_leaves_training_unchanged_and_writes_every_pair(tmp_path, mode):
    plain = run("short-suffix", "dpo", cfg=TINY)
    got = run("short-suffix", "dpo", cfg=dataclasses.replace(TINY, telemetry=mode), out=tmp_path)
    assert got["history"] == plain["history"]  # same losses, log-probs, eval measurements, bit for bit
    assert got["pairs"] == plain["pairs"]
    assert [r["step"] for r in got["train_telemetry"]] == list(range(TINY.pref_steps))
    rows = read_rows(tmp_path / "train_pairs")
    assert len(rows["step"]) == TINY.pref_steps * TINY.batch
    assert sorted(set(rows["step"].tolist())) == list(range(TINY.pref_steps))
    assert set(rows["structure"].tolist()) == {"short-suffix"}
    assert np.isfinite(rows["cos"]).all() and (np.abs(rows["cos"]) <= 1 + 1e-6).all()
    assert set(rows["regime"].tolist()) <= set(range(len(regimes.REGIMES)))  # DPO: d_w, d_l > 0, never unknown
    # the own-step regime is the first-order rule on the row's own ip, nw2, nl2 and weights
    pred = regimes.regime_codes(*regimes.first_order(rows["d_w"], rows["d_l"], rows["ip"], rows["nw2"], rows["nl2"]))
    assert np.array_equal(pred, rows["regime"])
    assert ("batch_regime" in rows) == (mode == "batch")
    with open(tmp_path / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in table] == list(range(TINY.pref_steps))
    assert set(FRACTION_KEYS) <= set(table[0])
    for r, t in zip(table, got["train_telemetry"]):
        assert abs(sum(float(r[k]) for k in FRACTION_KEYS if k.startswith("train_frac_")) - 1) < 1e-9
        assert float(r["train_mean_cos"]) == pytest.approx(t["train_mean_cos"])
    assert table[2]["cos"] != "" and table[1]["cos"] == ""  # eval measurements stay on their own steps


def test_telemetry_refuses_a_custom_objective():
    with pytest.raises(GesimError, match="plain loss"):
        run("1t", "dpo", cfg=dataclasses.replace(TINY, telemetry="pairs", sft_steps=0, pref_steps=1),
            objective=lambda *a: None)


def test_telemetry_modes_come_from_the_registry():
    from gesim import registries
    from gesim.transformer import telemetry
    assert telemetry.MODES is registries.TELEMETRY


def test_unknown_telemetry_mode_refused():
    with pytest.raises(GesimError, match="telemetry mode"):
        TrainConfig.fast(telemetry="every")


def test_cli_telemetry_flag_writes_pair_rows(tmp_path, capsys):
    from gesim.cli import main
    rc = main(["transformer", "--dataset", "1t", "--steps", "2", "--telemetry", "pairs", "--out", str(tmp_path)])
    assert rc == 0
    assert len(read_rows(tmp_path / "train_pairs")["step"]) == 2 * TrainConfig.fast().batch


def test_training_telemetry_figure_shows_its_runs_data(monkeypatch):
    """The figure (on a tiny config) draws four panels and its summary is computed from the
    runs' per-step fractions and per-pair cosines."""
    from gesim import figures
    from gesim.figures import telemetry as fig_mod

    monkeypatch.setattr(fig_mod, "config", lambda ctx: dataclasses.replace(TINY, telemetry="pairs", pref_steps=3,
                                                                           sft_steps=20, token_pairs=0))
    fig, data = figures.registry()["training_telemetry"].fn(figures.Context("training_telemetry"))
    assert len(fig.axes) == 4 and {r["dataset"] for r in data["per_run"]} == set(fig_mod.DATASETS)
    for r in data["per_run"]:
        s = data["summary"][r["dataset"]]
        assert s["mean_cos"] == pytest.approx(float(np.mean(r["pair_cos"])))
        assert s["both_down"] == pytest.approx(float(np.mean(r["fractions"]["both_down"])))
        assert len(r["pair_cos"]) == 3 * TINY.batch
    assert "both down" in fig._suptitle.get_text()
