"""THE loss registry: every preference loss gesim knows, each defined exactly once.

A loss is one function ``fn(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, **params)`` of the
summed response log-probs (``lw``, ``ll``), the reference log-probs, the response lengths
and its hyper-parameters, written with ordinary arithmetic and the primitives of ``ops``
(:mod:`gesim.backends`). The same function evaluates with numpy, torch and sympy, so the
symbolic weights ``d_w = -dL/dlw``, ``d_l = dL/dll``, the loss tables, the command line and
the tests all derive from this one definition.

Register your own loss in five lines::

    import gesim

    @gesim.losses.register("my_loss", margin=True, source="my paper, Eq. (3)", beta=0.5)
    def my_loss(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
        return -ops.log_sigmoid(beta * (lw - ll))

Notation (theory.md section 1): ``rw = lw - lw_ref``, ``rl = ll - ll_ref``,
``h = rw - rl`` (the DPO log-ratio margin).
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


# --------------------------------------------------------------------------------------------
# Shared pieces of the formulas (notation of theory.md section 1).

def _h(lw, ll, lw_ref, ll_ref):
    """DPO's implicit-reward margin h = (lw - lw_ref) - (ll - ll_ref)."""
    return (lw - lw_ref) - (ll - ll_ref)


def _h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l):
    """Length-normalised margin (lw - lw_ref)/len_w - (ll - ll_ref)/len_l (trl's IPO)."""
    return (lw - lw_ref) / len_w - (ll - ll_ref) / len_l


def _log_odds(ops, s):
    """log(p / (1 - p)) for p = exp(s), s <= 0 a per-token mean log-prob (ORPO)."""
    return s - ops.log(-ops.expm1(s))


_BETA = {"beta": POSITIVE}
_EPS = Range(0.0, 0.5, low_closed=True)


def _dpo_trl(loss_type="sigmoid", **params):
    """A :class:`Trl` record for trl's DPOTrainer (``beta`` maps to ``beta`` unless given)."""
    return Trl("DPOTrainer", loss_type, {"beta": "beta", **params})


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


# --------------------------------------------------------------------------------------------
# The paper's family (theory.md section 2).


@register("dpo", margin=True, ranges=_BETA, beta=0.1, trl=_dpo_trl(),
          source="Rafailov et al. 2023, DPO (arXiv 2305.18290), Eq. (7); trl loss_type='sigmoid'")
def dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta h),  h = (lw - lw_ref) - (ll - ll_ref)."""
    return -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref))


@register("ipo", margin=True, ranges={"tau": POSITIVE}, tau=0.1,
          source="Azar et al. 2023, IPO (arXiv 2310.12036), Eq. (17), summed log-ratios "
          "(trl's 'ipo' is length-averaged: see ipo_norm)")
def ipo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, tau):
    """L = (h - 1/(2 tau))^2 on summed log-ratios."""
    return (_h(lw, ll, lw_ref, ll_ref) - 1 / (2 * tau)) ** 2


@register("ipo_norm", margin=False, ranges={"tau": POSITIVE}, tau=0.1,
          trl=Trl("DPOTrainer", "ipo", {"tau": "beta"}),
          source="trl loss_type='ipo' (length-averaged log-probs, tau = trl beta), after Azar et al. 2023")
def ipo_norm(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, tau):
    """L = (rw/len_w - rl/len_l - 1/(2 tau))^2: IPO on per-token mean log-ratios."""
    return (_h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l) - 1 / (2 * tau)) ** 2


@register("hinge", margin=True, ranges=_BETA, beta=0.1, trl=_dpo_trl("hinge"),
          source="Zhao et al. 2023, SLiC (arXiv 2305.10425); trl loss_type='hinge'")
def hinge(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = relu(1 - beta h)."""
    return ops.relu(1 - beta * _h(lw, ll, lw_ref, ll_ref))


@register("slic_hf", margin=False, ranges={"delta": POSITIVE, "lam": NONNEG}, delta=1.0, lam=0.1,
          source="Zhao et al. 2023, SLiC-HF (arXiv 2305.10425), regulariser on the chosen response")
