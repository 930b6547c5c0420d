"""One harness for the alignment tax (docs/theory.md section 6.6) on the small Transformer.

Stages, all on the offline review language (:mod:`gesim.transformer.data`):

1. pretrain theta_b: next-token prediction on review text alone;
2. SFT theta_r (also the DPO reference): review -> label + a slot-filled ``long-suffix``, the
   label flipped with probability ``sft_label_noise``, so the SFT model labels well but not
   perfectly and keeps a suffix behaviour (the ability to keep);
3. preference optimisation on ``pref_structure`` pairs (default ``1t``: chosen = correct label
   + <eos>, rejected = the other label + <eos>). The data asks for the correct label and, by
   ending the response right after it, pulls against the SFT suffix: a real trade-off.

Measured on held-out reviews (disjoint draws from the training data):

* **reward** = P(first response token = the preferred label | review), the exact expected
  fraction of sampled responses that carry the preferred label (one forward pass; the
  ``sampled_reward`` draws one response label per review to show the same number with sampling
  noise); next to it the likelihood-based numbers of held-out preference pairs (mean chosen
  log-prob ``lw``, rejected ``ll``, ``margin``);
* **tax** = the held-out SFT suffix NLL (nats/token) minus theta_r's, and **pretrain_tax** =
  the held-out review-text NLL minus theta_r's: abilities the preference data does not target.

Why this setting (small timed runs, fast config, one thread): with the label as the reward the
tiny SFT model labels at chance in most seeds (P(correct) about 0.5 after 200-400 SFT steps),
and DPO on the label then pushes both labels down (P(correct) 0.49 -> 0.02): no trade-off to
study. The opener needs no classification: at lr 3e-4 AdamW DPO lifts P(rated) from about 0.16
to 0.4-0.6 within 10-50 steps at a suffix tax of +0.4 to +1 nats/token.

**The AdamW end point** is chosen on a validation split (:func:`heldout` with
``split="val"``, reviews disjoint from the test ones): the recorded checkpoint of the AdamW path
with the highest validation reward, the earliest among ties (:func:`end_index`;
``TaxConfig.end_point="last"`` takes the last step instead). Choosing the checkpoint on
validation data is what a practitioner does and uses no test review; the last step's numbers
are reported next to it (``last_reward`` in :mod:`gesim.methods.tax`).

Why not the last step: the run itself displaces the chosen opener in some seeds. Measured
(seeds 0-10 and 67889, lr 3e-4, 60 steps, one thread, with the harness's former streams: a
global torch seed and seed + k generators; with the current hashed streams the numbers over
seeds 0-10 are in bench/results/tax_study.json, where seed 2's last step falls below SFT,
0.155 against 0.170, after a validation-chosen peak of 0.451 at step 15): DPO lowers the rejected openers'
log-probs by 2-5 nats and the mass they lose goes to tokens in neither response ("was", "the",
"camera": 1% of the opener position's mass at SFT, 30-90% after 15-60 steps); in seeds 8 and
67889 the chosen "rated" goes down with them (P 0.37-0.49 at step 10, 0.10-0.15 at step 60,
below the SFT model's 0.15-0.21) while the margin keeps growing. That is gradient entanglement,
not noise (the reward's standard error over 128 test reviews is about 0.001, ``reward_se``;
validation and test rewards agree to 0.02): with most of the mass on tokens outside the pair,
grad log p(y) = grad z_y - E_p[grad z] is dominated by the shared E_p term for chosen and
rejected alike, and the held-out opener pairs' raw-gradient cosine goes from below 0 at SFT
(every pair ideal) to 0.93-0.97 from step 15 on in seed 8 (the chosen falls under a one-pair
step for 20-75% of pairs), against at most 0.5 in seed 1 (none falls). A lower step size slows
the displacement but does not remove it: at lr 1e-4 over 120 steps (seeds 0-5) the reward
peaks at 0.35-0.50 and then falls in 4 of 6 seeds, in seed 4 to 0.17, below its SFT model's 0.18.

Every stage trains through the one loop of :mod:`gesim.transformer.loop` (pretraining and the
preference stage here, SFT in :func:`gesim.transformer.train.sft`); the model's init and the
batches, and every data draw (pretraining reviews, preference pairs, the test and validation
splits, HMA's samples) come from the run's own (seed, stage) streams
(:func:`gesim.transformer.train.stage_seed`), never from torch's global generator nor from
``seed + k`` offsets (with those, seed s's k-th stream was seed s+1's (k-1)-th).

Every method is a point or a path in the (tax, reward) plane (:mod:`gesim.methods.tax`
compares them over seeds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from gesim import lm
from gesim.errors import GesimError
from gesim.transformer import data, loop
from gesim.transformer.train import TrainConfig, init_model, pair_objective, stage_seed, token_nll

SFT_STRUCTURE = "long-suffix"
PREFERRED = "rated"  # the suffix opening the preference data asks for
PREF_TOKENS = ("opener", "full")
END_POINTS = ("best_val", "last")
SPLITS = ("test", "val")


@dataclass(frozen=True)
class TaxConfig:
    """The harness's sizes: the Transformer config plus the stages' lengths and the method grid.

    ``omo_p`` and ``omo_alpha_over_lr`` span the OMO paper's ranges (p = 5e-4 .. 1e-2 stable,
    alpha 1e-7 .. 5e-6 at lr 1e-6, i.e. alpha / lr = 0.1 .. 5); ``omo_rescale`` follows the
    authors' code for OnDARE's dropout (kept entries divided by p, without which p = 1e-2 barely
    moves a model); OnTIES keeps its top-p entries unscaled (1/p on the largest entries diverges).
    ``end_point``: which checkpoint of the AdamW path is "the aligned model" (``"best_val"``: the
    highest validation reward, :func:`end_index`; ``"last"``: the last step).
    """

    model: TrainConfig = TrainConfig.fast(sft_steps=200, n_train=512)
    sft_label_noise: float = 0.25
    pref_tokens: str = "opener"
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    pref_steps: int = 60
    lr: float = 3e-4
    record_every: int = 5
    n_heldout: int = 128
    ratios: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    hma_ratios: tuple = (0.25, 0.5, 0.75)
    hma_steps: int = 30
    n_samples: int = 64
    omo_methods: tuple = ("dare", "ties")
    omo_p: tuple = (0.01,)
    omo_alpha_over_lr: tuple = (0.1, 5.0)
    omo_rescale: bool = True
    end_point: str = "best_val"

    def __post_init__(self):
        if self.pref_tokens not in PREF_TOKENS:
            raise GesimError(f"pref_tokens {self.pref_tokens!r}: choose from {', '.join(PREF_TOKENS)}")
        if self.end_point not in END_POINTS:
            raise GesimError(f"end_point {self.end_point!r}: choose from {', '.join(END_POINTS)}")
        for name in ("pretrain_steps", "pref_steps", "record_every", "n_heldout", "n_samples"):
            if getattr(self, name) < 1:
                raise GesimError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @classmethod
    def fast(cls, **overrides):
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def full(cls, **overrides):
        return dataclasses.replace(cls(model=TrainConfig.full(), pretrain_steps=1000, pref_steps=200,
                                       n_heldout=512, n_samples=256, hma_steps=100,
                                       omo_p=(1e-3, 1e-2, 0.1), omo_alpha_over_lr=(0.1, 1.0, 5.0)),
                                   **overrides)


def _prompt_mask(ids, prompt_len):
    m = (torch.arange(ids.shape[1], device=ids.device)[None, :] < prompt_len[:, None]).float()
    m[:, 0] = 0
    return m


def style_pairs(n: int, seed: int, tokens: str = "opener") -> tuple[lm.PairBatch, torch.Tensor]:
    """``n`` preference pairs for the preferred opening, and the prompt lengths.

    Both responses are the review's correct label + a 27-token slot-filled suffix + <eos>, in
    the SFT format; the chosen suffix opens with :data:`PREFERRED` ("rated N out of 10 ..."),
    the rejected one with any other piece. ``tokens="opener"``: lw and ll count the first
    suffix token only (the one the preference is about); ``"full"``: the whole responses.
    """
    if tokens not in PREF_TOKENS:
        raise GesimError(f"pref_tokens {tokens!r}: choose from {', '.join(PREF_TOKENS)}")
    lang = data.Language()
    rng = np.random.default_rng(seed)
    rows_w, rows_l, starts = [], [], []
    L = data.SUFFIX[SFT_STRUCTURE]
    for _ in range(n):
        prompt, label = lang.review(rng)
        rated = ["rated", data.NUMBERS[int(rng.integers(len(data.NUMBERS)))], "out", "of", "10"]
        chosen = (rated + lang.suffix(rng, L))[:L]
        other = lang.suffix(rng, L)
        while other[0] == PREFERRED:
            other = lang.suffix(rng, L)
        rows_w.append(lang.encode(prompt + [label] + chosen + ["<eos>"]))
        rows_l.append(lang.encode(prompt + [label] + other + ["<eos>"]))
        starts.append(len(prompt))
    batch = lm.PairBatch.from_rows(rows_w, rows_l, starts, lang.pad_id)
    ids_w, ids_l, mw, ml = batch.tensors()
    start = torch.tensor(starts)
    if tokens == "opener":
        mw, ml = torch.zeros_like(mw), torch.zeros_like(ml)
        rows = torch.arange(n)
        mw[rows, start + 1], ml[rows, start + 1] = 1.0, 1.0
    return lm.PairBatch(ids_w, ids_l, mw, ml), start


def heldout(cfg: TaxConfig, seed: int, split: str = "test") -> dict:
    """Held-out data: clean SFT sequences (correct label + suffix) with the opener position and
    the masks of the suffix after it and of the review text, plus held-out preference pairs
    (all from draws disjoint from the training data). ``split="val"``: the same from other
    draws, for choosing the AdamW end point (:func:`end_index`) without the test reviews."""
    if split not in SPLITS:
        raise GesimError(f"split {split!r}: choose from {', '.join(SPLITS)}")
    ps = data.pairs(SFT_STRUCTURE, cfg.n_heldout, stage_seed(seed, f"{split}-sft"))
    ids, mask = ps.batch.chosen_ids, ps.batch.chosen_mask
    rows, opener = torch.arange(len(ids)), ps.prompt_len + 1
    rest = mask.clone()
    rest[rows, ps.prompt_len] = 0
    rest[rows, opener] = 0
    pref, _ = style_pairs(cfg.n_heldout, stage_seed(seed, f"{split}-style"), cfg.pref_tokens)
    dev = cfg.model.device
    return {"ids": ids.to(dev), "prompt": _prompt_mask(ids, ps.prompt_len).to(dev), "rest": rest.to(dev),
            "opener": opener.to(dev), "label_pos": ps.prompt_len.to(dev), "pref": pref.to(dev), "seed": seed}


@torch.no_grad()
def evaluate(model, held: dict) -> dict:
    """reward (and ``reward_se``, its standard error over the held-out reviews), sampled_reward;
    the label's NLL; NLLs of the SFT suffix after the opener and of the
    review text; held-out preference pairs' mean lw, ll and margin."""
    ids = held["ids"]
    logits = lm.logits(model, ids)
    logp = lm.token_logps(logits, ids)  # (N, T)
    rows = torch.arange(len(ids), device=ids.device)
    at_opener = torch.softmax(logits[rows, held["opener"] - 1].double(), -1)  # (N, V)
    preferred = data.Language().index[PREFERRED]
    g = torch.Generator().manual_seed(held["seed"] + 13)
    drawn = torch.multinomial(at_opener.cpu(), 1, generator=g).squeeze(1)
    nll = lambda m: float(-(logp * m).sum() / m.sum())  # noqa: E731
    lw, ll = lm.pair_logps(model, held["pref"])
    p = at_opener[:, preferred]
    return {"reward": float(p.mean()), "reward_se": float(p.std() / len(p) ** 0.5) if len(p) > 1 else float("nan"),
            "sampled_reward": float((drawn == preferred).double().mean()),
            "label_nll": float(-logp[rows, held["label_pos"]].mean()),
            "sft_nll": nll(held["rest"]), "pretrain_nll": nll(held["prompt"]),
            "lw": float(lw.mean()), "ll": float(ll.mean()), "margin": float((lw - ll).mean())}


