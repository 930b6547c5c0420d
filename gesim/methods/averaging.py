"""Model averaging and Heterogeneous Model Averaging, HMA (Lin et al., "Mitigating the Alignment
Tax of RLHF", EMNLP 2024, arXiv 2309.06256); docs/theory.md section 6.5.

theta_0 is the model before alignment (SFT), theta the model after it. The ratio ``a`` ALWAYS
weights the aligned model (the authors' public code weights theta_0 instead):

    theta(a) = (1 - a) theta_0 + a theta,        a = 0: theta_0,   a = 1: theta,

exactly at both ends. ``select`` averages only some parameters ("linear": the nn.Linear
weights and biases, the paper's partwise variant); the others keep the aligned values.

HMA splits the layers into K contiguous blocks (embeddings in the first, final norm and head in
the last) with one ratio each, theta^[k] = (1 - a_k) theta_0^[k] + a_k theta^[k], where

    a_k = a K (sigmoid(s_k) + eps) / sum_j (sigmoid(s_j) + eps),   so mean_k a_k = a exactly,

and fits only the logits s, maximising the merged model's likelihood of the aligned model's own
high-reward samples (optionally with an L1 penalty keeping the middle blocks near a). The ratios
are not clipped: as in the paper's parameterisation, a_k > 1 (extrapolation past theta) happens
when a K share_k > 1, which needs a > 1/K.
"""

from __future__ import annotations

import re

import torch

from gesim import lm
from gesim.errors import GesimError

_LAYER = re.compile(r"(?:^|\.)(?:blocks|h|layers|layer)\.(\d+)(?:\.|$)")


def _state(theta) -> dict:
    return theta.state_dict() if isinstance(theta, torch.nn.Module) else theta


def _mix(t0: torch.Tensor, t: torch.Tensor, a) -> torch.Tensor:
    return (1 - a) * t0 + a * t  # a = 0 and a = 1 give t0 and t bit for bit


def _pair(theta0, theta) -> tuple[dict, dict]:
    theta0, theta = _state(theta0), _state(theta)
    for n, t in theta.items():
        if n not in theta0:
            raise GesimError(f"theta0 has no entry {n!r} (theta0 and theta must share names)")
        if theta0[n].shape != t.shape:
            raise GesimError(f"{n!r} has shape {tuple(theta0[n].shape)} in theta0, {tuple(t.shape)} in theta")
    return theta0, theta