def slic_hf(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, delta, lam):
    """L = relu(delta - lw + ll) - lam lw: rank calibration plus a chosen-side NLL term."""
    return ops.relu(delta - lw + ll) - lam * lw


@register("simpo", margin=False, ranges={"beta": POSITIVE, "gamma": NONNEG}, beta=2.0, gamma=1.0,
          trl=Trl("CPOTrainer", "simpo", {"beta": "beta", "gamma": "simpo_gamma"}, {"cpo_alpha": 0.0}),
          source="Meng et al. 2024, SimPO (arXiv 2405.14734), Eq. (6); trl CPOTrainer loss_type='simpo', "
          "cpo_alpha=0, gamma = simpo_gamma")
def simpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, gamma):
    """L = -log sigma(beta lw/len_w - beta ll/len_l - gamma): reference-free, length-normalised."""
    return -ops.log_sigmoid(beta * lw / len_w - beta * ll / len_l - gamma)


@register("r_dpo", margin=True, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=0.01,
          source="Park et al. 2024, R-DPO (arXiv 2403.19159)")
def r_dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta h - alpha (len_w - len_l)): DPO with a length penalty."""
    return -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref) - alpha * (len_w - len_l))


def _smoothed(ops, z, eps):
    """Label-smoothed logistic loss -(1 - eps) log sigma(z) - eps log sigma(-z) (cDPO, trl)."""
    return -(1 - eps) * ops.log_sigmoid(z) - eps * ops.log_sigmoid(-z)


@register("cpo", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=1.0,
          trl=Trl("CPOTrainer", "sigmoid", {"beta": "beta"}, {"cpo_alpha": 0.0}, requires={"alpha": 0.0}),
          source="Xu et al. 2024, CPO (arXiv 2401.08417) with the per-pair NLL term -alpha lw; trl "
          "averages the NLL over the batch's tokens and offers label_smoothing (cpo_trl)")
def cpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta (lw - ll)) - alpha lw: reference-free DPO plus chosen NLL."""
    return -ops.log_sigmoid(beta * (lw - ll)) - alpha * lw


@register("rrhf", margin=False, ranges={"lam": NONNEG}, lam=1.0,
          source="Yuan et al. 2023, RRHF (arXiv 2304.05302), two responses")
def rrhf(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam):
    """L = relu(ll/len_l - lw/len_w) - lam lw: length-normalised ranking plus chosen NLL."""
    return ops.relu(ll / len_l - lw / len_w) - lam * lw


@register("orpo", margin=False, ranges={"lam": NONNEG}, lam=0.1,
          source="Hong et al. 2024, ORPO (arXiv 2403.07691), per-pair NLL of the response; lam is trl's "
          "beta; trl's NLL runs over prompt and response tokens, batch-averaged (orpo_trl)")
def orpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam):
    """L = -lw/len_w - lam log sigma(logodds(lw/len_w) - logodds(ll/len_l))."""
    ratio = _log_odds(ops, lw / len_w) - _log_odds(ops, ll / len_l)
    return -lw / len_w - lam * ops.log_sigmoid(ratio)


_KTO_RANGES = {"beta": POSITIVE, "z0": REAL, "lambda_d": NONNEG, "lambda_u": NONNEG}


@register("kto", margin=False, ranges=_KTO_RANGES, beta=0.1, z0=0.0, lambda_d=1.0, lambda_u=1.0,
          trl=Trl("KTOTrainer", "kto", {"beta": "beta", "lambda_d": "desirable_weight",
                                        "lambda_u": "undesirable_weight"}, scale=0.5,
                  batch="z0 is trl's detached batch KL estimate clamp(mean(KL logps - ref KL logps), min=0)"),
          source="Ethayarajh et al. 2024, KTO (arXiv 2402.01306), used on pairs; z0 is the detached KL "
          "reference point; trl's KTOTrainer on a batch of B pairs (2B single examples) gives 0.5 x this")
