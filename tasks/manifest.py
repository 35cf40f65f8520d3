"""Reading the dataset to audit: an image folder or a CSV/Parquet manifest → the images table.

Whole-file problems (no such file, empty file, no ``path`` column, unreadable CSV) raise
:class:`ManifestError`. Problems with single rows (no path, wrong type, file missing, duplicate,
label not in the class list) never stop the run: the row goes to the errors table with a reason.
Every input row ends up in exactly one of the two tables.

``image_id`` is a stable hash of the normalised path relative to the dataset root (the folder, or
the manifest's folder), so the same dataset gives the same ids wherever it is mounted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from textcam.data import IMAGE_EXTENSIONS
from textcam.schema import ERRORS, IMAGES, error_row

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})
RESERVED_COLUMNS = frozenset({"image_id", "run_id"})
STAGE = "manifest"


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (the message says why and what to change)."""


@dataclass
class Manifest:
    """The validated images table (IMAGES schema + metadata columns) and the rejected rows."""

    root: Path
    images: pa.Table
    errors: pa.Table
    n_rows: int  # input rows (files found, or manifest rows)

    @property
    def n_images(self) -> int:
        return self.images.num_rows


def image_id_for(relative_path: str) -> str:
    """Stable 16-hex id of a normalised POSIX path relative to the dataset root."""
    return hashlib.sha256(normalise_path(relative_path).encode("utf-8")).hexdigest()[:16]


def normalise_path(path: str) -> str:
    """``./a//b/../c.png`` → ``a/c.png``; backslashes count as separators."""
    return posixpath.normpath(path.replace("\\", "/"))


def read_manifest(
    source: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    run_id: str = "",
    check_files: bool = True,
) -> Manifest:
    """Read an image folder or a manifest file into a :class:`Manifest`.

    Args:
        source: a folder (``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` when the
            top-level folders are split names), or a ``.csv``/``.tsv``/``.parquet`` file with a
            ``path`` column (relative to the file's folder, or absolute) and optional ``label``,
            ``split`` and any metadata columns, which are kept.
        classes: when given, rows whose label is not one of these go to the errors table.
        run_id: written into the errors table.
        check_files: reject rows whose file does not exist (one ``stat`` per row).
    """
    source = Path(source).expanduser()
    if source.is_dir():
        root = source.resolve()
        frame = _frame_from_folder(root)
    elif source.is_file():
        root = source.resolve().parent
        frame = _frame_from_file(source)
    else:
        raise ManifestError(f"dataset not found: {source} (expected an image folder or a CSV/Parquet file)")
    return _validate(frame, root, classes=classes, run_id=run_id, check_files=check_files)


def _frame_from_folder(root: Path) -> pd.DataFrame:
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise ManifestError(f"no images found under {root} (extensions: {sorted(IMAGE_EXTENSIONS)})")
    rel = [p.relative_to(root).parts for p in files]
    with_split = all(len(parts) >= 3 and parts[0].lower() in SPLIT_NAMES for parts in rel)
    rows = []
    for parts in rel:
        split = parts[0] if with_split else None
        dirs = parts[1:-1] if with_split else parts[:-1]
        rows.append({"path": "/".join(parts), "label": dirs[0] if dirs else None, "split": split})
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def _frame_from_file(path: Path) -> pd.DataFrame:
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ManifestError(
            f"unsupported manifest type {path.suffix!r}: use an image folder or a "
            f"{'/'.join(sorted(MANIFEST_SUFFIXES))} file"
        )
    if path.stat().st_size == 0:
        raise ManifestError(f"manifest is empty (0 bytes): {path}")
    try:
        if kind == "parquet":
            frame = pq.read_table(path).to_pandas(types_mapper=None)
        else:
            frame = pd.read_csv(
                path,
                sep="\t" if kind == "tsv" else ",",
                dtype={"path": "object", "label": "object", "split": "object"},
                keep_default_na=False,
                na_values={"label": [""], "split": [""]},
                # A file name that is not UTF-8 (``ls > manifest.csv``) must cost its row, not the file.
                encoding_errors="surrogateescape",
            )
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest has no header and no rows: {path}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"cannot parse manifest {path}: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if "path" not in frame.columns:
        raise ManifestError(
            f"manifest {path} has no `path` column (columns: {list(frame.columns)}); "
            "add one with image paths relative to the manifest's folder or absolute"
        )
    if len(set(frame.columns)) != len(frame.columns):
        raise ManifestError(f"manifest {path} has duplicate column names: {list(frame.columns)}")
    clash = sorted(RESERVED_COLUMNS & set(frame.columns))
    if clash:
        raise ManifestError(f"manifest {path}: column(s) {clash} are computed by TextCAM; rename them")
    if frame.empty:
        raise ManifestError(f"manifest has a header but no rows: {path}")
    return frame


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _as_label(value: Any) -> tuple[str | None, str | None]:
    """(label, None) or (None, reason)."""
    if _is_missing(value):
        return None, None
    if isinstance(value, str):
        text = value.strip()
        return (text or None), None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu":  # numpy integers
        return str(int(value)), None
    return None, f"label must be a string or an integer, got {type(value).__name__} {value!r}"


