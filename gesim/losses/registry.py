"""The loss registry's machinery: :class:`Loss`, :class:`Range`, :class:`Trl`, ``register``.

The catalogue of built-in losses lives in the sibling modules (``paper``, ``trl_pairwise``,
``batch_forms``, ``literature``); :mod:`gesim.losses` imports them in that order, so
``names()`` lists the paper's family first.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gesim.backends import BACKENDS
from gesim.errors import GesimError, unknown

#: The positional arguments every loss function takes, in order.
ARGS = ("ops", "lw", "ll", "lw_ref", "ll_ref", "len_w", "len_l")


@dataclass(frozen=True)
class Range:
    """The valid values of one parameter: an interval, each end open or closed."""

    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def __str__(self) -> str:
        lo = "[" if self.low_closed else "("
        hi = "]" if self.high_closed else ")"
        return f"{lo}{self.low:g}, {self.high:g}{hi}"


POSITIVE = Range(0.0)
NONNEG = Range(0.0, low_closed=True)
REAL = Range()


#: The trl release the ``trl`` records below were checked against (tests/test_trl_oracle.py).
TRL_VERSION = "1.16"


@dataclass(frozen=True)
class Trl:
    """Which trl loss a registered loss reproduces, checked by calling trl's own code.

    ``trainer`` and ``loss_type`` name trl's code path (a tuple for a list of loss types, with
    ``loss_weights``); ``params`` maps each gesim parameter to the trl config field that carries
    it (a gesim parameter missing here must take the value in ``requires`` for the match to
    hold); ``fixed`` lists other trl fields the match needs (e.g. ``f_divergence_type``);
    ``scale``: trl's batch loss is ``scale`` x the batch mean of gesim's per-pair loss (KTO
    averages over the 2B single examples of B pairs: 0.5); ``batch`` says how a batch-level
    normaliser of trl becomes a per-pair parameter (the parameter is set from the batch, see
    :func:`trl_batch_params`), empty when trl's loss is per pair; ``version`` is the trl
    release tested.
    """

    trainer: str
    loss_type: str | tuple[str, ...]
    params: Mapping[str, str] = field(default_factory=dict)
    fixed: Mapping[str, object] = field(default_factory=dict)
    requires: Mapping[str, float] = field(default_factory=dict)
    scale: float = 1.0
    batch: str = ""
    version: str = TRL_VERSION


@dataclass(frozen=True)
class Loss:
    """A registered preference loss: its function, defaults, ranges, flag, source, trl match."""

    name: str
    fn: Callable
    defaults: Mapping[str, float]
    ranges: Mapping[str, Range]
    margin: bool
    source: str
    doc: str = field(default="", compare=False)
    trl: Trl | None = field(default=None, compare=False)

    def params(self, **overrides) -> dict[str, float]:
        """Defaults overridden by keyword, each checked against its range."""
        for key in overrides:
            if key not in self.defaults:
                raise unknown(f"parameter of loss {self.name!r}:", key, self.defaults) \
                    if self.defaults else GesimError(f"loss {self.name!r} takes no parameters, got {key!r}")
        merged = {**self.defaults, **overrides}
        for key, value in merged.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise GesimError(f"parameter {key} of loss {self.name!r} must be a number, got {value!r}") from None
            if math.isnan(value) or value not in self.ranges[key]:
                raise GesimError(
                    f"parameter {key}={value:g} of loss {self.name!r} is out of range {self.ranges[key]}")
            merged[key] = value
        return merged

    def __call__(self, ops, lw, ll, lw_ref=0.0, ll_ref=0.0, len_w=1.0, len_l=1.0, **params):
        """Evaluate with backend ``ops`` (an Ops object or 'numpy' / 'torch' / 'sympy')."""
        if isinstance(ops, str):
            ops = backend(ops)
        return self.fn(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, **self.params(**params))

    def weights(self, lw, ll, lw_ref=0.0, ll_ref=0.0, len_w=1.0, len_l=1.0, **params):
        """The loss weights d_w = -dL/dlw and d_l = dL/dll of every pair, by torch autograd.

        ``lw``, ``ll``: torch tensors (B,) or scalars (attached or not; the weights are taken
        at their values and returned detached, same shape); the rest broadcast. Each pair's
        loss depends on its own (lw, ll) only, so the gradient of the batch sum gives every
        pair's weights at once. A loss that does not depend on lw (or ll) has d_w = 0 (d_l = 0).
        The closed forms, for numpy arrays or sympy, are :meth:`gesim.symbolic.Derivation.weights`.
        """
        import torch

        a, b = lw.detach().requires_grad_(True), ll.detach().requires_grad_(True)
        with torch.enable_grad():
            L = self("torch", a, b, lw_ref, ll_ref, len_w, len_l, **params).sum()
            dLa, dLb = torch.autograd.grad(L, (a, b), allow_unused=True)
        d_w = -dLa if dLa is not None else torch.zeros_like(a)
        d_l = dLb if dLb is not None else torch.zeros_like(b)
        return d_w.detach(), d_l.detach()


_REGISTRY: dict[str, Loss] = {}

#: Names from the literature that gesim deliberately does not register, and why.
UNSUPPORTED: dict[str, str] = {
    "aot": "AOT (Melnyk et al. 2024, arXiv 2406.05882) sorts the log-ratio margins of the whole batch "
    "and matches them by rank, so a pair's weights depend on every other pair: there is no per-pair "
    "loss L(lw, ll). gesim.losses.aot_weights gives the batch's per-pair weights (trl loss_type='aot'); "
    "feed them to gesim.dynamics.batch_first_order.",
    "aot_unpaired": "AOT unpaired (Melnyk et al. 2024) sorts chosen and rejected log-ratios separately "
    "over the batch, coupling pairs through the sort: no per-pair loss exists. "
    "gesim.losses.aot_weights(..., unpaired=True) gives the batch weights for "
    "gesim.dynamics.batch_first_order.",
}


def backend(name: str):
    """The Ops adapter called ``name``."""
    if name not in BACKENDS:
        raise unknown("backend", name, BACKENDS)
    return BACKENDS[name]


def register(name: str, *, margin: bool, source: str, ranges: Mapping[str, Range] | None = None,
             overwrite: bool = False, trl: Trl | None = None, **defaults: float):
    """Decorator: register ``fn`` as loss ``name`` with keyword parameter ``defaults``.

    ``margin`` says whether the loss depends on (lw, ll) only through the margin; ``ranges``
    maps parameter names to :class:`Range` (default: any real number); ``source`` names the
    paper and equation; ``trl`` (a :class:`Trl`) the trl loss it reproduces, if any.
    Registering an existing name needs ``overwrite=True``.
    """
    ranges = dict(ranges or {})

    def decorate(fn: Callable) -> Callable:
        _check_signature(name, fn, defaults, ranges)
        _check_trl(name, trl, defaults)
        if name in _REGISTRY and not overwrite:
            raise GesimError(f"loss {name!r} is already registered; pass overwrite=True to replace it")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = Loss(name, fn, dict(defaults), {k: ranges.get(k, REAL) for k in defaults},
                               bool(margin), source, doc, trl)
        return fn

    return decorate


def _check_signature(name, fn, defaults, ranges):
    sig = inspect.signature(fn)
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = {p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}
    if len(positional) != len(ARGS):
        raise GesimError(f"loss {name!r} must take the positional arguments {', '.join(ARGS)}; "
                         f"it takes {', '.join(positional) or 'none'}")
    if keyword != set(defaults):
        raise GesimError(f"loss {name!r}: keyword parameters {sorted(keyword)} must match the "
                         f"registered defaults {sorted(defaults)}")
    extra = set(ranges) - set(defaults)
    if extra:
        raise GesimError(f"loss {name!r}: ranges given for unknown parameters {sorted(extra)}")


def _check_trl(name, trl, defaults):
    if trl is None:
        return
    named = set(trl.params) | set(trl.requires)
    if not named <= set(defaults):
        raise GesimError(f"loss {name!r}: trl record names unknown parameters {sorted(named - set(defaults))}")


def get(name: str) -> Loss:
    """The registered loss ``name`` (a clear error for unknown or unsupported names)."""
    if isinstance(name, Loss):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in UNSUPPORTED:
        raise GesimError(f"loss {name!r} is not supported: {UNSUPPORTED[name]}")
    raise unknown("loss", name, _REGISTRY)


def names() -> list[str]:
    """Registered loss names, in registration order (the built-ins first)."""
    return list(_REGISTRY)


def unregister(name: str) -> None:
    """Remove a user-registered loss (tests and notebooks use this to clean up)."""
    get(name)
    del _REGISTRY[name]


#: The per-pair parameter that stands for a batch-level token normaliser of trl.
LEN_BAR = "len_bar"


def trl_batch_params(name, len_w, len_p=None) -> dict[str, float]:
    """The per-pair parameters that make loss ``name`` reproduce trl's batch normalisation.

    trl's SFT / NLL terms divide the batch's summed chosen log-probs by the batch's token count
    ``sum_i n_i``; the batch mean of the per-pair loss ``-lw_i / len_bar`` equals that (value and
    every gradient) when ``len_bar = mean_i n_i``. ``n_i = len_w`` (response tokens) except for
    ``orpo_trl``, whose NLL also counts the predicted prompt tokens ``len_p`` (its prompt
    log-probs lie outside the (g_w, g_l) plane and are left out of the per-pair loss).
    Losses without a batch normaliser get ``{}``.
    """
    import numpy as np

    loss = get(name)
    if LEN_BAR not in loss.defaults:
        return {}
    n = np.asarray(len_w, float) + (0.0 if len_p is None else np.asarray(len_p, float))
    return {LEN_BAR: float(n.mean())}
