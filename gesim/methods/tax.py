"""The alignment-tax study over seeds: every method in the (tax, reward) plane and the three
seed-paper claims, each with its 95% interval and "holds in k/n seeds" (:mod:`gesim.claims`).

Per seed (:func:`tax_seed`, on the harness of :mod:`gesim.methods.harness`):

* **early stopping**: the AdamW DPO path, evaluated every ``record_every`` steps; its **end
  point** theta_AdamW (the aligned model) is the checkpoint with the highest reward on the
  validation reviews (``TaxConfig.end_point``, :func:`gesim.methods.harness.end_index`; the
  harness's docstring says why not the last step), and the study reports the last step too;
* **model averaging**: theta(a) = (1 - a) theta_r + a theta_AdamW for ``ratios`` (a weights the
  aligned model, :mod:`gesim.methods.averaging`);
* **HMA** at the same mean ratios, fitted on the aligned model's own high-reward samples;
* **OMO** (OnDARE, OnTIES) around AdamW, for every (p, alpha) of the grid, each a path.

Comparisons at equal tax use a method's *front*: ``front_at(points, t)`` is the highest reward
on the piecewise-linear curve through ``points`` (in path order) at tax <= t, the reward of
its lowest-tax point when t lies below the whole curve (generous to the reference front).
Claims, per seed (Lin et al. 2024; Lu et al. 2024; docs/theory.md sections 6.5-6.6):

1. averaging beats early stopping: reward_avg(a) - front_at(early stopping, tax_avg(a)) > 0;
2. HMA beats averaging at the same mean ratio: reward_hma(a) - front_at(averaging, tax_hma(a)) > 0
   (the raw differences of reward and tax at the same a are reported too);
3. OMO beats AdamW at equal tax: the best reward of the OMO path with tax <= the AdamW end
   point's tax, minus early stopping's best reward under the same cap, > 0.

Both fronts and caps use every recorded checkpoint of a path (early stopping's past its end
point too), so a comparison is never made against a truncated AdamW path. The setting's own
check, "the AdamW end point's reward is clearly above the SFT model's", is ``reward_rises``:
the gain is > 0.05 and > 3 standard errors (the two models' ``reward_se`` over the test
reviews, added).

Every run pins torch to one thread (restored afterwards), so the numbers do not depend on the
machine's thread count.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from gesim import claims, lm
from gesim.errors import GesimError
from gesim.methods import averaging, harness, omo


def front_at(points: list[dict], t: float) -> float:
    """Highest reward on the piecewise-linear (tax, reward) curve through ``points`` at tax <= t."""
    if not points:
        raise GesimError("front_at of no points")
    tax = np.array([p["tax"] for p in points], dtype=float)
    rew = np.array([p["reward"] for p in points], dtype=float)
    best = rew[tax <= t].max() if np.any(tax <= t) else -np.inf
    for i in range(len(points) - 1):  # segments crossing t: the reward where they cross it
        t0, t1 = tax[i], tax[i + 1]
        if (t0 - t) * (t1 - t) < 0:
            best = max(best, rew[i] + (rew[i + 1] - rew[i]) * (t - t0) / (t1 - t0))
    return float(rew[np.argmin(tax)]) if best == -np.inf else float(best)


def best_within(points: list[dict], cap: float) -> float:
    """Highest reward among ``points`` with tax <= cap (NaN when none)."""
    ok = [p["reward"] for p in points if p["tax"] <= cap + 1e-12]
    return float(max(ok)) if ok else float("nan")


def omo_name(method: str, p: float, alpha_over_lr: float) -> str:
    return f"omo_{method}_p{p:g}_a{alpha_over_lr:g}"


def _with_tax(points, start):
    return [p | {"tax": p["sft_nll"] - start["sft_nll"], "pretrain_tax": p["pretrain_nll"] - start["pretrain_nll"]}
            for p in points]


def adamw_path(model, cfg: harness.TaxConfig, held: dict, seed: int) -> tuple[list[dict], int]:
    """AdamW DPO from ``model`` (trained in place): its path, every point with its validation
    reward, and the index of its end point (``cfg.end_point``); ``model`` is left at the end
    point's parameters."""
    val = harness.heldout(cfg, seed, split="val")
    states = []

    def keep(step, m):  # the validation reward of every checkpoint, and its state
        states.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return {"val_reward": harness.evaluate(m, val)["reward"]}

    path = harness.prefer(model, cfg, held, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0),
                          seed, on_record=keep)
    end = harness.end_index(path, cfg.end_point)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(states[end][n])
    return path, end


