"""Online Merging Optimizer, OMO (Lu et al., "Online Merging Optimizers for Boosting Rewards and
Mitigating Tax in Alignment", arXiv 2405.17931).

theta_b is the base (pretrained) model, theta_r the SFT model (also the DPO reference) and
tau_r = theta_r - theta_b the SFT delta. At every step the finished AdamW update dtheta is merged
with tau_r instead of being applied alone:

    OnDARE:  theta <- theta + (1 - alpha) F_R(dtheta) + alpha F_R(tau_r),
             F_R keeps each entry with probability p (the reserve rate) and drops the rest;
    OnTIES:  F_R keeps the top-p fraction of entries by magnitude (per tensor); the weighted terms
             x = (1 - alpha) F_R(dtheta), y = alpha F_R(tau_r) are combined by sign consensus:
             the elected sign is sign(x + y), and the terms that agree with it are added (signs
             agree: x + y; signs disagree: the larger of x, y in magnitude).

alpha is added to the parameters, not scaled by lr. alpha = 0 with p = 1 is AdamW exactly (for
``sign_vote="magnitude"``); alpha = 0 alone makes OnDARE update dropout. Step-K (``every=K``)
runs plain AdamW for K steps and then merges the accumulated change theta - theta_anchor, where
theta_anchor is theta at the previous merge (K = 1 is OMO; K = the whole run is offline merging).

Switches for what the authors' public code does (QwenLM/online_merging_optimizers,
``online_merging/optimizers.py``) where it differs from the paper; gesim's defaults follow the
paper. :func:`code_variant` returns the switches that reproduce the code's defaults.

=====================  ==========================  ===============================  ==================
behaviour              paper                       reference code                   gesim switch (default)
=====================  ==========================  ===============================  ==================
F_R rescaling          none                        OnDARE: kept / p (torch dropout)  ``rescale`` (False)
                                                   OnTIES: none
clamp                  none                        OnDARE: F_R(tau_r) clamped to     ``clamp`` (None)
                                                   [-1, 1]; an L1-rescaled update
                                                   too (clip_val = 1)
TIES top-k count       top-p fraction              int(p n); no masking when < 1     ``topk`` ("ceil":
                                                   (or p >= 1)                       ceil(p n), >= 1)
L1 rescale             none                        flag, off by default: kept x      ``l1_rescale`` (False)
                                                   ||x||_1 / ||F_R(x)||_1 (OnTIES:
                                                   both terms; OnDARE: the update)
weight decay           AdamW (decoupled, on the    after the merge, on the merged    ``decay_after_merge``
                       parameter before the step)  parameter: theta (1 - lr wd)      (False)
tau_r's mask           (unspecified)               drawn once at the start           ``mask_once`` (False)
TIES sign vote         weighted terms              sign(F(dtheta) + F(tau_r)),       ``sign_vote``
                                                   unweighted                        ("magnitude")
step K                 merge the K-step change     only the first parameter tensor   not copied: every
                                                   is updated on non-merge steps     tensor steps
Adam                   Adam                        HF AdamW: eps (1e-6) added to     torch AdamW
                                                   sqrt(v) before bias correction    (not a switch)
TIES top-k ties        (unspecified)               argsort: exactly m entries        all entries tied
                                                                                     at the threshold
=====================  ==========================  ===============================  ==================

``rescale`` multiplies kept entries by 1/p (in both F_R). ``clamp=c`` clamps F_R(tau_r) (after
its rescaling) to [-c, c], and F_R(dtheta) when ``l1_rescale`` rescaled it, as the code does: at
p = 0.01 with 1/p rescaling every |tau_i| > 0.01 becomes +-1, so the clamp changes the merge
completely. ``l1_rescale`` multiplies the kept entries by ||x||_1 / ||F_R(x)||_1 (it replaces
the 1/p factor). ``sign_vote="unweighted"`` elects the sign from F_R(dtheta) + F_R(tau_r) without
the weights (1 - alpha, alpha), which in practice drops every update coordinate that points
against tau_r on its top-p support (so alpha = 0, p = 1 is then *not* AdamW).
``decay_after_merge`` computes dtheta without weight decay and then decays the merged parameter
after every step, theta <- theta (1 - lr wd), as the code does.
"""

