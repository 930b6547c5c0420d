"""Causal language models as gesim sees them: pairs of token sequences and their log-probs.

One convention everywhere (the small GPT, Hugging Face models, the probe, the trainer):

* A pair is two right-padded token sequences ``prompt + response`` of shape (B, T), with a
  response mask of the same shape: ``mask[i, t] = 1`` when token t of row i is a response
  token whose log-prob counts. Position 0 is never counted (nothing predicts it).
* ``lw = sum_t mask_w[t] log pi(x_t | x_<t)``: summed response log-probs, prompt masked out.
* A model is any callable ``model(input_ids, ...)`` returning logits (N, T, V) or an object
  with ``.logits`` (Hugging Face). Hugging Face models get explicit per-row ``position_ids``
  (N, T) and an all-ones ``attention_mask`` (right padding under causal attention: pads never
  change a real row's numbers, and no pad row is left with nothing to attend to).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gesim.errors import GesimError


@dataclass
class PairBatch:
    """B preference pairs as right-padded token ids and response masks, (B, T) each (T may
    differ w / l): THE pair type of gesim (the Transformer's data, the probe, the trainer, and,
    holding numpy arrays, the synthetic pairs of :mod:`gesim.policies.pairs`).

    Build one from token lists with :meth:`from_rows`; ``take(rows)`` selects pairs,
    ``to(device)`` moves (numpy arrays become torch tensors).
    """

    chosen_ids: torch.Tensor
    rejected_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor

    def __post_init__(self):
        for ids, mask, side in ((self.chosen_ids, self.chosen_mask, "chosen"),
                                (self.rejected_ids, self.rejected_mask, "rejected")):
            if ids.shape != mask.shape or ids.ndim != 2:
                raise GesimError(f"{side} ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must be (B, T)")
        if len(self.chosen_ids) != len(self.rejected_ids):
            raise GesimError("chosen and rejected must hold the same number of pairs")

    @classmethod
    def from_rows(cls, rows_w: list, rows_l: list, starts: list, pad_id: int = 0,
                  mask_dtype: torch.dtype = torch.float32) -> PairBatch:
        """Pairs from token-id lists ``prompt + response`` and each pair's response start (the
        prompt length): right-padded with ``pad_id``, masks 1 from the start to the row's end."""
        (cw, mw), (cl, ml) = (_padded(rows, starts, pad_id, mask_dtype) for rows in (rows_w, rows_l))
        return cls(cw, cl, mw, ml)

    def tensors(self) -> tuple:
        return self.chosen_ids, self.rejected_ids, self.chosen_mask, self.rejected_mask

    def __len__(self) -> int:
        return len(self.chosen_ids)

    @property
    def len_w(self):
        """Response lengths |y_w| (B,)."""
        return self.chosen_mask.sum(-1)

    @property
    def len_l(self):
        """Response lengths |y_l| (B,)."""
        return self.rejected_mask.sum(-1)

    def take(self, rows) -> PairBatch:
        """The pairs ``rows`` (indices, a mask or a slice)."""
        return PairBatch(*(t[rows] for t in self.tensors()))

    def to(self, device) -> PairBatch:
        return PairBatch(*(torch.as_tensor(t).to(device) for t in self.tensors()))

    def pair(self, i: int) -> PairBatch:
        """Pair i alone, trimmed to its own length (no padding)."""
        return self.take(slice(i, i + 1)).trimmed()

    def trimmed(self) -> PairBatch:
        """Drop padding columns beyond the last response token of every row."""
        def cut(ids, mask):
            last = int(mask.nonzero()[:, 1].max()) + 1 if mask.any() else 1
            return ids[:, :last], mask[:, :last]
        cw, mw = cut(self.chosen_ids, self.chosen_mask)
        cl, ml = cut(self.rejected_ids, self.rejected_mask)
        return PairBatch(cw, cl, mw, ml)

    def stacked(self, pad_id: int = 0):
        """Chosen rows then rejected rows, padded to one length: ids, mask, each (2B, T)."""
        T = max(self.chosen_ids.shape[1], self.rejected_ids.shape[1])
        pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
        ids = torch.cat([pad(self.chosen_ids, pad_id), pad(self.rejected_ids, pad_id)])
        mask = torch.cat([pad(self.chosen_mask, 0), pad(self.rejected_mask, 0)])
        return ids, mask


def _padded(rows: list, starts: list, pad_id: int, mask_dtype: torch.dtype):
    """Right-padded ids (N, T) of token-id lists and masks (N, T), 1 from ``starts[i]`` to the row's end."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=mask_dtype)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, s: len(r)] = 1
    return ids, mask


def is_hf(model) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` (duck-typed, no import of transformers)."""
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings")


def logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, T, V) of ``model`` on right-padded ``ids`` (N, T).

    Hugging Face models get per-row position ids and an all-ones attention mask: with right
    padding and causal attention no real token sees a pad, so masking pads changes nothing
    for them, while a padding mask can leave a pad's query row with no visible key (sliding
    window shorter than the padding) and make it NaN under eager attention. ``mask`` (the
    response mask) is accepted for the calling convention and not needed.
    """
    if not is_hf(model):
        out = model(ids)
        return out.logits if hasattr(out, "logits") else out
    N, T = ids.shape
    position_ids = torch.arange(T, device=ids.device).expand(N, T)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=position_ids, use_cache=False)
    return out.logits


class _AtParams:
    """``model`` evaluated at the parameters ``params`` through ``torch.func.functional_call``;
    keeps the Hugging Face calling convention of :func:`logits` when ``model`` has it."""

    def __init__(self, model, params: dict):
        self.model, self.params = model, params
        if is_hf(model):
            self.config, self.get_input_embeddings = model.config, model.get_input_embeddings

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.model, self.params, args, kwargs)


def at_params(model, params: dict):
    """A callable with ``model``'s calling convention that evaluates it at ``params`` ({name: tensor})."""
    return _AtParams(model, params)


def token_logps(logits_: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(x_t | x_<t) at every position t >= 1, in float32 or wider; position 0 gets 0. (N, T)."""
    logp = torch.log_softmax(logits_[:, :-1].float() if logits_.dtype in (torch.float16, torch.bfloat16)
                             else logits_[:, :-1], dim=-1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return torch.nn.functional.pad(picked, (1, 0))


def response_logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed response log-probs (N,): sum_t mask[t] log pi(x_t | x_<t)."""
    mask = mask.clone()
    mask[:, 0] = 0
    logp = token_logps(logits(model, ids, mask), ids)
    return torch.where(mask.bool(), logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)


def pair_logps(model, batch: PairBatch):
    """(lw, ll), each (B,), in one forward pass over chosen and rejected together."""
    ids, mask = batch.stacked()
    s = response_logps(model, ids, mask)
    return s[: len(batch)], s[len(batch):]
