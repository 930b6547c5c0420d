"""The fast exact probe: one forward and one backward with respect to activations.

Every selected parameter must live (directly) in a module the probe understands (Linear,
HF Conv1D, Embedding, LayerNorm, RMSNorm; PEFT LoRA factors are Linear). Forward hooks record
each call ("use") of those modules; all parameters are frozen and every embedding output is
made a grad-requiring leaf, so the single backward computes activation gradients only (no
weight-gradient GEMMs, no B x P tensor). A tensor hook on each use's output receives its
output gradient during that backward and immediately turns it into its share of
``<G_i, P G_j>`` (streaming: nothing is kept once consumed), except for parameters with
several uses (tied weights), whose uses are kept until the last arrives and then combined
with all use pairs, cross terms included (docs/theory.md sections 8.2 and 8.4).

Preconditioner: supported (every matrix is then materialised one layer at a time, since
the ghost identity has no diagonal weighting). Products are accumulated in float32, or
float64 for float64 models (docs/theory.md section 8.6: never a bf16 Gram).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from gesim import lm
from gesim.errors import GesimError
from gesim.probe.layers import Use, gather_head, ghost_cost_wins, ghost_product, module_kind, per_sample, rms_xhat
from gesim.probe.reference import precond_vector, selected_named  # noqa: F401 (precond checks)

KEYS = ("ip", "nw2", "nl2")


class _Products:
    """Which products to take: ``pairs`` {key: (ia, ib)} row indices (or slices) over the N rows, or the
    full (N, N) Gram when ``pairs`` is None."""

    def __init__(self, pairs, N, dtype, device):
        self.pairs, self.N = pairs, N
        if pairs is None:
            self.total = torch.zeros(N, N, dtype=dtype, device=device)
        else:
            self.total = {k: torch.zeros(len(range(N)[ia]), dtype=dtype, device=device) for k, (ia, _) in pairs.items()}
        self.layers = defaultdict(dict)

    def index_pairs(self):
        if self.pairs is None:  # full Gram: all (i, j), built once (the same objects every call)
            ia = torch.arange(self.N).repeat_interleave(self.N)
            self.pairs_all = getattr(self, "pairs_all", None) or {"K": (ia, torch.arange(self.N).repeat(self.N))}
            return self.pairs_all
        return self.pairs

    def add(self, name, values):
        """values: {key: (K,)} from ghost products (K index pairs)."""
        if self.pairs is None:
            values = {"K": values["K"].view(self.N, self.N)}
            self.total += values["K"]
        else:
            for k, v in values.items():
                self.total[k] += v
        for k, v in values.items():
            self.layers[name][k] = self.layers[name].get(k, 0) + v.detach()

    def dots(self, name, g_u, g_v, P=None):
        """Add <g_u, P g_v> for materialised per-sample gradients (N, ...)."""
        gu, gv = g_u.flatten(1), g_v.flatten(1)
        if P is not None:
            gv = gv * P.reshape(1, -1).to(gv.dtype)
        if self.pairs is None:
            self.add(name, {"K": (gu @ gv.T).reshape(-1)})
        else:
            self.add(name, {k: (gu[ia] * gv[ib]).sum(1) for k, (ia, ib) in self.pairs.items()})

    def ghost(self, name, u, v):
        self.add(name, {k: ghost_product(u, ia, v, ib) for k, (ia, ib) in self.index_pairs().items()})


class _Engine:
    """Hooks, one forward, one backward; fills a :class:`_Products`."""

    def __init__(self, model, params, N, pairs, precond=None):
        self.model, self.N = model, N
        chosen = selected_named(model, params)
        precond_vector(precond, [p for _, p in chosen])  # validates shapes and membership
        self.precond = {id(p): v for p, v in (precond or {}).items()}
        self.selected = {id(p): name for name, p in chosen}
        first = chosen[0][1]
        self.dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.products = _Products(pairs, N, self.dtype, first.device)
        self.modules, uncovered = {}, []
        for mname, module in model.named_modules():
            roles = {r: p for r, p in module.named_parameters(recurse=False) if id(p) in self.selected}
            if not roles:
                continue
            kind = module_kind(module)
            if kind is None or not set(roles) <= {"weight", "bias"}:
                uncovered += [f"{mname + '.' if mname else ''}{r} ({type(module).__name__})" for r in roles]
                continue
            self.modules[mname] = (module, kind, roles)
        if uncovered:
            raise GesimError("the probe has no exact rule for these selected parameters: " + ", ".join(uncovered)
                             + " (select fewer with params=..., or use backend='reference')")
        self.uses, self.leaves = [], []
        self.pending = {}  # id(param) -> uses already arrived (tied parameters)
        self.n_uses = defaultdict(int)

    # -- forward ---------------------------------------------------------------------------
    def _forward_hook(self, mname, module, kind, roles):
        def hook(mod, inputs, output):
            x = inputs[0]
            out = output
            if kind == "embedding":
                if x.dim() < 2 or x.shape[0] != self.N:
                    x = x.reshape(1, -1).expand(self.N, -1)  # broadcast positions -> per row
                    out = output.reshape(1, x.shape[1], -1).expand(self.N, -1, -1)
                out = out.detach().clone().requires_grad_()
                self.leaves.append(out)
            elif not out.requires_grad:
                raise GesimError(f"module {mname} runs before any embedding: the probe cannot reach it")
            if roles:
                if kind == "embedding":
                    a = x
                elif kind == "layernorm":
                    a = torch.nn.functional.layer_norm(x, mod.normalized_shape, None, None, mod.eps).detach()
                elif kind == "rmsnorm":
                    a = rms_xhat(mod, x.detach())
                else:
                    a = x.detach()
                use = Use(f"{mname}#{len(self.uses)}" if self.n_uses.get(id(mod)) else mname, kind, mod, roles, a=a,
                          padding_idx=getattr(mod, "padding_idx", None))
                self.n_uses[id(mod)] += 1
                for p in roles.values():
                    self.n_uses[("p", id(p))] += 1
                self.uses.append(use)
                out.register_hook(lambda g, use=use: self._on_grad(use, g))
            return out if out is not output else None
        return hook

    # -- backward --------------------------------------------------------------------------
    def _on_grad(self, use, g):
        use.b = g.detach().to(self.dtype)
        use.a = use.a if use.kind == "embedding" else use.a.to(self.dtype)
        if use.kind == "embedding" and use.padding_idx is not None:
            use.b = use.b * (use.a != use.padding_idx)[..., None]
        keep = False
        for role, p in use.roles.items():
            if self.n_uses[("p", id(p))] == 1:
                self._single(use, role, p)
            else:
                arrived = self.pending.setdefault(id(p), [])
                arrived.append((use, role))
                keep = True
                self._shrink_head(use, role, p, arrived)
                if len(arrived) == self.n_uses[("p", id(p))]:
                    self._tied(p)
        if not keep:
            use.a = use.b = None

    def _single(self, use, role, p):
        name = f"{use.name}.{role}"
        P = self.precond.get(id(p))
        ghostable = role == "weight" and use.kind in ("linear", "conv1d", "embedding") and P is None
        if ghostable and (use.kind == "embedding" or ghost_cost_wins(use)):
            self.products.ghost(name, use, use)
        else:
            g = per_sample(use, role)
            self.products.dots(name, g, g, P)

    def _shrink_head(self, use, role, p, arrived):
        """Streaming for a tied LM head (docs/theory.md section 8.6): when a Linear use of a tied weight
        arrives and every use still to come is an embedding, take its self term now, keep only
        the T x T gathers of its output gradient at those embeddings' input ids, and free the
        (N, T, V) gradient."""
        if use.kind != "linear" or role != "weight" or self.precond.get(id(p)) is not None:
            return
        others = [u for u in self.uses if u is not use and any(q is p for q in u.roles.values())]
        waiting = [u for u in others if not any(u is w for w, _ in arrived)]
        if not waiting or any(u.kind != "embedding" or u.roles.get("weight") is not p for u in waiting):
            return
        if any(u.kind not in ("linear", "embedding") for u, _ in arrived):
            return
        name = "tied:" + self.selected[id(p)]
        self.products.ghost(name, use, use)
        for v, _ in arrived:
            if v is not use:
                self.products.ghost(name, use, v)
                self.products.ghost(name, v, use)
        pairs = list(self.products.index_pairs().values())
        use.extra["gathered"] = {id(e): {(id(x), id(y)): gather_head(use.b, y, e.a, x) for ia, ib in pairs
                                         for x, y in ((ia, ib), (ib, ia))} for e in waiting}
        use.extra["done"] = True
        use.b = None

    def _tied(self, p):
        arrived = self.pending.pop(id(p))
        name = "tied:" + self.selected[id(p)]
        P = self.precond.get(id(p))
        if P is None and all(role == "weight" and u.kind in ("linear", "embedding", "conv1d") for u, role in arrived):
            for x, (u, _) in enumerate(arrived):
                for v, _ in arrived[x:]:
                    if u.extra.get("done") and v.extra.get("done"):
                        continue  # taken when the head arrived (_shrink_head)
                    self.products.ghost(name, u, v)
                    if v is not u:
                        self.products.ghost(name, v, u)
        else:
            g = sum(per_sample(u, role) for u, role in arrived)
            self.products.dots(name, g, g, P)
        for u, _ in arrived:
            if not any(u is w for group in self.pending.values() for w, _ in group):
                u.a = u.b = None

    def run(self, ids, mask):
        """Forward, backward; returns the summed log-probs (N,)."""
        handles, saved = [], {}
        for mname, module in self.model.named_modules():
            kind = module_kind(module)
            if mname in self.modules or kind == "embedding":
                roles = self.modules[mname][2] if mname in self.modules else {}
                handles.append(module.register_forward_hook(self._forward_hook(mname, module, kind, roles)))
        for p in self.model.parameters():
            saved[p] = p.requires_grad
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                s = lm.response_logps(self.model, ids, mask)  # (N,)
                if not self.leaves:
                    raise GesimError("the model has no nn.Embedding module: the probe cannot start its backward")
                torch.autograd.grad(s.sum(), self.leaves, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved.items():
                p.requires_grad_(flag)
        used = {k[1] for k in self.n_uses if isinstance(k, tuple)}
        unused = [name for pid, name in self.selected.items() if pid not in used]
        if unused:
            raise GesimError("selected parameters not used through any module in the forward pass (used "
                             "functionally?): " + ", ".join(unused))
        for pid in list(self.pending):  # tied uses whose output never received a gradient
            p = next(q for q in self.model.parameters() if id(q) == pid)
            for u in self.uses:
                if (u.b is None and not u.extra.get("done") and any(q is p for q in u.roles.values())
                        and not any(u is w for w, _ in self.pending[pid])):
                    u.b = torch.zeros((*u.a.shape[:2], _out_dim(u)), dtype=self.dtype, device=u.a.device)
                    u.a = u.a if u.kind == "embedding" else u.a.to(self.dtype)
                    self.pending[pid].append((u, next(r for r, q in u.roles.items() if q is p)))
            self._tied(p)
        return s.detach()


def _out_dim(use):
    w = use.roles.get("weight")
    return {"linear": lambda: w.shape[0], "conv1d": lambda: w.shape[1]}.get(use.kind, lambda: w.shape[-1])()


def fast_pair_stats(model, batch: lm.PairBatch, params="all", precond=None, per_layer=False):
    """See :func:`gesim.probe.pair_stats`."""
    B = len(batch)
    ids, mask = batch.stacked()  # (2B, T): chosen rows then rejected rows
    ia, ib = slice(0, B), slice(B, 2 * B)  # views, no gather copies
    engine = _Engine(model, params, 2 * B, {"ip": (ia, ib), "nw2": (ia, ia), "nl2": (ib, ib)}, precond)
    s = engine.run(ids, mask)
    out = {k: v for k, v in engine.products.total.items()}
    out["cos"] = out["ip"] / (out["nw2"] * out["nl2"]).sqrt()
    out["lw"], out["ll"] = s[:B].to(out["ip"].dtype), s[B:].to(out["ip"].dtype)
    if per_layer:
        out["layers"] = dict(engine.products.layers)
    return out


def fast_token_gram(model, ids, mask, params="all"):
    """Exact token Gram: every masked token (row, t) becomes its own copy of row with a
    one-hot loss mask at t, and the per-sample machinery gives the full (M, M) Gram of the
    copies (one forward over the M copies, one backward)."""
    mask = mask.clone()
    mask[:, 0] = 0
    index = [(int(r), int(t)) for r, t in mask.nonzero().tolist()]
    if not index:
        raise GesimError("token_gram: the mask selects no response token")
    rows = torch.tensor([r for r, _ in index], device=ids.device)
    cols = torch.tensor([t for _, t in index], device=ids.device)
    rep_ids = ids[rows]  # (M, T)
    rep_mask = torch.zeros_like(rep_ids)
    rep_mask[torch.arange(len(index)), cols] = 1
    engine = _Engine(model, params, len(index), None)
    engine.run(rep_ids, rep_mask)
    return engine.products.total, index


def fast_row_gram(model, ids, mask, params="all", precond=None):
    """Full Gram (N, N) of the per-row gradients ``<G_i, P G_j>`` of the summed masked log-probs
    (one forward, one backward): ``sum_ij`` of it equals ``||grad sum_i S_i||^2`` (P = 1)."""
    engine = _Engine(model, params, len(ids), None, precond)
    engine.run(ids, mask)
    return engine.products.total
