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

Two HMA variants live here; both take ``a``, the mean weight on the aligned model:

=====================  ===================================  =========================================
                       gesim (:func:`fit_hma`)              the authors' code (:func:`fit_hma_authors`)
=====================  ===================================  =========================================
what is interpolated   every floating entry                 nn.Linear weights and biases only;
                                                            embeddings and norms stay at theta_0; an
                                                            untied head (and any Linear outside the
                                                            layers) at the fixed mean ratio
ratio family           a_k = a K share_k, share_k =         SFT weight w = 1 - a normalised instead:
                       (sig(s_k)+eps)/sum_j(sig(s_j)+eps)   w_k = w K share_k, a_k = 1 - w_k, so
                       a_k in (0, K a): [0, 2.4] at a=0.8   a_k in (1 - K w, 1]: (0.4, 1] at a = 0.8
blocks                 K contiguous, floor(rank K / L);     "block3": layers < 8, < 16, rest (< 11,
                       embeddings first, norm/head last     < 21 above 30 layers); "blockN": int(L/N)
                                                            layers each, the rest to the last;
                                                            "layerwise"; or explicit boundaries
objective              response NLL of the samples +        causal-LM NLL of the collected text (all
                       l1 sum_{middle k} |a_k - a|          tokens) + reg sum over Linear modules m
                                                            c / (|layer_m - L // 2| + 1) |w_k(m) - w|
                                                            (c = 25: a distance-weighted penalty)
start                  s = 0                                s = logit(w) (same ratios: all a_k = a)
=====================  ===================================  =========================================

The authors' code calls its ratio ``init_val`` and applies it to the pre-alignment model (their
merge script gives an untied head ``init_val``; their trainer normalises the head's fixed logit
with the block logits: gesim uses the merge script's fixed ratio in fitting too); their
script's defaults are init_val (= w) 0.2, epsilon 0.2 (gesim's default eps 1e-6 is their
trainer's default), reg 1e-4, mask_level "layerwise"; block3 is the paper's K = 3.
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
    theta0, theta, names = _fit_inputs(model, theta0, theta, ids, mask)
    block_of = blocks(names, k)
    s = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    ratios, history, losses, state = _fit_ratios(
        model, ids, mask, s, lambda s: hma_ratios(s, a), lambda r: average_blocks(theta0, theta, r, block_of),
        lambda r: l1 * (r[1:-1] - a).abs().sum(), steps, lr, seed, batch_size)
    return {"ratios": ratios.tolist(), "nll": history, "loss": losses, "state": state}


def _fit_inputs(model, theta0, theta, ids, mask):
    """Checked (N, T) ids and mask; both endpoints detached, on ``model``'s parameter names."""
    if ids.shape != mask.shape or ids.ndim != 2:
        raise GesimError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both be (N, T)")
    theta0, theta = _pair(theta0, theta)
    names = [n for n, _ in model.named_parameters()]
    theta0, theta = ({n: d[n].detach() for n in names} for d in (theta0, theta))
    return theta0, theta, names


def _fit_ratios(model, ids, mask, s, ratios_of, merge, penalty, steps, lr, seed, batch_size):
    """Adam on block logits ``s``: minimise NLL(merge(ratios_of(s))) + penalty(ratios) over the
    tokens ``mask`` marks (position 0 excluded: nothing predicts it), on minibatches of
    ``batch_size`` rows drawn with ``seed`` (full batch by default). Returns (fitted ratios,
    full-batch NLL per token at s_0 .. s_steps, the minimised objective per step, merged state)."""
    opt = torch.optim.Adam([s], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def nll(ratios, rows):
        merged = lm.at_params(model, merge(ratios))
        m = mask[rows].clone()
        m[:, 0] = 0  # nothing predicts position 0
        return -lm.response_logps(merged, ids[rows], m).sum() / m.sum().clamp_min(1)

    everything = torch.arange(len(ids))
    history, losses = [], []
    for _ in range(steps):
        rows = everything if batch_size is None else torch.randperm(len(ids), generator=gen)[:batch_size]
        ratios = ratios_of(s)
        fit = nll(ratios, rows)
        loss = fit + penalty(ratios)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if batch_size is not None:
            with torch.no_grad():
                fit = nll(ratios.detach(), everything)
        history.append(float(fit.detach()))
    ratios = ratios_of(s.detach())
    with torch.no_grad():
        history.append(float(nll(ratios, everything)))
        state = {n: t.detach() for n, t in merge(ratios).items()}
    return ratios, history, losses, state


# --------------------------------------------------------------------------------------------
# HMA as the authors' code defines it (module table, right column).

def author_blocks(names, scheme="block3") -> dict[str, int]:
    """{name: block} for the names that carry a layer index, split as the authors' code does.

    ``scheme``: "block3" (layers < 8, < 16, the rest; < 11, < 21 with more than 30 layers),
    "blockN" (int(L / N) layers per block, the remainder to the last), "layerwise" (one block per
    layer) or a tuple of boundaries (b_1 < b_2 < ...: layer < b_1 is block 0, ...). L is the
    number of layers, counted as max index + 1. Names without a layer index are left out. A split
    that leaves a block empty (block3 on a model of 16 layers or fewer) is refused.
    """
    layer = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    if not layer:
        raise GesimError("no layer index in the parameter names (expected e.g. 'blocks.3.', 'h.3.', 'layers.3.')")
    L = max(layer.values()) + 1
    if scheme == "layerwise":
        return dict(layer)
    if scheme == "block3":
        bounds = (11, 21) if L > 30 else (8, 16)
    elif isinstance(scheme, str) and scheme.startswith("block") and scheme[5:].isdigit() and int(scheme[5:]) >= 1:
        n_blocks = int(scheme[5:])
        each = L // n_blocks
        return {n: min(i // each, n_blocks - 1) if each else n_blocks - 1 for n, i in layer.items()}
    elif isinstance(scheme, tuple | list) and all(isinstance(b, int) for b in scheme) and list(scheme) == sorted(
            scheme):
        bounds = tuple(scheme)
    else:
        raise GesimError(f"block scheme must be 'block3', 'blockN', 'layerwise' or increasing layer boundaries, "
                         f"got {scheme!r}")
    out = {n: sum(i >= b for b in bounds) for n, i in layer.items()}
    empty = sorted(set(range(len(bounds) + 1)) - set(out.values()))
    if empty:
        raise GesimError(f"block scheme {scheme!r} splits at layers {bounds}, which leaves block(s) {empty} empty "
                         f"in this {L}-layer model (the code's block3 is built for 26-40 layers): use 'blockN', "
                         f"'layerwise' or boundaries inside 1..{L - 1}")
    return out


def text_mask(mask: torch.Tensor) -> torch.Tensor:
    """Every token of each right-padded row up to its last marked one (prompt and response): the
    "collected text" the authors' HMA objective scores, from a response mask. (N, T)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device)
    last = torch.where(mask.bool(), pos, -1).max(dim=1).values
    return (pos[None, :] <= last[:, None]).to(mask.dtype)


def hma_ratios_authors(s, a: float, eps: float = 1e-6) -> torch.Tensor:
    """The authors' ratios on the aligned model: a_k = 1 - w_k, w_k = w K (sigmoid(s_k) + eps) /
    sum_j (sigmoid(s_j) + eps), w = 1 - a (their ``init_val``, the weight on theta_0). (K,)."""
    return 1 - hma_ratios(s, 1 - a, eps)


def _authors_plan(model: torch.nn.Module, names: list, scheme):
    """(block_of for the Linear entries inside layers, the other Linear entries, layer index of each)."""
    linear = [n for n in names if n in linear_names(model)]
    block_of = author_blocks(linear, scheme) if linear else {}
    layer = {n: int(m.group(1)) for n in linear if (m := _LAYER.search(n))}
    return block_of, [n for n in linear if n not in block_of], layer


def merge_authors(theta0, theta, ratios, block_of: dict, fixed=(), a: float | None = None) -> dict:
    """The authors' merge: entries in ``block_of`` get (1 - a_k) theta0 + a_k theta, the names in
    ``fixed`` get ratio ``a``, everything else keeps theta0 (the model before alignment)."""
    theta0, theta = _pair(theta0, theta)
    if fixed and a is None:
        raise GesimError("merge_authors: give the mean ratio a for the fixed entries")
    out = {}
    for n, t in theta.items():
        if n in block_of:
            out[n] = _mix(theta0[n], t, ratios[block_of[n]])
        elif n in fixed:
            out[n] = _mix(theta0[n], t, a)
        else:
            out[n] = theta0[n]
    return out


def fit_hma_authors(model: torch.nn.Module, theta0, theta, ids: torch.Tensor, mask: torch.Tensor, a: float,
                    blocks="block3", steps: int = 50, lr: float = 0.1, reg: float = 1e-4, reg_scale: float = 25.0,
                    eps: float = 1e-6, seed: int = 0, batch_size: int | None = None) -> dict:
    """Fit HMA as the authors' code does (module table): only nn.Linear entries move, ratios
    a_k = 1 - w_k with the SFT weight w = 1 - a normalised over the blocks, blocks from
    :func:`author_blocks` (``blocks``), objective

        -mean_t log pi_merged(x_t | x_<t)  +  reg sum_m reg_scale / (|layer_m - L // 2| + 1) |w_k(m) - w|,

    the NLL over the tokens ``mask`` marks (pass the whole collected text: prompt and response,
    position 0 excluded), the penalty over every Linear module m inside the layers (each weight
    matrix and bias counted once per module, as their trainer sums per module). Adam on the
    logits s from s = logit(w), ``steps`` steps, minibatches of ``batch_size`` rows drawn with
    ``seed`` (full batch by default).

    Returns {"ratios": a_k (K floats), "sft_weights": w_k, "blocks": {name: k}, "nll", "loss",
    "state"} as :func:`fit_hma`.
    """
    if not 0 < a < 1:
        raise GesimError(f"the authors' parameterisation needs the mean ratio a in (0, 1), got {a}")
    theta0, theta, names = _fit_inputs(model, theta0, theta, ids, mask)
    block_of, fixed, layer = _authors_plan(model, names, blocks)
    if not block_of:
        raise GesimError("the model has no nn.Linear parameters inside indexed layers to interpolate")
    K = max(block_of.values()) + 1
    w = 1 - a
    mid = (max(layer.values()) + 1) // 2
    modules = {n.rsplit(".", 1)[0]: layer[n] for n in block_of}  # one penalty term per Linear module
    scale = {m: reg_scale / (abs(i - mid) + 1.0) for m, i in modules.items()}
    module_block = {n.rsplit(".", 1)[0]: k for n, k in block_of.items()}
    s = torch.full((K,), float(torch.logit(torch.tensor(w, dtype=torch.float64))), dtype=torch.float64,
                   requires_grad=True)
    ratios, history, losses, state = _fit_ratios(
        model, ids, mask, s, lambda s: hma_ratios_authors(s, a, eps),
        lambda r: merge_authors(theta0, theta, r, block_of, fixed, a),
        lambda r: reg * sum(c * ((1 - r[module_block[m]]) - w).abs() for m, c in scale.items()),
        steps, lr, seed, batch_size)
    return {"ratios": ratios.tolist(), "sft_weights": (1 - ratios).tolist(), "blocks": block_of, "nll": history,
            "loss": losses, "state": state}
