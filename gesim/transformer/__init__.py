"""Transformer validation: a small GPT and an offline sentiment-style preference language.

* :mod:`gesim.transformer.model`: ``GPTConfig``, ``GPT`` (nanoGPT-shaped, plain torch).
* :mod:`gesim.transformer.data`: a word-level review language, SFT data and preference pairs
  in the paper's three structures (``1t``, ``short-suffix``, ``long-suffix``).
* :mod:`gesim.transformer.train`: SFT then preference optimisation with measurements,
  reproducible under a seed on CPU whatever the thread count.
* :mod:`gesim.transformer.experiment`: the validation over seeds (structures, suffix-length
  sweep, cross-loss comparison) with spreads and "holds in k/n" claims.
"""

from gesim.transformer.data import STRUCTURES, Language, PairSet
from gesim.transformer.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "Language", "PairSet", "STRUCTURES"]
