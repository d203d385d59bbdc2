"""Readers of the sources ``hivemarket data pack`` accepts: each infers the fields, then yields records.

A reader returns ``(fields, records)``: the schema's fields inferred from the whole source, and an
iterator over candidate records, each either a mapping of values or the name of the reason it was
already rejected (see :mod:`peer.data.pack` for the cleaning rules every source shares).
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peer.protocol.dataset import TENSOR_DTYPES, DatasetError, FieldKind, FieldSpec

# A reader yields, per source record, either the record's values or the reason it was already rejected.
Candidate = Mapping[str, Any] | str
Fields = dict[str, FieldSpec]
INT64 = np.iinfo(np.int64)


class Drop(Exception):
    """A record left out while cleaning; ``reason`` is one of :data:`peer.data.pack.REASONS`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_ROW_KINDS: dict[str, FieldKind] = {
    "b": "int",
    "i": "int",
    "u": "int",
    "f": "float",
    "S": "bytes",
    "U": "text",
}


def _read_npy(path: Path) -> tuple[Fields, Iterator[Candidate]]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"cannot read {path} as a NumPy .npy file: {e}") from None
    if not isinstance(array, np.ndarray):
        raise DatasetError(f"{path} is not a NumPy .npy file (an .npz archive?)")
    if array.ndim == 0:
        raise DatasetError(f"{path} holds a single value, not samples along axis 0")
    if len(array) == 0:
        raise DatasetError(f"{path} is empty: it has no rows")
    return {"x": _array_spec(array, "x", path)}, ({"x": row} for row in array)


def _read_npz(path: Path) -> tuple[Fields, Iterator[Candidate]]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path} is not a NumPy .npz archive (an .npy file?)")
        with loaded as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read {path} as a NumPy .npz file: {e}") from None
    if not arrays:
        raise DatasetError(f"{path} is empty: it holds no arrays")
    for name, array in arrays.items():
        if array.ndim == 0:
            raise DatasetError(f"{path}: array {name!r} holds a single value, not samples along axis 0")
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DatasetError(f"{path}: the arrays differ in length along axis 0: {lengths}")
    count = next(iter(lengths.values()))
    if count == 0:
        raise DatasetError(f"{path} is empty: its arrays have no rows")
    fields = {name: _array_spec(array, name, path) for name, array in arrays.items()}
    return fields, ({name: array[i] for name, array in arrays.items()} for i in range(count))


def _array_spec(array: np.ndarray, name: str, path: Path) -> FieldSpec:
    """One row per sample: a 1-D array gives a scalar field, a wider one a tensor of the row's shape."""
    dtype = array.dtype
    if array.ndim == 1 and dtype.kind in _ROW_KINDS:
        return FieldSpec(_ROW_KINDS[dtype.kind])
    if array.ndim > 1 and dtype.name in TENSOR_DTYPES:
        return FieldSpec("tensor", dtype.name, tuple(array.shape[1:]))
    raise DatasetError(
        f"{path}: array {name!r} of dtype {dtype} and {array.ndim} dimensions cannot be a field "
        f"(tensors: {', '.join(TENSOR_DTYPES)})"
    )


def _read_jsonl(path: Path) -> tuple[Fields, Iterator[Candidate]]:
    """First pass: infer the fields from every well-formed line; the second pass yields the records."""
    fields: Fields = {}
    lines = 0
    for line in _json_lines(path):
        lines += 1
        if isinstance(line, str):
            continue
        try:
            proposed = {key: spec for key, value in line.items() if (spec := _json_spec(value)) is not None}
        except Drop:
            continue
        merged = {key: _merge(fields.get(key), spec) for key, spec in proposed.items()}
        if None not in merged.values():
            fields.update(merged)
    if lines == 0:
        raise DatasetError(f"{path} is empty: it has no lines")
    return fields, _json_lines(path)


def _json_lines(path: Path) -> Iterator[Candidate]:
    """Each line as an object; a blank line as an empty record; anything else as 'malformed'."""
    with _open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                yield {}
                continue
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                value = None
            yield value if isinstance(value, dict) else "malformed"


