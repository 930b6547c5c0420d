"""One harness for the alignment tax (docs/theory.md section 6.6) on the small Transformer.

Stages: pretrain theta_b (next-token prediction on reviews alone) -> SFT theta_r (review,
label and a slot-filled suffix, the behaviour to keep) -> preference optimisation on
``long-suffix`` pairs from theta_r (also the reference). The preference data rewards the
correct label and, through the shared suffix, entangles: it also pushes the SFT suffix
behaviour down, so a tax exists.

* reward: the exact mean probability of the correct label given the review, on held-out
  reviews (one forward pass);
* tax: the increase of the held-out SFT suffix NLL (mean per token) over theta_r's, and of
  the pretraining NLL over theta_b's.

Every method is a point (or a path) in the (tax, reward) plane: early stopping (the path of
AdamW), model averaging of theta_r and the final model, HMA at the same mean ratios, and OMO
(OnDARE, OnTIES) around AdamW.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from gesim import lm
from gesim.methods import averaging, omo
from gesim.transformer import data
from gesim.transformer.train import TrainConfig, build_model, pair_objective

STRUCTURE = "long-suffix"


@dataclass(frozen=True)
class TaxConfig:
    """The harness's sizes: the Transformer config plus the three stages' lengths."""

    model: TrainConfig = TrainConfig.fast()
    pretrain_steps: int = 50
    pref_steps: int = 100
    lr: float = 1e-4
    record_every: int = 10
    n_heldout: int = 128
    ratios: tuple = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    hma_ratios: tuple = (0.25, 0.5, 0.75)
    omo_alpha: float = 1e-3
    omo_p: float = 0.3

    @classmethod
    def fast(cls, **overrides):
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides):
        return dataclasses.replace(cls(model=TrainConfig.full(), pretrain_steps=1000, pref_steps=300,
                                       n_heldout=512), **overrides)


def _heldout(cfg: TaxConfig):
    """Held-out SFT sequences, the label position and the prompt (pretraining) masks."""
    lang = data.Language()
    ps = data.pairs(STRUCTURE, cfg.n_heldout, cfg.model.seed + 11, lang)
    ids, mask = ps.batch.chosen_ids, ps.batch.chosen_mask
    label_pos = ps.prompt_len  # the response starts with the label
    T = ids.shape[1]
    prompt = (torch.arange(T)[None, :] < ps.prompt_len[:, None]).float()
    prompt[:, 0] = 0
    suffix = mask.clone()
    suffix[torch.arange(len(ids)), label_pos] = 0
    wrong = ps.batch.rejected_ids[torch.arange(len(ids)), label_pos]
    return {"ids": ids, "prompt": prompt, "suffix": suffix, "label_pos": label_pos,
            "right": ids[torch.arange(len(ids)), label_pos], "wrong": wrong}


@torch.no_grad()
def evaluate(model, held: dict) -> dict:
    """reward = mean P(correct label | review); NLLs of the SFT suffix and of the review text."""
    logp = lm.token_logps(lm.logits(model, held["ids"]), held["ids"])  # (N, T)
    rows = torch.arange(len(held["ids"]))
    reward = logp[rows, held["label_pos"]].exp().mean()
    nll = lambda m: float(-(logp * m).sum() / m.sum())  # noqa: E731
    return {"reward": float(reward), "sft_nll": nll(held["suffix"]), "pretrain_nll": nll(held["prompt"])}


def stages(cfg: TaxConfig):
    """theta_b after pretraining and the SFT model theta_r (a module), deterministic in the seed."""
    from gesim.transformer.train import sft

    m = cfg.model
    torch.manual_seed(m.seed)
    model = build_model(m, len(data.Language()))
    held = _heldout(cfg)
    ps = data.pairs(STRUCTURE, m.n_train, m.seed + 21)
    ids = ps.batch.chosen_ids.to(m.device)
    prompt = (torch.arange(ids.shape[1])[None, :] < ps.prompt_len[:, None]).float().to(m.device)
    opt = torch.optim.AdamW(model.parameters(), lr=m.sft_lr)
    g = torch.Generator().manual_seed(m.seed + 22)
    for _ in range(cfg.pretrain_steps):
        rows = torch.randint(0, len(ids), (m.batch,), generator=g)
        pm = prompt[rows].clone()
        pm[:, 0] = 0
        nll = -(lm.token_logps(lm.logits(model, ids[rows]), ids[rows]) * pm).sum() / pm.sum()
        opt.zero_grad()
        nll.backward()
        opt.step()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sft(model, m, STRUCTURE)
    model.eval()
    return model, base, held


def _prefer(model, cfg: TaxConfig, held, opt) -> list[dict]:
    """DPO from the current model (the reference); (step, reward, tax...) every record_every steps."""
    m = cfg.model
    train = data.pairs(STRUCTURE, m.n_train, m.seed + 1).batch.to(m.device)
    with torch.no_grad():
        ref_w, ref_l = lm.pair_logps(model, train)
    len_w, len_l = train.chosen_mask.sum(1), train.rejected_mask.sum(1)
    objective = pair_objective("dpo", {})
    g = torch.Generator().manual_seed(m.seed + 3)
    path = [{"step": 0, **evaluate(model, held)}]
    for step in range(1, cfg.pref_steps + 1):
        rows = torch.randint(0, len(train), (m.batch,), generator=g)
        sub = lm.PairBatch(*(t[rows] for t in (train.chosen_ids, train.rejected_ids, train.chosen_mask,
                                                 train.rejected_mask)))
        L = objective(model, sub, ref_w[rows], ref_l[rows], len_w[rows], len_l[rows])
        opt.zero_grad()
        L.backward()
        opt.step()
        if step % cfg.record_every == 0:
            path.append({"step": step, **evaluate(model, held)})
    return path


def _with_tax(points, start):
    return [p | {"tax": p["sft_nll"] - start["sft_nll"], "pretrain_tax": p["pretrain_nll"] - start["pretrain_nll"]}
            for p in points]


def tax_study(cfg: TaxConfig | None = None, progress: bool = False) -> dict:
    """Every method's (tax, reward) points: the data of the ``alignment_tax_pareto`` figure."""
    import copy

    cfg = cfg or TaxConfig.fast()
    model, base, held = stages(cfg)
    theta_r = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = evaluate(model, held)
    runs = {}
    aligned = copy.deepcopy(model)
    runs["early_stopping"] = _prefer(aligned, cfg, held, torch.optim.AdamW(aligned.parameters(), lr=cfg.lr,
                                                                           weight_decay=0.0))
    theta = {n: p.detach().clone() for n, p in aligned.named_parameters()}
    probe_model = copy.deepcopy(model)

    def at(state):
        return evaluate(lm.at_params(probe_model, state), held)

    runs["model_averaging"] = [{"a": a, **at(averaging.average(theta_r, theta, a))} for a in cfg.ratios]
    samples = data.pairs(STRUCTURE, 64, cfg.model.seed + 31).batch
    with torch.no_grad():
        lw, ll = lm.pair_logps(aligned, samples)
    keep = lw > ll  # the aligned model's own high-reward samples: it ranks the correct label first
    runs["hma"] = []
    for a in cfg.hma_ratios:
        fit = averaging.fit_hma(probe_model, theta_r, theta, samples.chosen_ids[keep], samples.chosen_mask[keep], a)
        runs["hma"].append({"a": a, "ratios": fit["ratios"], **at(fit["state"])})
    for method in ("dare", "ties"):
        run_model = copy.deepcopy(model)
        params = list(run_model.parameters())
        names = [n for n, _ in run_model.named_parameters()]
        opt = omo.OnlineMerging(params, [base[n] for n in names], [theta_r[n] for n in names], lr=cfg.lr,
                                method=method, alpha=cfg.omo_alpha, p=cfg.omo_p, seed=cfg.model.seed)
        runs[f"omo_{method}"] = _prefer(run_model, cfg, held, opt)
    out = {name: _with_tax(points, start) for name, points in runs.items()}
    out["start"] = start
    out["config"] = dataclasses.asdict(cfg)
    out["best_reward_at_tax"] = _compare(out)
    return out


def _compare(out: dict, tax_cap: float | None = None) -> dict:
    """Highest reward each method reaches with tax at most the AdamW end point's tax."""
    cap = out["early_stopping"][-1]["tax"] if tax_cap is None else tax_cap
    best = {}
    for name in ("early_stopping", "model_averaging", "hma", "omo_dare", "omo_ties"):
        ok = [p["reward"] for p in out[name] if p["tax"] <= cap + 1e-12]
        best[name] = float(np.max(ok)) if ok else None
    return {"tax_cap": cap, "best_reward": best}
