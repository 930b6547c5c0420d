"""Preference pairs with controlled structure, as padded token-id arrays.

A pair is (chosen y_w, rejected y_l) built from three blocks::

    y_w = prefix + diff_w + suffix,     y_l = prefix + diff_l + suffix

a shared prefix (length ``prefix``), a differing block (lengths ``differ_w``, ``differ_l``;
every position of the overlap differs, so with equal lengths the Hamming distance is
``differ``) and a shared suffix (length ``suffix``), optionally followed by unshared tails
(``tail_w``, ``tail_l``). Unequal ``differ_w`` / ``differ_l`` or tails give unequal lengths. :func:`hamming` places
``distance`` differing tokens anywhere in equal-length responses; :func:`structure` builds the
label-first structures of the sentiment study (`1t`, `short-suffix`, `long-suffix`) with the
suffix lengths of the Transformer's language (the one table :data:`gesim.registries.STRUCTURES`).

Each generator returns a :class:`gesim.lm.PairBatch` holding numpy arrays: ids (N, T) int64
right-padded with id 0, masks (N, T) float64 (1 on response tokens).
"""

from __future__ import annotations

import numpy as np

from gesim import registries
from gesim.errors import GesimError, unknown
from gesim.lm import PairBatch

#: The structures the synthetic pairs build: one differing token, then the shared suffix.
LABEL_FIRST = registries.PAPER_STRUCTURES


def distance(pairs: PairBatch) -> np.ndarray:
    """Positions where the two responses differ (N,); a position only one side has counts."""
    both = (pairs.chosen_mask > 0) & (pairs.rejected_mask > 0)
    return ((pairs.chosen_ids != pairs.rejected_ids) & both).sum(-1) + np.abs(pairs.len_w - pairs.len_l).astype(int)


def _check(vocab, **lengths):
    if int(vocab) < 2:
        raise GesimError(f"vocab must be at least 2 to make two different tokens, got {vocab}")
    for name, value in lengths.items():
        if int(value) != value or value < 0:
            raise GesimError(f"{name} must be a non-negative integer, got {value}")


def _distinct(rng, vocab, shape, avoid):
    """Random tokens in [1, vocab) different from ``avoid`` elementwise (pad 0 never drawn)."""
    if vocab < 3:
        raise GesimError("vocab must be at least 3 for differing tokens (id 0 is the pad)")
    tok = rng.integers(1, vocab - 1, size=shape)
    return np.where(tok >= avoid, tok + 1, tok)


def blocks(rng, n, vocab, *, prefix=0, differ=1, suffix=0, differ_w=None, differ_l=None, tail_w=0,
           tail_l=0) -> PairBatch:
    """``n`` pairs: shared prefix, differing block (lengths differ_w, differ_l), shared suffix,
    then unshared tails of lengths ``tail_w``, ``tail_l`` (unequal lengths at an aligned suffix)."""
    differ_w = differ if differ_w is None else differ_w
    differ_l = differ if differ_l is None else differ_l
    _check(vocab, prefix=prefix, suffix=suffix, differ_w=differ_w, differ_l=differ_l, tail_w=tail_w,
           tail_l=tail_l)
    if prefix + differ_w + suffix == 0 or prefix + differ_l + suffix == 0:
        raise GesimError("each response needs at least one token (prefix + differ + suffix > 0)")
    pre = rng.integers(1, vocab, size=(n, prefix))
    dw = rng.integers(1, vocab, size=(n, differ_w))
    k = min(differ_w, differ_l)
    dl = np.concatenate([_distinct(rng, vocab, (n, k), dw[:, :k]),
                         rng.integers(1, vocab, size=(n, differ_l - k))], axis=1)
    suf = rng.integers(1, vocab, size=(n, suffix))
    yw = np.concatenate([pre, dw, suf, rng.integers(1, vocab, size=(n, tail_w))], axis=1)
    yl = np.concatenate([pre, dl, suf, rng.integers(1, vocab, size=(n, tail_l))], axis=1)
    return _pad(yw, yl)


def _pad(yw, yl) -> PairBatch:
    n, T = yw.shape[0], max(yw.shape[1], yl.shape[1])
    out = []
    for y in (yw, yl):
        ids = np.zeros((n, T), dtype=np.int64)
        ids[:, : y.shape[1]] = y
        mask = np.zeros((n, T))
        mask[:, : y.shape[1]] = 1.0
        out.append((ids, mask))
    return PairBatch(out[0][0], out[1][0], out[0][1], out[1][1])


def hamming(rng, n, vocab, length, distance, where="random") -> PairBatch:
    """Equal-length pairs differing at exactly ``distance`` positions.

    ``where``: 'random' (positions drawn per pair), 'start' or 'end' (a contiguous block).
    """
    _check(vocab, length=length, distance=distance)
    if distance > length or length == 0:
        raise GesimError(f"distance must be between 0 and length={length}, got {distance}")
    yw = rng.integers(1, vocab, size=(n, length))
    if where == "random":
        pos = np.argsort(rng.random((n, length)), axis=1)[:, :distance]
        diff = np.zeros((n, length), bool)
        np.put_along_axis(diff, pos, True, axis=1)
    elif where in ("start", "end"):
        diff = np.zeros((n, length), bool)
        if where == "start":
            diff[:, :distance] = True
        else:
            diff[:, length - distance:] = True
    else:
        raise unknown("position rule", where, ("random", "start", "end"))
    yl = np.where(diff, _distinct(rng, vocab, (n, length), yw), yw)
    return _pad(yw, yl)


def structure(rng, n, vocab, name) -> PairBatch:
    """The label-first structures: '1t' (one differing token), 'short-suffix' (a differing token
    then 5 shared tokens), 'long-suffix' (then 27), as in the Transformer's review language
    (``mid`` and ``unequal`` need its grammar)."""
    if name not in LABEL_FIRST:
        raise unknown("synthetic pair structure", name, LABEL_FIRST)
    return blocks(rng, n, vocab, prefix=0, differ=1, suffix=registries.STRUCTURES[name])
