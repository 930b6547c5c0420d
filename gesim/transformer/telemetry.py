"""Every training pair of every preference step, in gesim's trainer (``TrainConfig.telemetry``).

The training step itself is recorded (:class:`gesim.probe.StepTelemetry`): the batch's one
stacked forward (chosen rows 0..B-1, rejected rows B..2B-1, :func:`gesim.lm.pair_logps`) and
its backward. The loss weights are read by autograd from the per-sequence log-probs of that
same graph (:func:`gesim.probe.loss_weights`: ``d_w = -B dL/dlw``, ``d_l = B dL/dll``), so
every pair gets the regime of its own step, cos, rho, ip, nw2 and nl2; with ``"batch"`` also
the regime and first-order change under the whole batch's SGD step (docs/theory.md section 8.8).
The step computes exactly the plain objective's loss and gradients (same operations, the
recorder only reads).

Per step: :data:`gesim.probe.telemetry.FRACTION_KEYS` (fractions of the batch's pairs in each
regime, mean cos) go to the result's ``train_telemetry`` (and ``metrics.csv``); per pair one
row (step, pair = position in the batch, index = row of the training set, structure, the
columns of :func:`gesim.probe.telemetry.pair_rows`) to ``train_pairs`` and, with an output
folder, to ``out/train_pairs/step-NNNNNN.parquet`` (CSV without pyarrow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gesim import lm, losses, regimes, registries
from gesim.errors import GesimError
from gesim.output import write_rows
from gesim.probe import StepTelemetry, loss_weights
from gesim.probe.telemetry import FRACTION_KEYS, pair_rows, step_fractions

MODES = registries.TELEMETRY
__all__ = ["FRACTION_KEYS", "MODES", "log", "metrics_rows", "recorder", "step"]


def recorder(model, mode: str, custom_objective: bool):
    """The recorder for ``TrainConfig.telemetry`` (None when "off")."""
    if mode == "off":
        return None
    if custom_objective:
        raise GesimError("telemetry needs the plain loss: a custom objective's loss weights d_w, d_l are unknown")
    return StepTelemetry(model, batch_gram=mode == "batch")


def step(tel, model, opt, batch: lm.PairBatch, loss: str, params: dict, refs, autocast):
    """One recorded training forward and backward (``opt.zero_grad()`` first, no optimizer step);
    returns (L, pair columns)."""
    lw_ref, ll_ref, len_w, len_l = refs
    B = len(batch)
    with tel.record(torch.arange(B), torch.arange(B, 2 * B)):
        with autocast:
            lw, ll = lm.pair_logps(model, batch)
            L = losses.get(loss)("torch", lw, ll, lw_ref, ll_ref, len_w, len_l, **params).mean()
        d_w, d_l, n = loss_weights(L, lw, ll)
        opt.zero_grad()
        L.backward()
    return L, pair_rows(tel.pop(), d_w, d_l, n)


def log(extra: dict, step_no: int, structure: str, rows: dict, index, out=None) -> dict:
    """Adds the step's fractions to ``extra["train_telemetry"]`` and its pairs to
    ``extra["train_pairs"]`` (and a part file under ``out``); returns the fractions."""
    fractions = {"step": step_no, **step_fractions(rows)}
    extra.setdefault("train_telemetry", []).append(fractions)
    B = len(rows["regime"])
    cols = {"step": np.full(B, step_no), "pair": np.arange(B), "index": np.asarray(index.cpu()),
            "structure": np.full(B, structure), **rows,
            "regime_name": np.array([regimes.REGIMES[c] if c >= 0 else "unknown" for c in rows["regime"]])}
    table = extra.setdefault("train_pairs", {})
    for k, v in cols.items():
        table.setdefault(k, []).extend(v.tolist())
    if out is not None:
        write_rows(Path(out) / "train_pairs", f"step-{step_no:06d}", cols)
    return fractions


def metrics_rows(history: list, telemetry: list) -> list:
    """``metrics.csv`` rows: every step with telemetry, merged with the measured rows."""
    by_step = {r["step"]: dict(r) for r in telemetry}
    for r in history:
        by_step.setdefault(r["step"], {}).update(r)
    return [by_step[s] for s in sorted(by_step)]
