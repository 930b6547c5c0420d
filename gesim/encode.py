"""Preference rows to token pairs: ``prompt + response`` ids with response masks, exactly as
trl 1.16's DPO data path tokenises them (``DPOTrainer._prepare_dataset``); used by the probe's
command line (:mod:`gesim.cli.probe_run`) and the trl callback (:mod:`gesim.integrations.trl`),
and padded into the one pair type by :func:`collate` (:meth:`gesim.lm.PairBatch.from_rows`):

* rows without a ``prompt`` (implicit prompt): the prompt is the longest common prefix of
  chosen and rejected (messages, or characters backed off before a space; trl's ``extract_prompt``);
* standard rows: the EOS token string is appended to each response (unless already there),
  then ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenised with the
  tokenizer's special tokens;
* conversational rows: the chat template renders the prompt with the generation prompt and
  each full conversation without it (``tokenize=True``: no second BOS, no EOS after the turn);
* the response starts where the tokenised prompt and prompt + response first differ (trl's
  ``common_prefix_length`` rule), so a template whose prompt rendering is not a prefix of the
  full one is handled as trl trains on it, and counted (``Encoded.prefix_cut``), never fatal.

Sequences longer than ``max_length`` have their response truncated (counted); a prompt that
leaves no room for a response token skips the row (counted); an empty prompt gets one BOS (or
pad) token in front, since position 0 is never predicted.
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
    prefix_cut: int = 0  # rows whose tokenised prompt is not a prefix of prompt + response (trl's rule applied)


def extract_prompt(chosen, rejected):
    """trl's ``extract_prompt``: the longest common prefix (of messages, or of characters backed
    off by one before a space) is the prompt; the rests are the responses."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def common_prefix_length(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def trl_token_ids(tokenizer, row) -> tuple[list, list, list, bool]:
    """(prompt, chosen, rejected) token ids as trl's DPO data path makes them, and whether the
    tokenised prompt had to be cut back to the common prefix."""
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if isinstance(chosen, list):
        if not getattr(tokenizer, "chat_template", None):
            raise GesimError("conversational rows need a tokenizer with a chat template; this one has none")
        render = lambda msgs, **kw: tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,  # noqa: E731
                                                                  **kw)["input_ids"]
        p = render(prompt, add_generation_prompt=True)
        full = [render(prompt + chosen), render(prompt + rejected)]
    else:
        eos = tokenizer.eos_token
        if eos is not None:
            chosen, rejected = (r if r.endswith(eos) else r + eos for r in (chosen, rejected))
        p = tokenizer(text=prompt)["input_ids"]
        full = [tokenizer(text=prompt + r)["input_ids"] for r in (chosen, rejected)]
    k = min(common_prefix_length(p, f) for f in full)
    return list(p[:k]), list(full[0][k:]), list(full[1][k:]), k < len(p)


def encode_rows(rows, tokenizer, max_length: int) -> Encoded:
    """Tokenise validated rows (``gesim.data.read_pairs(...).rows``) as trl does."""
    if max_length < 2:
        raise GesimError(f"max_length must be at least 2, got {max_length}")
    pad_id, note = tokenizer.pad_token_id, ""
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        note = f"tokenizer has no pad token; padding with id {pad_id} (masked out, right padding)"
    enc = Encoded([], pad_id=pad_id, pad_note=note)
    for row in rows:
        p, chosen, rejected, cut = trl_token_ids(tokenizer, row)
        enc.prefix_cut += cut
        if not chosen or not rejected:
            enc.skipped["empty response after tokenisation"] += 1
            continue
        if not p:  # position 0 is never predicted: keep one token in front of the response
            p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
        responses = [chosen, rejected]
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
    """Right-padded PairBatch of encoded pairs (response masks on the response tokens, int64)."""
    return lm.PairBatch.from_rows([p.prompt + p.chosen for p in pairs], [p.prompt + p.rejected for p in pairs],
                                  [len(p.prompt) for p in pairs], pad_id, mask_dtype=torch.long)


def buckets(pairs, batch_size: int):
    """Batches of pairs of similar length (sorted by length; less padding), order kept inside."""
    order = sorted(range(len(pairs)), key=lambda k: pairs[k].length)
    return [[pairs[k] for k in order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
