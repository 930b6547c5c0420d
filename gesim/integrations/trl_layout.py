"""What train-mode entanglement needs from a trl ``DPOTrainer`` step: its row layout, its LM head
read from outside its fused kernel, and the loss weight of every row, read from trl 1.16's own
training step.

**Layout** (trl 1.16 ``DataCollatorForPreference`` and ``DPOTrainer._compute_loss``): one
micro-batch of B pairs is one forward over ``input_ids`` (2B, T): rows 0..B-1 are
``prompt + chosen``, rows B..2B-1 ``prompt + rejected`` of the same pairs, right-padded,
``completion_mask`` marking the response tokens; trl sums the next-token log-probs of the
response tokens per row (``logps.chunk(2)``: "batch is [chosen, rejected]"). The reference
log-probs come from a separate ``ref_model``, from the policy with its PEFT adapter disabled,
both under ``torch.no_grad``, or from the batch (``precompute_ref_log_probs``): none of them
is a grad-enabled forward of the policy, so none is recorded. :func:`read_layout` checks all
of this on every micro-batch and refuses anything else (packed / padding-free rows, position
ids, extra model inputs such as images, left padding, rows whose prompts do not pair up).

**LM head**. trl patches the policy's ``forward`` with a fused head
(``trl.trainer.utils.add_fused_lm_head``): the LM-head weight is used inside a custom
autograd Function (float32 statistics and accumulation whatever the model's dtype), so no
module hook sees it, and a tied embedding would silently lose its head term.
:func:`watch_fused_head` leaves that forward running unchanged (the training step is bitwise
trl's) and hands over, per grad-enabled fused call, the backbone's last hidden states h (a
forward hook on ``base_model``, the backbone trl runs) and trl's ``log_probs``; from h and the
gradient reaching ``log_probs``, :func:`head_output_grad` forms the head's output gradient
``dL/dz = dL/dlogp (e_y - softmax(z))`` (one (2B, T, V) tensor), which the recorder turns into
the head's per-row share like any other use. Logit soft-capping / scaling and MoE router losses
are refused.

**Row weights**. A tensor hook on the ``log_probs`` output receives
``dL/dlogp[b, t]`` of the scalar L trl backpropagates. With lw_b trl's per-row log-prob
(the sum over the response, or trl's LD-DPO weighting), ``dL/dlogp[b, t] = c_b`` on every
response token (``c_b`` on the shared and ``ld_alpha c_b`` on the tail tokens under LD-DPO),
so the row's parameter gradient is ``r_b = c_b grad lw_b``. :func:`row_weights` reads c_b and
checks that pattern (anything else is refused: the per-row numbers would be wrong).

**CPOTrainer** (``trl.experimental.cpo``, 1.16: SimPO, CPO): ``concatenated_forward`` runs the
model itself on [chosen rows; rejected rows] padded to one length, labels -100 off the
response; its head is a module call already. ``dL/dlogp`` is read from the logits' gradient
(:func:`logit_token_weights`); its NLL term (``cpo_alpha``) is a per-token multiple of the
chosen rows' log-probs and is read with the rest. ORPO is refused: its NLL also covers the
prompt tokens, a gradient outside the pair's (g_w, g_l).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from gesim.errors import GesimError

TESTED_TRL = "1.16"
#: model inputs trl 1.16's text collator produces; anything else (images, position ids of a
#: packed batch, cu_seq_lens) is a layout this module does not read
TEXT_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
#: config fields trl's fused head reads to rescale logits; head_output_grad supports none
_LOGIT_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling")


def hf_model(trainer):
    """The Hugging Face model whose ``forward`` trl patched (the PEFT base model under LoRA)."""
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_trainer(trainer, allow_untested: bool = False):
    """Refuse a trainer whose step layout is not the one read here (message names the reason)."""
    import trl

    kind = trainer_kind(trainer)
    version = ".".join(trl.__version__.split(".")[:2])
    if version != TESTED_TRL and not allow_untested:
        raise GesimError(f"train mode reads trl {TESTED_TRL}'s DPOTrainer layout; trl {trl.__version__} may lay "
                         "rows out otherwise (pass allow_untested_trl=True after checking it)")
    if getattr(trainer, "padding_free", False):
        raise GesimError("padding_free=True packs all pairs into one row: train mode cannot tell pairs apart")
    if getattr(trainer, "aux_loss_enabled", False):
        raise GesimError("the MoE router loss (aux_loss_enabled) adds gradient outside the per-row log-probs; "
                         "train mode does not support it")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise GesimError("train mode is tested with single-process and DDP training; DeepSpeed / FSDP shard the "
                         "parameters it reads (not supported)")
    args = getattr(trainer, "args", None)
    if getattr(args, "torch_compile", False) or getattr(args, "use_liger_kernel", False):
        raise GesimError("train mode needs the model's own modules (its hooks): torch_compile and Liger kernels "
                         "replace them (not supported)")
    if getattr(trainer, "_is_vision_dataset", False):
        raise GesimError("vision-language batches (images) are not read by train mode")
    if kind == "cpo":
        if getattr(trainer, "is_encoder_decoder", False):
            raise GesimError("train mode reads decoder-only CPO batches; this model is an encoder-decoder")
        return kind
    config = hf_model(trainer).config.get_text_config()
    for field in _LOGIT_FIELDS:
        value = getattr(config, field, None)
        if value is not None and value != 1.0:
            raise GesimError(f"the model config sets {field}={value}: train mode's reading of the LM head does "
                             "not rescale logits")
    return kind


def trainer_kind(trainer) -> str:
    """"dpo" (trl's DPOTrainer: one fused-head forward over [chosen; rejected]) or "cpo"
    (trl.experimental's CPOTrainer: the model's own logits over [chosen; rejected], padded to one
    length, ``chosen_labels`` / ``rejected_labels`` -100 off the response); anything else refused."""
    names = {c.__name__ for c in type(trainer).__mro__}
    if "DPOTrainer" in names:
        return "dpo"
    if "CPOTrainer" in names:
        return "cpo"
    if "ORPOTrainer" in names:
        raise GesimError("ORPOTrainer's NLL term runs over the prompt tokens too: part of its gradient lies outside "
                         "the pair's (g_w, g_l), so train mode does not read it")
    raise GesimError(f"train mode reads trl's DPOTrainer and CPOTrainer layouts; got {type(trainer).__name__} "
                     "(its rows are laid out otherwise)")


def read_layout(inputs) -> int:
    """Check one trl micro-batch and return B, its number of pairs (rows b and b + B)."""
    extra = set(inputs) - TEXT_KEYS
    if extra:
        raise GesimError(f"the trl batch has inputs train mode does not read: {sorted(extra)} (packed / padding-free "
                         "rows, position ids or images); only [chosen rows; rejected rows] text batches are read")
    for key in ("input_ids", "attention_mask", "completion_mask"):
        if key not in inputs:
            raise GesimError(f"the trl batch has no {key!r}: not trl 1.16's preference batch")
    ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    if ids.ndim != 2 or attn.shape != ids.shape or comp.shape != ids.shape:
        raise GesimError(f"input_ids {tuple(ids.shape)}, attention_mask {tuple(attn.shape)} and completion_mask "
                         f"{tuple(comp.shape)} must be one (2B, T) shape")
    N, T = ids.shape
    if N % 2:
        raise GesimError(f"the batch has {N} rows; trl's layout has 2B ([chosen; rejected])")
    B = N // 2
    attn, comp = attn.bool(), comp.bool()
    lengths = attn.sum(1)
    right = torch.arange(T, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(attn, right):
        raise GesimError("attention_mask rows are not right-padded (ones then zeros): not the layout read here")
    if torch.any(comp & ~attn):
        raise GesimError("completion_mask marks padded positions")
    start = torch.where(comp.any(1), comp.float().argmax(1), lengths)  # first response position per row
    ends = start + comp.sum(1)
    if not torch.equal(comp, (torch.arange(T, device=ids.device) >= start[:, None])
                       & (torch.arange(T, device=ids.device) < ends[:, None])):
        raise GesimError("a row's completion tokens are not one block: not trl's prompt + response layout")
    for b in range(B):
        p = int(start[b])
        if int(start[b + B]) != p or not torch.equal(ids[b, :p], ids[b + B, :p]):
            raise GesimError(f"rows {b} and {b + B} do not share a prompt: the batch is not [chosen rows; rejected "
                             "rows] of the same pairs, and train mode will not guess its layout")
    return B


def token_weights(comp_shift, ld_alpha=None, dtype=torch.float32):
    """(N, T-1) weight of each next-token log-prob in trl's per-row log-prob lw_b: 1 on the
    response, 0 elsewhere; under LD-DPO ``ld_alpha`` past the shorter response of the pair."""
    w = comp_shift.to(dtype)
    if ld_alpha is not None:
        pos = comp_shift.long().cumsum(1)
        shared = torch.minimum(*comp_shift.sum(1).chunk(2)).repeat(2)
        w = torch.where(comp_shift & (pos > shared[:, None]), torch.full_like(w, ld_alpha), w)
    return w


def row_weights(grad, weights, rtol: float = 1e-6):
    """c (N,) = dL/dlw_b, read from ``grad`` = dL/dlog_probs (N, T-1): checks that
    ``grad = c_b weights[b, t]`` on every response position (module docstring), else refuses.
    (Positions off the response pass no gradient: the head zeroes their log-probs.)"""
    grad = grad.detach()
    weights = weights.to(grad.dtype)
    grad = torch.where(weights != 0, grad, torch.zeros_like(grad))
    first = weights.ne(0).float().argmax(1)  # the row's first response token (weight 1), or 0 (weight 0)
    rows = torch.arange(len(grad), device=grad.device)
    w0 = weights[rows, first]
    c = torch.where(w0 != 0, grad[rows, first] / torch.where(w0 != 0, w0, torch.ones_like(w0)), torch.zeros_like(w0))
    scale = grad.abs().max().clamp(min=torch.finfo(grad.dtype).tiny)
    if (grad - c[:, None] * weights).abs().max() > rtol * scale:
        raise GesimError("the loss's gradient is not c_b x (the token's weight in lw_b) on a row: trl's loss uses "
                         "per-token log-probs otherwise than through the per-row sums, and train mode would misread it")
    return c


def head_output_grad(h, head, labels, grad_log_probs, dtype, compute_dtype=None):
    """dL/dz (N, T, V) of the head's logits z = W h + b, from dL/dlogp (N, T-1), the gradient
    trl's fused head receives: ``dL/dz_t = dL/dlogp_t (e_{y_{t+1}} - softmax(z_t))`` at t < T-1,
    0 at the last position (no next token) and where the label is -100 (trl's head zeroes those
    log-probs, so whatever gradient reaches them stops there).

    The logits are formed as trl forms them, h and W cast to ``compute_dtype`` (trl's: the
    autocast dtype when its forward ran under autocast, else h's dtype; the backward, where this
    runs, is outside autocast, so the caller passes it), the softmax in ``dtype`` (float32,
    float64 for float64 models); trl's own backward folds the same quantity tile by tile without
    materialising it.
    Memory: one (N, T, V) tensor, as a module-called head's gradient would be."""
    W, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
    cd = compute_dtype or h.dtype
    with torch.no_grad():
        z = torch.nn.functional.linear(h.detach().to(cd), W.to(cd), None if b is None else b.to(cd)).to(dtype)
        q = torch.softmax(z, -1).neg_()
        y = labels[:, 1:].to(q.device)
        q[:, :-1].scatter_add_(-1, y.clamp(min=0).unsqueeze(-1), torch.ones_like(y, dtype=dtype).unsqueeze(-1))
        q[:, :-1] *= torch.where(y != -100, grad_log_probs.to(dtype), 0).unsqueeze(-1)
        q[:, -1] = 0
    return q


@contextlib.contextmanager
def watch_fused_head(model, on_call):
    """Within the block the policy's forward is trl's own, unchanged (its fused head's forward
    and backward run bitwise as without gesim); for each grad-enabled ``fused_lm_head=True``
    call, ``on_call(h, labels, out, compute_dtype)`` gets the backbone's last hidden states h
    (N, T, d) (read by a forward hook on ``model.base_model``, the backbone trl runs), the
    labels, trl's output (its ``log_probs``) and the dtype trl's head computed its logits in
    (the autocast dtype if autocast was on, else h's). no-grad calls (trl's reference forward
    under PEFT) pass through."""
    fused = model.__dict__.get("forward")
    if fused is None:
        raise GesimError("the model's forward is not trl's fused-head forward (add_fused_lm_head): not a trl 1.16 "
                         "DPOTrainer policy")
    state = {"armed": False, "h": None}

    def grab(mod, args, output):
        if state["armed"] and torch.is_grad_enabled():
            if state["h"] is not None:
                raise GesimError("the backbone ran twice in one fused-head forward")
            state["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            dev = state["h"].device.type  # trl's head runs right after, under the same autocast state
            state["cd"] = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else state["h"].dtype

    @functools.wraps(type(model).forward)
    def forward(*args, fused_lm_head=False, **kwargs):
        if not (fused_lm_head and torch.is_grad_enabled()):
            return fused(*args, fused_lm_head=fused_lm_head, **kwargs)
        if kwargs.get("shift_labels") is not None or kwargs.get("labels") is None:
            raise GesimError("train mode reads next-token labels (no shift_labels: no context parallelism)")
        state["armed"], state["h"], state["cd"] = True, None, None
        try:
            out = fused(*args, fused_lm_head=True, **kwargs)
        finally:
            state["armed"] = False
        if state["h"] is None:
            raise GesimError("trl's fused-head forward did not run the model's backbone (base_model) as a module")
        on_call(state["h"], kwargs["labels"], out, state["cd"])
        return out

    handle = model.base_model.register_forward_hook(grab)
    model.forward = forward
    try:
        yield
    finally:
        model.forward = fused
        handle.remove()


# ---- CPOTrainer (trl.experimental.cpo, 1.16): the model's own logits -------------------------------

CPO_KEYS = {"prompt", "chosen", "rejected", "prompt_input_ids", "prompt_attention_mask", *(
    f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels"))}


def read_cpo_layout(inputs):
    """B and the (2B, T) token ids and labels of CPOTrainer's ``concatenated_forward`` (chosen rows,
    then rejected rows, each padded to the longer side), checked as :func:`read_layout` does."""
    extra = set(inputs) - CPO_KEYS
    if extra:
        raise GesimError(f"the CPO batch has inputs train mode does not read: {sorted(extra)}")
    T = max(inputs["chosen_input_ids"].shape[1], inputs["rejected_input_ids"].shape[1])
    pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
    ids = torch.cat([pad(inputs[f"{s}_input_ids"], 0) for s in ("chosen", "rejected")])
    attn = torch.cat([pad(inputs[f"{s}_attention_mask"], 0) for s in ("chosen", "rejected")])
    labels = torch.cat([pad(inputs[f"{s}_labels"], -100) for s in ("chosen", "rejected")])
    resp = labels != -100
    if torch.any(resp & (labels != ids)):
        raise GesimError("CPO labels differ from the input ids on the response: not the layout read here")
    read_layout({"input_ids": ids, "attention_mask": attn, "completion_mask": resp.long()})
    return len(ids) // 2, ids, labels


@contextlib.contextmanager
def logits_hook(model, seen):
    """Within the block, every grad-enabled call of ``model`` appends its ``logits`` to ``seen``,
    then their gradient when the backward reaches them."""
    def hook(module, args, kwargs, output):
        if torch.is_grad_enabled():
            seen.append(output.logits)
            output.logits.register_hook(lambda g: seen.append(g))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def logit_token_weights(logits, grad, labels, rtol=None):
    """k (N, T-1): dL/dlogp[b, t] of the next-token log-probs, from the logits' gradient: any loss
    that uses the logits only through those log-probs has ``dL/dz_t = k_t (e_{y_t} - p_t)``;
    checked (with nothing off the response), else refused."""
    z = logits.detach()[:, :-1]
    y = labels[:, 1:]
    mask = y != -100
    g = grad.detach()
    tol = rtol if rtol is not None else max(1e-6, 50 * torch.finfo(g.dtype).eps)
    scale = g.abs().max().clamp(min=torch.finfo(g.dtype).tiny)
    if g[:, -1].abs().max() > tol * scale:
        raise GesimError("the loss has a gradient on the last position's logits: not next-token log-probs")
    g = g[:, :-1].to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    e = torch.nn.functional.one_hot(y.clamp(min=0), z.shape[-1]).to(g.dtype) - torch.softmax(z.to(g.dtype), -1)
    k = (g * e).sum(-1) / (e * e).sum(-1).clamp(min=torch.finfo(g.dtype).tiny)
    k = torch.where(mask, k, torch.zeros_like(k))
    if (g - k[..., None] * e).abs().max() > tol * scale:
        raise GesimError("the loss's gradient on the logits is not a multiple of the response tokens' log-prob "
                         "gradients (a term on other positions or other logits): train mode would misread it")
    return k
