"""Fetching a dataset's manifest and shards from a location into a local cache keyed by SHA-256.

A location is a dataset folder or the base URL of a server of :mod:`peer.protocol.dataset_server`. A peer
fetches only the shards it was assigned. Every shard is written to ``CACHE/partial/<sha256>.part``, checked
against the manifest (size, then hash) and only then renamed to ``CACHE/<sha256>``, so a file under its final
name is always a verified shard: a tampered or truncated download can never be read by training, and datasets
that share a shard share its cached file. Interrupted downloads resume with a Range request; failures are
retried with exponential backoff, and a shard that keeps failing raises a DatasetError naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from peer.protocol.dataset import (
    MANIFEST,
    VERSION_RE,
    DatasetError,
    Manifest,
    ShardInfo,
    check_shard,
    file_sha256,
    load_manifest,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

_CHUNK = 1 << 16
_MANIFEST_MAX_BYTES = 64 << 20  # far above any real manifest; stops a hostile server filling memory
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class DatasetUnreachable(DatasetError):
    """The dataset's location did not answer (after every retry): the network, not the dataset."""


class FetchSettings(BaseSettings):
    """Timeouts, retries and the cache folder; ``HIVEMARKET_<FIELD>`` overrides each one."""

    model_config = SettingsConfigDict(env_prefix="HIVEMARKET_", frozen=True)

    home: Path = Field(
        default_factory=lambda: Path.home() / ".hivemarket", description="Folder for local state."
    )
    cache_dir: Path | None = Field(None, description="Shard cache [default: $HIVEMARKET_HOME/cache].")
    fetch_timeout: float = Field(
        60.0, gt=0, description="Seconds to connect, or to wait for the next bytes, before an attempt fails."
    )
    fetch_retries: int = Field(5, ge=0, description="Attempts after the first before a shard is given up.")
    fetch_backoff: float = Field(0.5, ge=0, description="Seconds before the first retry; doubled each time.")
    fetch_backoff_max: float = Field(30.0, ge=0, description="Longest wait between two attempts.")
    fetch_concurrency: int = Field(4, ge=1, description="Shards downloaded at the same time.")

    @property
    def cache_root(self) -> Path:
        return self.cache_dir or self.home / "cache"

    def backoff(self, attempt: int) -> float:
        """Exponential with jitter, so that peers that failed together do not retry together."""
        return min(self.fetch_backoff_max, self.fetch_backoff * 2**attempt) * random.uniform(0.5, 1.0)


class ShardCache:
    """Verified shards under ``dir/<sha256>``; downloads in progress under ``dir/partial/<sha256>.part``.

    One process may fetch into it from many tasks: a lock per shard makes the second task wait for the
    first and then find the file. Two processes sharing one folder could collide on a partial file (the
    rename keeps the final file sound, but one of them may fail a hash check and retry).
    """

    def __init__(self, dir: Path):
        self.dir = Path(dir)
        (self.dir / "partial").mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def final_path(self, shard: ShardInfo) -> Path:
        """Where the verified shard lives (or will): named by its hash, checked to be one."""
        if not VERSION_RE.fullmatch(shard.sha256):  # the name becomes a path: never let it be "../x"
            raise DatasetError(f"shard {shard.file}: {shard.sha256!r} is not a SHA-256")
        return self.dir / shard.sha256

    def partial(self, shard: ShardInfo) -> Path:
        return self.dir / "partial" / f"{self.final_path(shard).name}.part"

    def path(self, shard: ShardInfo) -> Path | None:
        """The cached shard, or None; a cheap size check catches a file truncated after it was verified."""
        path = self.final_path(shard)
        try:
            return path if path.stat().st_size == shard.size else None
        except FileNotFoundError:
            return None

    def verify(self, shard: ShardInfo) -> bool:
        """Re-hash the cached shard; one that no longer matches is deleted so nothing can read it."""
        path = self.path(shard)
        if path is None:
            return False
        if file_sha256(path) == shard.sha256:
            return True
        path.unlink(missing_ok=True)
        return False

    def commit(self, shard: ShardInfo) -> Path:
        """Check the partial file; if it is the shard, make it durable and move it to its final name.

        Raises DatasetError (after deleting the partial file) when it is not. Blocking: run in a thread.
        """
        partial = self.partial(shard)
        try:
            check_shard(partial, shard)
        except DatasetError:
            partial.unlink(missing_ok=True)
            raise
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        final = self.final_path(shard)
        os.replace(partial, final)
        return final

    def manifest(self, version: str) -> bytes | None:
        """A manifest kept by :meth:`keep_manifest`, if its bytes still hash to ``version``."""
        if not VERSION_RE.fullmatch(version):
            return None
        try:
            raw = (self.dir / f"{version}.manifest.json").read_bytes()
        except FileNotFoundError:
            return None
        return raw if hashlib.sha256(raw).hexdigest() == version else None

    def keep_manifest(self, raw: bytes) -> None:
        """Manifests are content-addressed like shards, so a peer that has its shards can start offline."""
        path = self.dir / f"{hashlib.sha256(raw).hexdigest()}.manifest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)

    @contextlib.asynccontextmanager
    async def lock(self, shard: ShardInfo) -> AsyncIterator[None]:
        """Hold the shard's lock; locks are dropped when unused so the table does not grow with the cache."""
        key = shard.sha256
        lock, users = self._locks[key] if key in self._locks else (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _session(settings: FetchSettings) -> aiohttp.ClientSession:
    # No total timeout: a large shard on a slow link is fine as long as bytes keep coming.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.fetch_timeout, sock_read=settings.fetch_timeout
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,  # ranges and hashes are over the stored bytes
        headers={"Accept-Encoding": "identity"},
        connector=aiohttp.TCPConnector(limit=settings.fetch_concurrency),
    )


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix; the message says how."""


async def _with_retries(what: str, settings: FetchSettings, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt`` until it succeeds, backing off after connection errors, timeouts and _Retry.

    A DatasetError (a 404, say) is final and passes straight through.
    """
    failures = 0
    while True:
        try:
            return await attempt()
        except (aiohttp.ClientError, TimeoutError, _Retry) as e:
            reason = str(e) or type(e).__name__
            failures += 1
            if failures > settings.fetch_retries:
                raise DatasetUnreachable(f"{what}: gave up after {failures} attempts: {reason}") from None
            logger.warning("%s: attempt %d failed (%s); retrying", what, failures, reason)
            await asyncio.sleep(settings.backoff(failures - 1))


