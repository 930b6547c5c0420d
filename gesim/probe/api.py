"""The probe's public functions: :func:`pair_stats`, :func:`token_gram`, :func:`ches`.

Notation (docs/theory.md sections 5 and 8): for pair b, ``S_w = lw`` and ``S_l = ll`` are the
summed response log-probs, ``g_w = grad S_w`` and ``g_l = grad S_l`` over the selected
parameters; ``ip = <g_w, P g_l>``, ``nw2 = <g_w, P g_w>``, ``nl2 = <g_l, P g_l>`` with P a
diagonal preconditioner (identity by default), ``cos = ip / sqrt(nw2 nl2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gesim import lm
from gesim.errors import GesimError, unknown

BACKENDS = ("auto", "fast", "func", "reference")


def pair_stats(model, batch: lm.PairBatch, select="all", backend: str = "auto", precond=None,
               per_layer: bool = False, *, params=None) -> dict[str, torch.Tensor]:
    """Per pair (each (B,)): ``ip``, ``nw2``, ``nl2``, ``cos``, ``lw``, ``ll``.

    ``select``: ``"all"`` trainable parameters, ``"lora"`` (names containing ``lora_``) or a
    predicate ``f(name, param)``. ``backend``: ``"fast"`` (one forward, one backward with
    respect to activations; ghost or materialised products per layer), ``"func"``
    (torch.func per-sample gradients), ``"reference"`` (one pair at a time, two backward
    passes) or ``"auto"`` (= fast). ``precond``: optional ``{parameter: tensor of its shape}``
    diagonal preconditioner P. ``per_layer=True`` adds ``"layers"``: {module use name:
    {"ip", "nw2", "nl2"}} (fast backend only). ``params=``: the old name of ``select`` (deprecated).
    """
    select = _renamed(select, params)
    if backend not in BACKENDS:
        raise unknown("probe backend", backend, BACKENDS)
    if len(batch) == 0:
        raise GesimError("pair_stats: the batch holds no pair")
    was_training = model.training
    switch = any(m.training for m in model.modules())  # eval() costs ~0.2 ms even when it changes nothing
    if switch:
        model.eval()
    try:
        if backend == "reference":
            if per_layer:
                raise GesimError("per_layer=True needs the 'fast' backend")
            from gesim.probe.reference import reference_pair_stats
            return reference_pair_stats(model, batch, select, precond=precond)
        if backend == "func":
            if per_layer:
                raise GesimError("per_layer=True needs the 'fast' backend")
            from gesim.probe.func import func_pair_stats
            return func_pair_stats(model, batch, select, precond=precond)
        from gesim.probe.fast import fast_pair_stats
        try:
            return fast_pair_stats(model, batch, select, precond=precond, per_layer=per_layer)
        except (TypeError, IndexError, KeyError, AttributeError, ValueError) as err:
            # A model whose forward the fast probe's hooks do not follow: a clear refusal, never
            # a raw traceback (the families matrix lists the known cases).
            raise GesimError(f"the fast probe could not follow {type(model).__name__} "
                             f"({type(err).__name__}: {err}); backend='reference' uses plain autograd") from err
    finally:
        if switch:
            model.train(was_training)


def _renamed(select, params):
    """``params=`` is the old keyword of the parameter selection (one word per concept: ``select``)."""
    if params is None:
        return select
    import warnings

    warnings.warn("the probe's `params=` is now `select=`", DeprecationWarning, stacklevel=3)
    return params


@dataclass
class TokenGram:
    """Token-level Gram ``K[a, b] = <grad log p_a, grad log p_b>`` over the masked tokens
    ``index[a] = (row, t)`` of the given rows (rows in order, t ascending)."""

    K: torch.Tensor  # (M, M)
    index: list
    backend: str = "fast"  # what computed K: "fast" (layer-wise) or "reference" (one backward per token)
    why: str = ""  # with backend="auto", why the fast path refused this model (the loop ran instead)

    def cos(self) -> torch.Tensor:
        """Cosine matrix K / sqrt(diag diag^T). (M, M)"""
        d = self.K.diagonal().clamp_min(torch.finfo(self.K.dtype).tiny).sqrt()
        return self.K / (d[:, None] * d[None, :])

    def block(self, row_a: int, row_b: int) -> torch.Tensor:
        """The sub-matrix between the tokens of row_a and those of row_b (e.g. chosen x rejected)."""
        ia = [k for k, (r, _) in enumerate(self.index) if r == row_a]
        ib = [k for k, (r, _) in enumerate(self.index) if r == row_b]
        return self.K[ia][:, ib]


def token_gram(model, ids: torch.Tensor, mask: torch.Tensor, select="all", backend: str = "auto", *,
               params=None) -> TokenGram:
    """Exact token Gram of the per-token log-prob gradients for all masked tokens of ``ids``
    (N, T) right-padded; several rows give the cross blocks (e.g. chosen x rejected).

    ``backend``: ``"fast"`` (layer-wise, one backward batched over one-hot cotangents, LM-head
    closed form, docs/theory.md section 8.5; a model it cannot split per token is refused with a
    GesimError naming the module), ``"reference"`` (one backward per token) or ``"auto"`` (fast, or
    the exact per-token loop where fast refuses: the result's ``backend`` and ``why`` say which ran).
    """
    select = _renamed(select, params)
    if backend not in BACKENDS:
        raise unknown("token-gram backend", backend, BACKENDS)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise GesimError(f"token_gram: ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both be (N, T)")
    was_training = model.training
    model.eval()
    try:
        ran, why = "fast", ""
        if backend == "reference" or backend == "func":
            from gesim.probe.reference import reference_token_gram
            ran = "reference"
            K, index = reference_token_gram(model, ids, mask, select)
        else:
            from gesim.probe.tokens import fast_token_gram
            try:
                K, index = fast_token_gram(model, ids, mask, select)
            except GesimError as err:
                if backend == "fast":
                    raise
                from gesim.probe.reference import reference_token_gram  # exact, one backward per token
                ran, why = "reference", str(err)
                K, index = reference_token_gram(model, ids, mask, select)
    finally:
        model.train(was_training)
    return TokenGram(K.detach(), index, ran, why)


def ches(model, batch: lm.PairBatch) -> dict[str, torch.Tensor]:
    """CHES and length-normalised CHES per pair (Razin et al., "Unintentional Unalignment:
    Likelihood Displacement in Direct Preference Optimization", ICLR 2025, eqs. 4-5).

    With ``h`` the final hidden states (the LM head's input) at the positions that predict the
    response tokens, ``s = sum_k h_k`` and ``m = s / |y|`` (the response mean):

    * ``ches = <s_w, s_l> - ||s_w||^2`` (eq. 4);
    * ``ln_ches = <m_w, m_l> - ||m_w||^2`` (eq. 5, the authors' length normalisation: each
      sum divided by its own response length). High values flag pairs whose rejected
      response looks like the chosen one to the model, the pairs that displace likelihood;
    * ``mean_dist2 = ||m_w - m_l||^2``, a different quantity (gesim's ``ln_ches`` before
      issue 14): the squared distance of the mean hidden states, which grows as the pair
      becomes *less* similar; ``mean_dist2 = ||m_l||^2 - ||m_w||^2 - 2 ln_ches``.

    Each (B,), float64.
    """
    head = output_head(model)
    captured = []
    handle = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    was_training = model.training
    model.eval()
    try:
        ids, mask = batch.stacked()
        with torch.no_grad():
            lm.logits(model, ids, mask)
    finally:
        handle.remove()
        model.train(was_training)
    h = captured[-1].double()  # (N, T, d)
    pred = torch.nn.functional.pad(mask[:, 1:], (0, 1)).to(h.dtype)  # position t-1 predicts token t; (N, T)
    s = (h * pred[..., None]).sum(1)  # (N, d)
    n = pred.sum(1).clamp_min(1)
    B = len(batch)
    s_w, s_l = s[:B], s[B:]
    m_w, m_l = s_w / n[:B, None], s_l / n[B:, None]
    return {"ches": (s_w * s_l).sum(-1) - (s_w * s_w).sum(-1),
            "ln_ches": (m_w * m_l).sum(-1) - (m_w * m_w).sum(-1),
            "mean_dist2": ((m_w - m_l) ** 2).sum(-1)}


def output_head(model) -> torch.nn.Module:
    """The module producing the logits: ``get_output_embeddings()`` for Hugging Face models
    (PEFT-wrapped included), else a child named ``lm_head``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        head = dict(model.named_modules()).get("lm_head")
    if head is None:
        for name, mod in model.named_modules():
            if name.endswith("lm_head"):
                head = mod
    if head is None:
        raise GesimError("cannot find the model's output head (no get_output_embeddings() and no lm_head module)")
    return head
