"""The multi-seed Transformer experiment (issue 11): per-seed rows, their spread, claims as
k/n, the suffix-length cut, the loss list read from the registry, and the --seeds CLI."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats

from gesim import losses
from gesim.cli import main
from gesim.transformer import data, experiment
from gesim.transformer.train import TrainConfig

TINY = TrainConfig.fast(n_embd=24, sft_steps=60, n_train=96, n_eval=6, batch=16, pref_steps=6, eval_every=5,
                        lr=1e-4)


@pytest.mark.parametrize("length", [0, 1, 5, 27])
def test_suffix_cut_keeps_the_draws_and_cuts_after_length_tokens(length):
    full, cut = data.pairs("long-suffix", 8, seed=4), data.pairs("long-suffix", 8, seed=4, suffix_len=length)
    for w, rej, fw in zip(cut.chosen, cut.rejected, full.chosen):
        assert w == fw[: 1 + length] and rej[1:] == w[1:] and {w[0], rej[0]} == {"positive", "negative"}
    assert (cut.batch.chosen_mask.sum(1) == 1 + length).all()
    assert (cut.prompt_len == full.prompt_len).all()


def test_suffix_cut_refuses_what_it_cannot_cut():
    with pytest.raises(Exception, match="outside"):
        data.pairs("short-suffix", 2, 0, suffix_len=6)
    with pytest.raises(Exception, match="label-first"):
        data.pairs("mid", 2, 0, suffix_len=1)
    with pytest.raises(Exception, match="suffix_len"):
        TrainConfig.fast(suffix_len=28)


def test_supported_losses_follow_the_registry():
    assert set(experiment.supported_losses()) <= set(losses.names()) and "dpo" in experiment.supported_losses()

    @losses.register("tmp_issue11", margin=True, source="test", beta=0.1)
    def tmp_issue11(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
        return -ops.log_sigmoid(beta * ((lw - lw_ref) - (ll - ll_ref)))

    try:
        assert "tmp_issue11" in experiment.supported_losses()
    finally:
        losses.unregister("tmp_issue11")
    assert "tmp_issue11" not in experiment.supported_losses()


def test_aggregate_and_claims_are_the_per_seed_numbers(one_thread):
    """Sweep and cross-loss on a tiny model, two seeds: every aggregate is the mean and t
    interval of the per-seed rows, every claim's k counts the seeds where it holds."""
    seeds = (0, 1)
    settings = {"adamw": {"optimizer": "adamw", "lr": 1e-4, "pref_steps": 4}}
    sweep = experiment.sweep_rows(seeds, TINY, lengths=(0, 8), settings=settings)
    assert [(r["seed"], r["suffix_len"]) for r in sweep] == [(0, 0), (0, 8), (1, 0), (1, 8)]
    for a in experiment.aggregate(sweep, ("setting", "suffix_len"), ("cos_start", "dlw")):
        vals = [r["dlw"] for r in sweep if r["suffix_len"] == a["suffix_len"]]
        half = stats.t.ppf(0.975, 1) * np.std(vals, ddof=1) / np.sqrt(2)
        assert a["n"] == 2 and a["dlw"]["mean"] == pytest.approx(np.mean(vals))
        assert a["dlw"]["hi"] - a["dlw"]["mean"] == pytest.approx(half)
    table = experiment.claims_table(sweep=sweep)
    fell = next(c for c in table if "more pairs' chosen falls" in c["claim"])
    by = {(r["seed"], r["suffix_len"]): r for r in sweep}
    assert fell["per_seed"] == [by[s, 8]["chosen_fell"] > by[s, 0]["chosen_fell"] for s in seeds]
    assert fell["k"] == sum(fell["per_seed"]) and fell["holds"] == f"{fell['k']}/2"
    cross = experiment.loss_rows(seeds, dataclasses.replace(TINY, pref_steps=4), names=("dpo", "cpo"))
    table = experiment.claims_table(cross=cross)
    assert [c["claim"] for c in table][:2] == ["cross-loss: cpo keeps the chosen up", "cross-loss: dpo lets the "
                                                                                      "chosen fall"]
    for r in cross:
        assert sum(r["pred_regimes"].values()) == pytest.approx(1)
        assert sum(r["real_regimes"].values()) == pytest.approx(1)


def test_the_shared_suffix_raises_the_start_cosine(one_thread):
    """theory.md section 4 on the tiny trained GPT: the same pairs cut longer have a larger
    start cosine."""
    settings = {"adamw": {"optimizer": "adamw", "lr": 1e-5, "pref_steps": 1}}
    rows = experiment.sweep_rows((0,), TINY, lengths=(0, 4, 27), settings=settings)
    cos = [r["cos_start"] for r in rows]
    assert cos[0] < cos[1] < cos[2]


def test_cli_seeds_reports_per_seed_aggregate_and_claims(capsys, one_thread):
    assert main(["transformer", "--structure", "1t", "--seeds", "0,2", "--steps", "3", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 2] and [r["seed"] for r in out["per_seed"]] == [0, 2]
    for key in ("cos_first", "dlw", "pair_agreement"):
        assert out["aggregate"][key]["mean"] == pytest.approx(np.mean([r[key] for r in out["per_seed"]]))
    rises = out["claims"][0]
    assert rises["k"] == sum(r["dlw"] > 0 for r in out["per_seed"]) and rises["n"] == 2
    assert main(["transformer", "--seeds", "3-1"]) == 2
    assert "seeds" in capsys.readouterr().err
