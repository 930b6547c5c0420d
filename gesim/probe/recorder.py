"""The hook engine behind :class:`gesim.probe.telemetry.StepTelemetry`: per-row gradient
products read from a training step's own backward pass.

In a training step with loss L, row i of the grad-enabled forward contributes
``G_i = dL/dtheta`` restricted to that row (rows never interact: causal or per-row masks, no
batch norm). For every module that owns a selected parameter, a forward hook keeps the use's
inputs ``A_i`` (the probe's rules, :mod:`gesim.probe.layers`) and a tensor hook on its output
receives ``B_i = dL/d(output)_i`` during the user's own ``L.backward()``; each use is turned at
once into its share of ``<G_i, G_j>`` (ghost or materialised products by the probe's cost rule;
tied weights with every use pair, the embedding x head cross term included) and freed. No
parameter is frozen and no output value is changed, so autograd computes exactly the
gradients it would compute without the hooks (the recorder only reads).

Two product sets: ``pairs`` (each pair's ``<r_w, r_w>``, ``<r_l, r_l>``, ``<r_w, r_l>``) or the
full Gram of the recorded rows (``batch_gram``; materialised per-row gradients chunk by chunk
over the output dimension, or flattened ghost Grams, whichever costs fewer FLOPs).
Products are accumulated in float32 (float64 for float64 models): never a bf16 Gram.
"""

from __future__ import annotations

import contextlib

import torch

from gesim.errors import GesimError
from gesim.probe.grams import embedding_gram, linear_gram, tied_gram
from gesim.probe.layers import (
    ElementwiseRule,
    EmbeddingRule,
    LayerNormRule,
    LinearRule,
    RowRule,
    RuleHost,
    Use,
    rule_for,
)
from gesim.probe.reference import selected_named
from gesim.probe.rows import CONTAINERS, gather_head, pair_gram_rows


def as_index(rows: torch.Tensor):
    """A slice when ``rows`` is a contiguous ascending range (views, no gather copies), else the tensor."""
    rows = torch.as_tensor(rows).reshape(-1).long()
    if len(rows) and torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows), device=rows.device)):
        return slice(int(rows[0]), int(rows[0]) + len(rows))
    return rows


def owners(model, selected: dict) -> dict:
    """{id(param): names of the innermost modules registering it (containers -> their parent)}."""
    named = dict(model.named_modules())
    own: dict = {}
    for mname, module in named.items():
        for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) in selected:
                while mname and isinstance(named[mname], CONTAINERS):
                    mname = mname.rpartition(".")[0]
                own.setdefault(id(p), set()).add(mname)
    for pid, names in own.items():
        own[pid] = {m for m in names if not any(o != m and (o.startswith(m + ".") or m == "") for o in names)}
    return own


