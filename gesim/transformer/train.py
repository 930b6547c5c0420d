"""SFT, then preference optimisation, with the entanglement measurements of theory.md section 5.

On a fixed eval set of pairs, every ``eval_every`` steps:

* mean lw, ll (summed response log-probs) and the margin;
* per pair ip, nw2, nl2 and cos over all parameters (:func:`gesim.probe.pair_stats`);
* the realised change of every eval pair's lw and ll over the next optimizer step, next to
  the first-order prediction <grad lw, u> for the actual update u (theory.md section 3: this
  holds for any update, so it covers AdamW's preconditioned steps), computed as one
  symmetric difference along u (exact up to O(|u|^3)). ``regime_agreement`` is the fraction of eval pairs whose
  realised signs match the predicted ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from gesim import lm, losses, probe, regimes
from gesim.errors import GesimError
from gesim.transformer import data
from gesim.transformer.model import GPT, GPTConfig


@dataclass(frozen=True)
class TrainConfig:
    """One experiment: model size, SFT, preference optimisation, measurement."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 48
    block_size: int = 64
    sft_steps: int = 300
    sft_lr: float = 3e-3
    label_noise: float = 0.15
    n_train: int = 512
    n_eval: int = 16
    batch: int = 32
    pref_steps: int = 60
    lr: float = 1e-5
    optimizer: str = "adamw"
    eval_every: int = 10
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def fast(cls, **overrides) -> TrainConfig:
        """CPU, a tiny model: about ten seconds per dataset."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides) -> TrainConfig:
        """GPU: a model of a few million parameters, paper-sized preference phase."""
        return dataclasses.replace(cls(n_layer=4, n_head=4, n_embd=256, sft_steps=1500, n_train=4096, n_eval=64,
                                       pref_steps=200, eval_every=10), **overrides)


def _optimizer(name, params, lr):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise GesimError(f"unknown optimizer {name!r}; choose from: adamw, sgd")


def sft(model: GPT, cfg: TrainConfig, structure: str) -> list[float]:
    """Train on prompt + (noisy) label + suffix; returns the loss per step (mean token NLL)."""
    ids, mask = data.sft_sequences(structure, cfg.n_train, cfg.seed, cfg.label_noise)
    ids, mask = ids.to(cfg.device), mask.to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    history = []
    for _ in range(cfg.sft_steps):
        rows = torch.randint(0, len(ids), (cfg.batch,), generator=g)
        m = mask[rows].clone()
        m[:, 0] = 0
        nll = -(lm.token_logps(model(ids[rows]), ids[rows]) * m).sum() / m.sum()
        opt.zero_grad()
        nll.backward()
        opt.step()
        history.append(float(nll.detach()))
    return history


@torch.no_grad()
def _directional(model, at: dict, batch: lm.PairBatch, u: dict):
    """<grad lw_i, u> and <grad ll_i, u> at parameters ``at``, for every pair.

    The symmetric difference (f(at + u) - f(at - u)) / 2 equals <grad f, u> up to O(|u|^3):
    the even (curvature) terms cancel. Forward-mode AD would be exact, but torch has no
    forward derivative for CPU scaled-dot-product attention.
    """
    def f(sign):
        point = {n: at[n] + sign * u[n] for n in at}
        return lm.pair_logps(lambda x: functional_call(model, point, (x,)), batch)

    (pw, pl), (mw, ml) = f(1.0), f(-1.0)
    return (pw - mw) / 2, (pl - ml) / 2


def preference(model: GPT, cfg: TrainConfig, structure: str, loss: str, params: dict, progress=False) -> dict:
    """Preference optimisation against the SFT model as reference; returns the history."""
    lossfn = losses.get(loss)
    lossfn.params(**params)
    train = data.pairs(structure, cfg.n_train, cfg.seed + 1).batch.to(cfg.device)
    evals = data.pairs(structure, cfg.n_eval, cfg.seed + 2).batch.to(cfg.device)
    with torch.no_grad():
        ref_w, ref_l = lm.pair_logps(model, train)
    len_w, len_l = train.chosen_mask.sum(1), train.rejected_mask.sum(1)
    opt = _optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    history = []
    steps = range(cfg.pref_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{structure} {loss}", unit="step")
    for step in steps:
        rows = torch.randint(0, len(train), (cfg.batch,), generator=g)
        sub = lm.PairBatch(*(t[rows] for t in (train.chosen_ids, train.rejected_ids, train.chosen_mask,
                                                 train.rejected_mask)))
        measure = step % cfg.eval_every == 0 or step == cfg.pref_steps - 1
        if measure:
            stats = probe.pair_stats(model, evals)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        lw, ll = lm.pair_logps(model, sub)
        L = lossfn("torch", lw, ll, ref_w[rows], ref_l[rows], len_w[rows], len_l[rows], **params).mean()
        opt.zero_grad()
        L.backward()
        opt.step()
        if measure:
            u = {n: p.detach() - before[n] for n, p in model.named_parameters()}
            pred_w, pred_l = _directional(model, before, evals, u)
            with torch.no_grad():
                after_w, after_l = lm.pair_logps(model, evals)
            real_w, real_l = after_w - stats["lw"], after_l - stats["ll"]
            agree = regimes.regime_codes(pred_w.numpy(), pred_l.numpy()) == regimes.regime_codes(
                real_w.numpy(), real_l.numpy())
            history.append({"step": step, "lw": float(stats["lw"].mean()), "ll": float(stats["ll"].mean()),
                            "cos": float(stats["cos"].mean()), "ip": float(stats["ip"].mean()),
                            "nw2": float(stats["nw2"].mean()), "nl2": float(stats["nl2"].mean()),
                            "loss": float(L.detach()), "regime_agreement": float(np.mean(agree)),
                            "pred_dlw": float(pred_w.mean()), "real_dlw": float(real_w.mean()),
                            "pred_dll": float(pred_l.mean()), "real_dll": float(real_l.mean())})
    return {"history": history}


def run(structure: str, loss: str = "dpo", params: dict | None = None, cfg: TrainConfig | None = None,
        progress: bool = False) -> dict:
    """SFT then preference optimisation on one dataset; a summary plus the history."""
    cfg = cfg or TrainConfig.fast()
    params = params or {}
    torch.manual_seed(cfg.seed)
    lang = data.Language()
    model = GPT(GPTConfig(vocab_size=len(lang), block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd)).to(cfg.device)
    sft_loss = sft(model, cfg, structure)
    model.eval()
    out = preference(model, cfg, structure, loss, params, progress)
    h = out["history"]
    return {"dataset": structure, "loss": loss, "params": params, "steps": cfg.pref_steps,
            "sft_loss_first": sft_loss[0], "sft_loss_last": sft_loss[-1],
            "cos_first": h[0]["cos"], "cos_last": h[-1]["cos"], "cos_mean": float(np.mean([r["cos"] for r in h])),
            "lw_start": h[0]["lw"], "lw_end": h[-1]["lw"], "ll_start": h[0]["ll"], "ll_end": h[-1]["ll"],
            "regime_agreement": float(np.mean([r["regime_agreement"] for r in h])), "history": h,
            "config": dataclasses.asdict(cfg)}
