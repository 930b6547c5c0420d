"""An offline sentiment-style preference language (theory.md section 5).

Reviews come from a small grammar with sentiment-bearing words; the response is a label
("positive" / "negative", decided by the majority of sentiment words in the review),
optionally followed by a suffix whose slots (names, days, cities, numbers) keep entropy after
SFT, which theory.md section 5 found necessary for a positive suffix cosine.

Structures of a preference pair (chosen = correct label, rejected = the other one; names and
suffix lengths from the one table :data:`gesim.registries.STRUCTURES`):

=================  ===================================================================
``1t``             the responses are the label alone: they differ in exactly one token
``short-suffix``   label + a shared suffix of 5 tokens
``long-suffix``    label + a shared suffix of 27 tokens
``mid``            a shared lead-in, the label mid-response, then a shared short suffix
``unequal``        label + suffix; the rejected response carries 3 extra suffix tokens
=================  ===================================================================

Everything is deterministic under the seed; train and eval pairs come from disjoint draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gesim import registries
from gesim.errors import GesimError, unknown
from gesim.lm import PairBatch

POSITIVE = ["great", "wonderful", "excellent", "brilliant", "charming", "moving", "superb", "delightful",
            "clever", "beautiful", "fun", "gripping"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "clumsy", "tedious", "weak", "bland", "messy", "painful",
            "silly", "flat"]
NOUNS = ["film", "movie", "plot", "cast", "script", "ending", "story", "score", "acting", "pacing", "dialogue",
         "direction", "camera", "sequel", "premise", "villain"]
INTENS = ["very", "truly", "rather", "quite", "so", "really", "fairly", "mostly"]
NAMES = ["anna", "ben", "carla", "dev", "eli", "fay", "gus", "hana", "ivan", "jo", "kai", "lena"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
CITIES = ["paris", "lima", "oslo", "cairo", "delhi", "tokyo", "quito", "rome", "seoul", "accra"]
NUMBERS = [str(i) for i in range(2, 30)]
GLUE = ["the", "was", "and", "but", "with", "a", ".", "sentiment", ":", "positive", "negative", "seen", "by",
        "on", "in", "at", "pm", "rated", "out", "of", "10", "friends", "told", "me", "it", "said", "i", "think"]
SPECIAL = ["<pad>", "<bos>", "<eos>"]
VOCAB = SPECIAL + sorted(set(GLUE + POSITIVE + NEGATIVE + NOUNS + INTENS + NAMES + DAYS + CITIES + NUMBERS))

STRUCTURES = tuple(registries.STRUCTURES)


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]


class Language:
    """Word-level tokenizer over :data:`VOCAB` and the review grammar."""

    def __init__(self):
        self.vocab = list(VOCAB)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, words) -> list[int]:
        try:
            return [self.index[w] for w in words]
        except KeyError as err:
            raise GesimError(f"word {err.args[0]!r} is not in the review language") from None

    def decode(self, ids) -> list[str]:
        return [self.vocab[int(i)] for i in ids]

    def review(self, rng: np.random.Generator):
        """(prompt words, label): 2-3 clauses, the label is the majority sentiment."""
        n = int(rng.integers(2, 4))
        signs = rng.random(n) < 0.5
        while signs.sum() * 2 == n:  # no ties
            signs = rng.random(n) < 0.5
        words = ["<bos>"]
        for i, pos in enumerate(signs):
            words += ["the", _pick(rng, NOUNS), "was", _pick(rng, INTENS), _pick(rng, POSITIVE if pos else NEGATIVE)]
            words += ["and"] if i < n - 1 else ["."]
        label = "positive" if signs.sum() * 2 > n else "negative"
        return words + ["sentiment", ":"], label

    def suffix(self, rng: np.random.Generator, length: int) -> list[str]:
        """A suffix of exactly ``length`` tokens built from high-entropy slots."""
        pieces = [lambda: ["seen", "by", _pick(rng, NAMES)], lambda: ["on", _pick(rng, DAYS)],
                  lambda: ["in", _pick(rng, CITIES)], lambda: ["at", _pick(rng, NUMBERS), "pm"],
                  lambda: ["rated", _pick(rng, NUMBERS), "out", "of", "10"],
                  lambda: [_pick(rng, NAMES), "said", "it", "was", _pick(rng, INTENS)]]
        words: list[str] = []
        while len(words) < length:
            words += pieces[int(rng.integers(len(pieces)))]()
        return words[:length]


#: Shared suffix length per structure (the table :data:`gesim.registries.STRUCTURES`).
SUFFIX = registries.STRUCTURES


@dataclass
class PairSet:
    """Encoded preference pairs (a :class:`PairBatch`) plus the words, for inspection."""

    batch: PairBatch
    prompt_len: torch.Tensor  # (N,)
    chosen: list[list[str]]
    rejected: list[list[str]]

    def __len__(self) -> int:
        return len(self.batch)


def pairs(structure: str, n: int, seed: int, lang: Language | None = None, suffix_len: int | None = None) -> PairSet:
    """``n`` preference pairs of ``structure`` (see the module docstring), deterministic in ``seed``.

    ``suffix_len`` (the suffix-length sweep): each response is cut to the label and the first
    ``suffix_len`` tokens of its shared suffix, without ``<eos>``; the random draws are the
    same for every ``suffix_len``, so the sweep's pairs differ only in where they are cut."""
    if structure not in STRUCTURES:
        raise unknown("pair structure", structure, STRUCTURES)
    if suffix_len is not None and structure not in ("1t", "short-suffix", "long-suffix"):
        raise GesimError(f"suffix_len needs a label-first structure (1t, short-suffix, long-suffix), not {structure!r}")
    if suffix_len is not None and not 0 <= suffix_len <= SUFFIX[structure]:
        raise GesimError(f"suffix_len={suffix_len} is outside [0, {SUFFIX[structure]}] for {structure!r}")
    lang = lang or Language()
    rng = np.random.default_rng(seed)
    rows_w, rows_l, starts, words_w, words_l = [], [], [], [], []
    for _ in range(n):
        prompt, label = lang.review(rng)
        other = "negative" if label == "positive" else "positive"
        suffix = lang.suffix(rng, SUFFIX[structure])
        lead = lang.suffix(rng, 3) if structure == "mid" else []
        extra = lang.suffix(rng, 3) if structure == "unequal" else []
        resp_w = lead + [label] + suffix + ["<eos>"]
        resp_l = lead + [other] + suffix + extra + ["<eos>"]
        if suffix_len is not None:
            resp_w, resp_l = resp_w[: 1 + suffix_len], resp_l[: 1 + suffix_len]
        rows_w.append(lang.encode(prompt + resp_w))
        rows_l.append(lang.encode(prompt + resp_l))
        starts.append(len(prompt))
        words_w.append(resp_w)
        words_l.append(resp_l)
    return PairSet(PairBatch.from_rows(rows_w, rows_l, starts, lang.pad_id), torch.tensor(starts), words_w, words_l)


def sft_sequences(structure: str, n: int, seed: int, label_noise: float = 0.1, lang: Language | None = None):
    """SFT data: prompt + label + the structure's suffix, the label flipped with probability
    ``label_noise`` (so that SFT learns the label without saturating it, theory.md section 5).
    Returns right-padded ids (n, T) and response masks (n, T)."""
    if not 0 <= label_noise < 0.5:
        raise GesimError(f"label_noise must be in [0, 0.5), got {label_noise}")
    lang = lang or Language()
    data = pairs(structure, n, seed, lang)
    flip = torch.from_numpy(np.random.default_rng(seed + 1).random(n) < label_noise)
    ids, mask = data.batch.stacked(lang.pad_id)  # (2n, T): chosen rows, then rejected rows
    pick = torch.arange(n) + n * flip.long()
    return ids[pick], mask[pick]
