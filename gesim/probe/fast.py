"""The fast exact probe: one forward and one backward with respect to activations.

Every selected parameter is differentiated through the calls of the module that owns it, by
that module's rule (:mod:`gesim.probe.layers`: Linear/Conv1D, Embedding, LayerNorm, elementwise
parameters, or row-by-row replay; a parameter whose owner is never called is moved to its
nearest called ancestor, e.g. weights used functionally by a parent). Forward hooks record
each call ("use") of those modules; all parameters are frozen and every embedding output is
made a grad-requiring leaf, so the single backward computes activation gradients only (no
weight-gradient GEMMs, no B x P tensor). A tensor hook on each use's output receives its
output gradient during that backward and immediately turns it into its share of
``<G_i, P G_j>`` (streaming: nothing is kept once consumed). Parameters with several uses
(tied weights) take the cheaper exact form (``_tied_ghost``): ghost products of every use
pair, cross terms included (uses kept until the last arrives; docs/theory.md sections 8.2 and
8.4), or their per-sample gradients summed as they arrive and dotted once.

For a pair batch (rows 0..B-1 chosen, B..2B-1 rejected) the three products of a use with
itself come from one stacked pass (``Rule.pair_products``): the self Grams of all 2B rows in
one bmm per side (nw2 and nl2 together, each symmetric T x T), the chosen x rejected Grams in
one more; materialised per-sample gradients give all three from one (B, 2, P) x (B, P, 2)
GEMM (``rows.pair_gram``), and the short ones (norms, biases) are joined into one at the end.

Preconditioner: supported (every matrix is then materialised one layer at a time, since
the ghost identity has no diagonal weighting). Products are accumulated in float32, or
float64 for float64 models (docs/theory.md section 8.6: never a bf16 Gram).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from gesim import dynamics, lm
from gesim.errors import GesimError
from gesim.probe.layers import (
    ElementwiseRule,
    EmbeddingRule,
    LinearRule,
    RowRule,
    RuleHost,
    Use,
    rule_for,
)
from gesim.probe.products import Products
from gesim.probe.reference import precond_vector, selected_named  # noqa: F401 (precond checks)
from gesim.probe.rows import CONTAINERS, gather_head, tensors


class _Engine(RuleHost):
    """Hooks, one forward, one backward; fills a :class:`Products`."""

    def __init__(self, model, select, N, pairs, precond=None):
        self.model, self.N, self.T = model, N, 0
        chosen = selected_named(model, select)
        precond_vector(precond, [p for _, p in chosen])  # validates shapes and membership
        self.precond = {id(p): v for p, v in (precond or {}).items()}
        self.selected = {id(p): name for name, p in chosen}
        first = chosen[0][1]
        self.dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.products = Products(pairs, N, self.dtype, first.device)
        self.tensor_hooks = []  # handles of the hooks on hooked outputs, removed after the backward
        self.named = dict(model.named_modules())
        self.owner = defaultdict(set)  # id(param) -> names of the modules whose calls it is differentiated through
        self.role = {}  # (module name, id(param)) -> the parameter's name in that module
        self.params = {}  # id -> every parameter of the model (frozen during the call)
        for mname, module in self.named.items():
            for pname, p in module._parameters.items():  # = named_parameters(recurse=False), one dict read
                if p is None:
                    continue
                self.params[id(p)] = p
                if id(p) in self.selected:
                    owner, role = mname, pname
                    while owner and isinstance(self.named[owner], CONTAINERS):  # no forward of their own
                        owner, _, last = owner.rpartition(".")
                        role = f"{last}.{role}"
                    self.owner[id(p)].add(owner)
                    self.role.setdefault((owner, id(p)), role)
        for pid, owners in self.owner.items():  # registered on a module and on its ancestor: the inner one uses it
            self.owner[pid] = {m for m in owners if not any(o != m and o.startswith(m + ".") or (m == "" and o != "")
                                                            for o in owners)}
        self._replay = False
        self.copy_outputs = False  # set when the model updates a hooked output in place

    def _plan(self):
        """{module name: (module, rule, roles)} from ``self.owner`` (roles: name relative to the module)."""
        plan = {}
        for pid, owners in self.owner.items():
            for mname in owners:
                module = self.named[mname]
                name = self.role.get((mname, pid))
                if name is None:  # moved to an ancestor (_reassign): its name relative to that module
                    name = next(n for n, p in module.named_parameters(remove_duplicate=False) if id(p) == pid)
                plan.setdefault(mname, (module, {}))[1][name] = self.params[pid]
        out = {}
        for mname, (module, roles) in plan.items():
            rule = rule_for(module)
            if not isinstance(rule, ElementwiseRule) and not set(roles) <= {"weight", "bias"}:
                rule = ElementwiseRule()
            out[mname] = (module, rule, roles)
        return out

    # -- forward ---------------------------------------------------------------------------
    def _forward_hook(self, mname, rule0, roles):
        def hook(mod, args, kwargs, output):
            rule = rule0
            self.called.add(mname)
            if self._replay:
                return None
            out = leaf = output
            if isinstance(mod, torch.nn.Embedding):
                shape, d = out.shape, out.shape[-1]
                if not roles:  # nothing to measure here: only a start for the backward pass
                    leaf = out.detach().clone().requires_grad_()
                    out = leaf.clone()
                elif out.numel() == self.N * self.T * d:  # one row per sample (maybe with extra unit axes)
                    leaf = out.detach().reshape(self.N, self.T, d).clone().requires_grad_()
                    out = leaf.clone().reshape(shape)  # a model may update it in place; the hook sits on the leaf
                else:  # broadcast positions -> per row
                    leaf = out.detach().reshape(1, -1, d).expand(self.N, -1, -1).clone().requires_grad_()
                    out = leaf.clone()
                self.leaves.append(leaf)
            elif not any(t.requires_grad for t in tensors(out)):
                raise GesimError(f"module {mname} ({type(mod).__name__}) is called on an input that does not come "
                                 "from the batch's embeddings (a position bias before any embedding, or a weight "
                                 "computation such as DoRA's norm): the probe has no per-sample rule for it")
            if roles:
                k = self.n_uses[id(mod)]
                label = mname or f"<{type(mod).__name__}>"
                use = Use(f"{label}#{k}" if k else label, rule, mod, roles)
                if isinstance(rule, ElementwiseRule) and not rule.capture(use, self, args, kwargs, out):
                    use.rule = rule = RowRule()
                if isinstance(rule, RowRule):
                    out = rule.capture(use, self, args, kwargs, out)
                elif not isinstance(rule, ElementwiseRule):  # an embedding checks what the module itself returned
                    rule.capture(use, self, args, kwargs, output if isinstance(rule, EmbeddingRule) else out)
                self.n_uses[id(mod)] += 1
                for p in roles.values():
                    self.n_uses[("p", id(p))] += 1
                self.uses.append(use)
                if rule.streaming:
                    target = leaf if isinstance(mod, torch.nn.Embedding) else out
                    if self.copy_outputs and target is out and out is output:
                        out = output.clone()  # the model may update it in place; the hook stays on the original
                    self.tensor_hooks.append(target.register_hook(lambda g, use=use: self._on_grad(use, g)))
                    self.watched_outputs.append((target, target._version))
            return out if out is not output else None
        return hook

    # -- backward --------------------------------------------------------------------------
    def _on_grad(self, use, g):
        use.rule.grad_arrived(use, g, self)
        self._consume(use)

    def _consume(self, use):
        keep = False
        for role, p in use.roles.items():
            if self.n_uses[("p", id(p))] == 1:
                self._single(use, role, p)
            else:
                arrived = self.pending.setdefault(id(p), [])
                arrived.append((use, role))
                if self._tied_ghost(p):
                    keep = True
                    self._shrink_head(use, role, p, arrived)
                else:  # materialised: add this use's per-sample gradient now, keep nothing of the use
                    acc = self.tied_sum.get(id(p))
                    if acc is None:  # (a replayed module's gradient is its own stored tensor: copied)
                        g = use.rule.per_sample(use, role)
                        self.tied_sum[id(p)] = g.clone() if isinstance(use.rule, RowRule) else g
                    elif hasattr(use.rule, "add_per_sample") and role == "weight":
                        use.rule.add_per_sample(use, acc)
                    else:
                        acc += use.rule.per_sample(use, role)
                if len(arrived) == self.n_uses[("p", id(p))]:
                    self._tied(p)
        if not keep:
            use.a = use.b = None

    def _tied_ghost(self, p) -> bool:
        """Ghost or materialised products for a parameter with several uses (tied weights), decided
        once per call when its first use arrives: ghost needs every use ghost-capable (weights of
        Linear/Conv1D/Embedding, no preconditioner); materialised is taken when its FLOPs are fewer
        (per pair: 2 x sum_u the per-row gradient of use u, plus the (2 x 2) Gram of the summed
        gradient, against 3 x sum_{u,v} 2 T_u T_v (w_u + w_v) / 2 for the ghost Grams of every use
        pair, w = Gram width) and the (N, *shape) sum is no larger than the largest output gradient
        among its uses (the (N, T, V) logits gradient of a tied head): the peak memory grows by at
        most that much, held from the head's gradient to the embedding's (GPT-2 shapes, d > T:
        ghost; the tiny CPU benches with d <= T: materialised, measured +2 MB at d 64, B 8, T 64)."""
        mode = self.tied_mode.get(id(p))
        if mode is None:
            uses = [(u, r) for u in self.uses for r, q in u.roles.items() if q is p]
            mode = self.precond.get(id(p)) is None and all(r == "weight" and u.rule.ghost for u, r in uses)
            if mode and tied_materialise_cheaper(uses, p, self.N):
                mode = False
            self.tied_mode[id(p)] = mode
        return mode

    def _single(self, use, role, p):
        name = f"{use.name}.{role}"
        P = self.precond.get(id(p))
        rule = use.rule
        if rule.ghost and role == "weight" and P is None and rule.cost_prefers_ghost(use):
            self.products.ghost(name, use, use)
        else:
            g = rule.per_sample(use, role)
            self.products.dots(name, g, g, P)

    def _shrink_head(self, use, role, p, arrived):
        """Streaming for a tied LM head (docs/theory.md section 8.6): when a Linear use of a tied weight
        arrives and every use still to come is an embedding, take its self term now, keep only
        the T x T gathers of its output gradient at those embeddings' input ids, and free the
        (N, T, V) gradient."""
        head = isinstance(use.rule, LinearRule) and not use.rule.transposed
        if not head or role != "weight" or self.precond.get(id(p)) is not None:
            return
        others = [u for u in self.uses if u is not use and any(q is p for q in u.roles.values())]
        waiting = [u for u in others if not any(u is w for w, _ in arrived)]
        if not waiting or any(not isinstance(u.rule, EmbeddingRule) or u.roles.get("weight") is not p
                              for u in waiting):
            return
        if any(not isinstance(u.rule, (LinearRule, EmbeddingRule)) for u, _ in arrived):
            return
        name = "tied:" + self.selected[id(p)]
        self.products.ghost(name, use, use)
        for v, _ in arrived:
            if v is not use:
                self.products.ghost_both(name, use, v)
        pairs = {(id(x), id(y)): (x, y) for ia, ib in self.products.index_pairs().values()
                 for x, y in ((ia, ib), (ib, ia))}  # distinct (a self key gives one, not two)
        use.extra["gathered"] = {id(e): {k: gather_head(use.b, y, e.a, x) for k, (x, y) in pairs.items()}
                                 for e in waiting}
        use.extra["done"] = True
        if len(use.roles) == 1:  # a tied bias of the same use still needs its output gradient
            use.b = None

    def _tied(self, p):
        arrived = self.pending.pop(id(p))
        name = "tied:" + self.selected[id(p)]
        P = self.precond.get(id(p))
        if not self._tied_ghost(p):
            g = self.tied_sum.pop(id(p), None)  # None: no use received a gradient (all products 0)
            if g is not None:
                self.products.dots(name, g, g, P)
        elif P is None and all(role == "weight" and u.rule.ghost for u, role in arrived):
            for x, (u, _) in enumerate(arrived):
                for v, _ in arrived[x:]:
                    if u.extra.get("done") and v.extra.get("done"):
                        continue  # taken when the head arrived (_shrink_head)
                    self.products.ghost_both(name, u, v)
        else:
            g = sum(u.rule.per_sample(u, role) for u, role in arrived)
            self.products.dots(name, g, g, P)
        for u, _ in arrived:
            if not any(u is w for group in self.pending.values() for w, _ in group):
                u.a = u.b = None

    def _forward(self, ids, mask, plan):
        """One hooked forward; returns (s, called module names)."""
        self.uses, self.leaves, self.pending, self.n_uses = [], [], {}, defaultdict(int)
        self.tied_mode, self.tied_sum = {}, {}
        self.looked_up, self.escaped, handles = {}, set(), []
        self.called = called = set()
        self.watched_outputs = []
        watched = {id(m.weight): m for m in self.named.values() if isinstance(m, torch.nn.Embedding)}
        embedding = torch.nn.functional.embedding

        def recording_embedding(input, weight, *args, **kwargs):
            if not self._replay and id(weight) in watched:
                self.looked_up[id(watched[id(weight)])] = input
            return embedding(input, weight, *args, **kwargs)

        ancestors = {n for owners in self.owner.values() for mname in owners for n in _chain(mname)}
        for mname, module in self.named.items():
            if mname in plan or isinstance(module, torch.nn.Embedding):
                _, rule, roles = plan.get(mname, (module, EmbeddingRule(), {}))
                handles.append(module.register_forward_hook(self._forward_hook(mname, rule, roles), with_kwargs=True))
            elif mname in ancestors:  # (a hooked module marks itself called in its forward hook)
                handles.append(module.register_forward_pre_hook(lambda m, a, n=mname: called.add(n)))
        torch.nn.functional.embedding = recording_embedding
        try:
            s = lm.response_logps(self.model, ids, mask)  # (N,)
        finally:
            torch.nn.functional.embedding = embedding
            for h in handles:
                h.remove()
        return s, called

    def run(self, ids, mask):
        """Forward, backward; returns the summed log-probs (N,)."""
        self.T = ids.shape[1]
        saved = {p: p.requires_grad for p in self.params.values()}
        for p in saved:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                plan = self._plan()
                s, called = self._forward(ids, mask, plan)
                moved = self._reassign(called)  # parameters used functionally by an ancestor: hook that one
                if any(t._version != v for t, v in self.watched_outputs):  # updated in place: its hook would not fire
                    self.copy_outputs = moved = True
                if moved:
                    s, _ = self._forward(ids, mask, self._plan())
                self.watched_outputs = []  # checked: not held through the backward (the logits alone are N x T x V)
                if not self.leaves:
                    raise GesimError("the model has no nn.Embedding module: the probe cannot start its backward")
                torch.autograd.grad(s.sum(), self.leaves, allow_unused=True)
                for use in [u for u in self.uses if not u.rule.streaming]:
                    use.rule.finish(use, self)
                    self._consume(use)
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)
            # The hooks' closures hold this engine and the engine holds the hooked tensors, whose
            # autograd nodes hold the hooks: a cycle through C++ that Python's collector cannot
            # see. Removing the hooks breaks it (else every call leaked its captured activations).
            for h in self.tensor_hooks:
                h.remove()
            self.tensor_hooks.clear()
            self.watched_outputs = []
        used = {k[1] for k in self.n_uses if isinstance(k, tuple)}
        unused = [name for pid, name in self.selected.items() if pid not in used]
        if unused:
            raise GesimError("selected parameters not used through any module in the forward pass (used "
                             "functionally?): " + ", ".join(unused))
        for pid in list(self.pending):  # tied uses whose output never received a gradient
            p = self.params[pid]
            for u in self.uses:
                if (u.b is None and not u.extra.get("done") and any(q is p for q in u.roles.values())
                        and not any(u is w for w, _ in self.pending[pid])):
                    u.rule.grad_arrived(u, torch.zeros(*_out_shape(u), dtype=self.dtype, device=s.device), self)
                    self.pending[pid].append((u, next(r for r, q in u.roles.items() if q is p)))
            self._tied(p)
        self.products.flush()
        return s.detach()

    def _reassign(self, called) -> bool:
        """Move parameters whose owner was never called to their nearest called ancestor."""
        used = {k[1] for k in self.n_uses if isinstance(k, tuple)}
        moved = False
        for pid, owners in self.owner.items():
            if pid in used and pid not in self.escaped:
                continue
            for anc in _chain(min(owners, key=len))[1:]:
                if anc in called:
                    self.owner[pid], moved = {anc}, True
                    break
        return moved


def tied_materialise_cheaper(uses, p, N) -> bool:
    """See :meth:`_Engine._tied_ghost` (uses: [(use, role)], all ghost-capable weight uses)."""
    outs = [math.prod(_out_shape(u)) for u, _ in uses]
    if N * p.numel() > max(outs):
        return False
    T = [u.a.shape[1] for u, _ in uses]
    w = [u.rule.ghost_width(u) for u, _ in uses]
    ghost = 3 * sum(T[x] * T[y] * (w[x] + w[y]) for x in range(len(uses)) for y in range(len(uses)))
    mat = 2 * sum(u.rule.materialise_flops(u) for u, _ in uses) + 8 * p.numel()
    return mat < ghost


def _chain(mname: str) -> list:
    """The module and its ancestors, innermost first ('' is the root)."""
    parts = mname.split(".") if mname else []
    return [".".join(parts[:k]) for k in range(len(parts), -1, -1)]


def _out_shape(use):
    a = use.a
    if isinstance(use.rule, EmbeddingRule):
        return (*a.shape[:2], use.roles["weight"].shape[-1])
    return (*a.shape[:2], use.rule.out_dim(use))


def fast_pair_stats(model, batch: lm.PairBatch, select="all", precond=None, per_layer=False):
    """See :func:`gesim.probe.pair_stats`."""
    B = len(batch)
    ids, mask = batch.stacked()  # (2B, T): chosen rows then rejected rows
    ia, ib = slice(0, B), slice(B, 2 * B)  # views, no gather copies
    engine = _Engine(model, select, 2 * B, {"ip": (ia, ib), "nw2": (ia, ia), "nl2": (ib, ib)}, precond)
    engine.products.record_layers = per_layer
    s = engine.run(ids, mask)
    out = {k: v for k, v in engine.products.total.items()}
    out["cos"] = dynamics.cosine(out["ip"], out["nw2"], out["nl2"])
    out["lw"], out["ll"] = s[:B].to(out["ip"].dtype), s[B:].to(out["ip"].dtype)
    if per_layer:
        out["layers"] = dict(engine.products.layers)
    return out


def fast_token_gram(model, ids, mask, select="all"):
    """Exact token Gram; see :func:`gesim.probe.tokens.fast_token_gram` (one forward per row,
    one activation-only backward per token, the LM head in closed form)."""
    from gesim.probe.tokens import fast_token_gram as tokens_gram
    return tokens_gram(model, ids, mask, select)


def fast_row_gram(model, ids, mask, select="all", precond=None):
    """Full Gram (N, N) of the per-row gradients ``<G_i, P G_j>`` of the summed masked log-probs
    (one forward, one backward): ``sum_ij`` of it equals ``||grad sum_i S_i||^2`` (P = 1)."""
    engine = _Engine(model, select, len(ids), None, precond)
    engine.run(ids, mask)
    return engine.products.total