def kto(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, z0, lambda_d, lambda_u):
    """L = lambda_d (1 - sigma(beta (rw - z0))) + lambda_u (1 - sigma(beta (z0 - rl)))."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return lambda_d * (1 - ops.sigmoid(beta * (rw - z0))) + lambda_u * (1 - ops.sigmoid(beta * (z0 - rl)))


@register("dpop", margin=False, ranges={"beta": POSITIVE, "lam": NONNEG}, beta=0.1, lam=50.0,
          source="Pal et al. 2024, Smaug / DPO-Positive (arXiv 2402.13228)")
def dpop(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, lam):
    """L = -log sigma(beta (h - lam relu(lw_ref - lw))): penalise chosen below the reference."""
    return -ops.log_sigmoid(beta * (_h(lw, ll, lw_ref, ll_ref) - lam * ops.relu(lw_ref - lw)))


@register("rpo", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=1.0,
          source="Pang et al. 2024, iterative RPO (arXiv 2404.19733), Eq. (3): per-pair NLL over |y_w|; "
          "trl 1.16 runs loss_type=['sigmoid', 'sft'] with a batch-level SFT mean (rpo_trl)")
def rpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta h) - alpha lw/len_w: DPO plus per-token chosen NLL."""
    return -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref)) - alpha * lw / len_w


# --------------------------------------------------------------------------------------------
# trl DPOTrainer's other pairwise losses (theory.md section 2, last paragraph).


@register("exo_pair", margin=True, ranges={"beta": POSITIVE, "eps": Range(0.0, 0.5)}, beta=0.1, eps=1e-3,
          trl=_dpo_trl("exo_pair", eps="label_smoothing"),
          source="Ji et al. 2024, EXO (arXiv 2402.00856), pairwise; trl loss_type='exo_pair', eps = label_smoothing")
def exo_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, eps):
    """L = sigma(beta h)(log sigma(beta h) - log(1-eps)) + sigma(-beta h)(log sigma(-beta h) - log eps)."""
    z = beta * _h(lw, ll, lw_ref, ll_ref)
    return (ops.sigmoid(z) * (ops.log_sigmoid(z) - ops.log(1 - eps))
            + ops.sigmoid(-z) * (ops.log_sigmoid(-z) - ops.log(eps)))


@register("nca_pair", margin=False, ranges=_BETA, beta=0.1, trl=_dpo_trl("nca_pair"),
          source="Chen et al. 2024, NCA (arXiv 2402.05369); trl loss_type='nca_pair'")
def nca_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta rw) - log sigma(-beta rw)/2 - log sigma(-beta rl)/2."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(beta * rw) - ops.log_sigmoid(-beta * rw) / 2 - ops.log_sigmoid(-beta * rl) / 2


@register("robust", margin=True, ranges={"beta": POSITIVE, "eps": _EPS}, beta=0.1, eps=0.1,
          trl=_dpo_trl("robust", eps="label_smoothing"),
          source="Chowdhury et al. 2024, robust DPO (arXiv 2403.00409); trl loss_type='robust' "
          "with label_smoothing=eps")
def robust(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, eps):
    """L = ((1 - eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps)."""
    z = beta * _h(lw, ll, lw_ref, ll_ref)
    return ((1 - eps) * -ops.log_sigmoid(z) + eps * ops.log_sigmoid(-z)) / (1 - 2 * eps)


@register("bco_pair", margin=False, ranges={"beta": POSITIVE, "delta": REAL}, beta=0.1, delta=0.0,
          trl=Trl("DPOTrainer", "bco_pair", {"beta": "beta"}, requires={"delta": 0.0}),
          source="Jung et al. 2024, BCO (arXiv 2404.04656), paired; delta is the paper's reward shift "
          "(a detached running mean of the rewards there); trl 1.16 loss_type='bco_pair' has no shift "
          "(delta = 0)")
def bco_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, delta):
    """L = -log sigma(beta rw - delta) - log sigma(-(beta rl - delta))."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(beta * rw - delta) - ops.log_sigmoid(-(beta * rl - delta))


@register("sppo_hard", margin=False, ranges=_BETA, beta=0.1, trl=_dpo_trl("sppo_hard"),
          source="Wu et al. 2024, SPPO (arXiv 2405.00675) with hard labels; trl loss_type='sppo_hard'")
def sppo_hard(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = (rw - 1/(2 beta))^2 + (rl + 1/(2 beta))^2."""
    return (lw - lw_ref - 1 / (2 * beta)) ** 2 + (ll - ll_ref + 1 / (2 * beta)) ** 2


