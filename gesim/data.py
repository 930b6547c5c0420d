"""Reading and validating preference data: ``prompt`` / ``chosen`` / ``rejected`` rows.

Formats: JSONL, JSON (a list of rows), Parquet, or a directory written by
``datasets.Dataset.save_to_disk``. A row is either *standard* (strings) or
*conversational* (lists of ``{"role", "content"}`` messages; ``chosen`` and ``rejected`` hold
the assistant turn(s), as in trl's preference format); ``prompt`` may be absent (trl's implicit
prompt: chosen and rejected hold the whole text or conversation, the prompt is their common
prefix). Bad rows are skipped and counted by reason (never dropped silently): missing fields,
non-string content, empty responses, prompt-only rows. An unreadable file raises
:class:`GesimError` naming the file (and line).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gesim.errors import GesimError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceRows:
    """Valid rows (with their original index in the file) and skip counts by reason."""

    rows: list = field(default_factory=list)  # dicts with keys prompt, chosen, rejected, index
    skipped: Counter = field(default_factory=Counter)
    n_read: int = 0


def _load_raw(path: Path) -> list:
    if not path.exists():
        raise GesimError(f"data file not found: {path}")
    if path.is_dir():
        try:
            import datasets
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several types for a bad directory
            raise GesimError(f"{path}: not a saved datasets dataset ({type(err).__name__}: {err})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
            if split is None:
                raise GesimError(f"{path}: a DatasetDict with splits {sorted(ds)}; save one split or name it 'train'")
            ds = ds[split]
        return list(ds)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        except Exception as err:
            raise GesimError(f"{path}: cannot read as Parquet ({err})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GesimError(f"{path}: not UTF-8 text (byte {err.start}): cannot decode") from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise GesimError(f"{path}:{n}: invalid JSON ({err.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise GesimError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise GesimError(f"{path}: a JSON file must hold a list of rows, got {type(data).__name__}")
        return data
    raise GesimError(f"{path}: unknown data format {suffix!r}; choose from: .jsonl, .json, .parquet, "
                     "or a saved datasets directory")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def row_problem(row) -> str | None:
    """Why a row is unusable (a short reason used as the skip-count key), or None."""
    if not isinstance(row, dict):
        return "not an object"
    if "prompt" in row and not any(row.get(k) for k in ("chosen", "rejected")):
        return "prompt-only row"
    present = [k for k in FIELDS if row.get(k) is not None]
    missing = [k for k in ("chosen", "rejected") if k not in present]
    if missing:
        return "missing field " + "/".join(missing)
    kinds = {k: "text" if isinstance(row[k], str) else "messages" if _is_messages(row[k]) else None for k in present}
    bad = [k for k, v in kinds.items() if v is None]
    if bad:
        return "non-string content in " + "/".join(bad)
    if len(set(kinds.values())) > 1:
        return "mixes strings and message lists"
    for k in ("chosen", "rejected"):
        text = row[k] if kinds[k] == "text" else "".join(m["content"] for m in row[k])
        if not text.strip():
            return f"empty {k} response"
    return None


def read_pairs(path) -> PreferenceRows:
    """Read and validate a preference file; raises if no valid row remains."""
    path = Path(path)
    out = PreferenceRows()
    for index, row in enumerate(_load_raw(path)):
        out.n_read += 1
        problem = row_problem(row)
        if problem:
            out.skipped[problem] += 1
        else:
            out.rows.append({**{k: row.get(k) for k in FIELDS}, "index": index})
    if not out.rows:
        detail = ", ".join(f"{n} {why}" for why, n in out.skipped.items()) or "the file is empty"
        raise GesimError(f"{path}: no usable preference row ({detail})")
    return out