async def fetch_manifest(
    location: str, version: str, settings: FetchSettings | None = None, cache: ShardCache | None = None
) -> Manifest:
    """The manifest of ``version`` at ``location``, checked to hash to ``version``.

    With a ``cache``, a manifest kept there is used without the network, and one fetched is kept.
    """
    if not VERSION_RE.fullmatch(version):
        raise DatasetError(f"unknown version {version!r}: a version is a SHA-256 in hex")
    raw = cache.manifest(version) if cache else None
    if raw is not None:
        return Manifest.from_bytes(raw, f"the cached manifest of {version}")
    if _is_url(location):
        where = f"{location.rstrip('/')}/datasets/{version}/{MANIFEST}"
        settings = settings or FetchSettings()
        async with _session(settings) as session:
            raw = await _with_retries(where, settings, lambda: _get_manifest(session, where, version))
    else:
        where = str(Path(location) / MANIFEST)
        try:
            raw = Path(where).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise DatasetError(f"{location} is not a dataset: {MANIFEST} is missing") from None
        actual = hashlib.sha256(raw).hexdigest()
        if actual != version:
            raise DatasetError(f"unknown version {version}: the dataset at {location} is version {actual}")
    manifest = Manifest.from_bytes(raw, where)
    if cache is not None:
        cache.keep_manifest(raw)
    return manifest


async def list_datasets(location: str, settings: FetchSettings | None = None) -> list[dict[str, Any]]:
    """The datasets at a location, ``{version, name, samples}`` each: a server's /datasets, or a folder."""
    if not _is_url(location):
        manifest = load_manifest(Path(location))
        return [{"version": manifest.version, "name": manifest.name, "samples": manifest.samples}]
    url = f"{location.rstrip('/')}/datasets"
    settings = settings or FetchSettings()

    async def get() -> list[dict[str, Any]]:
        async with session.get(url) as response:
            if response.status >= 500:
                raise _Retry(f"HTTP {response.status}")
            if response.status != 200:
                raise DatasetError(f"{url} answered HTTP {response.status}: not a dataset server")
            body = await response.json(content_type=None)
        if not isinstance(body, dict) or not isinstance(body.get("datasets"), list):
            raise DatasetError(f"{url} did not answer with a list of datasets")
        return body["datasets"]

    async with _session(settings) as session:
        return await _with_retries(url, settings, get)


async def _get_manifest(session: aiohttp.ClientSession, url: str, version: str) -> bytes:
    async with session.get(url) as response:
        if response.status == 404:
            raise DatasetError(f"unknown version {version}: {url} answered 404")
        if response.status >= 500:
            raise _Retry(f"HTTP {response.status}")
        if response.status != 200:
            raise DatasetError(f"{url} answered HTTP {response.status}")
        raw = await response.content.read(_MANIFEST_MAX_BYTES + 1)
    if len(raw) > _MANIFEST_MAX_BYTES:
        raise DatasetError(f"{url} is larger than {_MANIFEST_MAX_BYTES} bytes: not a manifest")
    actual = hashlib.sha256(raw).hexdigest()
    if actual != version:
        raise DatasetError(
            f"the manifest from {url} does not match version {version}: its SHA-256 is {actual}"
        )
    return raw


