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


ROW_FORMATS = ("auto", "parquet", "csv")


def write_rows(folder, part: str, columns: dict, fmt: str = "auto") -> Path:
    """One part of a columnar table: ``folder/part.parquet`` (pyarrow, when importable or
    ``fmt="parquet"``) or ``folder/part.csv``, written atomically. ``columns``: {name: 1-D
    array-like}, all of one length. Parts never overwrite each other's rows: give each writer
    (training step, process rank) its own ``part`` name; :func:`read_rows` concatenates them."""
    if fmt not in ROW_FORMATS:
        raise GesimError(f"unknown row format {fmt!r}; choose one of {', '.join(ROW_FORMATS)}")
    if not part or "/" in part or part.startswith("."):
        raise GesimError(f"part name {part!r} must be a plain file stem")
    cols = {k: np.asarray(v) for k, v in columns.items()}
    if len({len(v) for v in cols.values()}) > 1:
        raise GesimError("write_rows: columns of different lengths " + str({k: len(v) for k, v in cols.items()}))
    if fmt == "auto":
        try:
            import pyarrow  # noqa: F401
            fmt = "parquet"
        except ImportError:
            fmt = "csv"
    if fmt == "parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({k: pa.array(v) for k, v in cols.items()}), buf)
        return atomic_write_bytes(Path(folder) / f"{part}.parquet", buf.getvalue())
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(cols))
    writer.writerows(zip(*(v.tolist() for v in cols.values())))
    return atomic_write_text(Path(folder) / f"{part}.csv", buf.getvalue())


def read_rows(folder) -> dict:
    """Every part written by :func:`write_rows` in ``folder`` (sorted by name), concatenated:
    {column: numpy array}."""
    parts = sorted(Path(folder).glob("*.parquet")) + sorted(Path(folder).glob("*.csv"))
    if not parts:
        raise GesimError(f"no row parts (*.parquet, *.csv) in {folder}")
    tables = []
    for path in parts:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(path)
            tables.append({k: t.column(k).to_numpy() for k in t.column_names})
        else:
            import csv

            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
            tables.append({k: np.array([_number(r[i]) for r in rows[1:]]) for i, k in enumerate(rows[0])})
    keys = list(tables[0])
    return {k: np.concatenate([t[k] for t in tables]) for k in keys}


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