def _runs(cfg: harness.TaxConfig, seed: int) -> dict:
    model, base, held = harness.stages(cfg, seed)
    theta_r = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = harness.evaluate(model, held)
    runs = {}
    aligned = copy.deepcopy(model)
    runs["early_stopping"], end = adamw_path(aligned, cfg, held, seed)
    theta = {n: p.detach().clone() for n, p in aligned.named_parameters()}
    probe = copy.deepcopy(model)

    def at(state):
        return harness.evaluate(lm.at_params(probe, state), held)

    runs["model_averaging"] = [{"a": a, **at(averaging.average(theta_r, theta, a))} for a in cfg.ratios]
    ids, mask = harness.high_reward_samples(aligned, cfg, seed)
    runs["hma"] = []
    for a in cfg.hma_ratios:
        fit = averaging.fit_hma(probe, theta_r, theta, ids, mask, a, steps=cfg.hma_steps, seed=seed)
        runs["hma"].append({"a": a, "ratios": fit["ratios"], **at(fit["state"])})
    names = [n for n, _ in model.named_parameters()]
    for method in cfg.omo_methods:
        for p in cfg.omo_p:
            for r in cfg.omo_alpha_over_lr:
                run_model = copy.deepcopy(model)
                opt = omo.OnlineMerging(list(run_model.parameters()), [base[n] for n in names],
                                        [theta_r[n] for n in names], lr=cfg.lr, method=method, alpha=r * cfg.lr,
                                        p=p, rescale=cfg.omo_rescale and method == "dare", seed=seed)
                runs[omo_name(method, p, r)] = harness.prefer(run_model, cfg, held, opt, seed)
    out = {name: _with_tax(points, start) for name, points in runs.items()}
    out["start"] = start
    out["end"] = end
    out["n_hma_samples"] = len(ids)
    return out


