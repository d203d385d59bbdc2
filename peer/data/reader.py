"""Random access to a dataset's samples by id, reading only shards that passed their hash.

A shard is checked (:func:`check_shard`: size, then SHA-256) the first time any of its samples is read, and
indexed in the same step: the byte offset of every record, so that later reads seek straight to the
records they need instead of decoding the shard from its start. The file's identity (device, inode, size,
mtime) is remembered with the index; a file that no longer has that identity when it is opened again (the
download cache replaced it, someone rewrote it) is checked again before anything is decoded from it, so
a shard that was tampered with after its check never reaches training either.

The loader's workers call :meth:`DatasetReader.read` concurrently: files are opened per call and read with
``os.pread`` (no shared file position), and each shard's check-and-index runs once, under that shard's lock.
"""

from __future__ import annotations

import bisect
import operator
import os
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from peer.protocol.dataset import (
    MAX_RECORD_BYTES,
    DatasetError,
    Manifest,
    ShardInfo,
    check_shard,
    decode_record,
)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class _Indexed:
    """A shard that passed its check: where it is, which file that was, and where each record starts."""

    path: Path
    identity: tuple[int, int, int, int]
    offsets: array  # offsets[i] .. offsets[i + 1] are the bytes of the shard's i-th record


class DatasetReader:
    """Decoded samples by id from a manifest's shards; ``locate`` says where a shard's file is locally.

    ``locate`` is ``lambda s: root / s.file`` for a dataset folder, or ``lambda s: cache / s.sha256`` for a
    download cache keyed by hash.
    """

    def __init__(self, manifest: Manifest, locate: Callable[[ShardInfo], Path]):
        self.manifest = manifest
        self._locate = locate
        # Empty shards share their first_id with the next shard; bisect_right picks the last, non-empty one.
        self._first_ids = [s.first_id for s in manifest.shards]
        self._samples = manifest.samples
        self._indexed: dict[int, _Indexed] = {}
        self._locks = [threading.Lock() for _ in manifest.shards]

    def read(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """The decoded records of ``ids``, in the order asked (ids may repeat and may span shards)."""
        ids = [operator.index(i) for i in ids]
        out: list[dict[str, Any]] = [{} for _ in ids]
        by_shard: dict[int, list[int]] = {}
        for pos, sample_id in enumerate(ids):
            by_shard.setdefault(self._shard_number(sample_id), []).append(pos)
        # A shard that another thread is checking right now is read later, so that concurrent readers (the
        # loader's workers, whose first batches need every shard of a shuffled assignment) check different
        # shards in parallel (hashing releases the GIL) instead of queueing behind one lock.
        pending = list(by_shard)
        while pending:
            i = next(
                (i for i, n in enumerate(pending) if n in self._indexed or not self._locks[n].locked()), 0
            )
            number = pending.pop(i)
            self._read_shard(number, ids, by_shard[number], out)
        return out

    def shards_for(self, ids: Sequence[int]) -> list[ShardInfo]:
        """The shards that hold ``ids``, each once, in the order the ids first need them (fetch order)."""
        numbers = dict.fromkeys(self._shard_number(operator.index(i)) for i in ids)
        return [self.manifest.shards[n] for n in numbers]

    def stored_bytes(self, ids: Sequence[int]) -> int:
        """How many bytes of shard data the records of ``ids`` take (the loader's bytes/s counts these)."""
        total = 0
        for i in ids:
            sample_id = operator.index(i)
            number = self._shard_number(sample_id)
            offsets = self._index(number).offsets
            k = sample_id - self._first_ids[number]
            total += offsets[k + 1] - offsets[k]
        return total

    def _shard_number(self, sample_id: int) -> int:
        if not 0 <= sample_id < self._samples:
            raise DatasetError(f"sample id {sample_id} is outside the dataset's {self._samples} samples")
        return bisect.bisect_right(self._first_ids, sample_id) - 1

    def _read_shard(
        self, number: int, ids: list[int], positions: list[int], out: list[dict[str, Any]]
    ) -> None:
        shard = self.manifest.shards[number]
        fd, indexed = self._open(number)
        offsets = indexed.offsets
        try:
            for run in _runs(ids, positions):
                first = ids[run[0]] - shard.first_id
                base = offsets[first]
                data = os.pread(fd, offsets[first + len(run)] - base, base)
                if len(run) == 1:  # the usual case for a shuffled assignment: no slicing
                    out[run[0]] = self._decode(data, ids[run[0]], shard)
                    continue
                view = memoryview(data)
                for i, pos in enumerate(run, first):
                    out[pos] = self._decode(view[offsets[i] - base : offsets[i + 1] - base], ids[pos], shard)
        finally:
            os.close(fd)

    def _decode(self, raw: bytes | memoryview, sample_id: int, shard: ShardInfo) -> dict[str, Any]:
        try:
            item = msgpack.unpackb(raw, raw=False)
        except (msgpack.UnpackException, ValueError) as e:
            raise DatasetError(f"shard {shard.file} record {sample_id} cannot be decoded: {e}") from None
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and item[0] == sample_id):
            raise DatasetError(
                f"shard {shard.file} record {sample_id} is malformed or holds another sample's id"
            )
        return decode_record(item[1], self.manifest.schema, shard, sample_id)

    def _open(self, number: int) -> tuple[int, _Indexed]:
        """An open descriptor of the shard's checked file; a file that changed since is checked again."""
        indexed = self._index(number)
        fd = _open_if_same(indexed)
        if fd is None:
            indexed = self._index(number, stale=indexed)
            fd = _open_if_same(indexed)
        if fd is None:
            raise DatasetError(
                f"shard {self.manifest.shards[number].file} keeps changing on disk while in use"
            )
        return fd, indexed

    def _index(self, number: int, stale: _Indexed | None = None) -> _Indexed:
        indexed = self._indexed.get(number)
        if indexed is not None and indexed is not stale:
            return indexed
        with self._locks[number]:
            indexed = self._indexed.get(number)
            if indexed is None or indexed is stale:
                indexed = self._check_and_index(self.manifest.shards[number])
                self._indexed[number] = indexed
            return indexed

    def _check_and_index(self, shard: ShardInfo) -> _Indexed:
        path = Path(self._locate(shard))
        changed = DatasetError(f"shard {shard.file} changed on disk while it was being checked")
        try:
            checked = _identity(path.stat())
        except FileNotFoundError:
            checked = None  # check_shard says it is missing
        check_shard(path, shard)
        if checked is None:
            raise changed
        try:
            with open(path, "rb") as f:
                if _identity(os.fstat(f.fileno())) != checked:
                    raise changed
                offsets = _record_offsets(f, shard)
            if _identity(path.stat()) != checked:
                raise changed
        except FileNotFoundError:
            raise changed from None
        return _Indexed(path, checked, offsets)