from __future__ import annotations

import math

import torch

from gesim.errors import GesimError, unknown

METHODS = ("dare", "ties")
SIGN_VOTES = ("magnitude", "unweighted")
TOPK = ("ceil", "floor")


def code_variant(method: str) -> dict:
    """The switches that make :class:`OnlineMerging` behave as the authors' public code with its
    defaults (clip_val = 1, rescale flag off), for ``method`` "dare" or "ties"."""
    if method not in METHODS:
        raise unknown("merge method", method, METHODS)
    if method == "dare":
        return dict(rescale=True, clamp=1.0, mask_once=True, decay_after_merge=True)
    return dict(topk="floor", mask_once=True, sign_vote="unweighted", decay_after_merge=True)


def _check(method: str, alpha: float, p: float, sign_vote: str = "magnitude", every: int = 1,
           topk: str = "ceil", clamp: float | None = None) -> None:
    if method not in METHODS:
        raise unknown("merge method", method, METHODS)
    if sign_vote not in SIGN_VOTES:
        raise unknown("sign vote", sign_vote, SIGN_VOTES)
    if topk not in TOPK:
        raise unknown("top-k rounding", topk, TOPK)
    if clamp is not None and not (isinstance(clamp, int | float) and clamp > 0 and math.isfinite(clamp)):
        raise GesimError(f"clamp must be None or a positive number, got {clamp!r}")
    if not 0 < p <= 1:
        raise GesimError(f"reserve rate p must be in (0, 1], got {p}")
    if not 0 <= alpha <= 1:
        raise GesimError(f"merge weight alpha must be in [0, 1], got {alpha}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GesimError(f"every (merge every K steps) must be an integer >= 1, got {every!r}")


def keep_mask(x: torch.Tensor, method: str, p: float, generator: torch.Generator | None = None,
              topk: str = "ceil") -> torch.Tensor:
    """The entries F_R keeps, a bool tensor shaped like x.

    ``dare``: ``torch.rand(x.shape, generator=generator) < p`` (one draw of the generator per
    call). ``ties``: the m entries largest in |x| (all entries tied at the threshold), with
    m = ceil(p n), at least 1 (``topk="ceil"``), or the reference code's m = int(p n), keeping
    every entry when that is below 1 or p = 1 (``topk="floor"``).
    """
    if method == "dare":
        return torch.rand(x.shape, generator=generator, device=x.device) < p
    n = x.numel()
    if n == 0:
        return torch.ones_like(x, dtype=torch.bool)
    if topk == "floor":
        m = int(p * n)
        if m < 1 or p >= 1:
            return torch.ones_like(x, dtype=torch.bool)
    else:
        m = min(n, max(1, math.ceil(round(p * n, 9))))  # round: 0.1 * 30 must keep 3, not 4
    threshold = x.abs().flatten().kthvalue(n - m + 1).values  # m-th largest |x|
    return x.abs() >= threshold


def reserve(x: torch.Tensor, keep: torch.Tensor, p: float, rescale: bool = False, l1_rescale: bool = False,
            clamp: float | None = None) -> torch.Tensor:
    """F_R(x): the kept entries of x, zeros elsewhere; divided by p with ``rescale``, or
    multiplied by ||x||_1 / ||kept||_1 with ``l1_rescale`` (not when ||x||_1 < 1e-8, as the
    code); then clamped to [-clamp, clamp] when ``clamp`` is given."""
    kept = torch.where(keep.bool(), x, torch.zeros_like(x))
    if l1_rescale:
        total, new = x.abs().sum(), kept.abs().sum()
        if total >= 1e-8 and new > 0:
            kept = kept * (total / new)
    elif rescale:
        kept = kept / p
    return kept if clamp is None else kept.clamp(-clamp, clamp)


def combine(d: torch.Tensor, t: torch.Tensor, method: str, alpha: float,
            sign_vote: str = "magnitude") -> torch.Tensor:
    """Merge the reserved update d = F_R(dtheta) with the reserved delta t = F_R(tau_r).

    ``dare``: (1 - alpha) d + alpha t. ``ties``: x = (1 - alpha) d, y = alpha t; elected sign
    gamma = sign(x + y) (``magnitude``) or sign(d + t) with sign(0) = +1 (``unweighted``, the
    reference code); returns
    x [sign x = gamma] + y [sign y = gamma]. An exact tie |x| = |y| of opposite signs gives 0.
    """
    x, y = (1 - alpha) * d, alpha * t
    if method == "dare":
        return x + y
    if sign_vote == "magnitude":
        gamma = torch.sign(x + y)
    else:  # the reference code: majority sign of the unweighted sum, a zero sum counting as +
        gamma = torch.where(d + t >= 0, 1.0, -1.0).to(x.dtype)
    zero = torch.zeros_like(x)
    return torch.where(torch.sign(x) == gamma, x, zero) + torch.where(torch.sign(y) == gamma, y, zero)


def merge_update(dtheta: torch.Tensor, tau: torch.Tensor, method: str = "dare", alpha: float = 0.0,
                 p: float = 1.0, *, rescale: bool = False, sign_vote: str = "magnitude",
                 generator: torch.Generator | None = None, tau_mask: torch.Tensor | None = None,
                 topk: str = "ceil", l1_rescale: bool = False, clamp: float | None = None) -> torch.Tensor:
    """The merged update combine(F_R(dtheta), F_R(tau)) of OnDARE / OnTIES (module docstring).

    DARE masks are drawn from ``generator``, dtheta's first, then tau's. ``tau_mask`` fixes the
    entries of tau that are kept (a mask drawn once, ``mask_once``) instead of drawing them.
    ``l1_rescale`` acts on both terms for TIES and on dtheta only for DARE; ``clamp`` on
    F_R(tau) and on an L1-rescaled F_R(dtheta) (the reference code's choices, module table).
    """
    _check(method, alpha, p, sign_vote, topk=topk, clamp=clamp)
    if dtheta.shape != tau.shape:
        raise GesimError(f"dtheta {tuple(dtheta.shape)} and tau {tuple(tau.shape)} must have one shape")
    if tau_mask is not None and tau_mask.shape != tau.shape:
        raise GesimError(f"tau_mask {tuple(tau_mask.shape)} must have tau's shape {tuple(tau.shape)}")
    d = reserve(dtheta, keep_mask(dtheta, method, p, generator, topk), p, rescale, l1_rescale,
                clamp if l1_rescale else None)
    t = reserve(tau, keep_mask(tau, method, p, generator, topk) if tau_mask is None else tau_mask, p, rescale,
                l1_rescale and method == "ties", clamp)
    return combine(d, t, method, alpha, sign_vote)


class OnlineMerging(torch.optim.Optimizer):
    """AdamW whose every K-th step is merged with tau_r = reference - base (OnDARE / OnTIES).

    ``base`` and ``reference`` are lists of tensors aligned with the parameters (in group order),
    or dicts {name: tensor} when ``params`` is given named (``model.named_parameters()``). An
    inner ``torch.optim.AdamW`` shares this optimizer's param groups (so LR schedulers act on
    both) and computes dtheta exactly as AdamW; the merge then corrects the parameters by
    merge_update(dtheta) - dtheta. Parameters without a gradient are neither stepped nor merged.
    DARE masks come from a generator seeded with ``seed`` (one per device); its state is not
    part of ``state_dict``. ``weight_decay`` defaults to 0 (gesim's preference trainer), not 1e-2.
    The switches ``rescale, clamp, topk, l1_rescale, decay_after_merge, mask_once, sign_vote``
    are the module table's; ``OnlineMerging(..., **code_variant(method))`` is the reference code.
    """

    def __init__(self, params, base, reference, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, method: str = "dare", alpha: float = 0.0, p: float = 1.0,
                 rescale: bool = False, mask_once: bool = False, sign_vote: str = "magnitude",
                 every: int = 1, seed: int | None = None, clamp: float | None = None, topk: str = "ceil",
                 l1_rescale: bool = False, decay_after_merge: bool = False):
        _check(method, alpha, p, sign_vote, every, topk, clamp)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adamw = torch.optim.AdamW(self.param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.merge = dict(method=method, alpha=alpha, p=p, rescale=rescale, sign_vote=sign_vote, topk=topk,
                          l1_rescale=l1_rescale, clamp=clamp)
        self.mask_once, self.every, self.seed, self.n_steps = mask_once, every, seed, 0
        self.decay_after_merge = decay_after_merge
        self._generators: dict = {}
        b, r = self._aligned(base, "base"), self._aligned(reference, "reference")
        for w, b_, r_ in zip(self._params(), b, r):
            state = self.state[w]
            state["tau"] = r_.to(w) - b_.to(w)  # tau_r = theta_r - theta_b
            if mask_once:
                state["tau_mask"] = keep_mask(state["tau"], method, p, self._generator(w.device), topk)

    def _params(self) -> list:
        return [w for group in self.param_groups for w in group["params"]]

    def _aligned(self, theta, what: str) -> list:
        params = self._params()
        if isinstance(theta, dict):
            names = [n for group in self.param_groups for n in group.get("param_names", [])]
            if len(names) != len(params):
                raise GesimError(f"{what} is a dict: pass params as model.named_parameters() to match names")
            missing = [n for n in names if n not in theta]
            if missing:
                raise GesimError(f"{what} has no tensor for parameter {missing[0]!r}")
            theta = [theta[n] for n in names]
        theta = list(theta)
        if len(theta) != len(params):
            raise GesimError(f"{what} has {len(theta)} tensors for {len(params)} parameters")
        for i, (t, w) in enumerate(zip(theta, params)):
            if tuple(t.shape) != tuple(w.shape):
                raise GesimError(f"{what} tensor {i} has shape {tuple(t.shape)}, parameter {tuple(w.shape)}")
        return [t.detach() for t in theta]

    def _generator(self, device):
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        if self.n_steps % self.every == 0:  # a new merge window starts here
            for w in params:
                self.state[w]["anchor"] = w.detach().clone()
                if self.decay_after_merge:
                    self.state[w]["cached"] = torch.zeros_like(w)
        if self.decay_after_merge:  # dtheta without decay; the decay acts after the merge
            decays = [group["weight_decay"] for group in self.param_groups]
            before = [w.detach().clone() for w in params]
            for group in self.param_groups:
                group["weight_decay"] = 0.0
            try:
                self.adamw.step()
            finally:
                for group, wd in zip(self.param_groups, decays):
                    group["weight_decay"] = wd
            for w, w0 in zip(params, before):
                self.state[w]["cached"] += w - w0
        else:
            self.adamw.step()
        self.n_steps += 1
        if self.n_steps % self.every == 0:
            for w in params:
                state = self.state[w]
                anchor = state.pop("anchor")
                dtheta = state.pop("cached") if self.decay_after_merge else w - anchor
                if w.grad is None:
                    continue
                merged = merge_update(dtheta, state["tau"], **self.merge, tau_mask=state.get("tau_mask"),
                                      generator=self._generator(w.device))
                w.add_(merged - dtheta)  # exact AdamW when merged == dtheta
        if self.decay_after_merge:
            for group in self.param_groups:
                for w in group["params"]:
                    if w.grad is not None and group["weight_decay"]:
                        w.mul_(1 - group["lr"] * group["weight_decay"])
        return loss

    def state_dict(self) -> dict:
        return {"merge": super().state_dict(), "adamw": self.adamw.state_dict(), "n_steps": self.n_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict["merge"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.adamw.param_groups = self.param_groups  # one set of hyper-parameters again
        self.n_steps = state_dict["n_steps"]
