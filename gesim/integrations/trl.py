"""``EntanglementCallback``: gradient-entanglement diagnostics inside a trl training run.

Tested against trl 1.16.0 / transformers 5.24 (``DPOTrainer``; the callback uses only the
public ``transformers.TrainerCallback`` API, so it works with any Trainer, CPO/ORPO included).
Every ``every`` optimizer steps it probes a fixed set of pairs with :func:`gesim.probe.pair_stats`
(exact, one forward and one backward, no effect on the optimizer state or gradients). It adds,
never removes: the metrics wait for the trainer's next log row and join it in ``on_log`` (the
row the trainer appended to ``state.log_history``, and the ``logs`` dict the reporters see,
since the callback puts itself first); its own ``trainer.log`` is never called, so the
trainer's ``loss``, ``grad_norm``, ``learning_rate`` and trl's ``rewards/*``, ``logps/*`` stay.

* ``entanglement/step``: the step the probe ran at (the row's ``step`` may be later);
* ``entanglement/frac_<regime>``: fraction of probe pairs in each regime predicted by
  ``gesim.symbolic`` for ``loss`` (policy = reference at the probe point);
* ``entanglement/mean_cos``, ``/mean_ip_over_nw2``, ``/mean_ip_over_nl2`` (plain products);
* ``entanglement/pred_delta_lw``, ``/pred_delta_ll``: first-order change of the probe pairs'
  log-probs for one step on each pair alone under the optimiser the trainer runs: for Adam(W)
  ``P = 1 / (sqrt(v_hat) + eps)`` from the optimizer state (``v_hat = exp_avg_sq / (1 -
  beta2^step)``, momentum and weight decay left out), ``eta`` = the current learning rate;
  plain SGD (P = 1) before the first step or for other optimizers (``/preconditioned`` 0 or 1);
* ``entanglement/real_delta_lw``, ``/real_delta_ll``: the realised mean change over the next
  optimizer step (measured at the next step), and ``/pred_delta_lw_batch``, ``/pred_delta_ll_batch``:
  its prediction ``<(grad mean lw(theta) + grad mean lw(theta')) / 2, theta' - theta>`` from the update taken
  (a batch of other pairs), so that prediction and realisation are the same quantity;
* ``entanglement/seconds``: wall time of the probe at that step (the callback's overhead).

Memory: between a probe step and the next step the callback keeps one copy of the selected
parameters and the two mean-log-prob gradients (3 P numbers; use ``select="lora"`` on big models).

Usage::

    cb = EntanglementCallback(rows, tokenizer, every=50, loss="dpo").attach(trainer)
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import TrainerCallback

from gesim import dynamics, lm, regimes, symbolic
from gesim.encode import collate, encode_rows
from gesim.errors import GesimError
from gesim.probe import api
from gesim.probe.reference import selected_parameters

TESTED_TRL = "1.16.0"


class EntanglementCallback(TrainerCallback):
    """Probe fixed pairs every ``every`` steps and add the diagnostics to the trainer's logs.

    ``pairs``: a :class:`gesim.lm.PairBatch`, or rows ``{"prompt", "chosen", "rejected"}``
    (strings) with ``tokenizer``. ``loss``: a registered gesim loss name; ``loss_params``
    its hyper-parameters (e.g. ``{"beta": 0.1}``); ``select``: the parameters, as for
    ``pair_stats`` (``params=`` is its old, deprecated name).
    """

    def __init__(self, pairs, tokenizer=None, every: int = 10, loss: str = "dpo", loss_params=None,
                 select="all", max_length: int = 512, *, params=None):
        if every < 1:
            raise GesimError(f"every must be a positive number of steps, got {every}")
        if not isinstance(pairs, lm.PairBatch):
            if tokenizer is None:
                raise GesimError("EntanglementCallback: rows need a tokenizer (or pass a gesim.lm.PairBatch)")
            enc = encode_rows([dict(r, index=i) for i, r in enumerate(pairs)], tokenizer, max_length)
            if not enc.pairs:
                raise GesimError("EntanglementCallback: no probe pair left after tokenisation")
            pairs = collate(enc.pairs, enc.pad_id)
        self.batch, self.every, self.select = pairs, every, (select if params is None else params)
        self.derivation = symbolic.derive(loss)
        self.loss_params = dict(loss_params or {})
        self.derivation.loss.params(**self.loss_params)  # validate now
        self.trainer, self.history, self._last, self._pending = None, [], None, {}

    def attach(self, trainer):
        """Register with ``trainer``, first in its callback list (so reporters see the merged row)."""
        self.trainer = trainer
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def _precond(self, model, optimizer):
        """{parameter: 1 / (sqrt(v_hat) + eps)} for the selected parameters, or None (no Adam state)."""
        if optimizer is None:
            return None
        selected = {id(p) for p in selected_parameters(model, self.select)}
        out = {}
        for group in getattr(optimizer, "param_groups", []):
            beta2, eps = group.get("betas", (None, None))[1], group.get("eps")
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if id(p) not in selected or "exp_avg_sq" not in st or beta2 is None:
                    continue
                step = float(st["step"])
                v_hat = st["exp_avg_sq"] / (1 - beta2 ** step)
                out[p] = 1.0 / (v_hat.sqrt() + eps)
        return out or None

    def measure(self, model, eta: float, optimizer=None) -> dict:
        """The diagnostics for ``model`` now (also usable outside a trainer)."""
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        batch = self.batch.to(device)
        st = api.pair_stats(model, batch, select=self.select)
        c = {k: v.double().cpu().numpy() for k, v in st.items() if k != "layers"}
        P = self._precond(model, optimizer)
        pc = c if P is None else {k: v.double().cpu().numpy() for k, v in api.pair_stats(
            model, batch, select=self.select, precond=P).items()}
        len_w = self.batch.chosen_mask.sum(1).double().numpy()
        len_l = self.batch.rejected_mask.sum(1).double().numpy()
        pred = dynamics.predict(self.derivation, lw=c["lw"], ll=c["ll"], ip=pc["ip"], nw2=pc["nw2"], nl2=pc["nl2"],
                                       lw_ref=c["lw"], ll_ref=c["ll"], len_w=len_w, len_l=len_l, eta=eta,
                                       check=False, **self.loss_params)
        out = {f"entanglement/frac_{k}": float(np.mean(pred["regime"] == k)) for k in regimes.REGIMES}
        out.update({"entanglement/mean_cos": float(c["cos"].mean()),
                    "entanglement/mean_ip_over_nw2": float((c["ip"] / c["nw2"]).mean()),
                    "entanglement/mean_ip_over_nl2": float((c["ip"] / c["nl2"]).mean()),
                    "entanglement/pred_delta_lw": float(np.mean(pred["delta_lw"])),
                    "entanglement/pred_delta_ll": float(np.mean(pred["delta_ll"])),
                    "entanglement/preconditioned": float(P is not None)})
        out["entanglement/seconds"] = time.perf_counter() - t0
        return out

    def _grads(self, model, chosen):
        """(lw, ll) of the probe pairs and the gradients of their means (eval mode)."""
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                lw, ll = lm.pair_logps(model, self.batch.to(device))
                g = [torch.autograd.grad(s.mean(), chosen, retain_graph=True, allow_unused=True) for s in (lw, ll)]
        finally:
            model.train(was)
        g = [[torch.zeros_like(p) if x is None else x.detach() for x, p in zip(gs, chosen)] for gs in g]
        return lw.detach().double().cpu(), ll.detach().double().cpu(), g

    def _snapshot(self, model):
        """Log-probs, their mean gradients and the selected parameters now, for the next step."""
        chosen = selected_parameters(model, self.select)
        lw, ll, g = self._grads(model, chosen)
        return lw, ll, g, [p.detach().clone() for p in chosen]

    def _one_step(self, model) -> dict:
        """Realised change of the probe pairs over the step just taken and its prediction from
        that update ``d``: ``<(grad mean S(theta) + grad mean S(theta + d)) / 2, d>`` (trapezoid
        rule: exact up to third order in d)."""
        lw0, ll0, g0, theta0 = self._last
        chosen = selected_parameters(model, self.select)
        lw, ll, g1 = self._grads(model, chosen)
        step = [p.detach() - q for p, q in zip(chosen, theta0)]
        out = {}
        for k, key in enumerate(("lw", "ll")):
            out[f"entanglement/pred_delta_{key}_batch"] = float(sum(
                (0.5 * (a.double() + b.double()) * d.double()).sum() for a, b, d in zip(g0[k], g1[k], step)))
        out["entanglement/real_delta_lw"] = float((lw - lw0).mean())
        out["entanglement/real_delta_ll"] = float((ll - ll0).mean())
        return out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        if self._last is not None:  # the step after a probe: realised one-step change
            self._pending.update(self._one_step(model))
            self._last = None
        if state.global_step % self.every:
            return control
        scheduler = kwargs.get("lr_scheduler")
        eta = float(scheduler.get_last_lr()[0]) if scheduler is not None else float(args.learning_rate)
        metrics = {"entanglement/step": state.global_step,
                   **self.measure(model, max(eta, 1e-30), kwargs.get("optimizer"))}
        self.history.append({"step": state.global_step, **metrics})
        self._pending.update(metrics)
        self._last = self._snapshot(model)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Merge the waiting metrics into the row the trainer just logged (adds keys only)."""
        if self._pending and logs is not None and state.log_history:
            extra = {k: v for k, v in self._pending.items() if k not in logs}
            logs.update(extra)
            state.log_history[-1].update(extra)
            self._pending = {}
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Metrics no trainer row took (the run ended first) get a row of their own."""
        if self._pending:
            state.log_history.append({**self._pending, "step": state.global_step})
            self._pending = {}
        return control