def _printable(value: Any) -> Any:
    """Strings with undecodable bytes (surrogate escapes) as ``\\xNN`` text, so Arrow can store them."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _not_utf8(row: dict[str, Any]) -> str | None:
    """The first column whose text is not valid UTF-8, or None."""
    for key, value in row.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return str(key)
    return None


def _row_json(row: dict[str, Any]) -> str:
    return json.dumps({k: (None if _is_missing(v) else _printable(v)) for k, v in row.items()}, default=str)


def _validate(
    frame: pd.DataFrame,
    root: Path,
    *,
    classes: Sequence[str] | None,
    run_id: str,
    check_files: bool,
) -> Manifest:
    class_set = set(classes) if classes is not None else None
    meta_columns = [c for c in frame.columns if c not in ("path", "label", "split")]
    records = frame.to_dict(orient="records")
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(records):
        try:
            checked = _checked_row(row, root, class_set, check_files, seen)
        except _Rejected as r:
            bad.append(error_row(run_id, r.image_id, r.path, STAGE, f"row {i}: {r.reason}", _row_json(row)))
            continue
        seen[checked["image_id"]] = i
        good.append({**checked, **{c: row[c] for c in meta_columns}})
    images = _images_table(good, frame, meta_columns)
    errors = pa.Table.from_pylist(bad, schema=ERRORS)
    return Manifest(root=root, images=images, errors=errors, n_rows=len(records))


class _Rejected(Exception):
    """A manifest row that cannot be audited, with why."""

    def __init__(self, reason: str, path: str = "", image_id: str = "") -> None:
        super().__init__(reason)
        self.reason, self.path, self.image_id = reason, path, image_id


def _checked_row(
    row: dict[str, Any], root: Path, class_set: set[str] | None, check_files: bool, seen: dict[str, int]
) -> dict[str, Any]:
    """The row's image id, normalised path, label and split; raises :class:`_Rejected`."""
    raw = row.get("path")
    if _is_missing(raw) or (isinstance(raw, str) and not raw.strip()):
        raise _Rejected("no path")
    if not isinstance(raw, str):
        raise _Rejected(f"path must be a string, got {type(raw).__name__} {raw!r}", str(raw))
    if "\x00" in raw:
        raise _Rejected("path contains a NUL byte", raw.replace("\x00", "\\0"))
    column = _not_utf8(row)
    if column is not None:
        # Parquet stores UTF-8 only; an escaped name would not open the file, a guessed decoding
        # might open another one. The row is recorded, the file must be renamed.
        raise _Rejected(f"{column!r} is not valid UTF-8: {_printable(row[column])}", _printable(raw))
    text = raw.strip().replace("\\", "/")
    full = Path(posixpath.normpath(text)) if posixpath.isabs(text) else root / normalise_path(text)
    try:
        rel = full.relative_to(root).as_posix()
    except ValueError:
        rel = full.as_posix()  # outside the root: the absolute path is the identity
    image_id, path = image_id_for(rel), full.as_posix()
    if image_id in seen:
        raise _Rejected(f"duplicate of row {seen[image_id]} (same normalised path)", path, image_id)
    label, reason = _as_label(row.get("label"))
    if reason:
        raise _Rejected(reason, path, image_id)
    if class_set is not None and label is not None and label not in class_set:
        raise _Rejected(f"label {label!r} is not one of the {len(class_set)} classes", path, image_id)
    split = row.get("split")
    if _is_missing(split):
        split = None
    elif not isinstance(split, str):
        raise _Rejected(f"split must be a string, got {type(split).__name__} {split!r}", path, image_id)
    if check_files:
        try:
            if not full.is_file():
                raise _Rejected(_missing_reason(full), path, image_id)
        except OSError as exc:  # e.g. a name too long for the file system
            raise _Rejected(f"cannot check file: {exc.strerror or exc}", path, image_id) from None
    return {"image_id": image_id, "path": path, "label": label, "split": split}


def _missing_reason(path: Path) -> str:
    if path.exists():
        return "not a regular file"
    return "broken symlink" if path.is_symlink() else "file not found"


def _images_table(rows: list[dict[str, Any]], frame: pd.DataFrame, meta_columns: list[str]) -> pa.Table:
    base = pa.Table.from_pylist(
        [{k: r[k] for k in ("image_id", "path", "label", "split")} for r in rows], schema=IMAGES
    )
    for column in meta_columns:
        values = [None if _is_missing(r[column]) else r[column] for r in rows]
        try:
            arr = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types in a metadata column: keep them, as text.
            arr = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.string())
        base = base.append_column(column, arr)
    return base.replace_schema_metadata(IMAGES.metadata)
