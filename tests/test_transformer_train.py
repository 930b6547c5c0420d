"""A tiny run trains: SFT loss falls, the DPO margin grows, the first-order prediction of the
actual AdamW step matches its realised sign, and the same seed gives the same numbers."""

from gesim.cli import main
from gesim.transformer.train import TrainConfig, run

TINY = TrainConfig.fast(n_embd=24, sft_steps=60, n_train=96, n_eval=6, batch=16, pref_steps=6, eval_every=5,
                        lr=1e-4)


def test_tiny_run_trains_and_predicts_the_realised_signs():
    out = run("short-suffix", "dpo", cfg=TINY)
    assert out["sft_loss_last"] < 0.6 * out["sft_loss_first"]
    h = out["history"]
    assert h[-1]["lw"] - h[-1]["ll"] > h[0]["lw"] - h[0]["ll"]  # the margin grows
    assert -1 <= out["cos_last"] <= 1 and out["regime_agreement"] >= 0.8
    for row in h:  # first order: <grad f, u> of the actual AdamW update is close to the realised change
        scale = max(abs(row["real_dlw"]), abs(row["real_dll"]))
        assert abs(row["pred_dlw"] - row["real_dlw"]) < 0.2 * scale
        assert abs(row["pred_dll"] - row["real_dll"]) < 0.2 * scale


def test_same_seed_same_numbers_and_cli_json(capsys):
    a = run("1t", "dpo", cfg=TINY)
    b = run("1t", "dpo", cfg=TINY)
    assert a["history"] == b["history"]
    assert main(["transformer", "--dataset", "1t", "--loss", "nope"]) == 2
    assert "unknown loss" in capsys.readouterr().err
