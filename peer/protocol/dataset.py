"""The dataset format: a folder of shards plus a manifest; the dataset's version is the manifest's hash.

    DATASET/manifest.json          canonical JSON (sorted keys, no spaces): see :class:`Manifest`
    DATASET/shard-00000.msgpack    a stream of msgpack records ``[sample_id, {field: value, ...}]``

Sample ids are consecutive from 0 in shard order, so shard i holds ids ``[first_id, first_id + samples)``
and anyone can tell which shard holds a sample without opening it. A tensor field is stored as its raw
little-endian bytes; its dtype and shape live in the schema. The manifest lists each shard's SHA-256,
size and sample count, so a shard is checked before anything reads it, and since the version is the
SHA-256 of the manifest's exact bytes, the version pins every byte of the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np

FORMAT = "hivemarket-dataset/1"
MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"[0-9a-f]{64}")
FieldKind = Literal["tensor", "int", "float", "text", "bytes"]
TENSOR_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")
_SCALAR_TYPES: dict[str, type] = {"int": int, "float": float, "text": str, "bytes": bytes}
_CHUNK = 1 << 20
MAX_RECORD_BYTES = 64 << 20  # the most one encoded record may take; readers refuse larger ones
_ARRAY_OF_TWO = b"\x92"  # msgpack's header of a 2-element array: a record is [sample_id, fields]


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file or field and the reason."""


@dataclass(frozen=True)
class FieldSpec:
    kind: FieldKind
    dtype: str | None = None  # tensors only
    shape: tuple[int, ...] = ()  # tensors only

    def encode(self, value: Any) -> Any:
        if self.kind == "tensor":
            array = np.asarray(value, dtype=self.dtype)
            if array.shape != self.shape:
                raise DatasetError(f"tensor of shape {array.shape} does not match the schema's {self.shape}")
            return array.astype(self._stored_dtype, copy=False).tobytes()
        if type(value) is not _SCALAR_TYPES[self.kind]:
            raise DatasetError(f"a value of type {type(value).__name__} cannot be stored as {self.kind}")
        return value

    @cached_property
    def _stored_dtype(self) -> np.dtype:
        """Little-endian dtype, computed once: decoding looks it up for every record."""
        return np.dtype(self.dtype).newbyteorder("<")

    def decode(self, value: Any) -> Any:
        """The stored value as the schema says it is; a value of another kind is refused, not passed on."""
        if self.kind == "tensor":
            if not isinstance(value, bytes):
                raise ValueError(f"a tensor is stored as bytes, not {type(value).__name__}")
            return np.frombuffer(value, dtype=self._stored_dtype).reshape(self.shape)
        if type(value) is not _SCALAR_TYPES[self.kind]:
            raise ValueError(f"holds a value of type {type(value).__name__}, the schema says {self.kind}")
        return value


@dataclass(frozen=True)
class Schema:
    fields: dict[str, FieldSpec]
    label: str | None = None  # the field that holds the label, if any

    def to_json(self) -> dict[str, Any]:
        return {
            "fields": {
                name: {
                    k: list(v) if k == "shape" else v for k, v in asdict(spec).items() if v not in (None, ())
                }
                for name, spec in self.fields.items()
            },
            "label": self.label,
        }

    @classmethod
    def from_json(cls, data: Any) -> Schema:
        if not isinstance(data, dict) or not isinstance(data.get("fields"), dict) or not data["fields"]:
            raise DatasetError("manifest schema: 'fields' must be a non-empty object")
        fields = {}
        for name, spec in data["fields"].items():
            kind = spec.get("kind") if isinstance(spec, dict) else None
            if kind not in ("tensor", "int", "float", "text", "bytes"):
                raise DatasetError(f"manifest schema: field {name!r} has unknown kind {kind!r}")
            if kind == "tensor":
                dtype, shape = spec.get("dtype"), spec.get("shape", [])
                if dtype not in TENSOR_DTYPES:
                    raise DatasetError(f"manifest schema: field {name!r} has unsupported dtype {dtype!r}")
                if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
                    raise DatasetError(f"manifest schema: field {name!r} has a bad shape {shape!r}")
                fields[name] = FieldSpec("tensor", dtype, tuple(shape))
            else:
                fields[name] = FieldSpec(kind)
        label = data.get("label")
        if label is not None and (not isinstance(label, str) or label not in fields):
            raise DatasetError(f"manifest schema: label {label!r} is not one of the fields")
        return cls(fields, label)


@dataclass(frozen=True)
class ShardInfo:
    file: str
    sha256: str
    size: int
    samples: int
    first_id: int