class Recorder(RuleHost):
    """Hooks for one record block. ``N``, ``T``, ``dtype``, ``looked_up``, ``detached``,
    ``replaying``, ``escaped``, ``copy_outputs``, ``watched_outputs``: what the probe's rules
    read from their engine."""

    def __init__(self, model, select="all", batch_gram=False):
        chosen = selected_named(model, select)
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise GesimError("telemetry: selected parameters do not require grad (no gradient to record): "
                             + ", ".join(frozen[:5]))
        self.model, self.batch_gram = model, batch_gram
        self.selected = {id(p): name for name, p in chosen}
        self.params = {id(p): p for _, p in chosen}
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in chosen) else torch.float32
        self.named = dict(model.named_modules())
        self.plan = {}
        for pid, names in owners(model, self.selected).items():
            for mname in names:
                module = self.named[mname]
                role = next(r for r, q in module.named_parameters(remove_duplicate=False) if id(q) == pid)
                self.plan.setdefault(mname, [module, {}])[1][role] = self.params[pid]
        for entry in self.plan.values():
            rule = _rule(entry[0])
            if not isinstance(rule, ElementwiseRule) and not set(entry[1]) <= {"weight", "bias"}:
                rule = ElementwiseRule()
            entry.append(rule)
        self._replay, self.copy_outputs = False, True  # RowRule: a copy of each output, never a view
        self.verify = True  # the first block checks that every parameter's hooked uses add up to its gradient

    # -- what the rules read -------------------------------------------------------------
    # -- one block -----------------------------------------------------------------------
    @contextlib.contextmanager
    def block(self, chosen_rows, rejected_rows):
        cw, rj = (torch.as_tensor(r).reshape(-1).long() for r in (chosen_rows, rejected_rows))
        if len(cw) != len(rj) or len(cw) == 0:
            raise GesimError(f"telemetry: chosen_rows ({len(cw)}) and rejected_rows ({len(rj)}) must give "
                             "one row each for every pair (at least one pair)")
        self.rows = (cw, rj)
        self.N = self.T = None
        self.uses, self.pending, self.n_uses, self.fwd_calls = [], {}, {}, {}
        self.looked_up, self.escaped, self.watched_outputs, self.fired, self.arrived = {}, set(), [], set(), 0
        self.total = None
        handles = [self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
                   self.model.register_forward_hook(self._root_post)]
        for mname, (module, roles, rule) in self.plan.items():
            handles.append(module.register_forward_hook(self._hook(mname, rule, roles), with_kwargs=True))
        self.sums, self.checks = {}, {}  # first block: each parameter's hooked uses' shares, summed (see _fired)
        for pid, p in self.params.items():
            handles.append(p.register_hook(lambda g, pid=pid: self._fired(pid, g)))
        embedding = torch.nn.functional.embedding
        watched = {id(m.weight): m for m in self.named.values() if isinstance(m, torch.nn.Embedding)}

        def recording_embedding(input, weight, *args, **kwargs):
            if not self._replay and id(weight) in watched:
                self.looked_up[id(watched[id(weight)])] = input
            return embedding(input, weight, *args, **kwargs)

        torch.nn.functional.embedding = recording_embedding
        try:
            yield self
        finally:
            torch.nn.functional.embedding = embedding
            for h in handles:
                h.remove()
        self._finish()

    def _root_pre(self, mod, args, kwargs):
        if self._replay or not torch.is_grad_enabled() or _in_backward():
            return None
        if self.N is not None:
            raise GesimError("telemetry: a second grad-enabled forward of the model inside one record block; "
                             "record one forward (and its backward) per block")
        x = kwargs.get("input_ids")
        if x is None:
            x = next((a for a in args if isinstance(a, torch.Tensor)), kwargs.get("inputs_embeds"))
        if x is None or x.dim() < 2:
            raise GesimError("telemetry: cannot read the batch's rows from the model's inputs (no input_ids "
                             "or inputs_embeds of shape (N, T, ...))")
        self.N, self.T = int(x.shape[0]), int(x.shape[1])
        self.low_precision = torch.is_autocast_enabled(x.device.type) or any(
            p.dtype in (torch.bfloat16, torch.float16) for p in self.params.values())
        cw, rj = self.rows
        top = int(max(cw.max(), rj.max()))
        if top >= self.N or int(min(cw.min(), rj.min())) < 0:
            raise GesimError(f"telemetry: row index {top} outside the forward's {self.N} rows")
        if self.batch_gram:
            self.index = torch.cat([cw, rj])
            self.total = torch.zeros(len(self.index), len(self.index), dtype=self.dtype, device=x.device)
        else:
            self.index = {"rw2": (as_index(cw), as_index(cw)), "rl2": (as_index(rj), as_index(rj)),
                          "rwl": (as_index(cw), as_index(rj))}
            self.total = {k: torch.zeros(len(cw), dtype=self.dtype, device=x.device) for k in self.index}
        return None

    def _root_post(self, mod, args, output):
        """No reference to the hooked outputs past the forward (the logits would stay alive). An
        output the model later updates in place is fine: a tensor hook receives the gradient of
        the version it was registered on (torch's autograd semantics since 2.0), i.e. of what
        the module returned."""
        if not _in_backward():
            self.watched_outputs = []

    def _hook(self, mname, rule0, roles):
        def hook(mod, args, kwargs, output):
            if self._replay or self.N is None or not torch.is_grad_enabled():
                return None
            if _in_backward() and self.fwd_calls.get(mname):
                return None  # gradient checkpointing re-runs a forward already recorded
            if not _in_backward():
                self.fwd_calls[mname] = self.fwd_calls.get(mname, 0) + 1
            if isinstance(output, torch.Tensor) and torch.is_autocast_enabled(output.device.type):
                self.low_precision = True  # autocast is entered inside forward, after the root's pre-hook
            k = self.n_uses.get(id(mod), 0)
            use = Use(f"{mname or type(mod).__name__}#{k}" if k else (mname or type(mod).__name__), rule0, mod, roles)
            out = output
            if isinstance(mod, torch.nn.Embedding) and self.N > 1 and (
                    output.shape[0] == 1 or output.numel() == self.T * output.shape[-1]):  # (1, T, d) or (T, d)
                out = output.reshape(1, -1, output.shape[-1]).expand(self.N, -1, -1).clone()  # positions -> per row
            rule = rule0
            if isinstance(rule, ElementwiseRule) and not rule.capture(
                    use, self, args, kwargs, out.detach() if isinstance(out, torch.Tensor) else out):
                use.rule = rule = RowRule()
            if isinstance(rule, RowRule):
                out = rule.capture(use, self, args, kwargs, out)
            elif not isinstance(rule, ElementwiseRule):  # an embedding checks what the module itself returned
                rule.capture(use, self, args, kwargs, output if isinstance(rule, EmbeddingRule) else out)
            self.n_uses[id(mod)] = k + 1
            for p in roles.values():
                self.n_uses[("p", id(p))] = self.n_uses.get(("p", id(p)), 0) + 1
            self.uses.append(use)
            if rule.streaming:
                if not out.requires_grad:
                    raise GesimError(f"telemetry: module {mname} ({type(mod).__name__}) owns selected parameters "
                                     "but its output does not require grad")
                if out._base is not None:  # a view: an in-place update of it re-routes autograd; give a copy
                    out = out.clone()
                out.register_hook(lambda g, use=use: self._on_grad(use, g))
            return out if out is not output else None
        return hook

    # -- a call no hook sees ----------------------------------------------------------------
    def external_use(self, module, x):
        """Record a call of ``module`` (a selected ``nn.Linear``) on input ``x`` (N, T, d_in) that
        ran outside a module call, e.g. trl's fused LM head, which reads the head's weight inside
        its own autograd Function: the :class:`Use` whose output gradient (N, T, d_out) the
        caller hands to :meth:`deliver` during the backward (a tied embedding's cross terms
        included, as for a hooked call). None when the module owns no selected parameter."""
        entry = next(((n, e) for n, e in self.plan.items() if e[0] is module), None)
        if entry is None or self.N is None:
            return None
        mname, (module, roles, rule) = entry
        if not isinstance(rule, LinearRule) or rule.transposed:
            raise GesimError(f"telemetry: {mname} ({type(module).__name__}) is used outside a module call and is "
                             "not a plain nn.Linear; its per-row gradient cannot be formed")
        k = self.n_uses.get(id(module), 0)
        use = Use(f"{mname}#{k}" if k else mname, rule, module, roles)
        rule.capture(use, self, (x,), {}, None)
        self.n_uses[id(module)] = k + 1
        for p in roles.values():
            self.n_uses[("p", id(p))] = self.n_uses.get(("p", id(p)), 0) + 1
        self.uses.append(use)
        return use

    def deliver(self, use, g):
        """The output gradient of an :meth:`external_use`, as a tensor hook would have received it."""
        self._on_grad(use, g)

    # -- backward ------------------------------------------------------------------------
    def _on_grad(self, use, g):
        if use.extra.get("consumed"):
            raise GesimError(f"telemetry: a second backward through {use.name} in one record block")
        use.rule.grad_arrived(use, g, self)
        self.arrived += 1
        self._consume(use)

    def _fired(self, pid, g):
        """A selected parameter's gradient is complete. On the first block its hooked uses' shares
        (summed as they were consumed, which is before: a use's output gradient arrives before the
        module's backward forms the weight gradient) must add up to it: a use no hook sees (a fused
        kernel reading the weight, e.g. an LM head inside a custom autograd Function, tied to the
        hooked embedding) would otherwise drop its share of the rows silently. One GEMM per use,
        once; the norms are compared at the end of the block (:meth:`_verify`)."""
        self.fired.add(pid)
        got = self.sums.pop(pid, None) if self.verify else None
        if got is None:
            return
        want = g.detach().to(self.dtype)
        self.checks[pid] = (float((got - want).norm()), float(want.norm()))

    def _verify(self):
        """Each checked parameter p: ``||sum of hooked shares - grad_p|| <= tol max(||grad_p||, G / 10)``,
        G the norm of the whole selected gradient, tol the precision's rounding allowance (1e-5 float64,
        1e-3 float32, 5e-2 autocast / bf16). Relative to ``||grad_p||`` alone, a parameter whose gradient
        cancels to rounding noise failed on noise: an attention key's bias (softmax ignores a shift shared
        by all keys, so its gradient is exactly zero) refused 26 families (OPT, BART, BERT-like, ...).
        A share no hook sees is caught whenever it exceeds tol max(||grad_p||, G / 10), so what could
        escape moves the rows by less than tol / 10 of the gradient."""
        if not self.checks:
            return
        tol = 5e-2 if self.low_precision else {torch.float64: 1e-5}.get(self.dtype, 1e-3)
        G = sum(w * w for _, w in self.checks.values()) ** 0.5
        scaled = [(pid, d / max(w, G / 10, torch.finfo(self.dtype).tiny)) for pid, (d, w) in self.checks.items()]
        bad = [(pid, err) for pid, err in scaled if err > tol]
        if bad:
            pid, err = max(bad, key=lambda x: x[1])
            raise GesimError(f"telemetry: the uses of {self.selected[pid]} that module hooks see do not add up to "
                             f"its gradient (relative difference {err:.1e}): it is also used where no hook sees it "
                             "(a fused kernel reading the weight?); record that use with Recorder.external_use, or "
                             "select parameters without it")

    def _consume(self, use):
        use.extra["consumed"] = True
        if self.verify and use.rule.streaming:
            for role, p in use.roles.items():
                share = use.rule.total(use, role).reshape(p.shape).to(self.dtype)
                self.sums[id(p)] = self.sums[id(p)] + share if id(p) in self.sums else share
        keep = False
        for role, p in use.roles.items():
            if self.n_uses[("p", id(p))] == 1:
                self._single(use, role, p)
            else:
                arrived = self.pending.setdefault(id(p), [])
                arrived.append((use, role))
                keep = True
                if not self.batch_gram:
                    self._shrink_head(use, role, p, arrived)
                if len(arrived) == self.n_uses[("p", id(p))]:
                    self._tied(p)
        if not keep:
            use.a = use.b = None

    def _add(self, values):
        if self.batch_gram:
            self.total += values
        else:
            for k, v in values.items():
                self.total[k] += v

    def _ghost(self, u, v):
        self._add({k: u.rule.product(u, ia, v, ib) for k, (ia, ib) in self.index.items()})

    def _dots(self, g):
        """Products of materialised per-row gradients g (N, ...)."""
        if self.batch_gram:
            x = g[self.index].reshape(len(self.index), -1)
            self._add(x @ x.T)
        else:  # one stacked (K, 2, P) x (K, P, 2) Gram for the three keys
            wl, w2, l2 = pair_gram_rows(g, *self.index["rwl"])
            self._add({"rw2": w2, "rl2": l2, "rwl": wl})

    def _single(self, use, role, p):
        rule = use.rule
        if self.batch_gram and role == "weight" and isinstance(rule, LinearRule):
            self._add(linear_gram(use.a[self.index], use.b[self.index]))
        elif self.batch_gram and role == "weight" and isinstance(rule, EmbeddingRule):
            self._add(embedding_gram(use.a[self.index], use.b[self.index]))
        elif not self.batch_gram and rule.ghost and role == "weight" and (
                isinstance(rule, EmbeddingRule) or rule.cost_prefers_ghost(use)):
            self._ghost(use, use)
        else:
            self._dots(rule.per_sample(use, role))

    def _shrink_head(self, use, role, p, arrived):
        """A tied LM head whose other uses still to come are embeddings: its self and cross terms
        with what arrived now, and only T x T gathers of its (N, T, V) output gradient kept."""
        if not isinstance(use.rule, LinearRule) or use.rule.transposed or role != "weight":
            return
        waiting = [u for u in self.uses if u is not use and any(q is p for q in u.roles.values())
                   and not any(u is w for w, _ in arrived)]
        if not waiting or any(not isinstance(u.rule, EmbeddingRule) or u.roles.get("weight") is not p
                              for u in waiting):
            return
        if any(not isinstance(u.rule, (LinearRule, EmbeddingRule)) for u, _ in arrived):
            return
        self._ghost(use, use)
        for v, _ in arrived:
            if v is not use:
                self._ghost(use, v)
                self._ghost(v, use)
        use.extra["gathered"] = {id(e): {(id(x), id(y)): gather_head(use.b, y, e.a, x)
                                         for ia, ib in self.index.values() for x, y in ((ia, ib), (ib, ia))}
                                 for e in waiting}
        use.extra["done"] = True
        if len(use.roles) == 1:
            use.b = None

    def _tied(self, p):
        arrived = self.pending.pop(id(p))
        if self.batch_gram and all(r == "weight" and (isinstance(u.rule, EmbeddingRule) or (
                isinstance(u.rule, LinearRule) and not u.rule.transposed)) for u, r in arrived):
            self._add(tied_gram([(u.rule, u.a[self.index], u.b[self.index]) for u, _ in arrived], p.shape))
        elif not self.batch_gram and all(r == "weight" and u.rule.ghost for u, r in arrived):
            for x, (u, _) in enumerate(arrived):
                for v, _ in arrived[x:]:
                    if u.extra.get("done") and v.extra.get("done"):
                        continue
                    self._ghost(u, v)
                    if v is not u:
                        self._ghost(v, u)
        else:
            self._dots(sum(u.rule.per_sample(u, r) for u, r in arrived))
        for u, _ in arrived:
            if not any(u is w for group in self.pending.values() for w, _ in group):
                u.a = u.b = None

    def _finish(self):
        if self.N is None:
            raise GesimError("telemetry: no grad-enabled forward of the model inside the record block")
        for use in [u for u in self.uses if not u.rule.streaming]:
            if any(b is not None for b in use.b):
                use.rule.finish(use, self)
                self.arrived += 1
                self._consume(use)
        if not self.arrived and self.uses:
            raise GesimError("telemetry: no backward pass reached the model inside the record block "
                             "(call L.backward() inside `with tel.record(...)`)")
        used = {k[1] for k in self.n_uses if isinstance(k, tuple)}
        missed = [self.selected[pid] for pid in self.fired if pid not in used]
        if missed:
            raise GesimError("telemetry: parameters received a gradient through no module the layer rules cover "
                             "(used functionally?): " + ", ".join(sorted(missed)))
        lost = [u.name for u in self.uses if u.rule.streaming and not u.extra.get("consumed") and any(
            self.n_uses[("p", id(p))] == 1 and id(p) in self.fired for p in u.roles.values())]
        if lost:  # e.g. an output updated in place through a view: its hook never fires
            raise GesimError("telemetry: no output gradient reached " + ", ".join(lost) + " though its parameters "
                             "received a gradient; its share would be missing")
        for pid in list(self.pending):  # tied uses whose output received no gradient: zero
            p = self.params[pid]
            for u in self.uses:
                if u.b is None and not u.extra.get("done") and any(q is p for q in u.roles.values()) and \
                        not any(u is w for w, _ in self.pending[pid]):
                    u.rule.grad_arrived(u, torch.zeros(*_out_shape(u), dtype=self.dtype,
                                                       device=p.device), self)
                    self.pending[pid].append((u, next(r for r, q in u.roles.items() if q is p)))
            self._tied(p)
        if self.verify:
            self._verify()
        self.verify, self.sums, self.checks = False, {}, {}  # checked on the first block only


def _rule(module):
    """The probe's rule, and its LayerNorm rule for a LayerNorm subclass that declares
    ``same_as_layer_norm`` (gesim's own, thread-invariant LayerNorm: no re-run needed)."""
    if getattr(type(module), "same_as_layer_norm", False) and isinstance(module, torch.nn.LayerNorm) \
            and module.elementwise_affine:
        return LayerNormRule()
    return rule_for(module)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _out_shape(use):
    if isinstance(use.rule, EmbeddingRule):
        return (*use.a.shape[:2], use.roles["weight"].shape[-1])
    return (*use.a.shape[:2], use.rule.out_dim(use))


__all__ = ["Recorder", "as_index"]