def linear_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the weights and biases of ``model``'s nn.Linear layers; a Linear weight
    tied to another module (GPT's head tied to the token embedding) counts as that module's."""
    other = {id(w) for m in model.modules() if not isinstance(m, torch.nn.Linear)
             for w in m.parameters(recurse=False)}
    return {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            for pn, w in m.named_parameters(recurse=False) if id(w) not in other}


def _linear_by_name(names: list, theta: dict) -> set[str]:
    """Without the module: 2-D ``*.weight`` entries not named like an embedding or the head, and
    their ``*.bias``."""
    weights = {n for n in names if n.endswith(".weight") and theta[n].ndim == 2
               and not any(s in n for s in ("emb", "wte", "wpe", "lm_head"))}
    return weights | {n for n in names if n.endswith(".bias") and n[:-4] + "weight" in weights}


def _selector(select, model, theta: dict):
    if callable(select):
        return select
    if select == "all":
        return lambda n: True
    if select == "linear":
        names = linear_names(model) if model is not None else _linear_by_name(list(theta), theta)
        return names.__contains__
    if isinstance(select, str):
        raise GesimError(f"select must be 'all', 'linear', a predicate f(name) or a set of names, got {select!r}")
    return set(select).__contains__


def average(theta0, theta, a: float, select="all", model: torch.nn.Module | None = None) -> dict:
    """theta(a) = (1 - a) theta0 + a theta on the selected entries; the others keep theta's values.

    theta0, theta: state dicts {name: tensor} or modules. ``select``: "all", "linear" (the
    nn.Linear weights and biases of ``model``, or of theta0 / theta when they are modules; from
    names alone, 2-D ``*.weight`` not named like an embedding or ``lm_head``, and their biases), a
    predicate f(name) -> bool, or a collection of names.
    Non-floating entries (integer buffers) keep theta's. a outside [0, 1] extrapolates.
    """
    model = model if model is not None else next((m for m in (theta, theta0) if isinstance(m, torch.nn.Module)), None)
    theta0, theta = _pair(theta0, theta)
    chosen = _selector(select, model, theta)
    return {n: _mix(theta0[n], t, a) if t.is_floating_point() and chosen(n) else t for n, t in theta.items()}


def blocks(names, k: int = 3) -> dict[str, int]:
    """Assign each parameter name to one of ``k`` contiguous blocks of layers: {name: block}.

    The layer index is parsed from ``blocks.N.`` / ``h.N.`` / ``layers.N.`` / ``layer.N.``; the L
    layers found go to block floor(rank * k / L). Names without an index go to block 0 if they come
    before the first layer in ``names`` (embeddings), to block k - 1 otherwise (final norm, head).
    ``names`` may be a module: its state-dict names, tied tensors following the first name. With
    k > L some blocks hold no layer (e.g. L = 2, k = 3: the last block is the final norm and head).
    """
    tied = {}
    if isinstance(names, torch.nn.Module):
        first = {}
        for n, t in names.state_dict(keep_vars=True).items():
            tied[n] = first.setdefault(id(t), n)
    names = list(tied or names)
    layer = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    if not layer:
        raise GesimError("no layer index in the parameter names (expected e.g. 'blocks.3.', 'h.3.', 'layers.3.')")
    levels = sorted(set(layer.values()))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GesimError(f"the number of blocks k must be an integer >= 1, got {k!r}")
    rank = {level: i * k // len(levels) for i, level in enumerate(levels)}
    start = min(i for i, n in enumerate(names) if n in layer)
    out = {n: rank[layer[n]] if n in layer else (0 if i < start else k - 1) for i, n in enumerate(names)}
    return {n: out[tied.get(n, n)] for n in names}


def average_blocks(theta0, theta, ratios, block_of: dict) -> dict:
    """HMA merge: entry n gets (1 - a_k) theta0[n] + a_k theta[n] with k = block_of[n].

    ``ratios``: K floats or a tensor (K,) (a tensor keeps the result differentiable in it).
    """
    theta0, theta = _pair(theta0, theta)
    missing = [n for n in theta if n not in block_of]
    if missing:
        raise GesimError(f"block_of has no block for {missing[0]!r}")
    K = len(ratios)
    bad = [n for n, b in block_of.items() if n in theta and not 0 <= b < K]
    if bad:
        raise GesimError(f"{bad[0]!r} is in block {block_of[bad[0]]}, but there are {K} ratios")
    return {n: _mix(theta0[n], t, ratios[block_of[n]]) if t.is_floating_point() else t for n, t in theta.items()}


def hma_ratios(s, a: float, eps: float = 1e-6) -> torch.Tensor:
    """a_k = a K (sigmoid(s_k) + eps) / sum_j (sigmoid(s_j) + eps), shape (K,); mean exactly a."""
    s = torch.as_tensor(s, dtype=torch.float64) if not isinstance(s, torch.Tensor) else s
    w = torch.sigmoid(s) + eps
    return a * len(w) * w / w.sum()


def fit_hma(model: torch.nn.Module, theta0, theta, ids: torch.Tensor, mask: torch.Tensor, a: float, k: int = 3,
            steps: int = 50, lr: float = 0.1, l1: float = 0.0, seed: int = 0,
            batch_size: int | None = None) -> dict:
    """Fit HMA's K block logits s on samples (ids, response mask), both (N, T), of the aligned model.

    Minimises  -mean_t log pi_merged(x_t | x_<t)  (over masked tokens t >= 1)  +  l1 sum_k |a_k - a|,
    the penalty over the middle blocks k = 2 .. K-1 only (none for K <= 2). Only s is trained:
    Adam, ``steps`` steps from s = 0 (plain averaging at ratio a), on minibatches of ``batch_size``
    rows drawn with ``seed`` (full batch by default). The merged
    parameters are built differentiably from s and evaluated with torch.func.functional_call, on
    the names of ``model.named_parameters()`` (a tied head follows its embedding's block).

    Returns {"ratios": K floats (mean a, not clipped), "nll": full-batch NLL per token at s_0 ..
    s_steps (steps + 1 values), "loss": the minimised objective at each step, "state": merged
    parameters at the fitted ratios}.
    """
    if not 0 <= a <= 1:
        raise GesimError(f"the mean ratio a must be in [0, 1], got {a}")
    if ids.shape != mask.shape or ids.ndim != 2:
        raise GesimError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both be (N, T)")
    theta0, theta = _pair(theta0, theta)
    names = [n for n, _ in model.named_parameters()]
    theta0, theta = ({n: d[n].detach() for n in names} for d in (theta0, theta))
    block_of = blocks(names, k)
    s = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def nll(ratios, rows):
        merged = lm.at_params(model, average_blocks(theta0, theta, ratios, block_of))
        m = mask[rows].clone()
        m[:, 0] = 0  # nothing predicts position 0
        return -lm.response_logps(merged, ids[rows], m).sum() / m.sum().clamp_min(1)

    everything = torch.arange(len(ids))
    history, losses = [], []
    for _ in range(steps):
        rows = everything if batch_size is None else torch.randperm(len(ids), generator=gen)[:batch_size]
        ratios = hma_ratios(s, a)
        fit = nll(ratios, rows)
        loss = fit + l1 * (ratios[1:-1] - a).abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if batch_size is not None:
            with torch.no_grad():
                fit = nll(ratios.detach(), everything)
        history.append(float(fit.detach()))
    ratios = hma_ratios(s.detach(), a)
    with torch.no_grad():
        history.append(float(nll(ratios, everything)))
        state = {n: t.detach() for n, t in average_blocks(theta0, theta, ratios, block_of).items()}
    return {"ratios": ratios.tolist(), "nll": history, "loss": losses, "state": state}
