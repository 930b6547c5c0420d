"""Entanglement of every training pair at every step, read from the step's own backward pass.

Maths (docs/theory.md sections 2-3; derived here and tested in ``tests/test_telemetry.py``).
In a training step on a batch of B pairs with loss ``L = (1/B) sum_b loss(lw_b, ll_b, ...)``,
the chosen row of pair b contributes ``r_w = (dL/dlw_b) g_w = -(d_w/B) g_w`` to the gradient
of L and its rejected row ``r_l = (dL/dll_b) g_l = (d_l/B) g_l`` (``d_w = -dloss/dlw``,
``d_l = dloss/dll``; for any L, ``B dL/dlw_b = -d_w``). The recorder
(:class:`StepTelemetry`, hooks of :mod:`gesim.probe.recorder` on the probe's layer rules)
gives, per pair, ``rw2 = ||r_w||^2``, ``rl2 = ||r_l||^2`` and ``rwl = <r_w, r_l>`` exactly, and
on request the Gram of all recorded rows. From these alone:

* ``cos(g_w, g_l) = -sign(d_w) sign(d_l) cos(r_w, r_l)``: ``-cos(r_w, r_l)`` when d_w, d_l > 0;
  undefined (NaN) for a pair with d_w = 0 or d_l = 0 (its row contributes nothing).
* **Own step.** The pair's own share of an SGD step, ``u = -eta (r_w + r_l)``, moves
  ``lw`` by ``<g_w, u> = eta (B/d_w) (rw2 + rwl)`` and ``ll`` by
  ``<g_l, u> = -eta (B/d_l) (rwl + rl2)``, so
  ``sign(delta lw) = sign(d_w) sign(rw2 + rwl)``, ``sign(delta ll) = -sign(d_l) sign(rwl + rl2)``:
  the regime needs nothing of the loss beyond the signs of d_w, d_l. (Expanding with r_w, r_l:
  ``rw2 + rwl = (d_w/B^2)(d_w nw2 - d_l ip)``, theory.md's ``delta lw = eta (d_w nw2 - d_l ip)``
  up to the positive factor ``eta/B``.) A pair with exactly one zero weight has a row of zero
  and the other response's change ``-eta <g, r>`` is not in the Gram: code ``UNKNOWN`` (-1);
  both zero: ``stalled``.
* With d_w, d_l known: ``g_w = -B r_w / d_w``, ``g_l = B r_l / d_l``, so
  ``nw2 = B^2 rw2 / d_w^2``, ``nl2 = B^2 rl2 / d_l^2``, ``ip = -B^2 rwl / (d_w d_l)``.
* **Batch step** (``batch_gram=True``, rows K over all recorded rows, u = -eta sum_j r_j):
  ``delta lw_i = eta (B/d_w^i) sum_j K[w_i, j]``, ``delta ll_i = -eta (B/d_l^i) sum_j K[l_i, j]``
  to first order (exact as eta -> 0, error O(eta^2)); the step must be the gradient of the
  recorded L alone (one record block per optimizer step, plain SGD).

Source of the trick: per-sample gradient products from the training backward, as in ghost
clipping (Li et al. 2022; Opacus) and GhostSuite's in-run data Shapley; docs/theory.md section 8.8.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from gesim import dynamics, regimes
from gesim.errors import GesimError
from gesim.probe.recorder import Recorder

UNKNOWN = -1  # regime code of a pair whose change the row Gram cannot tell (exactly one zero weight)


@dataclass
class RowGram:
    """What one record block saw. Each (P,) in float32, float64 for float64 models; rows of
    ``gram`` (2P, 2P): the P chosen rows, then the P rejected rows, in the pairs' order."""

    rw2: torch.Tensor
    rl2: torch.Tensor
    rwl: torch.Tensor
    gram: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rw2)

    def cos(self, sign_dw=None, sign_dl=None) -> torch.Tensor:
        """cos(g_w, g_l) per pair: ``-cos(r_w, r_l)`` (d_w, d_l > 0, the default), else
        ``-sign(d_w) sign(d_l) cos(r_w, r_l)`` with the signs given."""
        c = -dynamics.cosine(self.rwl, self.rw2, self.rl2)
        if sign_dw is not None or sign_dl is not None:
            c = c * _sign(sign_dw, c) * _sign(sign_dl, c)
        return c

    def own_step_regimes(self, sign_dw, sign_dl) -> np.ndarray:
        """Regime codes (:data:`gesim.regimes.REGIMES`; ``UNKNOWN`` = -1) of each pair's own SGD
        step ``-eta (r_w + r_l)``, from the signs of d_w, d_l only (module docstring)."""
        sw, sl = _sign(sign_dw, self.rw2).cpu().numpy(), _sign(sign_dl, self.rw2).cpu().numpy()
        dlw = sw * np.sign((self.rw2 + self.rwl).detach().cpu().numpy())
        dll = -sl * np.sign((self.rwl + self.rl2).detach().cpu().numpy())
        codes = regimes.regime_codes(dlw, dll, sw, sl).astype(np.int64)
        codes[(sw == 0) != (sl == 0)] = UNKNOWN
        return codes

    def pair_stats(self, d_w, d_l, B) -> dict[str, torch.Tensor]:
        """``ip``, ``nw2``, ``nl2``, ``cos``, ``rho`` of g_w, g_l given the loss weights
        (g_w = -B r_w / d_w, g_l = B r_l / d_l; NaN where a weight is zero)."""
        d_w, d_l = (torch.as_tensor(d, dtype=self.rw2.dtype, device=self.rw2.device) for d in (d_w, d_l))
        nw2, nl2 = B * B * self.rw2 / (d_w * d_w), B * B * self.rl2 / (d_l * d_l)
        ip = -B * B * self.rwl / (d_w * d_l)
        return {"ip": ip, "nw2": nw2, "nl2": nl2, "cos": dynamics.cosine(ip, nw2, nl2), "rho": (nw2 / nl2).sqrt()}

    def batch_first_order(self, d_w, d_l, B, eta=1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """First-order (delta lw, delta ll) per pair under the SGD step ``-eta grad L`` of the
        recorded rows (needs ``batch_gram=True``)."""
        if self.gram is None:
            raise GesimError("batch_first_order needs the full row Gram: StepTelemetry(..., batch_gram=True)")
        P = len(self)
        d_w, d_l = (torch.as_tensor(d, dtype=self.gram.dtype, device=self.gram.device) for d in (d_w, d_l))
        s = self.gram.sum(1)  # <r_i, sum_j r_j>
        return eta * B / d_w * s[:P], -eta * B / d_l * s[P:]

    def batch_step_regimes(self, sign_dw, sign_dl) -> np.ndarray:
        """Regime codes of each pair under the whole batch's SGD step, from signs only."""
        sw, sl = _sign(sign_dw, self.rw2), _sign(sign_dl, self.rw2)
        dlw, dll = self.batch_first_order(sw + (sw == 0), sl + (sl == 0), 1.0)
        dlw, dll = dlw * (sw != 0), dll * (sl != 0)
        codes = regimes.regime_codes(dlw.cpu().numpy(), dll.cpu().numpy(), sw.cpu().numpy(), sl.cpu().numpy())
        codes = codes.astype(np.int64)
        codes[((sw == 0) != (sl == 0)).cpu().numpy()] = UNKNOWN
        return codes


def _sign(s, like):
    if s is None:
        return torch.ones_like(like)
    return torch.sign(torch.as_tensor(s, dtype=like.dtype, device=like.device))


class StepTelemetry:
    """Per-pair row Grams of training steps, read from their own backward pass.

    ``select``: ``"all"`` trainable parameters, ``"lora"`` or a predicate ``f(name, param)``
    (as :func:`gesim.probe.pair_stats`' ``params``). ``batch_gram``: also the full Gram of all
    recorded rows (for the batch step's first-order prediction; costlier).

    Usage, one block per forward + backward (gradient accumulation: one per micro-batch)::

        tel = StepTelemetry(model)
        with tel.record(chosen_rows, rejected_rows):   # (P,) row indices in the forward's batch
            L = loss(model(ids)) ; L.backward()
        rg = tel.pop()                                  # RowGram

    Forwards under ``torch.no_grad`` (a reference model, evaluation) are ignored; the hooks
    exist only inside the block and only read tensors, so gradients and the optimizer step
    are the ones without the recorder. Refused with a :class:`GesimError`: a selected
    parameter that receives a gradient through no module the layer rules cover, two
    grad-enabled forwards in one block, a block without backward.
    """

    def __init__(self, model, select="all", batch_gram: bool = False):
        self.recorder = Recorder(model, select, batch_gram)
        self.batch_gram = batch_gram
        self._done: list[RowGram] = []

    @contextlib.contextmanager
    def record(self, chosen_rows, rejected_rows):
        rec = self.recorder
        with rec.block(chosen_rows, rejected_rows):
            yield self
        P = len(rec.rows[0])
        if self.batch_gram:
            K = rec.total
            idx = torch.arange(P, device=K.device)
            self._done.append(RowGram(K[idx, idx], K[idx + P, idx + P], K[idx, idx + P], K))
        else:
            t = rec.total
            self._done.append(RowGram(t["rw2"], t["rl2"], t["rwl"]))

    def pop(self) -> RowGram:
        """The oldest recorded block's :class:`RowGram` (first in, first out)."""
        if not self._done:
            raise GesimError("telemetry: nothing recorded (use `with tel.record(...)` around forward and backward)")
        return self._done.pop(0)

    def pending(self) -> int:
        return len(self._done)


def loss_weights(L: torch.Tensor, lw: torch.Tensor, ll: torch.Tensor):
    """``(d_w, d_l, B)`` of a batch loss L from the per-sequence log-probs lw, ll (B,) of its
    graph, by autograd: ``d_w = -B dL/dlw``, ``d_l = B dL/dll`` (the graph is kept for the
    training backward)."""
    B = len(lw)
    gw, gl = torch.autograd.grad(L, (lw, ll), retain_graph=True, allow_unused=True)
    gw = torch.zeros_like(lw) if gw is None else gw
    gl = torch.zeros_like(ll) if gl is None else gl
    return -B * gw.detach(), B * gl.detach(), B


FRACTION_KEYS = tuple(f"train_frac_{name}" for name in (*regimes.REGIMES, "unknown")) + ("train_mean_cos",)


def pair_rows(rg: RowGram, d_w=None, d_l=None, B=None) -> dict[str, np.ndarray]:
    """One row per pair (numpy columns): ``regime`` (code of the own step, ``UNKNOWN`` = -1),
    ``cos``, ``rho``, ``ip``, ``nw2``, ``nl2``, ``d_w``, ``d_l`` and the recorded ``rw2``,
    ``rl2``, ``rwl``; with the full Gram also ``batch_regime`` and the batch step's first-order
    ``pred_dlw``, ``pred_dll`` per unit step size. Without d_w, d_l (loss unknown) the weights
    are taken positive: regimes and cos as for a margin loss that still pushes, the rest NaN."""
    known = d_w is not None and d_l is not None
    if known:
        sw, sl = torch.sign(torch.as_tensor(d_w)), torch.sign(torch.as_tensor(d_l))
    else:
        sw = sl = torch.ones(len(rg))
    cols = {"regime": rg.own_step_regimes(sw, sl), "cos": rg.cos(sw, sl)}
    if known:
        st = rg.pair_stats(d_w, d_l, B)
        cols |= {k: st[k] for k in ("rho", "ip", "nw2", "nl2")} | {"d_w": d_w, "d_l": d_l}
    else:
        nan = torch.full((len(rg),), float("nan"))
        cols |= {k: nan for k in ("rho", "ip", "nw2", "nl2", "d_w", "d_l")}
    cols |= {"rw2": rg.rw2, "rl2": rg.rl2, "rwl": rg.rwl}
    if rg.gram is not None:
        cols["batch_regime"] = rg.batch_step_regimes(sw, sl)
        if known:
            cols["pred_dlw"], cols["pred_dll"] = rg.batch_first_order(d_w, d_l, B)
    return {k: (v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in cols.items()}


def step_fractions(rows: dict) -> dict[str, float]:
    """Per-step summary of :func:`pair_rows`: ``train_frac_<regime>`` (the five regimes and
    ``unknown``, summing to 1) and ``train_mean_cos`` (mean over pairs with a defined cos)."""
    codes = np.asarray(rows["regime"])
    out = {f"train_frac_{name}": float(np.mean(codes == k)) for k, name in enumerate(regimes.REGIMES)}
    out["train_frac_unknown"] = float(np.mean(codes == UNKNOWN))
    cos = np.asarray(rows["cos"], float)
    out["train_mean_cos"] = float(np.mean(cos[np.isfinite(cos)])) if np.isfinite(cos).any() else float("nan")
    return out


__all__ = ["FRACTION_KEYS", "UNKNOWN", "RowGram", "StepTelemetry", "loss_weights", "pair_rows", "step_fractions"]
