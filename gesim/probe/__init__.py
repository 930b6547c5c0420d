"""Exact gradient geometry of preference pairs in real models.

For each pair: ip = <g_w, g_l>, nw2 = ||g_w||^2, nl2 = ||g_l||^2 (g = gradient of the summed
response log-prob over the selected parameters), cos and rho. Backends:

* ``reference``: the plain method (theory.md section 5, probe.md section 1): one pair at a
  time, two backward passes, flattened gradients. Slow; the test oracle.
"""

from gesim.probe.reference import reference_pair_stats

__all__ = ["reference_pair_stats"]
