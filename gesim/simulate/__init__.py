"""Preference optimisation on synthetic policies: the engine, update rules and sweeps.

* :mod:`gesim.simulate.engine`: :class:`SimConfig`, :func:`simulate` (vectorised) and
  :func:`simulate_loop` (the plain per-instance reference).
* :mod:`gesim.simulate.logit`: the fast path for SGD-family rules (exact steps in logit space)
  and :func:`gesim.simulate.logit.floor`, the counted FLOPs of the cheapest exact update.
* :mod:`gesim.simulate.optim`: update rules (SGD, Adam) as u = eta P s + rest.
* :mod:`gesim.simulate.sweeps`: suffix, regime-map, length-ratio and step-size sweeps.
"""

from gesim.simulate import optim
from gesim.simulate.engine import FIELDS, SimConfig, SimResult, simulate, simulate_loop

__all__ = ["optim", "FIELDS", "SimConfig", "SimResult", "simulate", "simulate_loop"]
