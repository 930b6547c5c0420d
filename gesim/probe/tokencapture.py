"""What the fast token Gram (:mod:`gesim.probe.tokens`) captures from one row's forward: the plan
(which module owns which selected parameters, and by which per-token rule: ``linear`` for Linear /
HF Conv1D applied to one input vector per position, ``embedding`` for lookups of token ids,
``layernorm`` for LayerNorm, per-head norms included, ``vector`` for parameters acting elementwise),
forward hooks recording each use's input (``A``, the ids, or ``xhat``) and the output the backward
is taken at, and the head's pre-hook that ends the row's forward at the head's input (or, on the
check row, runs the model's own head on the first response tokens, :class:`gesim.probe.lmhead.FirstTokens`).

Anything else is refused with a GesimError naming the module (``token_gram``'s ``"auto"`` backend then
runs the per-token loop): a module whose output is off the gradient path or not a tensor, a linear map
applied to other than one vector per position (routed experts, per-head linears), an embedding not
called on ids or not returning ``W[ids] * embed_scale``, a head that is not a plain linear map, a tie
of the head's weight to anything but an embedding, parameters of modules never called.
"""

from __future__ import annotations

import math

import torch

from gesim.errors import GesimError
from gesim.probe.layers import ElementwiseRule, RuleHost, Use, rule_for
from gesim.probe.rows import close


class Stop(Exception):
    """Raised by the head's pre-hook: the row's forward ends at the head's input."""


class _Shim(RuleHost):
    """What :class:`ElementwiseRule` needs from an engine, for one row."""

    def __init__(self, T, dtype):
        self.N, self.T, self.dtype, self._replay = 1, T, dtype, False


def _kind(module, roles):
    """The per-token rule of a module's selected roles (module docstring)."""
    if set(roles) <= {"weight", "bias"}:
        rule = rule_for(module)
        if type(rule).__name__ == "LinearRule":
            return "linear"
        if type(rule).__name__ == "EmbeddingRule" and set(roles) == {"weight"}:
            return "embedding"
        if type(rule).__name__ == "LayerNormRule":
            return "layernorm"
    return "vector"


class Capture:
    """Hooks for one row: per use, what its products need; the head's input."""

    def __init__(self, plan, head, T, dtype, check=None):
        self.plan, self.head, self.T, self.dtype, self.check = plan, head, T, dtype, check
        self.uses, self.h, self.handles, self.shim = [], None, [], _Shim(T, dtype)

    def __enter__(self):
        for module, (name, kind, roles) in self.plan.items():
            self.handles.append(module.register_forward_hook(self._hook(name, kind, roles), with_kwargs=True))
        self.handles.append(self.head.register_forward_pre_hook(self._head_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _head_hook(self, mod, args, kwargs):
        if self.h is not None:
            raise GesimError("the output head is called more than once per forward")
        self.h = args[0] if args else kwargs["input"]
        if self.check is None:
            raise Stop
        sub = self.check(self.h)  # the head and what follows it run on these positions only
        return ((sub, *args[1:]), kwargs) if args else (args, {**kwargs, "input": sub})

    def _hook(self, name, kind, roles):
        def hook(mod, args, kwargs, output):
            if self.shim._replay:
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                raise GesimError(f"module {name} ({type(mod).__name__}): its output is not a tensor on the "
                                 "gradient path; no per-token rule")
            use = Use(name, None, mod, roles)
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise GesimError(f"module {name} ({type(mod).__name__}): its input is not a tensor; no per-token rule")
            if kind == "linear":
                if x.numel() != self.T * x.shape[-1]:  # e.g. experts on routed tokens, a linear on per-head states
                    raise GesimError(f"linear {name} ({type(mod).__name__}) is not applied to one input vector per "
                                     "position; the per-token loop handles it")
                use.a = x.detach().reshape(self.T, -1).to(self.dtype)
            elif kind == "embedding":
                if x.is_floating_point() or x.is_complex():
                    raise GesimError(f"embedding {name} ({type(mod).__name__}) is not called on token ids")
                ids = x.reshape(-1)
                scale = getattr(mod, "embed_scale", 1.0)
                scale = float(scale.detach().float()) if isinstance(scale, torch.Tensor) else float(scale)
                want = torch.nn.functional.embedding(ids, mod.weight.detach()) * scale
                if ids.numel() != self.T or not close(output.detach().reshape(want.shape), want):
                    raise GesimError(f"embedding {name} ({type(mod).__name__}) does not return W[ids] * "
                                     "embed_scale for one id per position")
                pad = getattr(mod, "padding_idx", None)
                use.a, use.extra["scale"] = ids, scale
                use.extra["keep"] = None if pad is None else (ids != pad)
            elif kind == "layernorm":
                xhat = torch.nn.functional.layer_norm(x.detach(), mod.normalized_shape, None, None, mod.eps)
                # one row per normalised vector (a per-head norm has heads x T of them), summed per token
                use.a = {"weight": xhat.reshape(-1, math.prod(mod.normalized_shape)).to(self.dtype)}
                if "bias" in roles:
                    use.a["bias"] = torch.ones_like(use.a["weight"])
            else:
                if not ElementwiseRule().capture(use, self.shim, args, kwargs, output.detach()):
                    raise GesimError(f"module {name} ({type(mod).__name__}): no per-token rule (not linear, "
                                     "embedding or elementwise); the per-token loop handles it")
                use.a = {r: j.reshape(-1, *roles[r].shape).to(self.dtype) for r, j in use.a.items()}
            use.extra["out"] = output
            self.uses.append(use)
            return output.clone()  # the model may update its copy in place; the gradient is taken at this one
        return hook


def plan_uses(model, head, chosen):
    """{module: (name, kind, roles)} for the modules owning selected parameters (the head excluded);
    the head's selected roles; refuses parameters owned by nothing that is called."""
    selected = {id(p) for _, p in chosen}
    plan, head_roles = {}, {}
    for name, module in model.named_modules():
        roles = {r: p for r, p in module.named_parameters(recurse=False) if id(p) in selected}
        if module is head:
            head_roles = roles
            if set(roles) - {"weight", "bias"} or not isinstance(head, torch.nn.Linear):
                raise GesimError(f"output head {type(head).__name__} is not a plain linear map")
            continue
        if roles:
            kind = _kind(module, roles)
            if any(p is head.weight for p in roles.values()) and kind != "embedding":
                raise GesimError(f"the head's weight is also used by {name} ({type(module).__name__}), not an "
                                 "embedding: no closed form for that tie")
            plan[module] = (name or type(module).__name__, kind, roles)
    return plan, head_roles


def check_uses(plan, caps):
    called = {id(u.module) for c in caps if c for u in c[0].uses}
    missing = [name for module, (name, _, _) in plan.items() if id(module) not in called]
    if missing:
        raise GesimError("selected parameters of modules never called in the forward pass (used "
                         "functionally?): " + ", ".join(missing))
