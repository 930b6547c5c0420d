"""Synthetic policies with closed-form log-probs, gradients and pair geometry.

See :mod:`gesim.policies.models` (the three policies), :mod:`gesim.policies.linear` (the
closed forms) and :mod:`gesim.policies.pairs` (pair generators with controlled structure).
"""

from gesim.policies import linear, pairs
from gesim.policies.linear import grad, logps, pair_ip, residuals, token_probs
from gesim.policies.models import POLICIES, Context, FreeLogits, Instances, SingleToken, make

__all__ = ["linear", "pairs", "grad", "logps", "pair_ip", "residuals", "token_probs", "POLICIES",
           "Context", "FreeLogits", "Instances", "SingleToken", "make"]