@register("apo_zero", margin=False, ranges=_BETA, beta=0.1, trl=_dpo_trl("apo_zero"),
          source="D'Oosterlinck et al. 2024, APO-zero (arXiv 2408.06266); trl loss_type='apo_zero'")
def apo_zero(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = (1 - sigma(beta rw)) + sigma(beta rl): push chosen up and rejected down separately."""
    return 1 - ops.sigmoid(beta * (lw - lw_ref)) + ops.sigmoid(beta * (ll - ll_ref))


@register("apo_down", margin=False, ranges=_BETA, beta=0.1, trl=_dpo_trl("apo_down"),
          source="D'Oosterlinck et al. 2024, APO-down (arXiv 2408.06266); trl loss_type='apo_down'")
def apo_down(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = sigma(beta rw) + (1 - sigma(beta h)): push both down, rejected more."""
    return ops.sigmoid(beta * (lw - lw_ref)) + 1 - ops.sigmoid(beta * _h(lw, ll, lw_ref, ll_ref))


@register("discopop", margin=True, ranges={"beta": POSITIVE, "tau": POSITIVE}, beta=0.1, tau=0.05,
          trl=_dpo_trl("discopop", tau="discopop_tau"),
          source="Lu et al. 2024, DiscoPOP / log-ratio modulated loss (arXiv 2406.08414); "
          "trl loss_type='discopop', tau = discopop_tau")
def discopop(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, tau):
    """L = (1 - m)(-log sigma(z)) + m exp(-z),  z = beta h,  m = sigma(z / tau)."""
    z = beta * _h(lw, ll, lw_ref, ll_ref)
    m = ops.sigmoid(z / tau)
    return (1 - m) * -ops.log_sigmoid(z) + m * ops.exp(-z)


@register("sigmoid_norm", margin=False, ranges=_BETA, beta=5.0, trl=_dpo_trl("sigmoid_norm"),
          source="Lambert et al. 2024, Tulu 3 (arXiv 2411.15124), length-normalised DPO; "
          "trl loss_type='sigmoid_norm'")
def sigmoid_norm(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta (rw/len_w - rl/len_l))."""
    return -ops.log_sigmoid(beta * _h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l))


def _alpha_reward(ops, s, alpha):
    """AlphaPO's reward r(s) = (1 - p^-alpha) / alpha with p = exp(s); alpha -> 0 gives s."""
    return -ops.expm1(-alpha * s) / alpha


@register("alphapo", margin=False, ranges={"beta": POSITIVE, "gamma": NONNEG, "alpha": POSITIVE},
          beta=2.0, gamma=1.0, alpha=0.25,
          trl=Trl("CPOTrainer", "alphapo", {"beta": "beta", "gamma": "simpo_gamma", "alpha": "alpha"}),
          source="Gupta et al. 2025, AlphaPO (arXiv 2501.03884) on per-token mean log-probs; trl CPOTrainer "
          "loss_type='alphapo' (= 'simpo' with cpo_alpha=0); alpha -> 0 recovers SimPO")
def alphapo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, gamma, alpha):
    """L = -log sigma(beta (r(lw/len_w) - r(ll/len_l)) - gamma),  r(s) = (1 - exp(-alpha s)) / alpha."""
    return -ops.log_sigmoid(beta * (_alpha_reward(ops, lw / len_w, alpha)
                                    - _alpha_reward(ops, ll / len_l, alpha)) - gamma)


# --------------------------------------------------------------------------------------------
# trl's batch-normalised forms, registered next to the per-pair paper forms above. Each takes
# len_bar, the batch-mean token count that trl divides by (trl_batch_params sets it); for one
# pair or equal lengths they equal the per-pair forms.

_LEN = {LEN_BAR: POSITIVE}


@register("sft", margin=False, ranges={}, source="supervised fine-tuning on the chosen response, "
          "per-pair token mean; trl loss_type='sft' averages over the batch's tokens instead (sft_trl)")
def sft(ops, lw, ll, lw_ref, ll_ref, len_w, len_l):
    """L = -lw / len_w: the chosen response's mean token NLL (no rejected term, d_l = 0)."""
    return -lw / len_w


