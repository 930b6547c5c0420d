"""Exact gradient geometry of preference pairs in real models.

For each pair: ip = <g_w, g_l>, nw2 = ||g_w||^2, nl2 = ||g_l||^2 (g = gradient of the summed
response log-prob over the selected parameters) and cos. Backends:

* ``fast`` (default): one forward and one backward with respect to activations; per layer,
  ghost Grams or materialised per-sample gradients by the cost rule; tied weights with all
  use pairs (docs/theory.md sections 8.2-8.4).
* ``func``: torch.func per-sample gradients (a second path and test oracle; memory N x P).
* ``reference``: the plain method (docs/theory.md section 8.1): one pair at a
  time, two backward passes, flattened gradients. Slow; the test oracle.
"""

from gesim.probe.api import BACKENDS, TokenGram, ches, output_head, pair_stats, token_gram
from gesim.probe.reference import reference_pair_stats, reference_token_gram, selected_parameters
from gesim.probe.telemetry import RowGram, StepTelemetry, loss_weights

__all__ = ["BACKENDS", "RowGram", "StepTelemetry", "TokenGram", "ches", "loss_weights", "output_head", "pair_stats",
           "reference_pair_stats", "reference_token_gram", "selected_parameters", "token_gram"]
