"""Every finite set of names gesim accepts, in one torch-free place.

The command line (``choices=``), the figures and the tests read these tuples; the modules
that implement the names (policies, update rules, Transformer settings, probe backends)
check against the same tuples, and ``tests/test_registries.py`` asserts each implementation
table covers exactly its registry, so adding a name means adding it here and where it is
built, and nothing else. Importing this module loads nothing beyond the standard library.

Losses have their own registry with parameters and ranges (:mod:`gesim.losses`).
"""

from __future__ import annotations

import importlib

from gesim.errors import unknown

#: Synthetic policies of the simulator (:mod:`gesim.policies.models`).
POLICIES = ("single_token", "free_logits", "context")

#: Simulator update rules: name -> "module:attribute" of the class that implements it.
#: Rules resolve lazily (:func:`rule`), so no call depends on which module was imported first.
RULES = {
    "sgd": "gesim.simulate.optim:SGD",
    "adam": "gesim.simulate.optim:Adam",
    "pngd": "gesim.methods.pairwise:PNGD",
    "calibrated": "gesim.methods.pairwise:Calibrated",
}

#: Pair structures, the one table: name -> length of the suffix both responses share after the
#: differing label token. The Transformer's review language (:mod:`gesim.transformer.data`)
#: builds all five; the synthetic pairs (:func:`gesim.policies.pairs.structure`) the
#: label-first three (``1t``, ``short-suffix``, ``long-suffix``).
STRUCTURES = {"1t": 0, "short-suffix": 5, "long-suffix": 27, "mid": 5, "unequal": 5}

#: The paper's three (label-first) structures: the Transformer study and the synthetic pairs.
PAPER_STRUCTURES = ("1t", "short-suffix", "long-suffix")

#: Transformer architectures (:mod:`gesim.transformer.train`).
ARCHS = ("gpt", "hf-gpt2")

#: torch optimisers of the Transformer's preference stage (not simulator update rules).
TORCH_OPTIMIZERS = ("adamw", "sgd")

#: Mixed-precision settings of the Transformer trainer.
AMP = ("auto", "bf16", "off")

#: Training-batch telemetry of gesim's trainer (:mod:`gesim.transformer.telemetry`).
TELEMETRY = ("off", "pairs", "batch")

#: Parameter dtypes a model can be loaded in (the probe).
DTYPES = ("float32", "bfloat16", "float64")

#: Probe backends (:mod:`gesim.probe.api`): auto picks fast where supported.
PROBE_BACKENDS = ("auto", "fast", "func", "reference")

#: Mitigation methods compared in the methods figures (:mod:`gesim.methods`), plain DPO first.
MITIGATIONS = ("dpo", "pngd", "calibrated", "token_mask", "fish_disentangle", "rpo", "dpop", "cpo")

#: Devices a command may be asked for; the figure runner also accepts "auto".
DEVICES = ("cpu", "cuda")
FIGURE_DEVICES = ("auto", *DEVICES)

#: Run presets: fast (CPU-sized, minutes) and full (paper-sized).
MODES = ("fast", "full")

#: Output formats of the commands that print a summary.
FORMATS = ("text", "json")


def resolve(table: dict, kind: str, name: str):
    """The object ``table[name]`` names ("module:attribute"), imported on first use."""
    if name not in table:
        raise unknown(kind, name, table)
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def rule(name: str):
    """The update-rule class registered as ``name`` (see :data:`RULES`)."""
    return resolve(RULES, "update rule", name)
