"""``EntanglementCallback``: gradient-entanglement diagnostics inside a trl training run.

Tested against trl 1.16.0 / transformers 5.23 (``DPOTrainer``; the callback uses only the
public ``transformers.TrainerCallback`` API, so it works with any Trainer, CPO/ORPO included).
Every ``every`` optimizer steps it probes a fixed set of pairs with :func:`gesim.probe.pair_stats`
(exact, one forward and one backward, no effect on the optimizer state or gradients) and logs:

* ``entanglement/frac_<regime>``: fraction of probe pairs in each regime predicted by
  ``gesim.symbolic`` for ``loss`` (policy = reference at the probe point);
* ``entanglement/mean_cos``, ``/mean_ip_over_nw2``, ``/mean_ip_over_nl2``;
* ``entanglement/pred_delta_lw``, ``/pred_delta_ll``: first-order change of the probe pairs'
  log-probs for one step of size ``eta`` (the current learning rate) on each pair alone,
  mean over pairs; ``/real_delta_lw``, ``/real_delta_ll``: the realised mean change since the
  previous probe (a batch-trained, multi-step quantity: compare signs, not sizes).

Usage::

    cb = EntanglementCallback(rows, tokenizer, every=50, loss="dpo").attach(trainer)
"""

from __future__ import annotations

import numpy as np
from transformers import TrainerCallback

from gesim import lm, regimes, symbolic
from gesim.errors import GesimError
from gesim.probe import api
from gesim.probe.encode import collate, encode_rows

TESTED_TRL = "1.16.0"


class EntanglementCallback(TrainerCallback):
    """Probe fixed pairs every ``every`` steps and add the diagnostics to the trainer's logs.

    ``pairs``: a :class:`gesim.lm.PairBatch`, or rows ``{"prompt", "chosen", "rejected"}``
    (strings) with ``tokenizer``. ``loss``: a registered gesim loss name; ``loss_params``
    its hyper-parameters (e.g. ``{"beta": 0.1}``); ``params``: as for ``pair_stats``.
    """

    def __init__(self, pairs, tokenizer=None, every: int = 10, loss: str = "dpo", loss_params=None,
                 params="all", max_length: int = 512):
        if every < 1:
            raise GesimError(f"every must be a positive number of steps, got {every}")
        if not isinstance(pairs, lm.PairBatch):
            if tokenizer is None:
                raise GesimError("EntanglementCallback: rows need a tokenizer (or pass a gesim.lm.PairBatch)")
            enc = encode_rows([dict(r, index=i) for i, r in enumerate(pairs)], tokenizer, max_length)
            if not enc.pairs:
                raise GesimError("EntanglementCallback: no probe pair left after tokenisation")
            pairs = collate(enc.pairs, enc.pad_id)
        self.batch, self.every, self.params = pairs, every, params
        self.derivation = symbolic.derive(loss)
        self.loss_params = dict(loss_params or {})
        self.derivation.loss.params(**self.loss_params)  # validate now
        self.trainer, self.history, self._last = None, [], None

    def attach(self, trainer):
        """Register with ``trainer`` (``add_callback``) and log through ``trainer.log``."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def measure(self, model, eta: float) -> dict:
        """The diagnostics for ``model`` now (also usable outside a trainer)."""
        device = next(model.parameters()).device
        st = api.pair_stats(model, self.batch.to(device), params=self.params)
        c = {k: v.double().cpu().numpy() for k, v in st.items() if k != "layers"}
        len_w = self.batch.chosen_mask.sum(1).double().numpy()
        len_l = self.batch.rejected_mask.sum(1).double().numpy()
        pred = self.derivation.predict(lw=c["lw"], ll=c["ll"], ip=c["ip"], nw2=c["nw2"], nl2=c["nl2"], lw_ref=c["lw"],
                                       ll_ref=c["ll"], len_w=len_w, len_l=len_l, eta=eta, check=False,
                                       **self.loss_params)
        out = {f"entanglement/frac_{k}": float(np.mean(pred["regime"] == k)) for k in regimes.REGIMES}
        out.update({"entanglement/mean_cos": float(c["cos"].mean()),
                    "entanglement/mean_ip_over_nw2": float((c["ip"] / c["nw2"]).mean()),
                    "entanglement/mean_ip_over_nl2": float((c["ip"] / c["nl2"]).mean()),
                    "entanglement/pred_delta_lw": float(np.mean(pred["delta_lw"])),
                    "entanglement/pred_delta_ll": float(np.mean(pred["delta_ll"]))})
        if self._last is not None:
            out["entanglement/real_delta_lw"] = float((c["lw"] - self._last[0]).mean())
            out["entanglement/real_delta_ll"] = float((c["ll"] - self._last[1]).mean())
        self._last = (c["lw"], c["ll"])
        return out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every:
            return control
        scheduler = kwargs.get("lr_scheduler")
        eta = float(scheduler.get_last_lr()[0]) if scheduler is not None else float(args.learning_rate)
        metrics = self.measure(model, max(eta, 1e-30))
        self.history.append({"step": state.global_step, **metrics})
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})
        return control
