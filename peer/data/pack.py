"""Packing: build a dataset from a common source, cleaning it on the way.

Sources (read by :mod:`peer.data.sources`): a NumPy ``.npy`` (each row along axis 0 is a sample, field
``x``), an ``.npz`` (arrays of one length along axis 0 become fields), JSONL (one object a line), CSV (a
header row) and a folder of files (one file a sample, ImageFolder-style labels from the subfolder names).

Every candidate record passes one cleaning path, so the rules are the same for every source. A record is
dropped, and counted in the manifest's ``dropped``, when it is

    malformed   not an object / wrong column count / a value of another kind or shape than the field's
    empty       all fields missing or null, or an empty text, bytes or tensor value
    incomplete  some (not all) fields missing or null: a sample without its label cannot be trained on
    oversized   its encoded record is larger than ``max_record_bytes``
    duplicate   its encoded record is byte-identical to one kept before (SHA-256)

Kinds are inferred from the whole source before anything is written (two passes over JSONL and CSV), and
the first record that decides a field wins: a tensor's shape is that of the first record holding it, and
an int field only widens to float (JSON tensors: int64, or float32 once any element is a float). Packing
is deterministic: the manifest holds the source's file name, not its path, so the same source packs to
the same version anywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peer.data.sources import INT64, READERS, Candidate, Drop, Fields, read_folder
from peer.protocol.dataset import (
    MANIFEST,
    DatasetError,
    FieldSpec,
    Manifest,
    Schema,
    ShardWriter,
    pack_fields,
)

REASONS = ("duplicate", "empty", "incomplete", "malformed", "oversized")
LABEL_NAMES = ("y", "label", "target")  # taken as the label when no label is named


@dataclass(frozen=True)
class PackReport:
    """What a pack produced; ``dropped`` (reason -> records) is also in the manifest."""

    manifest: Manifest
    version: str
    dropped: dict[str, int]
    kept: int


def pack(
    source: Path,
    out: Path,
    *,
    shard_bytes: int,
    max_record_bytes: int,
    label: str | None = None,
    name: str | None = None,
) -> PackReport:
    """Pack ``source`` into a new dataset folder ``out`` (absent or empty); raise DatasetError if unusable."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DatasetError(f"{source} does not exist")
    if source.is_dir():
        if out.resolve().is_relative_to(source.resolve()):
            raise DatasetError(f"{out} is inside the source folder {source}; write the dataset elsewhere")
        kind = "folder"
        fields, records = read_folder(source, max_record_bytes)
    else:
        kind = source.suffix.lower().lstrip(".")
        reader = READERS.get(kind)
        if reader is None:
            raise DatasetError(
                f"{source}: unknown source type {source.suffix or '(no suffix)'!r}; "
                "expected .npy, .npz, .jsonl, .csv or a folder of files"
            )
        if source.stat().st_size == 0:
            raise DatasetError(f"{source} is empty")
        fields, records = reader(source)
    schema = Schema(fields, _pick_label(fields, label, source))
    return write_dataset(
        records,
        schema,
        out,
        shard_bytes=shard_bytes,
        max_record_bytes=max_record_bytes,
        name=name or source.resolve().stem,
        source=f"{kind}:{source.resolve().name}",
    )