def _json_spec(value: Any) -> FieldSpec | None:
    """The kind a JSON value asks for; None when it says nothing (null or empty); Drop when unsupported."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        if not INT64.min <= value <= INT64.max:
            raise Drop("malformed")
        return FieldSpec("int")
    if isinstance(value, float):
        return FieldSpec("float")
    if isinstance(value, str):
        return FieldSpec("text")
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            raise Drop("malformed") from None
        if array.size == 0:
            return None
        if array.dtype.kind in "biu" and array.min() >= INT64.min and array.max() <= INT64.max:
            return FieldSpec("tensor", "int64", array.shape)
        if array.dtype.kind == "f":
            return FieldSpec("tensor", "float32", array.shape)
    raise Drop("malformed")


def _merge(old: FieldSpec | None, new: FieldSpec) -> FieldSpec | None:
    """The field's spec once ``new`` is seen too; None when they conflict (that record is malformed)."""
    if old is None or old == new:
        return new
    if old.kind == new.kind == "tensor" and old.shape == new.shape:
        return FieldSpec("tensor", "float32", old.shape)  # int64 and float32 meet at float32
    if {old.kind, new.kind} == {"int", "float"}:
        return FieldSpec("float")
    return None


def _read_csv(path: Path) -> tuple[Fields, Iterator[Candidate]]:
    """A column is int if every non-empty cell is one, else float if every one is, else text; a column
    with no value at all is left out; an empty cell is a missing value."""
    rows = _csv_rows(path)
    header = next(rows, None)
    if header is None:
        raise DatasetError(f"{path} is empty: it has no header row")
    for i, column in enumerate(header):
        if not column:
            raise DatasetError(f"{path}: header column {i + 1} has no name")
        if header.count(column) > 1:
            raise DatasetError(f"{path}: header column {column!r} appears more than once")
    kinds: list[set[str]] = [set() for _ in header]
    count = 0
    for row in rows:
        count += 1
        if len(row) == len(header):
            for cell, seen in zip(row, kinds, strict=True):
                if cell:
                    seen.add(_cell_kind(cell))
    if count == 0:
        raise DatasetError(f"{path} is empty: it has a header but no rows")
    fields = {
        column: FieldSpec("text" if "text" in seen else "float" if "float" in seen else "int")
        for column, seen in zip(header, kinds, strict=True)
        if seen
    }
    return fields, _csv_records(path, header, fields)


def _csv_records(path: Path, header: list[str], fields: Fields) -> Iterator[Candidate]:
    parse = {"int": int, "float": float, "text": str}
    rows = _csv_rows(path)
    next(rows)
    for row in rows:
        if not row:
            yield {}  # a blank line
        elif len(row) != len(header):
            yield "malformed"
        else:
            yield {
                column: parse[fields[column].kind](cell) if cell else None
                for column, cell in zip(header, row, strict=True)
                if column in fields
            }


def _cell_kind(cell: str) -> str:
    try:
        return "int" if INT64.min <= int(cell) <= INT64.max else "float"
    except ValueError:
        pass
    try:
        float(cell)
    except ValueError:
        return "text"
    return "float"


def _csv_rows(path: Path) -> Iterator[list[str]]:
    with _open(path, "r", newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            yield from reader
        except UnicodeDecodeError as e:  # decoded a block at a time, so no line number
            raise DatasetError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start} of a block") from None
        except csv.Error as e:
            raise DatasetError(f"{path} line {reader.line_num}: {e}") from None


def read_folder(root: Path, max_record_bytes: int) -> tuple[Fields, Iterator[Candidate]]:
    """Each file a sample (hidden files and folders skipped), in sorted order of their relative paths;
    when any file sits in a subfolder, the top subfolder's name is the sample's ``label``."""
    files = sorted(
        (path.relative_to(root) for path in root.rglob("*") if path.is_file()),
        key=lambda rel: rel.parts,
    )
    files = [rel for rel in files if not any(part.startswith(".") for part in rel.parts)]
    if not files:
        raise DatasetError(f"{root} is empty: it holds no files")
    labelled = any(len(rel.parts) > 1 for rel in files)
    fields: Fields = {"data": FieldSpec("bytes")}
    if labelled:
        fields["label"] = FieldSpec("text")
    return fields, _folder_records(root, files, labelled, max_record_bytes)


def _folder_records(
    root: Path, files: list[Path], labelled: bool, max_record_bytes: int
) -> Iterator[Candidate]:
    for rel in files:
        path = root / rel
        if path.stat().st_size > max_record_bytes:
            yield "oversized"  # known without reading it
            continue
        with _open(path, "rb") as f:
            record: dict[str, Any] = {"data": f.read()}
        if labelled:
            record["label"] = rel.parts[0] if len(rel.parts) > 1 else None
        yield record


READERS = {"npy": _read_npy, "npz": _read_npz, "jsonl": _read_jsonl, "ndjson": _read_jsonl, "csv": _read_csv}


def _open(path: Path, mode: str, **kwargs: Any) -> Any:
    try:
        return open(path, mode, **kwargs)  # the caller closes it
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror}") from None