def tax_seed(cfg: harness.TaxConfig, seed: int) -> dict:
    """One seed of the study: every method's points and the per-seed comparisons."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = _runs(cfg, seed)
    finally:
        torch.set_num_threads(n)
    es, avg = out["early_stopping"], out["model_averaging"]
    e, s0 = es[out["end"]], out["start"]
    cap = e["tax"]
    omos = [k for k in out if k.startswith("omo_")]
    inner = [p for p in avg if 0 < p["a"] < 1]
    by_a = {p["a"]: p for p in avg}
    out["seed"] = seed
    out["compare"] = {
        "end_step": e["step"], "end_reward_gain": e["reward"] - s0["reward"],
        "end_reward_se": e["reward_se"] + s0["reward_se"], "end_tax": cap, "end_pretrain_tax": e["pretrain_tax"],
        "last_reward_gain": es[-1]["reward"] - s0["reward"], "last_tax": es[-1]["tax"],
        "best_reward_at_tax": {k: best_within(out[k], cap)
                               for k in ["early_stopping", "model_averaging", "hma"] + omos},
        "avg_vs_es": {p["a"]: p["reward"] - front_at(es, p["tax"]) for p in inner},
        "hma_vs_avg": {h["a"]: h["reward"] - front_at(avg, h["tax"]) for h in out["hma"]},
        "hma_minus_avg_reward": {h["a"]: h["reward"] - by_a[h["a"]]["reward"] for h in out["hma"] if h["a"] in by_a},
        "hma_minus_avg_tax": {h["a"]: h["tax"] - by_a[h["a"]]["tax"] for h in out["hma"] if h["a"] in by_a},
        "omo_vs_adamw": {k: best_within(out[k], cap) - best_within(es, cap) for k in omos},
    }
    return out


def _table(per_seed: list[dict], key: str) -> dict:
    names = per_seed[0]["compare"][key].keys()
    return {str(k): claims.spread(s["compare"][key][k] for s in per_seed).as_dict() for k in names}


def _holds(per_seed: list[dict], key: str) -> dict:
    names = per_seed[0]["compare"][key].keys()
    return {str(k): claims.holds(s["compare"][key][k] > 0 for s in per_seed).as_dict() for k in names}


def summarise(per_seed: list[dict]) -> dict:
    """Spreads and claims over the seeds of :func:`tax_seed` results."""
    if not per_seed:
        raise GesimError("a tax study of no seeds")
    c = lambda k: [s["compare"][k] for s in per_seed]  # noqa: E731
    best = {k: claims.spread(b[k] for b in c("best_reward_at_tax")).as_dict()
            for k in per_seed[0]["compare"]["best_reward_at_tax"]}
    end = [s["early_stopping"][s["end"]] for s in per_seed]
    clearly = [s["compare"]["end_reward_gain"] > max(0.05, 3 * s["compare"]["end_reward_se"])
               for s in per_seed]
    return {
        "seeds": [s["seed"] for s in per_seed],
        "sft_reward": claims.spread(s["start"]["reward"] for s in per_seed).as_dict(),
        "end_step": claims.spread(p["step"] for p in end).as_dict(),
        "end_reward": claims.spread(p["reward"] for p in end).as_dict(),
        "end_sampled_reward": claims.spread(p["sampled_reward"] for p in end).as_dict(),
        "end_margin_change": claims.spread(p["margin"] - s["start"]["margin"] for p, s in zip(end, per_seed)).as_dict(),
        "end_lw_change": claims.spread(p["lw"] - s["start"]["lw"] for p, s in zip(end, per_seed)).as_dict(),
        "end_reward_gain": claims.spread(c("end_reward_gain")).as_dict(),
        "reward_rises": claims.holds(clearly).as_dict(),
        "last_reward": claims.spread(s["early_stopping"][-1]["reward"] for s in per_seed).as_dict(),
        "last_reward_gain": claims.spread(c("last_reward_gain")).as_dict(),
        "last_reward_rises": claims.holds(g > 0.05 for g in c("last_reward_gain")).as_dict(),
        "end_tax": claims.spread(c("end_tax")).as_dict(),
        "end_pretrain_tax": claims.spread(c("end_pretrain_tax")).as_dict(),
        "tax_positive": claims.holds(t > 0 for t in c("end_tax")).as_dict(),
        "best_reward_at_tax": best,
        "avg_vs_es": _table(per_seed, "avg_vs_es"), "avg_beats_es": _holds(per_seed, "avg_vs_es"),
        "hma_vs_avg": _table(per_seed, "hma_vs_avg"), "hma_beats_avg": _holds(per_seed, "hma_vs_avg"),
        "hma_minus_avg_reward": _table(per_seed, "hma_minus_avg_reward"),
        "hma_minus_avg_tax": _table(per_seed, "hma_minus_avg_tax"),
        "omo_vs_adamw": _table(per_seed, "omo_vs_adamw"), "omo_beats_adamw": _holds(per_seed, "omo_vs_adamw"),
    }


def tax_study(cfg: harness.TaxConfig | None = None, seeds=(0, 1, 2, 3, 4), progress: bool = False) -> dict:
    """The whole study: per-seed results (``per_seed``), their ``summary`` and the config."""
    cfg = cfg or harness.TaxConfig.fast()
    seeds = list(seeds)
    it = seeds
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(seeds, desc="tax study", unit="seed")
    per_seed = [tax_seed(cfg, s) for s in it]
    return {"per_seed": per_seed, "summary": summarise(per_seed), "config": dataclasses.asdict(cfg)}
