"""Writing results: atomically (a crash never leaves half a file) and reproducibly."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from gesim.errors import GesimError


def _writable_folder(folder: Path, flag: str, shown) -> None:
    """Refuse unless ``folder`` is (or can be created as) a folder we may write in.

    Walks up to the nearest existing ancestor: it must be a folder, and a probe file must be
    creatable in it (``os.access`` is not enough: it says yes to root under /proc)."""
    anc = folder
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise GesimError(f"{flag} {shown}: {anc} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=anc, prefix=".gesim-write-check.")
    except OSError as err:  # EACCES, EROFS, ...; /proc answers ENOENT, which would only confuse
        why = "" if err.errno == errno.ENOENT else f" ({err.strerror or type(err).__name__})"
        raise GesimError(f"{flag} {shown}: cannot write in {anc}{why}") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def check_out_file(path, flag: str = "--out") -> Path:
    """Check, before any work, that a result file can be written at ``path``.

    Refused (one :class:`GesimError` naming ``flag`` and the path as typed): an existing
    folder at ``path``, a file where a parent folder should be, a folder we may not write
    in. Missing parent folders are fine: :func:`atomic_write_bytes` creates them."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise GesimError(f"{flag} {path}: is a folder; give a file name (e.g. {p / 'out.csv'})")
    _writable_folder(p.parent if str(p.parent) else Path("."), flag, path)
    return p


def check_out_dir(path, flag: str = "--outdir") -> Path:
    """Check, before any work, that ``path`` is or can become a folder we may write in.

    Refused: an existing file at ``path`` (or at a parent), a folder we may not write in.
    A missing folder is fine (created when the first result is written)."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GesimError(f"{flag} {path}: is a file, not a folder")
    _writable_folder(p, flag, path)
    return p


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    """Pretty JSON (numpy values converted), written atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def to_jsonable(obj):
    """numpy scalars and arrays (and tuples) to plain Python, recursively; NaN stays NaN."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