def write_dataset(
    records: Iterable[Candidate],
    schema: Schema,
    out: Path,
    *,
    shard_bytes: int,
    max_record_bytes: int,
    name: str,
    source: str,
) -> PackReport:
    """Clean ``records`` and write the survivors as a dataset at ``out``.

    Shards are written into a hidden folder inside ``out`` and moved up, the manifest last, once they are
    all complete: a failed pack removes what it wrote, and a killed one leaves no manifest, so nothing it
    left behind can pass for a dataset.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} already exists and is not an empty folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".partial-{os.getpid()}"
    dropped = dict.fromkeys(REASONS, 0)
    seen: set[bytes] = set()
    kept = 0
    try:
        writer = ShardWriter(partial, schema, shard_bytes)
        for candidate in records:
            try:
                writer.add_packed(_clean(candidate, schema, max_record_bytes, seen))
                kept += 1
            except Drop as drop:
                dropped[drop.reason] += 1
        if kept == 0:
            lost = ", ".join(f"{reason} {n}" for reason, n in dropped.items() if n)
            raise DatasetError(f"{source}: no records left after cleaning (dropped: {lost or 'none'})")
        manifest = writer.finish(name, dropped=dropped, source=source)
        for path in sorted(partial.iterdir(), key=lambda path: path.name == MANIFEST):
            path.rename(out / path.name)
        partial.rmdir()
    except BaseException:
        shutil.rmtree(out if created else partial, ignore_errors=True)
        raise
    return PackReport(manifest, manifest.version, dropped, kept)


# ------------------------------------------------------------------------------------------------ cleaning


def _clean(candidate: Candidate, schema: Schema, max_record_bytes: int, seen: set[bytes]) -> bytes:
    """Return the record's fields conformed to the schema and packed, or raise Drop with the reason."""
    if isinstance(candidate, str):
        raise Drop(candidate)
    if any(key not in schema.fields and value is not None for key, value in candidate.items()):
        raise Drop("malformed")
    values: dict[str, Any] = {}
    missing = empty = 0
    malformed = False
    for field_name, spec in schema.fields.items():
        value = candidate.get(field_name)
        if value is None:
            missing += 1
            continue
        try:
            values[field_name] = _conform(value, spec)
        except Drop as drop:
            malformed |= drop.reason == "malformed"
            empty += drop.reason == "empty"
    if malformed:
        raise Drop("malformed")
    if empty or missing == len(schema.fields):
        raise Drop("empty")
    if missing:
        raise Drop("incomplete")
    encoded = pack_fields(values, schema)
    if len(encoded) > max_record_bytes:
        raise Drop("oversized")
    digest = hashlib.sha256(encoded).digest()
    if digest in seen:
        raise Drop("duplicate")
    seen.add(digest)
    return encoded


def _conform(value: Any, spec: FieldSpec) -> Any:
    """The value as the field stores it; raise Drop('empty') or Drop('malformed') when it cannot be."""
    if spec.kind == "tensor":
        return _conform_tensor(value, spec)
    if spec.kind == "int" and isinstance(value, int | np.integer | np.bool_):
        if not INT64.min <= int(value) <= INT64.max:
            raise Drop("malformed")
        return int(value)
    if spec.kind == "float" and isinstance(value, int | float | np.integer | np.floating | np.bool_):
        return float(value)
    if spec.kind == "text" and isinstance(value, str):
        if not value:
            raise Drop("empty")
        return str(value)
    if spec.kind == "bytes" and isinstance(value, bytes | bytearray | memoryview):
        if not value:
            raise Drop("empty")
        return bytes(value)
    raise Drop("malformed")


def _conform_tensor(value: Any, spec: FieldSpec) -> np.ndarray:
    target = np.dtype(spec.dtype)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        raise Drop("malformed") from None
    if array.size == 0:
        raise Drop("empty")
    if array.shape != spec.shape:
        raise Drop("malformed")
    if array.dtype == target:
        return array
    source_kind = array.dtype.kind
    lossy_kind = source_kind not in "biuf" or (source_kind == "f" and target.kind != "f")
    if lossy_kind or (target.kind == "b" and source_kind != "b"):
        raise Drop("malformed")
    if target.kind in "iu" and source_kind in "iu":
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise Drop("malformed")
    return array.astype(target)


def _pick_label(fields: Fields, label: str | None, source: Path) -> str | None:
    if label is None:
        return next((name for name in LABEL_NAMES if name in fields), None)
    if label not in fields:
        raise DatasetError(
            f"{source}: label field {label!r} does not exist; the fields are {', '.join(fields) or 'none'}"
        )
    return label


# ------------------------------------------------------------------------------------------------- sources
