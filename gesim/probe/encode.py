"""Preference rows to token pairs: ``prompt + response`` ids with response masks.

Standard rows: the prompt is tokenised with the tokenizer's special tokens, each response
without them, followed by the EOS token when the tokenizer has one (trl's convention).
Conversational rows: the prompt is rendered with the chat template and a generation prompt;
a response is the template of prompt + response minus the rendered prompt. Sequences longer
than ``max_length`` have their response truncated (counted); a prompt that leaves no room
for a response token skips the row (counted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from gesim import lm
from gesim.errors import GesimError


@dataclass
class EncodedPair:
    index: int
    prompt: list
    chosen: list
    rejected: list

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class Encoded:
    pairs: list
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    pad_id: int = 0
    pad_note: str = ""


def _render(tokenizer, row):
    if isinstance(row["prompt"], str):
        return row["prompt"], row["chosen"], row["rejected"]
    if not getattr(tokenizer, "chat_template", None):
        raise GesimError("conversational rows need a tokenizer with a chat template; this one has none")
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    out = [prompt]
    for key in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
        if not full.startswith(prompt):
            raise GesimError(f"row {row['index']}: the chat template of prompt + {key} does not start with the prompt")
        out.append(full[len(prompt):])
    return tuple(out)


def encode_rows(rows, tokenizer, max_length: int) -> Encoded:
    """Tokenise validated rows (``gesim.data.read_pairs(...).rows``)."""
    if max_length < 2:
        raise GesimError(f"max_length must be at least 2, got {max_length}")
    pad_id, note = tokenizer.pad_token_id, ""
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        note = f"tokenizer has no pad token; padding with id {pad_id} (masked out, right padding)"
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    enc = Encoded([], pad_id=pad_id, pad_note=note)
    for row in rows:
        prompt, chosen, rejected = _render(tokenizer, row)
        p = tokenizer(prompt)["input_ids"] if prompt else []
        if not p:  # position 0 is never predicted: keep one token in front of the response
            p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
        responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + eos for r in (chosen, rejected)]
        if len(p) >= max_length:
            enc.skipped["prompt longer than max_length"] += 1
            continue
        room = max_length - len(p)
        if any(len(r) > room for r in responses):
            enc.truncated += 1
            responses = [r[:room] for r in responses]
        enc.pairs.append(EncodedPair(row["index"], p, *responses))
    return enc


def collate(pairs, pad_id: int = 0) -> lm.PairBatch:
    """Right-padded PairBatch of encoded pairs (response masks on the response tokens)."""
    def side(key):
        seqs = [(p.prompt, getattr(p, key)) for p in pairs]
        T = max(len(a) + len(b) for a, b in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (a, b) in enumerate(seqs):
            ids[i, :len(a) + len(b)] = torch.tensor(a + b)
            mask[i, len(a):len(a) + len(b)] = 1
        return ids, mask
    cw, mw = side("chosen")
    cl, ml = side("rejected")
    return lm.PairBatch(cw, cl, mw, ml)


def buckets(pairs, batch_size: int):
    """Batches of pairs of similar length (sorted by length; less padding), order kept inside."""
    order = sorted(range(len(pairs)), key=lambda k: pairs[k].length)
    return [[pairs[k] for k in order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