@register("sft_trl", margin=False, ranges=_LEN, len_bar=1.0,
          trl=Trl("DPOTrainer", "sft", batch="len_bar = mean chosen response length of the batch"),
          source="trl DPOTrainer loss_type='sft': -sum(lw) / sum(len_w) over the batch; per pair "
          "-lw / len_bar with len_bar the batch-mean chosen length")
def sft_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, len_bar):
    """L = -lw / len_bar (len_bar: the batch-mean chosen length, a batch constant)."""
    return -lw / len_bar


@register("rpo_trl", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG, **_LEN},
          beta=0.1, alpha=1.0, len_bar=1.0,
          trl=Trl("DPOTrainer", ("sigmoid", "sft"), {"beta": "beta", "alpha": "loss_weights[1]"},
                  batch="len_bar = mean chosen response length of the batch"),
          source="trl DPOTrainer loss_type=['sigmoid', 'sft'], loss_weights=[1, alpha] (trl's form of "
          "RPO, Pang et al. 2024): the SFT term is -sum(lw)/sum(len_w) over the batch")
def rpo_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha, len_bar):
    """L = -log sigma(beta h) - alpha lw / len_bar."""
    return -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref)) - alpha * lw / len_bar


@register("cpo_trl", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG, "eps": _EPS, **_LEN},
          beta=0.1, alpha=1.0, eps=0.0, len_bar=1.0,
          trl=Trl("CPOTrainer", "sigmoid", {"beta": "beta", "alpha": "cpo_alpha", "eps": "label_smoothing"},
                  batch="len_bar = mean chosen response length of the batch"),
          source="trl CPOTrainer loss_type='sigmoid' (Xu et al. 2024): NLL = -sum(lw)/sum(len_w) over the "
          "batch, weight cpo_alpha; eps = label_smoothing")
def cpo_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha, eps, len_bar):
    """L = -(1-eps) log sigma(beta (lw - ll)) - eps log sigma(-beta (lw - ll)) - alpha lw / len_bar."""
    return _smoothed(ops, beta * (lw - ll), eps) - alpha * lw / len_bar


@register("orpo_trl", margin=False, ranges={"lam": NONNEG, **_LEN}, lam=0.1, len_bar=1.0,
          trl=Trl("ORPOTrainer", "orpo", {"lam": "beta"},
                  batch="len_bar = mean predicted prompt+response tokens of the chosen sequences; the "
                  "prompt tokens' NLL (outside the g_w, g_l plane) is not part of the per-pair loss"),
          source="trl ORPOTrainer (Hong et al. 2024): NLL over the chosen prompt and response tokens, "
          "averaged over the batch's tokens; the odds ratio on per-token mean log-probs")
def orpo_trl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam, len_bar):
    """L = -lw/len_bar - lam log sigma(logodds(lw/len_w) - logodds(ll/len_l))."""
    ratio = _log_odds(ops, lw / len_w) - _log_odds(ops, ll / len_l)
    return -lw / len_bar - lam * ops.log_sigmoid(ratio)


# --------------------------------------------------------------------------------------------
# More trl options and literature losses (issue 14).

def _f_div_dpo(ops, score, lw, ll, lw_ref, ll_ref, beta):
    return -ops.log_sigmoid(beta * (score(lw - lw_ref) - score(ll - ll_ref)))


@register("dpo_forward_kl", margin=False, ranges=_BETA, beta=0.1,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta"}, {"f_divergence_type": "forward_kl"}),
          source="Wang et al. 2023, f-DPO (arXiv 2309.16240), forward KL: f'(t) = 1 - 1/t; "
          "trl f_divergence_type='forward_kl'")
def dpo_forward_kl(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta (exp(-rl) - exp(-rw))): scores 1 - exp(-r)."""
    return _f_div_dpo(ops, lambda r: 1 - ops.exp(-r), lw, ll, lw_ref, ll_ref, beta)


@register("dpo_js", margin=False, ranges=_BETA, beta=0.1,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta"}, {"f_divergence_type": "js_divergence"}),
          source="Wang et al. 2023, f-DPO (arXiv 2309.16240), Jensen-Shannon: f'(t) = log(2t/(1+t)); "
          "trl f_divergence_type='js_divergence'")
def dpo_js(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta (log sigma(rw) - log sigma(rl)))."""
    return _f_div_dpo(ops, ops.log_sigmoid, lw, ll, lw_ref, ll_ref, beta)