@dataclass(frozen=True)
class Manifest:
    name: str
    schema: Schema
    shards: tuple[ShardInfo, ...]
    dropped: dict[str, int] = field(default_factory=dict)  # cleaning: reason -> records dropped
    source: str = ""

    @cached_property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_bytes(self) -> bytes:
        """The canonical bytes: the version is their SHA-256, so they must never vary for one dataset."""
        data = {
            "format": FORMAT,
            "name": self.name,
            "schema": self.schema.to_json(),
            "shards": [asdict(s) for s in self.shards],
            "samples": self.samples,
            "dropped": dict(sorted(self.dropped.items())),
            "source": self.source,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @cached_property
    def version(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = MANIFEST) -> Manifest:
        """Parse and check a manifest: counts must add up and shards must tile the sample ids."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise DatasetError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DatasetError(f"{where}: 'format' must be {FORMAT!r}")
        shards = []
        next_id = 0
        listed = data.get("shards") or []
        if not isinstance(listed, list):
            raise DatasetError(f"{where}: 'shards' must be a list, got {listed!r}")
        for i, item in enumerate(listed):
            try:
                shard = ShardInfo(**item)
            except TypeError as e:
                raise DatasetError(f"{where}: shards[{i}] is malformed: {e}") from None
            if not (isinstance(shard.file, str) and re.fullmatch(r"(?!\.\.?$)[A-Za-z0-9._-]+", shard.file)):
                raise DatasetError(f"{where}: shards[{i}].file {shard.file!r} is not a plain file name")
            if not (isinstance(shard.sha256, str) and VERSION_RE.fullmatch(shard.sha256)):
                raise DatasetError(f"{where}: shards[{i}].sha256 {shard.sha256!r} is not a SHA-256")
            for name in ("size", "samples", "first_id"):
                value = getattr(shard, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise DatasetError(f"{where}: shards[{i}].{name} {value!r} is not a count")
            if shard.first_id != next_id:
                raise DatasetError(f"{where}: shards[{i}].first_id is {shard.first_id}, expected {next_id}")
            next_id += shard.samples
            shards.append(shard)
        manifest = cls(
            name=str(data.get("name", "")),
            schema=Schema.from_json(data.get("schema")),
            shards=tuple(shards),
            dropped=_counts(data.get("dropped"), where),
            source=str(data.get("source", "")),
        )
        if data.get("samples") != manifest.samples:
            raise DatasetError(
                f"{where}: 'samples' says {data.get('samples')!r} but the shards hold {manifest.samples}"
            )
        return manifest


def _counts(value: Any, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(type(v) is int and v >= 0 for v in value.values()):
        raise DatasetError(f"{where}: 'dropped' must map reasons to counts, got {value!r}")
    return dict(value)


def read_manifest_bytes(root: Path) -> bytes:
    """The manifest's exact bytes (its SHA-256 is the version), with an error that says what is wrong."""
    try:
        return (Path(root) / MANIFEST).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetError(f"{root} is not a dataset: {MANIFEST} is missing") from None
    except OSError as e:
        raise DatasetError(f"{root}: cannot read {MANIFEST}: {e.strerror}") from None


def load_manifest(root: Path) -> Manifest:
    return Manifest.from_bytes(read_manifest_bytes(root), str(Path(root) / MANIFEST))


def write_manifest(root: Path, manifest: Manifest) -> str:
    """Write the manifest atomically; return the dataset's version."""
    tmp = Path(root) / f".{MANIFEST}.tmp"
    tmp.write_bytes(manifest.to_bytes())
    os.replace(tmp, Path(root) / MANIFEST)
    return manifest.version


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard(path: Path, shard: ShardInfo) -> None:
    """Raise unless the file at ``path`` is exactly the shard the manifest describes (size, then hash)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"shard {shard.file} is missing") from None
    if size != shard.size:
        raise DatasetError(f"shard {shard.file} has {size} bytes, the manifest says {shard.size}")
    actual = file_sha256(path)
    if actual != shard.sha256:
        raise DatasetError(f"shard {shard.file} has SHA-256 {actual}, the manifest says {shard.sha256}")


def read_records(path: Path, shard: ShardInfo, schema: Schema) -> Iterator[tuple[int, dict[str, Any]]]:
    """Decode a shard that :func:`check_shard` accepted; its records must match the manifest too."""
    expected = shard.first_id
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=MAX_RECORD_BYTES)
        while True:
            try:
                item = next(unpacker)
            except StopIteration:
                break
            except (ValueError, msgpack.UnpackException) as e:
                raise DatasetError(
                    f"shard {shard.file} cannot be decoded at record {expected}: {e}"
                ) from None
            if not (isinstance(item, list) and len(item) == 2 and item[0] == expected):
                raise DatasetError(f"shard {shard.file}: record {expected} is malformed or out of order")
            yield expected, decode_record(item[1], schema, shard, expected)
            expected += 1
    if expected != shard.first_id + shard.samples:
        raise DatasetError(
            f"shard {shard.file} holds {expected - shard.first_id} samples, the manifest says {shard.samples}"
        )


def encode_record(record: Mapping[str, Any], schema: Schema) -> dict[str, Any]:
    missing = set(schema.fields) - set(record)
    if missing:
        raise DatasetError(f"record lacks the fields {sorted(missing)}")
    return {name: spec.encode(record[name]) for name, spec in schema.fields.items()}


def pack_fields(record: Mapping[str, Any], schema: Schema) -> bytes:
    """A record's fields encoded by the schema and packed: the second element of a stored record."""
    return msgpack.packb(encode_record(record, schema), use_bin_type=True)


def decode_record(stored: Any, schema: Schema, shard: ShardInfo, sample_id: int) -> dict[str, Any]:
    """A stored record as the schema's values. The loader calls this per sample, so the happy path
    builds nothing it does not return (the error message is only formatted on failure)."""
    if not isinstance(stored, dict) or stored.keys() != schema.fields.keys():
        raise DatasetError(
            f"shard {shard.file} record {sample_id} does not have the schema's fields {sorted(schema.fields)}"
        )
    decoded = {}
    for name, spec in schema.fields.items():
        try:
            decoded[name] = spec.decode(stored[name])
        except (TypeError, ValueError) as e:
            raise DatasetError(
                f"shard {shard.file} record {sample_id}: field {name!r} does not match the schema: {e}"
            ) from None
    return decoded


def verify_dataset(root: Path) -> Manifest:
    """Check a dataset end to end: the manifest, every shard's size and SHA-256, then every record.

    A hash only proves a shard is the one the manifest names, not that the manifest tells the truth about
    what is inside it (counts, ids, kinds), hence the decoding.
    """
    root = Path(root)
    manifest = load_manifest(root)
    for shard in manifest.shards:
        check_shard(root / shard.file, shard)
        for _ in read_records(root / shard.file, shard, manifest.schema):
            pass
    return manifest


class ShardWriter:
    """Appends records to shards of about ``shard_bytes`` each; :meth:`finish` writes the manifest.

    Records are encoded once, hashed as they are written, and a shard is only named in the manifest after
    it is complete, so an interrupted pack never yields a dataset that verifies.
    """

    def __init__(self, root: Path, schema: Schema, shard_bytes: int):
        if shard_bytes <= 0:
            raise DatasetError(f"shard size must be positive, got {shard_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.shard_bytes = shard_bytes
        self.shards: list[ShardInfo] = []
        self._file: Any = None
        self._digest = hashlib.sha256()
        self._size = 0
        self._samples = 0
        self._next_id = 0

    def add(self, record: Mapping[str, Any]) -> int:
        """Write one record; return its sample id."""
        return self.add_packed(pack_fields(record, self.schema))

    def add_packed(self, fields: bytes) -> int:
        """Write a record whose fields :func:`pack_fields` already packed (``pack`` needs those bytes to
        check size and duplicates); the record is ``[sample_id, fields]`` without packing them again."""
        packed = _ARRAY_OF_TWO + msgpack.packb(self._next_id) + fields
        if self._file is None:
            self._file = open(self.root / f"shard-{len(self.shards):05d}.msgpack", "wb")  # noqa: SIM115
        self._file.write(packed)
        self._digest.update(packed)
        self._size += len(packed)
        self._samples += 1
        self._next_id += 1
        if self._size >= self.shard_bytes:
            self._close_shard()
        return self._next_id - 1

    def _close_shard(self) -> None:
        self._file.close()
        self.shards.append(
            ShardInfo(
                file=Path(self._file.name).name,
                sha256=self._digest.hexdigest(),
                size=self._size,
                samples=self._samples,
                first_id=self._next_id - self._samples,
            )
        )
        self._file, self._digest, self._size, self._samples = None, hashlib.sha256(), 0, 0

    def finish(self, name: str, *, dropped: Mapping[str, int] | None = None, source: str = "") -> Manifest:
        if self._file is not None:
            self._close_shard()
        manifest = Manifest(name, self.schema, tuple(self.shards), dict(dropped or {}), source)
        write_manifest(self.root, manifest)
        return manifest
