"""The Transformer validation as a multi-seed experiment (issue 11; theory.md sections 4-5).

Three experiments, each a list of per-seed rows (plain dicts, JSON-able) that
:func:`aggregate` turns into a mean with its 95% t interval per number and :func:`claims`
into "holds in k/n seeds" (:mod:`gesim.claims`):

* :func:`structure_rows`: the paper's three structures (``1t``, ``short-suffix``,
  ``long-suffix``) trained with one loss, every measurement on (cosines, one-pair and
  whole-batch first-order checks).
* :func:`sweep_rows`: the mechanism itself. One SFT model per seed (trained on the 27-token
  suffix) and the same pairs cut to label + L suffix tokens, L in :data:`SWEEP_LENGTHS`,
  trained with each optimizer setting. Within a seed only L changes, so a difference between
  lengths is a paired comparison, free of the seed-to-seed spread of the SFT model.
* :func:`loss_rows`: every registered pairwise loss the trainer supports
  (:func:`supported_losses`, read from the registry at call time) with its default
  parameters and one shared budget on the long-suffix data.

Per run (``outcomes`` of :func:`gesim.transformer.measure.pair_outcomes`): mean cos at start
and end, the mean change of lw and ll over the run, the fractions of eval pairs whose chosen
fell / rejected rose, the fraction the start geometry predicts "chosen down" and the fraction
whose realised sign it got right (``agree_start``; for light runs also the first-order
prediction summed over every step, ``agree_sum``), and predicted / realised regime fractions.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np

from gesim import claims, losses, registries
from gesim.errors import GesimError
from gesim.transformer.train import TrainConfig, run

STRUCTURES = registries.PAPER_STRUCTURES
SWEEP_LENGTHS = (0, 1, 2, 4, 8, 16, 27)
SUMMARY = ("cos_first", "cos_last", "cos_mean", "lw_start", "lw_end", "ll_start", "ll_end", "regime_agreement",
           "pair_agreement")
OUTCOMES = ("cos_start", "cos_end", "dlw", "dll", "chosen_fell", "rejected_rose", "pred_fall_start", "agree_start")
LIGHT_OUTCOMES = OUTCOMES + ("pred_fall_sum", "agree_sum")
# The paper's reading of its cross-loss table: a chosen-side NLL term (or DPOP's penalty) keeps
# the chosen log-prob up; the plain margin losses let it fall.
KEEP_CHOSEN_UP = ("cpo", "rpo", "slic_hf", "rrhf", "orpo", "dpop")
LET_CHOSEN_FALL = ("dpo", "ipo", "simpo")


def sweep_settings(fast: bool = True) -> dict[str, dict]:
    """The optimizer settings of the suffix sweep (TrainConfig overrides), by name.

    AdamW lr 1e-5 is theory.md section 5's gentle regime (at 3e-5 every chosen log-prob falls,
    at >= 1e-4 the ``1t`` rise disappears); SGD's lr 0.03 is that section's upper end for SGD.
    """
    steps = 60 if fast else 200
    return {"adamw": {"optimizer": "adamw", "lr": 1e-5, "pref_steps": steps},
            "sgd": {"optimizer": "sgd", "lr": 0.03, "pref_steps": steps}}


def supported_losses() -> tuple[str, ...]:
    """Registered losses the trainer can train and check, read from the registry now: those
    the symbolic derivation handles (the one-pair check needs d_w, d_l), in registry order."""
    return tuple(n for n in losses.names() if _derivable(n, id(losses.get(n).fn)))


@cache
def _derivable(name: str, fn_id: int) -> bool:
    from gesim import symbolic

    try:
        symbolic.derive(name)
    except GesimError:
        return False
    return True


@cache
def _run(structure: str, loss: str, params: tuple, cfg: TrainConfig) -> dict:
    return run(structure, loss, dict(params), cfg=cfg)


def run_cached(structure: str, loss: str, cfg: TrainConfig, params: dict | None = None) -> dict:
    """:func:`gesim.transformer.train.run`, cached for the life of the process (figures share runs)."""
    return _run(structure, loss, tuple(sorted((params or {}).items())), cfg)


def _row(out: dict, keys) -> dict:
    return {k: out["outcomes"][k] for k in keys}


def structure_rows(seeds, cfg: TrainConfig, loss: str = "dpo", structures=STRUCTURES, tokens_on_first: bool = True):
    """One row per (seed, structure): the run's summary numbers and outcomes. Token cosines are
    measured on the first seed only (``tokens_on_first``), the costliest measurement."""
    rows = []
    for i, seed in enumerate(seeds):
        for name in structures:
            c = dataclasses.replace(cfg, seed=seed, token_pairs=cfg.token_pairs if i == 0 and tokens_on_first else 0)
            out = run_cached(name, loss, c)
            rows.append({"seed": seed, "structure": name, "loss": loss, **{k: out[k] for k in SUMMARY},
                         **_row(out, OUTCOMES), "pair_confusion": out["pair_confusion"],
                         "batch_confusion": out["batch_confusion"],
                         "history": [{k: r[k] for k in ("step", "lw", "ll", "cos")} for r in out["history"]]})
    return rows


def sweep_rows(seeds, cfg: TrainConfig, lengths=SWEEP_LENGTHS, settings: dict | None = None, loss: str = "dpo"):
    """One row per (seed, setting, suffix length) on the long-suffix SFT model."""
    settings = settings if settings is not None else sweep_settings()
    rows = []
    for seed in seeds:
        for name, over in settings.items():
            for length in lengths:
                c = dataclasses.replace(cfg, seed=seed, light=True, suffix_len=length, **over)
                out = run_cached("long-suffix", loss, c)
                rows.append({"seed": seed, "setting": name, "suffix_len": length, **_row(out, LIGHT_OUTCOMES)})
    return rows


def loss_budget(fast: bool = True) -> dict:
    """The cross-loss comparison's shared budget (TrainConfig overrides): the preset's AdamW lr
    1e-5 and batch for every loss; 30 steps in fast mode (23 losses x 3 seeds must fit the
    figure runner's CPU budget), 200 in full mode."""
    return {"pref_steps": 30 if fast else 200}


def loss_rows(seeds, cfg: TrainConfig, names=None, structure: str = "long-suffix", budget: dict | None = None):
    """One row per (seed, loss): every supported loss with its defaults, one shared budget."""
    names = supported_losses() if names is None else tuple(names)
    budget = budget if budget is not None else {}
    rows = []
    for seed in seeds:
        for name in names:
            out = run_cached(structure, name, dataclasses.replace(cfg, seed=seed, light=True, **budget))
            rows.append({"seed": seed, "loss": name, **_row(out, LIGHT_OUTCOMES),
                         "pred_regimes": out["outcomes"]["pred_regimes"],
                         "real_regimes": out["outcomes"]["real_regimes"]})
    return rows


def paired_rows(sweep, key: str = "dlw") -> list[dict]:
    """Per (seed, setting, L): ``key`` at L minus ``key`` at the shortest length of the same
    seed and setting (same SFT model, same prompts: the seed-to-seed spread cancels)."""
    base = {}
    for r in sweep:
        k = (r["seed"], r["setting"])
        if k not in base or r["suffix_len"] < base[k]["suffix_len"]:
            base[k] = r
    return [{"seed": r["seed"], "setting": r["setting"], "suffix_len": r["suffix_len"],
             f"{key}_minus_L0": r[key] - base[r["seed"], r["setting"]][key]} for r in sweep]


def aggregate(rows, by, keys) -> list[dict]:
    """Per group of ``by`` values (in first-seen order): n seeds and :func:`claims.spread` of each key."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), []).append(r)
    return [dict(zip(by, g)) | {"n": len(rs)} | {k: claims.spread(r[k] for r in rs).as_dict() for k in keys}
            for g, rs in groups.items()]


def _by_seed(rows, key):
    out: dict = {}
    for r in rows:
        out.setdefault(r["seed"], {})[r[key]] = r
    return out


def _claim(text: str, per_seed, detail: str = "") -> dict:
    h = claims.holds(per_seed)
    return {"claim": text, "holds": str(h), "k": h.k, "n": h.n, "per_seed": list(h.per_seed), "detail": detail}


def claims_table(structures=(), sweep=(), cross=(), agreement: float = 0.9) -> list[dict]:
    """The paper's claims, each checked on every seed ("holds in k/n")."""
    out = []
    if structures:
        s = _by_seed(structures, "structure")
        out.append(_claim("cos order at the end: long-suffix > short-suffix > 1t",
                          [d["long-suffix"]["cos_last"] > d["short-suffix"]["cos_last"] > d["1t"]["cos_last"]
                           for d in s.values()]))
        out.append(_claim("1t: cos < 0 at the start", [d["1t"]["cos_first"] < 0 for d in s.values()]))
        for name in STRUCTURES:
            want = "rises" if name == "1t" else "falls"
            out.append(_claim(f"{name}: mean chosen log-prob {want} over training",
                              [(d[name]["dlw"] > 0) == (want == "rises") for d in s.values()],
                              "mean over eval pairs of lw_final - lw_start"))
        out.append(_claim(f"first order: whole-batch and one-pair agreement >= {agreement} on every structure",
                          [all(r["regime_agreement"] >= agreement and r["pair_agreement"] >= agreement
                               for r in d.values()) for d in s.values()]))
    for setting in dict.fromkeys(r["setting"] for r in sweep):
        rows = [r for r in sweep if r["setting"] == setting]
        d = _by_seed(rows, "suffix_len")  # seed -> {L: row}
        lo, hi = min(r["suffix_len"] for r in rows), max(r["suffix_len"] for r in rows)
        out.append(_claim(f"sweep ({setting}): start cos increases with the suffix length",
                          [_increasing([v[L]["cos_start"] for L in sorted(v)]) for v in d.values()]))
        out.append(_claim(f"sweep ({setting}): more pairs' chosen falls at L={hi} than at L={lo}",
                          [v[hi]["chosen_fell"] > v[lo]["chosen_fell"] for v in d.values()]))
        out.append(_claim(f"sweep ({setting}): mean chosen change lower at L={hi} than at L={lo}",
                          [v[hi]["dlw"] < v[lo]["dlw"] for v in d.values()], "paired within each seed"))
        out.append(_claim(f"sweep ({setting}): mean chosen log-prob falls at L={hi}",
                          [v[hi]["dlw"] < 0 for v in d.values()]))
        out.append(_claim(f"sweep ({setting}): summed first-order prediction gets >= {agreement} of the signs "
                          "of delta lw right at every length",
                          [all(r["agree_sum"] >= agreement for r in v.values()) for v in d.values()]))
    if cross:
        c = _by_seed(cross, "loss")
        up = [n for n in KEEP_CHOSEN_UP if n in next(iter(c.values()))]
        down = [n for n in LET_CHOSEN_FALL if n in next(iter(c.values()))]
        for name in up + down:
            want = name in up
            out.append(_claim(f"cross-loss: {name} {'keeps the chosen up' if want else 'lets the chosen fall'}",
                              [(d[name]["dlw"] > 0) == want for d in c.values()],
                              "sign of the mean lw_final - lw_start over eval pairs"))
        out.append(_claim("cross-loss: the paper's reading holds for all of " + ", ".join(up + down),
                          [all((d[n]["dlw"] > 0) == (n in up) for n in up + down) for d in c.values()]))
    return out


def run_claims(rows, agreement: float = 0.9) -> list[dict]:
    """Claims about one (structure, loss) over seeds (the CLI's ``--seeds``): per-seed summary rows in."""
    return [_claim("mean chosen log-prob rises over training", [r["dlw"] > 0 for r in rows]),
            _claim("mean rejected log-prob falls over training", [r["dll"] < 0 for r in rows]),
            _claim("mean cos(g_w, g_l) > 0 at the start", [r["cos_first"] > 0 for r in rows]),
            _claim(f"first order: whole-batch and one-pair agreement >= {agreement}",
                   [r["regime_agreement"] >= agreement and r["pair_agreement"] >= agreement for r in rows])]


def claims_markdown(table) -> str:
    """A claims table as Markdown: claim, "holds in k/n", detail."""
    lines = ["| claim | holds | |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['holds']} | {c['detail']} |" for c in table]
    return "\n".join(lines)


def _increasing(values) -> bool:
    return bool(np.all(np.diff(values) > 0))