def stages(cfg: TaxConfig, seed: int):
    """(SFT model theta_r as a module, theta_b state after pretraining, held-out data), deterministic in seed."""
    from gesim.transformer.train import sft

    m = dataclasses.replace(cfg.model, seed=seed, label_noise=cfg.sft_label_noise)
    model = init_model(m)
    ps = data.pairs(SFT_STRUCTURE, m.n_train, stage_seed(seed, "pretrain-data"))
    ids = ps.batch.chosen_ids.to(m.device)
    prompt = _prompt_mask(ps.batch.chosen_ids, ps.prompt_len).to(m.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr)
    g = torch.Generator().manual_seed(stage_seed(seed, "pretrain-batches"))
    loop.train_steps(opt, lambda rows: token_nll(model, ids[rows], prompt[rows]), len(ids), m.batch, g,
                     range(cfg.pretrain_steps), device=m.device, autocast=m.autocast)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sft(model, m, SFT_STRUCTURE)
    model.eval()
    return model, base, heldout(cfg, seed)


def train_pairs(cfg: TaxConfig, seed: int) -> lm.PairBatch:
    return style_pairs(cfg.model.n_train, stage_seed(seed, "style-train"), cfg.pref_tokens)[0].to(cfg.model.device)


def prefer(model, cfg: TaxConfig, held: dict, opt, seed: int, loss: str = "dpo", on_record=None) -> list[dict]:
    """DPO (``loss``) from the current model, which is also the reference; the evaluation at
    step 0 and every ``record_every`` steps, each row {"step", **evaluate}, plus what
    ``on_record(step, model)`` returns (a dict, e.g. the validation reward; it may keep a copy
    of the model's state)."""
    m = cfg.model
    train = train_pairs(cfg, seed)
    with torch.no_grad():
        lw_ref, ll_ref = lm.pair_logps(model, train)
    len_w, len_l = train.chosen_mask.sum(1), train.rejected_mask.sum(1)
    objective = pair_objective(loss, {})
    g = torch.Generator().manual_seed(stage_seed(seed, "pref-batches"))

    def record(step):
        return {"step": step, **evaluate(model, held), **(on_record(step, model) if on_record else {})}

    path = [record(0)]

    def loss_of(rows):
        return objective(model, train.take(rows), lw_ref[rows], ll_ref[rows], len_w[rows], len_l[rows])

    loop.train_steps(opt, loss_of, len(train), m.batch, g, range(cfg.pref_steps), device=m.device,
                     autocast=m.autocast, callback=_Record(cfg, record, path))
    return path


