"""Per-module rules of the fast probe: what each rule captures from a module call ("use"),
the per-sample gradient it gives, and the exact products between uses (no kind strings).

For a use with inputs ``A_i`` (T, d_in) and output gradients ``B_i = dS/d(output)`` (T, d_out)
of row i (every non-batch, non-feature axis counts as a position: (N, T, H, hd) inputs and
flattened (N*T, d) inputs are mapped back to rows), the per-sample weight gradient of a
linear map is ``G_i = B_i^T A_i`` (its transpose for HF Conv1D) and
``<G_i, G_j> = sum_{t,s} (A_i A_j^T)[t,s] (B_i B_j^T)[t,s]`` (ghost, docs/theory.md section 8.2).
Embedding ``y_t = s W[x_t]`` (s = the module's ``embed_scale``, 1 if none; the looked-up ids
are read from the ``F.embedding`` call itself, so OPT's positional embedding is exact):
``G_i = sum_t e_{x_it} (s c_it)^T``, ``<G_i, G_j> = sum_{t,s} [x_it = x_js] s^2 c_it . c_js``;
embedding x linear head (tied): ``<E_i, H_j> = sum_{t,s} B_j[s, x_it] (s c_it . a_js)``.

Parameters used elementwise (every norm's weight and bias: RMSNorm with ``w`` or ``1 + w``,
float32 internals, per-head q/k norms, Cohere's LayerNorm): the module is re-run once with each
parameter expanded to the output's shape, ``J = d out / d w_expanded`` (diagonal, checked with
a random cotangent) and ``g_i = sum_positions J_i * B_i``. Anything else (nn.Conv1d, MoE
experts and routers, attention sinks, LoRA on embeddings, DoRA): the module is re-run row by
row and ``g_i = (d out_i / d theta)^T B_i`` by autograd (exact, slower); a module whose row
alone does not reproduce its row in the batch is refused with its name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from gesim.errors import GesimError
from gesim.probe import rows as rows_module
from gesim.probe.rows import (
    close,
    emb_head_from_gather,
    gather_head,
    ghost_pair,
    map_tensors,
    row_slicer,
    rowdot,
    rows_view,
    tensors,
)


@dataclass
class Use:
    """One call of a hooked module: its rule, the selected parameters by role (attribute name)
    and what backward needs (``a``: inputs / ids / Jacobians; ``b``: output gradient)."""

    name: str
    rule: Rule
    module: torch.nn.Module
    roles: dict
    a: object = None
    b: object = None
    extra: dict = field(default_factory=dict)


def _as_is(t):
    return t


class RuleHost:
    """What the rules read from the engine driving them (the probe, the training recorder, the
    token Gram): ``replaying()``, a block in which re-runs of a module by a rule are not
    recorded (``_replay``), and ``detached(x)``, x's tensors detached through tuples, lists and
    dicts (named tuples are left as they are)."""

    _replay = False

    @contextlib.contextmanager
    def replaying(self):
        """Also shields the re-run from saved-tensor hooks of an enclosing region: under
        non-reentrant gradient checkpointing the tensors a rule's re-run saves would otherwise be
        counted as the checkpointed forward's, and its recomputation (where nothing is re-run)
        would be refused by torch as saving a different number of tensors."""
        old, self._replay = self._replay, True
        try:
            with torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
                yield
        finally:
            self._replay = old

    def detached(self, x):
        if isinstance(x, torch.Tensor):
            return x.detach()
        if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
            return type(x)(self.detached(v) for v in x)
        if isinstance(x, dict):
            return {k: self.detached(v) for k, v in x.items()}
        return x


class Rule:
    """Base rule. ``ghost``: matrix products without per-sample gradients; ``streaming``: its
    output gradient is consumed as it arrives (else after the backward pass)."""

    ghost = False
    streaming = True

    def capture(self, use: Use, engine, args, kwargs, output):
        raise NotImplementedError

    def grad_arrived(self, use: Use, g: torch.Tensor, engine):
        use.b = rows_view(g.detach(), engine.N, engine.T, use.name, use.a.dim() - 2).to(engine.dtype)

    def per_sample(self, use: Use, role: str) -> torch.Tensor:
        raise NotImplementedError

    def total(self, use: Use, role: str) -> torch.Tensor:
        """The use's share of the batch gradient of ``role`` (the per-sample gradients summed)."""
        return self.per_sample(use, role).sum(0)

    def product(self, u: Use, ia, v: Use, ib) -> torch.Tensor:
        raise GesimError(f"no exact product rule between {u.name} ({type(u.rule).__name__}) and {v.name} "
                         f"({type(v.rule).__name__})")

    def out_dim(self, use: Use) -> int:
        return use.roles["weight"].shape[-1]

    def pair_products(self, use: Use, B: int) -> dict | None:
        """``{"ip", "nw2", "nl2"}`` (each (B,)) of this use with itself over the stacked batch
        (rows 0..B-1 chosen, B..2B-1 rejected) in one pass, or None when the rule has no such
        form (callers then take the three products one by one)."""
        return None