async def fetch_shards(
    location: str,
    manifest: Manifest,
    shards: Iterable[ShardInfo],
    cache: ShardCache,
    settings: FetchSettings | None = None,
) -> dict[str, Path]:
    """Make the given shards of ``manifest`` verified files in ``cache``; return their paths by file name.

    Shards already cached are not fetched again. On the first shard that cannot be fetched the others are
    cancelled (their partial files stay, to be resumed) and its DatasetError is raised.
    """
    settings = settings or FetchSettings()
    wanted = {s.file: s for s in shards}
    listed = set(manifest.shards)
    for shard in wanted.values():
        if shard not in listed:
            raise DatasetError(f"shard {shard.file} is not one of dataset {manifest.version}'s shards")
    limit = asyncio.Semaphore(settings.fetch_concurrency)
    session = _session(settings) if _is_url(location) else None

    async def one(shard: ShardInfo) -> Path:
        async with cache.lock(shard):
            cached = cache.path(shard)
            if cached is not None:
                return cached
            async with limit:
                if session is None:
                    return await asyncio.to_thread(_copy_local, Path(location) / shard.file, shard, cache)
                url = f"{location.rstrip('/')}/datasets/{manifest.version}/{shard.file}"
                return await _with_retries(
                    f"shard {shard.file} from {url}", settings, lambda: _download(session, url, shard, cache)
                )

    try:
        tasks = [asyncio.create_task(one(s)) for s in wanted.values()]
        try:
            paths = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    finally:
        if session is not None:
            await session.close()
    return dict(zip(wanted, paths, strict=True))


def _copy_local(source: Path, shard: ShardInfo, cache: ShardCache) -> Path:
    """Copy, then check the copy: checking the source first would leave a window for it to change."""
    try:
        shutil.copyfile(source, cache.partial(shard))
    except FileNotFoundError:
        raise DatasetError(f"missing shard {shard.file}: {source} does not exist") from None
    except OSError as e:
        raise DatasetError(f"shard {shard.file}: cannot read {source}: {e.strerror}") from None
    return cache.commit(shard)


async def _download(session: aiohttp.ClientSession, url: str, shard: ShardInfo, cache: ShardCache) -> Path:
    """One attempt: complete the partial file, then commit it; a wrong hash or size is worth a retry."""
    await _complete_partial(session, url, shard, cache.partial(shard))
    try:
        return await asyncio.to_thread(cache.commit, shard)
    except DatasetError as e:  # commit() deleted the file: the next attempt starts from scratch
        raise _Retry(str(e)) from None


async def _complete_partial(
    session: aiohttp.ClientSession, url: str, shard: ShardInfo, partial: Path
) -> None:
    """Bring the partial file up to ``shard.size`` bytes, resuming it when the server honours Range.

    Never writes past the manifest's size, so a lying or hostile server cannot fill the disk.
    """
    offset = partial.stat().st_size if partial.exists() else 0
    if offset > shard.size:
        partial.unlink()
        offset = 0
    if offset == shard.size:
        return  # complete from an earlier attempt: commit() decides whether it is the shard
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    async with session.get(url, headers=headers) as response:
        if response.status == 404:
            raise DatasetError(f"missing shard {shard.file}: {url} answered 404")
        if response.status == 416:
            partial.unlink(missing_ok=True)
            raise _Retry(f"the server refused the range from byte {offset}; starting over")
        if response.status >= 500:
            raise _Retry(f"HTTP {response.status}")
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:  # not the bytes that follow ours: take the whole file instead
                partial.unlink(missing_ok=True)
                raise _Retry(f"asked for bytes from {offset}, the server sent them from {start}")
        elif response.status == 200:  # a server that ignores Range sends the whole file
            offset, total = 0, response.content_length
        else:
            raise DatasetError(f"shard {shard.file}: {url} answered HTTP {response.status}")
        if total is not None and total != shard.size:
            raise _Retry(f"the server's file has {total} bytes, the manifest says {shard.size}")
        with open(partial, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            async for chunk in response.content.iter_chunked(_CHUNK):
                if out.tell() + len(chunk) > shard.size:
                    out.truncate(0)
                    raise _Retry(f"the server sent more than the manifest's {shard.size} bytes")
                out.write(chunk)
            received = out.tell()
    if received < shard.size:
        raise _Retry(f"the download stopped at byte {received} of {shard.size}")


def _content_range(value: str) -> tuple[int | None, int | None]:
    match = _CONTENT_RANGE.fullmatch(value.strip())
    return (int(match[1]), int(match[3])) if match else (None, None)
