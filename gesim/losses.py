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


@dataclass(frozen=True)
class Loss:
    """A registered preference loss: its function, defaults, ranges, flag and source."""

    name: str
    fn: Callable
    defaults: Mapping[str, float]
    ranges: Mapping[str, Range]
    margin: bool
    source: str
    doc: str = field(default="", compare=False)

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
    "loss L(lw, ll). Measure the batch weights and use gesim.dynamics.batch_first_order.",
    "aot_unpaired": "AOT unpaired (Melnyk et al. 2024) sorts chosen and rejected log-ratios separately "
    "over the batch, coupling pairs through the sort: no per-pair loss exists. Use the batch form in "
    "gesim.dynamics.batch_first_order with measured weights.",
}


def backend(name: str):
    """The Ops adapter called ``name``."""
    if name not in BACKENDS:
        raise unknown("backend", name, BACKENDS)
    return BACKENDS[name]


def register(name: str, *, margin: bool, source: str, ranges: Mapping[str, Range] | None = None,
             overwrite: bool = False, **defaults: float):
    """Decorator: register ``fn`` as loss ``name`` with keyword parameter ``defaults``.

    ``margin`` says whether the loss depends on (lw, ll) only through the margin; ``ranges``
    maps parameter names to :class:`Range` (default: any real number); ``source`` names the
    paper and equation. Registering an existing name needs ``overwrite=True``.
    """
    ranges = dict(ranges or {})

    def decorate(fn: Callable) -> Callable:
        _check_signature(name, fn, defaults, ranges)
        if name in _REGISTRY and not overwrite:
            raise GesimError(f"loss {name!r} is already registered; pass overwrite=True to replace it")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = Loss(name, fn, dict(defaults), {k: ranges.get(k, REAL) for k in defaults},
                               bool(margin), source, doc)
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

# --------------------------------------------------------------------------------------------
# The paper's family (theory.md section 2).


@register("dpo", margin=True, ranges=_BETA, beta=0.1,
          source="Rafailov et al. 2023, DPO (arXiv 2305.18290), Eq. (7); trl loss_type='sigmoid'")
def dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta h),  h = (lw - lw_ref) - (ll - ll_ref)."""
    return -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref))


@register("ipo", margin=True, ranges={"tau": POSITIVE}, tau=0.1,
          source="Azar et al. 2023, IPO (arXiv 2310.12036), Eq. (17), summed log-ratios")
def ipo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, tau):
    """L = (h - 1/(2 tau))^2 on summed log-ratios."""
    return (_h(lw, ll, lw_ref, ll_ref) - 1 / (2 * tau)) ** 2


@register("ipo_norm", margin=False, ranges={"tau": POSITIVE}, tau=0.1,
          source="trl loss_type='ipo' (length-averaged log-probs), after Azar et al. 2023")
def ipo_norm(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, tau):
    """L = (rw/len_w - rl/len_l - 1/(2 tau))^2: IPO on per-token mean log-ratios."""
    return (_h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l) - 1 / (2 * tau)) ** 2


@register("hinge", margin=True, ranges=_BETA, beta=0.1,
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
          source="Meng et al. 2024, SimPO (arXiv 2405.14734), Eq. (6)")
def simpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, gamma):
    """L = -log sigma(beta lw/len_w - beta ll/len_l - gamma): reference-free, length-normalised."""
    return -ops.log_sigmoid(beta * lw / len_w - beta * ll / len_l - gamma)


@register("r_dpo", margin=True, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=0.01,
          source="Park et al. 2024, R-DPO (arXiv 2403.19159)")
def r_dpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta h - alpha (len_w - len_l)): DPO with a length penalty."""
    return -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref) - alpha * (len_w - len_l))


@register("cpo", margin=False, ranges={"beta": POSITIVE, "alpha": NONNEG}, beta=0.1, alpha=1.0,
          source="Xu et al. 2024, CPO (arXiv 2401.08417) with the NLL term -alpha lw "
          "(trl CPOTrainer averages the NLL over tokens instead)")
def cpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta (lw - ll)) - alpha lw: reference-free DPO plus chosen NLL."""
    return -ops.log_sigmoid(beta * (lw - ll)) - alpha * lw


@register("rrhf", margin=False, ranges={"lam": NONNEG}, lam=1.0,
          source="Yuan et al. 2023, RRHF (arXiv 2304.05302), two responses")
def rrhf(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam):
    """L = relu(ll/len_l - lw/len_w) - lam lw: length-normalised ranking plus chosen NLL."""
    return ops.relu(ll / len_l - lw / len_w) - lam * lw


@register("orpo", margin=False, ranges={"lam": NONNEG}, lam=0.1,
          source="Hong et al. 2024, ORPO (arXiv 2403.07691); lam is trl's beta")
def orpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, lam):
    """L = -lw/len_w - lam log sigma(logodds(lw/len_w) - logodds(ll/len_l))."""
    ratio = _log_odds(ops, lw / len_w) - _log_odds(ops, ll / len_l)
    return -lw / len_w - lam * ops.log_sigmoid(ratio)


@register("kto", margin=False,
          ranges={"beta": POSITIVE, "z0": REAL, "lambda_d": NONNEG, "lambda_u": NONNEG},
          beta=0.1, z0=0.0, lambda_d=1.0, lambda_u=1.0,
          source="Ethayarajh et al. 2024, KTO (arXiv 2402.01306), used on pairs; "
          "z0 is the detached KL reference point")
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
          source="Pang et al. 2024, iterative RPO (arXiv 2404.19733); trl rpo_alpha")
def rpo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, alpha):
    """L = -log sigma(beta h) - alpha lw/len_w: DPO plus per-token chosen NLL."""
    return -ops.log_sigmoid(beta * _h(lw, ll, lw_ref, ll_ref)) - alpha * lw / len_w


# --------------------------------------------------------------------------------------------
# trl DPOTrainer's other pairwise losses (theory.md section 2, last paragraph).


@register("exo_pair", margin=True, ranges={"beta": POSITIVE, "eps": Range(0.0, 0.5)}, beta=0.1, eps=1e-3,
          source="Ji et al. 2024, EXO (arXiv 2402.00856), pairwise; trl loss_type='exo_pair'")
def exo_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, eps):
    """L = sigma(beta h)(log sigma(beta h) - log(1-eps)) + sigma(-beta h)(log sigma(-beta h) - log eps)."""
    z = beta * _h(lw, ll, lw_ref, ll_ref)
    return (ops.sigmoid(z) * (ops.log_sigmoid(z) - ops.log(1 - eps))
            + ops.sigmoid(-z) * (ops.log_sigmoid(-z) - ops.log(eps)))


@register("nca_pair", margin=False, ranges=_BETA, beta=0.1,
          source="Chen et al. 2024, NCA (arXiv 2402.05369); trl loss_type='nca_pair'")
def nca_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta rw) - log sigma(-beta rw)/2 - log sigma(-beta rl)/2."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(beta * rw) - ops.log_sigmoid(-beta * rw) / 2 - ops.log_sigmoid(-beta * rl) / 2


@register("robust", margin=True, ranges={"beta": POSITIVE, "eps": Range(0.0, 0.5, low_closed=True)},
          beta=0.1, eps=0.1,
          source="Chowdhury et al. 2024, robust DPO (arXiv 2403.00409); trl loss_type='robust' "
          "with label_smoothing=eps")
def robust(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, eps):
    """L = ((1 - eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps)."""
    z = beta * _h(lw, ll, lw_ref, ll_ref)
    return ((1 - eps) * -ops.log_sigmoid(z) + eps * ops.log_sigmoid(-z)) / (1 - 2 * eps)


@register("bco_pair", margin=False, ranges={"beta": POSITIVE, "delta": REAL}, beta=0.1, delta=0.0,
          source="Jung et al. 2024, BCO (arXiv 2404.04656), paired; trl loss_type='bco_pair'; "
          "delta is the detached running mean of the rewards")
def bco_pair(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, delta):
    """L = -log sigma(beta rw - delta) - log sigma(-(beta rl - delta))."""
    rw, rl = lw - lw_ref, ll - ll_ref
    return -ops.log_sigmoid(beta * rw - delta) - ops.log_sigmoid(-(beta * rl - delta))


@register("sppo_hard", margin=False, ranges=_BETA, beta=0.1,
          source="Wu et al. 2024, SPPO (arXiv 2405.00675) with hard labels; trl loss_type='sppo_hard'")
def sppo_hard(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = (rw - 1/(2 beta))^2 + (rl + 1/(2 beta))^2."""
    return (lw - lw_ref - 1 / (2 * beta)) ** 2 + (ll - ll_ref + 1 / (2 * beta)) ** 2


@register("apo_zero", margin=False, ranges=_BETA, beta=0.1,
          source="D'Oosterlinck et al. 2024, APO-zero (arXiv 2408.06266); trl loss_type='apo_zero'")
def apo_zero(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = (1 - sigma(beta rw)) + sigma(beta rl): push chosen up and rejected down separately."""
    return 1 - ops.sigmoid(beta * (lw - lw_ref)) + ops.sigmoid(beta * (ll - ll_ref))


@register("apo_down", margin=False, ranges=_BETA, beta=0.1,
          source="D'Oosterlinck et al. 2024, APO-down (arXiv 2408.06266); trl loss_type='apo_down'")
def apo_down(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = sigma(beta rw) + (1 - sigma(beta h)): push both down, rejected more."""
    return ops.sigmoid(beta * (lw - lw_ref)) + 1 - ops.sigmoid(beta * _h(lw, ll, lw_ref, ll_ref))


@register("discopop", margin=True, ranges={"beta": POSITIVE, "tau": POSITIVE}, beta=0.1, tau=0.05,
          source="Lu et al. 2024, DiscoPOP / log-ratio modulated loss (arXiv 2406.08414); "
          "trl loss_type='discopop'")
def discopop(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, tau):
    """L = (1 - m)(-log sigma(z)) + m exp(-z),  z = beta h,  m = sigma(z / tau)."""
    z = beta * _h(lw, ll, lw_ref, ll_ref)
    m = ops.sigmoid(z / tau)
    return (1 - m) * -ops.log_sigmoid(z) + m * ops.exp(-z)


@register("sigmoid_norm", margin=False, ranges=_BETA, beta=5.0,
          source="Lambert et al. 2024, Tulu 3 (arXiv 2411.15124), length-normalised DPO; "
          "trl loss_type='sigmoid_norm'")
def sigmoid_norm(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta):
    """L = -log sigma(beta (rw/len_w - rl/len_l))."""
    return -ops.log_sigmoid(beta * _h_norm(lw, ll, lw_ref, ll_ref, len_w, len_l))


@register("alphapo", margin=False, ranges={"beta": POSITIVE, "gamma": NONNEG, "alpha": POSITIVE},
          beta=2.0, gamma=1.0, alpha=0.25,
          source="Gupta et al. 2025, AlphaPO (arXiv 2501.03884); trl CPOTrainer alpha; "
          "alpha -> 0 recovers SimPO")
def alphapo(ops, lw, ll, lw_ref, ll_ref, len_w, len_l, *, beta, gamma, alpha):
    """L = -log sigma(beta (r(lw/len_w) - r(ll/len_l)) - gamma),  r(s) = (1 - exp(-alpha s)) / alpha."""
    def r(s):
        return -ops.expm1(-alpha * s) / alpha
    return -ops.log_sigmoid(beta * (r(lw / len_w) - r(ll / len_l)) - gamma)