def _gram(x, ia, y, ib):
    return torch.bmm(x[ia], y[ib].transpose(1, 2))  # (K, T, T)


class LinearRule(Rule):
    """nn.Linear (``transposed=False``, W is (d_out, d_in)) and HF Conv1D (W is (d_in, d_out))."""

    ghost = True

    def __init__(self, transposed=False):
        self.transposed = transposed

    def capture(self, use, engine, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        use.a = rows_view(x.detach(), engine.N, engine.T, use.name)  # in the model's dtype until used
        use.extra["version"] = use.a._version

    def grad_arrived(self, use, g, engine):
        """The output gradient, and the input in the products' dtype (a bf16 model's float32 copy
        lives only while this use is consumed, not through the whole backward pass). The input
        is the model's own tensor: refused if the model changed it in place after the call."""
        if use.a._version != use.extra["version"]:
            raise GesimError(f"module {use.name}: its input was modified in place after the call; "
                             "the probe cannot read the input its output was computed from")
        super().grad_arrived(use, g, engine)
        use.a = use.a.to(engine.dtype)

    def per_sample(self, use, role):
        if role == "bias":
            return use.b.sum(1)
        if self.transposed:  # one batched GEMM (einsum took up to 1.9x as long on CPU for these shapes)
            return torch.bmm(use.a.transpose(1, 2), use.b)  # (N, d_in, d_out)
        return torch.bmm(use.b.transpose(1, 2), use.a)  # (N, d_out, d_in)

    def total(self, use, role):
        if role == "bias":
            return use.b.sum((0, 1))
        a, b = use.a.reshape(-1, use.a.shape[-1]).to(use.b.dtype), use.b.reshape(-1, use.b.shape[-1])
        return a.T @ b if self.transposed else b.T @ a  # one GEMM, no (N, d_out, d_in) tensor

    def cost_prefers_ghost(self, use) -> bool:
        """Cost rule (docs/theory.md section 8.2), FLOPs per pair counted to the end: ghost takes
        three products (two self, one cross), each an A-side and a G-side T x T Gram (2 T^2
        (d_in + d_out); the self ones 3/4 of that from T >= rows.SPLIT_T, ghost_pair) and a row dot
        (2 T^2); materialised takes two per-row gradients (2 T d_in d_out each) and the (2 x P)(P x 2)
        pair Gram (8 P, P = d_in d_out). Ghost when c T^2 (d_in + d_out) + 6 T^2 < 4 T d_in d_out +
        8 d_in d_out, c = 6 (5 with split self Grams); a tie of the GEMM FLOPs alone goes to ghost."""
        T, d_in, d_out = use.a.shape[1], use.a.shape[2], use.b.shape[2]
        c = 5 if T >= rows_module.SPLIT_T else 6
        return c * T * T * (d_in + d_out) + 6 * T * T < 4 * T * d_in * d_out + 8 * d_in * d_out

    def ghost_width(self, use) -> int:
        """Feature width of the T x T Grams of a ghost product (A and B sides)."""
        return use.a.shape[2] + self.out_dim(use)

    def materialise_flops(self, use) -> int:
        """FLOPs of one row's per-sample weight gradient B^T A."""
        return 2 * use.a.shape[1] * use.a.shape[2] * self.out_dim(use)

    def pair_products(self, use, B):
        ip, own = ghost_pair(use.a, use.b, B)
        return {"ip": ip, "nw2": own[:B], "nl2": own[B:]}

    def product(self, u, ia, v, ib):
        if isinstance(v.rule, EmbeddingRule):
            return v.rule.product(v, ib, u, ia)
        if not isinstance(v.rule, LinearRule) or v.rule.transposed != self.transposed:
            return super().product(u, ia, v, ib)
        return (_gram(u.a, ia, v.a, ib) * _gram(u.b, ia, v.b, ib)).sum((1, 2))

    def out_dim(self, use):
        w = use.roles["weight"]
        return w.shape[1] if self.transposed else w.shape[0]


class EmbeddingRule(Rule):
    """nn.Embedding and subclasses returning ``scale * W[ids]`` (checked on every call)."""

    ghost = True

    def capture(self, use, engine, args, kwargs, output):
        module = use.module
        ids = engine.looked_up.pop(id(module), None)
        if ids is None:
            raise GesimError(f"embedding {use.name} ({type(module).__name__}) did not call F.embedding on its weight")
        scale = getattr(module, "embed_scale", 1.0)
        scale = float(scale) if not isinstance(scale, torch.Tensor) else float(scale.detach().float())
        want = torch.nn.functional.embedding(ids, module.weight.detach())
        out = output.detach().reshape(want.shape) if output.numel() == want.numel() else None
        if out is None or not (scale == 1.0 and torch.equal(out, want.to(out.dtype))) and \
                not torch.allclose(out, (want * scale).to(out.dtype), rtol=1e-3, atol=0):
            raise GesimError(f"embedding {use.name} ({type(module).__name__}) returns something other than "
                             "W[ids] * embed_scale: the probe has no exact rule for it")
        if ids.numel() == engine.N * engine.T:
            ids = ids.reshape(engine.N, engine.T)
        else:
            ids = ids.reshape(1, -1).expand(engine.N, -1)  # broadcast positions -> per row
        use.a, use.extra["scale"] = ids, scale
        use.extra["padding_idx"] = getattr(module, "padding_idx", None)

    def grad_arrived(self, use, g, engine):
        b = g.detach().to(engine.dtype).reshape(engine.N, use.a.shape[1], -1)
        if use.extra["scale"] != 1.0:  # (no copy of the gradient to multiply it by 1)
            b = b * use.extra["scale"]
        if use.extra["padding_idx"] is not None:
            b = b * (use.a != use.extra["padding_idx"])[..., None]
        use.b = b

    def per_sample(self, use, role):
        b = use.b
        N, _, d = b.shape
        G = torch.zeros(N, use.roles["weight"].shape[0], d, dtype=b.dtype, device=b.device)
        return self.add_per_sample(use, G)

    def total(self, use, role):
        b = use.b
        return torch.zeros(use.roles["weight"].shape[0], b.shape[-1], dtype=b.dtype, device=b.device).index_add_(
            0, use.a.reshape(-1), b.reshape(-1, b.shape[-1]))

    def add_per_sample(self, use, G):
        """``G += `` the per-sample gradients (N, V, d) of this use, in place (one index_add)."""
        b, a = use.b, use.a
        N, V, d = G.shape
        G.view(N * V, d).index_add_(0, (a + torch.arange(N, device=a.device)[:, None] * V).reshape(-1),
                                    b.reshape(-1, d))
        return G

    def cost_prefers_ghost(self, use) -> bool:
        """Ghost (T x T equality-masked Grams, 6 T^2 (d + 1) FLOPs per pair) unless the table has
        no more rows than the use has positions (V <= T, e.g. a position table): then the
        materialised (N, V, d) gradients are no larger than the output gradient the backward
        already holds and cost about 10 V d + 2 T d < 6 T^2 d per pair."""
        return use.roles["weight"].shape[0] > use.a.shape[1]

    def ghost_width(self, use) -> int:
        return use.b.shape[2] + 1 if use.b is not None else use.roles["weight"].shape[1] + 1

    def materialise_flops(self, use) -> int:
        return 2 * use.a.shape[1] * use.roles["weight"].shape[1]

    def pair_products(self, use, B):
        x, c = use.a, use.b
        own = rowdot((x[:, :, None] == x[:, None, :]).to(c.dtype), torch.bmm(c, c.transpose(1, 2)))
        ip = rowdot((x[:B, :, None] == x[B:, None, :]).to(c.dtype), torch.bmm(c[:B], c[B:].transpose(1, 2)))
        return {"ip": ip, "nw2": own[:B], "nl2": own[B:]}

    def product(self, u, ia, v, ib):
        if isinstance(v.rule, EmbeddingRule):
            eq = u.a[ia][:, :, None] == v.a[ib][:, None, :]  # (K, T, T)
            return (eq * _gram(u.b, ia, v.b, ib)).sum((1, 2))
        if isinstance(v.rule, LinearRule) and not v.rule.transposed:
            gathered = v.extra["gathered"][id(u)][(id(ia), id(ib))] if v.b is None else gather_head(v.b, ib, u.a, ia)
            return emb_head_from_gather(u.b, ia, v.a, ib, gathered)
        return super().product(u, ia, v, ib)


class LayerNormRule(Rule):
    """nn.LayerNorm: ``y = xhat * w + beta``, per-sample ``sum_t xhat_t * b_t`` and ``sum_t b_t``.
    The use keeps the module's input (which autograd keeps anyway for LayerNorm's backward) and
    ``xhat`` is recomputed when the output gradient arrives, so no normalised copy is held
    through the backward pass."""

    def capture(self, use, engine, args, kwargs, output):
        m = use.module
        use.a = rows_view(args[0].detach(), engine.N, engine.T, use.name, len(m.normalized_shape))
        use.extra["dtype"], use.extra["version"] = engine.dtype, use.a._version

    def per_sample(self, use, role):
        if role == "bias":
            return use.b.sum(1)
        m = use.module
        if use.a._version != use.extra["version"]:
            raise GesimError(f"layer norm {use.name}: its input was modified in place after the call; "
                             "the probe cannot recompute its normalised input")
        xhat = torch.nn.functional.layer_norm(use.a, m.normalized_shape, None, None, m.eps)
        return (xhat.to(use.extra["dtype"]) * use.b).sum(1)


class ElementwiseRule(Rule):
    """Parameters acting elementwise on the output (norm weights and biases of any flavour):
    ``J = d out / d w_expanded`` from one re-run, diagonal by a random-cotangent check."""

    def capture(self, use, engine, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            return False
        shape = tuple(output.shape)
        if any(tuple(p.shape) != shape[len(shape) - p.dim():] for p in use.roles.values()):
            return False
        args, kwargs = engine.detached(args), engine.detached(kwargs)
        expanded = {r: p.detach().expand(shape).clone().requires_grad_() for r, p in use.roles.items()}
        try:
            with torch.enable_grad(), engine.replaying():
                out = torch.func.functional_call(use.module, expanded, args, kwargs, strict=False)
                J = torch.autograd.grad(out, list(expanded.values()), torch.ones_like(out), retain_graph=True)
                gen = torch.Generator(device=out.device).manual_seed(0)  # never the global stream
                r = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
                v = torch.autograd.grad(out, list(expanded.values()), r)
        except (RuntimeError, TypeError, ValueError):
            return False
        if not close(out, output) or any(not close(vv, j * r) for vv, j in zip(v, J)):
            return False
        use.a = {role: j.to(engine.dtype) for role, j in zip(use.roles, J)}
        use.extra["NT"] = (engine.N, engine.T)
        return True

    def grad_arrived(self, use, g, engine):
        use.b = g.detach().to(engine.dtype)

    def per_sample(self, use, role):
        N, T = use.extra["NT"]
        k = use.roles[role].dim()
        return (rows_view(use.a[role], N, T, use.name, k) * rows_view(use.b, N, T, use.name, k)).sum(1)


class RowRule(Rule):
    """Any module: re-run row by row, ``g_i = (d out_i / d theta)^T B_i`` by autograd."""

    streaming = False

    def capture(self, use, engine, args, kwargs, output):
        """Keeps the inputs; returns the output with each float tensor replaced by an alias whose
        gradient is the one from outside the module (an output computed from another output,
        like a router's scores from its logits, must not count that path twice)."""
        params = {id(p) for p in use.roles.values()}
        escaped = [t for t in tensors(output) if id(t) in params]
        if escaped:  # a parameter returned as such is used by the caller: differentiate through the caller
            engine.escaped.update(id(t) for t in escaped)
        use.a = (engine.detached(args), engine.detached(kwargs), [t.detach() for t in tensors(output)])
        use.b = [None] * len(use.a[2])
        count = iter(range(len(use.a[2])))

        def alias(t):
            k = next(count)
            if not t.requires_grad:
                return t
            t = t.clone() if engine.copy_outputs else t.view_as(t)
            t.register_hook(lambda g: use.b.__setitem__(k, g.detach()))
            engine.watched_outputs.append((t, t._version))
            return t
        return map_tensors(output, alias)

    def finish(self, use, engine):
        """After the backward pass: per-sample gradients of every role, (N, *shape)."""
        args, kwargs, outs = use.a
        N, T = engine.N, engine.T
        slicers = ([row_slicer(a, N, T) for a in args], {k: row_slicer(v, N, T) for k, v in kwargs.items()})
        out_slicers = [row_slicer(o, N, T) for o in outs]
        for g, o in zip(use.b, outs):
            if g is not None and (o.dim() == 0 or (o.shape[0] != N and o.shape[0] % (N * T))):
                raise GesimError(f"module {use.name} ({type(use.module).__name__}) returns a tensor of shape "
                                 f"{tuple(o.shape)} that is not split by rows ({N} or {N * T} first): its "
                                 "parameters have no per-sample gradient the probe can separate")
        grads = [g if g is not None else torch.zeros_like(o) for g, o in zip(use.b, outs)]
        names = list(use.roles)
        per = {r: [] for r in names}
        for i in range(N):
            theta = {r: p.detach().clone().requires_grad_() for r, p in use.roles.items()}
            a_i = [s(i) for s in slicers[0]]
            k_i = {k: s(i) for k, s in slicers[1].items()}
            try:
                with torch.enable_grad(), engine.replaying():
                    got = tensors(torch.func.functional_call(use.module, theta, tuple(a_i), k_i, strict=False))
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise GesimError(f"module {use.name} ({type(use.module).__name__}): cannot be re-run on one row "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); no exact per-sample "
                                 "gradient for its parameters " + ", ".join(use.roles)) from None
            want = [s(i) for s in out_slicers]
            if len(got) != len(want) or any(g.shape != w.shape or not close(g, w) for g, w in zip(got, want)):
                raise GesimError(f"module {use.name} ({type(use.module).__name__}): row {i} run alone does not "
                                 "reproduce its row in the batch (rows interact); no exact per-sample gradient")
            pairs = [(g, s(i)) for g, s, o in zip(got, [row_slicer(x, N, T) for x in grads], outs) if g.requires_grad]
            gs = torch.autograd.grad([g for g, _ in pairs], list(theta.values()), [c for _, c in pairs],
                                     allow_unused=True) if pairs else [None] * len(names)
            for r, g in zip(names, gs):
                per[r].append(torch.zeros_like(theta[r]) if g is None else g.detach())
        use.b = {r: torch.stack(v).to(engine.dtype) for r, v in per.items()}

    def per_sample(self, use, role):
        return use.b[role]


def rule_for(module) -> Rule:
    """The rule for a module that owns selected parameters (tried elementwise first, then by rows)."""
    if isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward:
        return LinearRule()  # (a subclass with its own forward, e.g. Llama 4's router, is replayed instead)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return LinearRule(transposed=True)
    if isinstance(module, torch.nn.Embedding):
        return EmbeddingRule()
    if isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine and \
            type(module).forward is torch.nn.LayerNorm.forward:
        return LayerNormRule()
    return ElementwiseRule()