@register("dpo_alpha_div", margin=False, ranges={"beta": POSITIVE, "alpha": Range(0.0, 1.0)}, beta=0.1, alpha=0.5,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta", "alpha": "f_alpha_divergence_coef"},
                  {"f_divergence_type": "alpha_divergence"}),
          source="Wang et al. 2023, f-DPO (arXiv 2309.16240), alpha-divergence; trl f_divergence_type="
          "'alpha_divergence' with f_alpha_divergence_coef = alpha: f'(t) = (t^(alpha-1) - 1)/(alpha - 1) "
          "(the paper's (1 - t^-a)/a with a = 1 - alpha); trl evaluates it in float32")
def dpo_alpha_div(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta (s(rw) - s(rl))),  s(r) = (exp((alpha - 1) r) - 1) / (alpha - 1)."""
    return _f_div_dpo(ops, lambda r: ops.expm1((alpha - 1) * r) / (alpha - 1), lw, ll, lw_ref, ll_ref, beta)


def _ld(ops, r, length, shared, a):
    """LD-DPO's log-ratio when every token carries the mean r/length: shared + a * tail."""
    return r * (shared + a * (length - shared)) / length


@register("ld_dpo", margin=False, ranges={"beta": POSITIVE, "alpha": Range(0.0, 1.0, True, True)},
          beta=0.1, alpha=0.5,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta", "alpha": "ld_alpha"},
                  batch="exact when each response's tokens carry equal log-probs (the per-pair model); trl "
                  "splits the actual per-token log-probs at the shared length"),
          source="Liu et al. 2024, LD-DPO (arXiv 2409.06411): the tokens beyond the shorter response's "
          "length count alpha times; trl ld_alpha")
def ld_dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta (rw (m + alpha (len_w - m))/len_w - rl (m + alpha (len_l - m))/len_l)),
    m = min(len_w, len_l)."""
    m = ops.minimum(len_w, len_l)
    return -ops.log_sigmoid(beta * (_ld(ops, lw - lw_ref, len_w, m, alpha) - _ld(ops, ll - ll_ref, len_l, m, alpha)))


@register("wpo", margin=False, ranges=_BETA, beta=0.1,
          trl=Trl("DPOTrainer", "sigmoid", {"beta": "beta"}, {"use_weighting": True},
                  batch="trl's weight subtracts each token's log sum_v p_v^2 (weight alignment); gesim's "
                  "is exp(mean log-prob) (the alignment term set to 0): a detached per-pair factor"),
          source="Zhou et al. 2024, WPO (arXiv 2406.11827), Eq. (2): DPO weighted by the detached "
          "exp(lw/len_w + ll/len_l); trl use_weighting=True")
def wpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = sg(exp(lw/len_w + ll/len_l)) * -log sigma(beta h), sg = stop_gradient."""
    return ops.exp(ops.stop_gradient(lw / len_w + ll / len_l)) * -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref))


@register("apo_zero_unpaired", margin=False, ranges={"beta": POSITIVE, "lambda_d": NONNEG, "lambda_u": NONNEG},
          beta=0.1, lambda_d=1.0, lambda_u=1.0,
          trl=Trl("KTOTrainer", "apo_zero_unpaired", {"beta": "beta", "lambda_d": "desirable_weight",
                                                      "lambda_u": "undesirable_weight"}, scale=0.5),
          source="D'Oosterlinck et al. 2024, APO-zero unpaired (arXiv 2408.06266); trl KTOTrainer "
          "loss_type='apo_zero_unpaired' on the 2B examples of B pairs gives 0.5 x this")
def apo_zero_unpaired(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, lambda_d, lambda_u):
    """L = lambda_d (1 - sigma(beta rw)) + lambda_u sigma(beta rl)."""
    return lambda_d * (1 - ops.sigmoid(beta * (lw - lw_ref))) + lambda_u * ops.sigmoid(beta * (ll - ll_ref))


