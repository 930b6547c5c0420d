"""``TrainEntanglementCallback``: the entanglement of every pair trl trains on, at every step,
read from the training step's own backward pass (issue 15 item 3; trl 1.16 ``DPOTrainer``, and
``trl.experimental.cpo.CPOTrainer``: SimPO, CPO).

What it measures. A DPO micro-batch of B pairs backpropagates one scalar L (trl's batch loss,
divided by the m micro-batches of an optimizer step). The chosen row of pair b contributes
``r_w = c_w g_w`` to the parameter gradient, the rejected row ``r_l = c_l g_l``, with
``g = grad lw`` (trl's per-row log-prob) and ``c = dL/dlw`` read exactly from the backward
(:mod:`gesim.integrations.trl_layout`). :class:`gesim.probe.StepTelemetry` records the row
products ``rw2 = |r_w|^2``, ``rl2 = |r_l|^2``, ``rwl = <r_w, r_l>`` in the same backward
(exact, no second pass). Per pair and step this gives (docs: ``gesim/probe/telemetry.py``)

* gesim's loss weights ``d_w = -B m c_w``, ``d_l = B m c_l`` (``L = (1/(B m)) sum loss``):
  for every trl loss type, combinations (``loss_weights``) and WPO weighting included, since
  they are read from trl's own gradient, not recomputed; for the losses gesim registers with a
  ``trl`` record they equal ``gesim.symbolic.derive(name).weights`` with trl's parameters
  (tested for 16 of the 19 ``DPOTrainer`` records: all but ``ld_dpo``, ``wpo``, ``dpo_alpha_div``);
* ``ip = <g_w, g_l>``, ``nw2``, ``nl2``, ``cos(g_w, g_l)``;
* the regime of the pair's own SGD step ``-eta (r_w + r_l)`` (``gesim.regimes``; ``unknown``
  when exactly one of d_w, d_l is 0: the other response's change is not in the row Gram).

Interception point. ``attach`` wraps ``trainer.training_step`` (instance attribute): it holds
the micro-batch's whole forward and backward (the loss, trl's reference forward, the
accelerator's backward, the loss scaling for gradient accumulation) and nothing else, so
one record block is exactly one micro-batch. ``compute_loss`` would miss the backward, and
hooks on ``forward`` alone could not tell the reference forward or evaluation from training.
For CPOTrainer (the model's own logits, no fused head) c is read from the logits' gradient
instead (``trl_layout.logit_token_weights``). For DPOTrainer, trl's fused LM head runs as it
is (``trl_layout.watch_fused_head``: it reads the head weight inside its own autograd
Function, where no module hook sees it); the head's use is recorded from its input (the
backbone's last hidden states) and ``dL/dz = dL/dlogp (e_y - p)``
(``trl_layout.head_output_grad``, :meth:`gesim.probe.recorder.Recorder.external_use`). The
callback only reads: a run with it is bitwise the run without it (bf16 autocast and float32).
Each process of a DDP run records and writes its own rows (the row products are local; DDP
averages parameter gradients only).

Outputs. The trainer's own log rows keep every key and value they have without the callback;
the callback adds, to the next training row the trainer logs (``logs`` and
``state.log_history``), ``entanglement/train_frac_<regime>`` (fraction of the pairs trained
since the previous row, so per step with ``logging_steps=1``), ``train_frac_unknown``,
``train_mean_cos`` (over pairs with d_w, d_l != 0), ``train_pairs``, ``train_steps``. Each
step's values stay in ``history``. Per-pair rows (step, micro, pair, rank, d_w, d_l, lw, ll,
len_w, len_l, rw2, rl2, rwl, ip, nw2, nl2, cos, rho, regime, regime_name) go to ``out_dir`` through
:func:`gesim.output.write_rows` (Parquet with pyarrow, else CSV), one part per process and
flush: ``train_pairs_rank<r>_<first step>``; :func:`gesim.output.read_rows` joins them.

Usage::

    trainer = DPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., processing_class=tok)
    cb = TrainEntanglementCallback(out_dir="run/entanglement").attach(trainer)
    trainer.train()
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.utils.checkpoint
from transformers import TrainerCallback

from gesim import regimes
from gesim.errors import GesimError
from gesim.integrations import trl_layout
from gesim.output import write_rows
from gesim.probe.telemetry import FRACTION_KEYS, UNKNOWN, StepTelemetry, pair_rows, step_fractions

REGIME_NAMES = {**dict(enumerate(regimes.REGIMES)), UNKNOWN: "unknown"}
PREFIX = "entanglement/"
#: the keys the callback adds to the trainer's training log rows
LOG_KEYS = tuple(PREFIX + k for k in FRACTION_KEYS) + (PREFIX + "train_pairs", PREFIX + "train_steps")


class TrainEntanglementCallback(TrainerCallback):
    """Per-pair entanglement of trl's training batches (module docstring).

    ``select``: the parameters, as :class:`gesim.probe.StepTelemetry` (``"all"`` trainable,
    ``"lora"``, or a predicate); ``out_dir``: where the per-pair rows go (default
    ``<output_dir>/entanglement``; None-like ``False`` keeps them in memory only, ``rows``);
    ``fmt``: ``"auto"``, ``"parquet"`` or ``"csv"``; ``flush_every``: steps between file parts.
    """

    def __init__(self, select="all", out_dir=None, fmt: str = "auto", flush_every: int = 50,
                 allow_untested_trl: bool = False):
        if flush_every < 1:
            raise GesimError(f"flush_every must be a positive number of steps, got {flush_every}")
        self.select, self.out_dir, self.fmt, self.flush_every = select, out_dir, fmt, flush_every
        self.allow_untested_trl = allow_untested_trl
        self.trainer = self.tel = None
        self.history: list[dict] = []  # one dict of metrics per optimizer step
        self.rows: dict[str, list] = {}  # per-pair rows not yet written (all rows when out_dir is False)
        self.parts: list[Path] = []
        self._micro: list[dict] = []  # micro-batches of the current step
        self._window: list[dict] = []  # per-pair regime / cos since the last merged log row

    # -- set-up ----------------------------------------------------------------------------
    def attach(self, trainer):
        """Check ``trainer``'s layout, wrap its ``training_step``, register first among its callbacks."""
        self.kind = trl_layout.check_trainer(trainer, self.allow_untested_trl)
        if getattr(trainer, "_gesim_train_callback", None) is not None:
            raise GesimError("a TrainEntanglementCallback is already attached to this trainer")
        self.trainer = trainer
        self.hf = trl_layout.hf_model(trainer) if self.kind == "dpo" else None
        self.ld_alpha = getattr(trainer, "ld_alpha", None)
        if self.out_dir is None:
            self.out_dir = Path(trainer.args.output_dir) / "entanglement"
        self.rank = int(getattr(trainer.args, "process_index", 0))
        if self.out_dir is not False and any(Path(self.out_dir).glob(f"train_pairs_rank{self.rank:03d}_*")):
            raise GesimError(f"{self.out_dir} already holds per-pair rows of this process from another run; "
                             "give the callback a new out_dir (rows of two runs would mix)")
        trainer.training_step = functools.partial(self._training_step, trainer.training_step)
        trainer._gesim_train_callback = self
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    # -- one micro-batch -------------------------------------------------------------------
    def _training_step(self, original, model, inputs, *args, **kwargs):
        if self.kind == "cpo":
            B, _, labels = trl_layout.read_cpo_layout(inputs)
        else:
            B = trl_layout.read_layout(inputs)
        if self.tel is None:  # built at the first step: the trainer may change trainable flags before
            self.tel = StepTelemetry(self.trainer.model, self.select)
        seen = []
        rec, head = self.tel.recorder, self.hf.get_output_embeddings() if self.hf is not None else None

        def on_call(h, labels, out, compute_dtype):  # trl's fused head: its use from h and dL/dlogp
            use = rec.external_use(head, h)
            lp = out.log_probs
            seen.append(lp)

            def arrived(g):
                seen.append(g)
                if use is not None:
                    rec.deliver(use, trl_layout.head_output_grad(h, head, labels, g, rec.dtype, compute_dtype))
            lp.register_hook(arrived)

        rows = torch.arange(B)
        if self.kind == "cpo":  # the model's own logits: read dL/dlogp from dL/dlogits
            watch = trl_layout.logits_hook(self.trainer.model, seen)
        else:
            watch = trl_layout.watch_fused_head(self.hf, on_call)
        try:
            with watch, self.tel.record(rows, rows + B):
                loss = original(model, inputs, *args, **kwargs)
        except torch.utils.checkpoint.CheckpointError as err:  # the recorder's replay rule inside a checkpoint
            raise GesimError(f"train mode cannot record this model under gradient checkpointing (torch refused "
                             f"the recomputation: {str(err).splitlines()[0]}); train with "
                             "gradient_checkpointing=False") from err
        rg = self.tel.pop()
        if len(seen) != 2:
            raise GesimError(f"train mode expected one grad-enabled policy forward and its backward in the step, "
                             f"saw {len(seen) // 2 + len(seen) % 2} forward(s) and {len(seen) // 2} backward(s)")
        if self.kind == "cpo":
            logits, grad_logits = seen
            labels = labels.to(logits.device)
            grad = trl_layout.logit_token_weights(logits, grad_logits, labels)  # dL/dlogp (2B, T-1)
            comp = labels[:, 1:] != -100
            lp = torch.log_softmax(logits.detach()[:, :-1].to(grad.dtype), -1).gather(
                -1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        else:
            lp, grad = seen
            comp = inputs["completion_mask"][:, 1:].to(grad.device).bool()
        w = trl_layout.token_weights(comp, self.ld_alpha, grad.dtype)
        c = trl_layout.row_weights(grad, w)
        logps = (lp.detach().to(grad.dtype) * w).sum(1)
        self._micro.append({"B": B, "c": c.double().cpu(), "logps": logps.double().cpu(),
                            "len": comp.sum(1).cpu(), "rg": rg})
        return loss

    # -- one optimizer step ----------------------------------------------------------------
    def _step_rows(self, step: int) -> dict:
        """Per-pair columns of the micro-batches of ``step`` (their m = len(self._micro))."""
        m, cols = len(self._micro), {}
        for j, rec in enumerate(self._micro):
            B, c, rg = rec["B"], rec["c"], rec["rg"]
            d_w, d_l = (x.to(rg.rw2.dtype) for x in (-B * m * c[:B], B * m * c[B:]))
            rows = pair_rows(rg, d_w, d_l, B * m)
            part = {"step": np.full(B, step), "micro": np.full(B, j), "pair": np.arange(B),
                    "rank": np.full(B, self.rank), **rows,
                    "regime_name": np.array([REGIME_NAMES[k] for k in rows["regime"]]),
                    "lw": rec["logps"][:B].numpy(), "ll": rec["logps"][B:].numpy(),
                    "len_w": rec["len"][:B].numpy(), "len_l": rec["len"][B:].numpy()}
            for k, v in part.items():
                cols.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in cols.items()}

    def on_step_end(self, args, state, control, **kwargs):
        if not self._micro:
            return control
        cols = self._step_rows(state.global_step)
        self._micro = []
        for k, v in cols.items():
            self.rows.setdefault(k, []).append(v)
        self._window.append({"regime": cols["regime"], "cos": cols["cos"]})
        self.history.append({"step": state.global_step, **_metrics([self._window[-1]])})
        if self.out_dir is not False and len(self.rows["step"]) >= self.flush_every:
            self._flush()
        return control

    def _flush(self):
        if not self.rows or self.out_dir is False:
            return
        cols = {k: np.concatenate(v) for k, v in self.rows.items()}
        part = f"train_pairs_rank{self.rank:03d}_{int(cols['step'][0]):08d}"
        self.parts.append(write_rows(self.out_dir, part, cols, self.fmt))
        self.rows = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Merge the window's metrics into the training row just logged (adds keys, never replaces)."""
        if self._window and logs is not None and "loss" in logs and state.log_history:
            extra = {k: v for k, v in _metrics(self._window).items() if k not in logs}
            logs.update(extra)
            state.log_history[-1].update(extra)
            self._window = []
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Write the rows left; a window no training row took gets a row of its own."""
        if self._window:
            state.log_history.append({**_metrics(self._window), "step": state.global_step})
            self._window = []
        self._flush()
        return control

    def table(self) -> dict:
        """This process's per-pair rows so far ({column: array}): its parts read back, then those in memory."""
        from gesim.output import read_rows

        mem = {k: np.concatenate(v) for k, v in self.rows.items()}
        if not self.parts:
            return mem
        done = read_rows(self.out_dir)
        mine = done["rank"] == self.rank
        return {k: np.concatenate([v[mine], mem[k]]) if mem else v[mine] for k, v in done.items()}


def _metrics(window) -> dict:
    """:func:`gesim.probe.telemetry.step_fractions` over the pairs of ``window`` (step records)."""
    rows = {k: np.concatenate([w[k] for w in window]) for k in ("regime", "cos")}
    out = {f"{PREFIX}{k}": v for k, v in step_fractions(rows).items()}
    out[f"{PREFIX}train_pairs"] = len(rows["regime"])
    out[f"{PREFIX}train_steps"] = len(window)
    return out
