"""Final models on disk: an upload is streamed to a temporary file while it is hashed, then published.

A model can be far larger than any JSON body, so it never sits in memory: chunks are written (and hashed)
in a worker thread as they arrive, and the upload is refused with 413 as soon as it passes the limit. The
file is fsynced before it is published under its final name, so a model the store has recorded survives
a crash; a temporary file left by a crash is removed by the leading replica's sweep once no one has
written it for ``HIVEMARKET_STALE_UPLOAD_SECONDS`` (replicas share the folder, and another replica may be
receiving an upload right now).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError

from coordinator.errors import BadRequest, BodyTooLarge

PARTIAL_SUFFIX = ".partial"
CHUNK_BYTES = 1 << 20  # bytes gathered before one write: few thread hops, bounded memory


@dataclass(frozen=True)
class Received:
    path: Path
    sha256: str
    size: int


def final_path(model_dir: Path, run_id: str) -> Path:
    return model_dir / f"{run_id}.model"


def remove_partials(model_dir: Path, untouched_since: float) -> int:
    """Delete temporary files of uploads that were last written before ``untouched_since`` (wall clock):
    a crash interrupted them, since a live upload writes every chunk. None of them is referenced."""
    removed = 0
    if model_dir.is_dir():
        for path in model_dir.glob(f".upload-*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):  # another replica removed it first
                if path.stat().st_mtime < untouched_since:
                    path.unlink()
                    removed += 1
    return removed


async def receive(stream: StreamReader, model_dir: Path, limit: int) -> Received:
    """Stream a request body to a temporary file in ``model_dir``, hashing it; :class:`BodyTooLarge` (and
    nothing left on disk) once it exceeds ``limit`` bytes; :class:`BadRequest` when the client hangs up or
    sends a malformed body before its end."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / f".upload-{secrets.token_hex(8)}{PARTIAL_SUFFIX}"
    digest = hashlib.sha256()
    size = 0
    out = await asyncio.to_thread(path.open, "wb")
    try:
        pending = bytearray()
        while chunk := await _read(stream):
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"model exceeds the limit of {limit} bytes")
            pending += chunk
            if len(pending) >= CHUNK_BYTES:
                await asyncio.to_thread(_write, out, digest, bytes(pending))
                pending.clear()
        await asyncio.to_thread(_write, out, digest, bytes(pending))
        await asyncio.to_thread(_sync, out)
    except BaseException:
        await asyncio.to_thread(out.close)
        path.unlink(missing_ok=True)
        raise
    await asyncio.to_thread(out.close)
    return Received(path, digest.hexdigest(), size)


async def _read(stream: StreamReader) -> bytes:
    try:
        return await stream.read(CHUNK_BYTES)
    except (ConnectionError, HttpProcessingError) as e:
        raise BadRequest(f"the body ended before it was complete: {e}", code="body_incomplete") from None


def _write(out: BinaryIO, digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)  # releases the GIL for large buffers
    out.write(data)


def _sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def publish(received: Received, target: Path) -> None:
    """Move the upload to its final name (atomic within the folder) and make the rename durable."""
    os.replace(received.path, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