@register("alphapo_sum", margin=False, ranges={"beta": POSITIVE, "alpha": POSITIVE, "eps": _EPS},
          beta=0.1, alpha=0.01, eps=0.0,
          trl=Trl("CPOTrainer", "sigmoid", {"beta": "beta", "alpha": "alpha", "eps": "label_smoothing"},
                  {"cpo_alpha": 0.0}),
          source="AlphaPO reward (Gupta et al. 2025, arXiv 2501.03884) on summed log-probs: trl CPOTrainer "
          "loss_type='sigmoid' with alpha != 0 and cpo_alpha=0")
def alphapo_sum(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha, eps):
    """L = -(1-eps) log sigma(z) - eps log sigma(-z),  z = beta (r(lw) - r(ll)),  r(s) = (1 - e^(-alpha s))/alpha."""
    return _smoothed(ops, beta * (_alpha_reward(ops, lw, alpha) - _alpha_reward(ops, ll, alpha)), eps)


@register("cal_dpo", margin=False, ranges=_BETA, beta=0.002,
          source="Xiao et al. 2024, Cal-DPO (NeurIPS 2024, arXiv 2412.14516), the authors' code "
          "(tengxiao1/Cal-DPO): DPO at unit temperature plus half the squared calibration errors; "
          "beta=0.002 from their zephyr config")
def cal_dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(rw - rl) + ((rw - 1/(2 beta))^2 + (rl + 1/(2 beta))^2) / 2."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(rw - rl) + ((rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2) / 2


@register("dpo_shift", margin=False, ranges={"beta": POSITIVE, "lam": Range(0.0, 1.0, high_closed=True)},
          beta=0.1, lam=0.95,
          source="Yang et al. 2025, DPO-Shift (arXiv 2502.07599): the rejected log-ratio scaled by "
          "f(lambda) = lam <= 1 (fixed strategy; lam = 1 is DPO)")
def dpo_shift(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, lam):
    """L = -log sigma(beta (rw - lam rl))."""
    return -ops.log_sigmoid(beta * ((lw - lw_ref) - lam * (ll - ll_ref)))


# --------------------------------------------------------------------------------------------
# AOT: a batch loss (no per-pair form). Its per-pair weights, for gesim.dynamics.batch_first_order.


def aot_weights(lw, ll, lw_ref, ll_ref, *, beta=0.1, eps=0.0, unpaired=False):
    """Per-pair weights (d_w, d_l) = (-dL/dlw_i, dL/dll_i) of trl's AOT batch loss, in numpy.

    ``unpaired=False`` (trl loss_type='aot', Melnyk et al. 2024): sort the policy margins
    ``lw - ll`` and the reference margins separately, delta_k = sorted_k - sorted_ref_k,
    L = mean_k [-(1-eps) log sigma(beta delta_k) - eps log sigma(-beta delta_k)]. The pair
    holding rank k of the policy margin gets c_k = (beta/B)((1-eps) sigma(-beta delta_k) -
    eps sigma(beta delta_k)) on both sides: d_w = d_l = c_k. ``unpaired=True`` ('aot_unpaired')
    sorts the chosen and the rejected log-ratios separately: d_w of the pair at chosen rank k
    is c_k and d_l of the pair at rejected rank k is c_k. Feed them, with the batch's Gram
    matrices, to :func:`gesim.dynamics.batch_first_order` (eps = trl label_smoothing).
    """
    import numpy as np
    from scipy.special import expit

    lw, ll, lw_ref, ll_ref = (np.asarray(a, float) for a in (lw, ll, lw_ref, ll_ref))
    a, b = (lw - lw_ref, ll - ll_ref) if unpaired else (lw - ll, lw_ref - ll_ref)
    ia, ib = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    delta = a[ia] - b[ib]
    c = beta / len(a) * ((1 - eps) * expit(-beta * delta) - eps * expit(beta * delta))
    d_w, d_l = np.empty_like(a), np.empty_like(a)
    d_w[ia] = c
    if unpaired:
        d_l[ib] = c
    else:
        d_l[ia] = c
    return d_w, d_l
