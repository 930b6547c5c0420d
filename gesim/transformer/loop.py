"""The one training loop of every Transformer stage: pretraining and SFT (token NLL) and
preference optimisation (a pair objective), in the trainer (:mod:`gesim.transformer.train`)
and the alignment-tax harness (:mod:`gesim.methods.harness`).

A stage is a loss of the drawn rows, ``loss_of(rows) -> scalar``; everything a stage measures,
records or checkpoints is a :class:`Callback` with two hook points, ``before(step, rows)``
(the model as it is before the update: measurements, a parameter snapshot) and
``after(step, rows, loss)`` (the model after the update: realised changes, histories,
checkpoints). The loop owns the order of the random draws, so a stage draws the same batches
whatever its callback does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch


class Callback:
    """Hooks of :func:`train_steps`; the default does nothing."""

    def before(self, step: int, rows: torch.Tensor) -> None:
        """Before step ``step``'s update, with the batch's row indices (B,) already drawn."""

    def after(self, step: int, rows: torch.Tensor, loss: torch.Tensor) -> None:
        """After the update of step ``step``; ``loss`` is that step's (attached) scalar loss."""


class LossHistory(Callback):
    """Records every step's loss as a float (the SFT curve)."""

    def __init__(self):
        self.losses: list[float] = []

    def after(self, step, rows, loss):
        self.losses.append(float(loss.detach()))


def train_steps(opt: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor], torch.Tensor], n_rows: int,
                batch: int, generator: torch.Generator, steps: Iterable[int], *, device="cpu",
                autocast: Callable = contextlib.nullcontext, callback: Callback | None = None,
                backward: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Run ``steps`` optimizer steps of ``loss_of`` on batches of ``batch`` rows out of ``n_rows``.

    ``generator`` is the stage's own random stream (:func:`gesim.transformer.train.stage_seed`)
    and is the only randomness the loop uses; ``autocast()`` the context of the forward
    (:meth:`TrainConfig.autocast`). ``backward(step, rows) -> loss`` replaces the forward,
    ``zero_grad`` and backward of a step (it must compute the same loss and leave its gradients
    in ``.grad``): a step recorded from inside its own backward (training telemetry,
    :mod:`gesim.transformer.telemetry`).
    """
    callback = callback or Callback()
    for step in steps:
        # draw the batch: row indices with replacement, from the stage's own stream (on CPU,
        # then moved, so the draws are the same on every device)
        rows = torch.randint(0, n_rows, (batch,), generator=generator).to(device)
        # measure the model before the update (the first-order checks need it)
        callback.before(step, rows)
        if backward is None:
            # forward and loss (bf16 autocast on CUDA where the stage asks for it)
            with autocast():
                loss = loss_of(rows)
            # backward
            opt.zero_grad()
            loss.backward()
        else:
            # forward and backward together, recorded (the same loss and gradients)
            loss = backward(step, rows)
        # update
        opt.step()
        # measure the realised change, record, checkpoint
        callback.after(step, rows, loss)