def _open_if_same(indexed: _Indexed) -> int | None:
    """A descriptor of the file that was checked, or None if the path now holds another file (or none)."""
    try:
        fd = os.open(indexed.path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if _identity(os.fstat(fd)) == indexed.identity:
        return fd
    os.close(fd)
    return None


def _record_offsets(f: Any, shard: ShardInfo) -> array:
    """Where each record starts, checking ids and count against the manifest (a lying manifest can still
    hash its own shards correctly). Records are skipped, not decoded, so indexing allocates no samples."""
    unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=MAX_RECORD_BYTES)
    offsets = array("q", [0])
    for expected in range(shard.first_id, shard.first_id + shard.samples):
        try:
            ok = unpacker.read_array_header() == 2 and _is_id(unpacker.unpack(), expected)
            unpacker.skip()
        except (msgpack.UnpackException, ValueError):
            ok = False
        if not ok:
            raise DatasetError(f"shard {shard.file}: record {expected} is malformed, missing or out of order")
        offsets.append(unpacker.tell())
    if offsets[-1] != shard.size:
        raise DatasetError(
            f"shard {shard.file} holds more than the {shard.samples} samples the manifest says "
            f"(records end at byte {offsets[-1]} of {shard.size})"
        )
    return offsets


def _is_id(value: Any, expected: int) -> bool:
    return type(value) is int and value == expected


def _runs(ids: list[int], positions: list[int]) -> Iterator[list[int]]:
    """Split positions into runs of consecutive ids, each read with one ``pread``."""
    run = [positions[0]]
    for pos in positions[1:]:
        if pos == run[-1] + 1 and ids[pos] == ids[run[-1]] + 1:
            run.append(pos)
        else:
            yield run
            run = [pos]
    yield run