class _Record(loop.Callback):
    """Appends ``record(step)`` to ``path`` every ``record_every`` steps and at the last."""

    def __init__(self, cfg: TaxConfig, record, path: list):
        self.cfg, self.record, self.path = cfg, record, path

    def after(self, step, rows, loss):
        if (step + 1) % self.cfg.record_every == 0 or step + 1 == self.cfg.pref_steps:
            self.path.append(self.record(step + 1))


def end_index(path: list[dict], rule: str = "best_val") -> int:
    """Which recorded point of a training path is its end point: ``"best_val"``, the highest
    ``val_reward`` (the earliest among ties: the fewest steps for the same validation reward);
    ``"last"``, the last one."""
    if not path:
        raise GesimError("end_index of an empty path")
    if rule not in END_POINTS:
        raise GesimError(f"end_point {rule!r}: choose from {', '.join(END_POINTS)}")
    if rule == "last":
        return len(path) - 1
    if any("val_reward" not in p for p in path):
        raise GesimError("end_point 'best_val' needs every path point's val_reward (prefer(..., on_record=...))")
    v = [p["val_reward"] for p in path]
    return int(np.argmax(v))


@torch.no_grad()
def sample(model, prompts: torch.Tensor, prompt_len: torch.Tensor, length: int, seed: int):
    """Ancestral samples of ``length`` response tokens after each prompt (ids (N, T), lengths (N,)).

    Returns (ids, response mask), right-padded; a response ends at its first <eos>."""
    lang = data.Language()
    N = len(prompts)
    T = int(prompt_len.max()) + length
    ids = torch.full((N, T), lang.pad_id, dtype=torch.long, device=prompts.device)
    for i in range(N):
        ids[i, : prompt_len[i]] = prompts[i, : prompt_len[i]]
    pos, done = prompt_len.clone(), torch.zeros(N, dtype=torch.bool, device=prompts.device)
    mask = torch.zeros(N, T, device=prompts.device)
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(N, device=prompts.device)
    for _ in range(length):
        logits = lm.logits(model, ids)[rows, pos - 1]
        tok = torch.multinomial(torch.softmax(logits.double(), -1).cpu(), 1, generator=g).squeeze(1).to(ids.device)
        live = ~done
        ids[rows[live], pos[live]] = tok[live]
        mask[rows[live], pos[live]] = 1.0
        done |= tok == lang.eos_id
        pos = torch.where(live, pos + 1, pos)
    return ids, mask


def high_reward_samples(aligned, cfg: TaxConfig, seed: int):
    """The aligned model's own samples on training reviews whose response opens with
    :data:`PREFERRED` (reward 1; HMA's fitting data): ids and response masks."""
    ps = data.pairs(SFT_STRUCTURE, cfg.n_samples, stage_seed(seed, "sample-prompts"))
    prompts, plen = ps.batch.chosen_ids.to(cfg.model.device), ps.prompt_len.to(cfg.model.device)
    ids, mask = sample(aligned, prompts, plen, data.SUFFIX[SFT_STRUCTURE] + 2, stage_seed(seed, "sample-draws"))
    keep = ids[torch.arange(len(ids), device=ids.device), plen + 1] == data.Language().index[PREFERRED]
    if not keep.any():
        raise GesimError(f"none of {len(ids)} samples of the aligned model opens with {PREFERRED!r}: "
                         "nothing to fit HMA on (train longer or draw more samples, n_samples)")
    return ids[keep], mask[keep]


