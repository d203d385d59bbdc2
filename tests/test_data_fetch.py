"""Distribution of datasets: the HTTP server, fetching into the hash-keyed cache, and every bad input.

Servers are real aiohttp servers on 127.0.0.1 port 0; misbehaving servers (cut connections, stalls, Range
ignored or answered wrongly, 503s) are a middleware in front of the real routes that records each request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from peer.data.cli import serve_command
from peer.data.fetch import FetchSettings, ShardCache, fetch_manifest, fetch_shards
from peer.protocol.commands import serving
from peer.protocol.dataset import (
    DatasetError,
    FieldSpec,
    Manifest,
    Schema,
    ShardWriter,
    file_sha256,
    write_manifest,
)
from peer.protocol.dataset_server import dataset_app, dataset_routes, open_datasets
from peer.protocol.identity import Identity
from tests.harness import REPO, group_members, kill_group, start_coordinator

SCHEMA = Schema({"x": FieldSpec("tensor", "uint8", (64,)), "y": FieldSpec("int")}, label="y")
CUT = 5000  # bytes a cut or stalled first response delivers


def make_dataset(root: Path, name: str = "toy", records: int = 1000) -> Manifest:
    """About 80 KB in five shards of about 16 KB."""
    writer = ShardWriter(root, SCHEMA, shard_bytes=16_000)
    for i in range(records):
        writer.add({"x": [(i * 7 + j) % 256 for j in range(64)], "y": i % 10})
    return writer.finish(name)


def fast(tmp_path: Path, **overrides: float) -> FetchSettings:
    values = {"home": tmp_path / "home", "fetch_retries": 2, "fetch_backoff": 0.01, "fetch_timeout": 5}
    return FetchSettings(**{**values, **overrides})


def cache_files(cache: ShardCache) -> set[str]:
    return {p.name for p in cache.dir.iterdir() if p.is_file() and not p.name.endswith(".manifest.json")}


@dataclasses.dataclass
class Server:
    """A dataset server that records every request and misbehaves as told, once per shard file."""

    datasets: dict[str, Path]
    cut: set[str] = dataclasses.field(default_factory=set)  # first response stops after CUT bytes
    stall: set[str] = dataclasses.field(default_factory=set)  # first response stalls after CUT bytes
    unavailable: set[str] = dataclasses.field(default_factory=set)  # first response is a 503
    ignore_range: bool = False  # answer 200 with the whole file
    wrong_range: bool = False  # answer a Range request with a 206 from byte 0
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    url: str = ""
    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def shard_requests(self, file: str) -> list[str | None]:
        """The Range header of each request for ``file``, in order."""
        return [rng for path, rng in self.requests if path.endswith(f"/{file}")]

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.get("Range")))
        name = request.path.rsplit("/", 1)[-1]
        first = len(self.shard_requests(name)) == 1
        if first and name in self.unavailable:
            return web.Response(status=503)
        if first and name in self.cut | self.stall:
            return await self._partial_response(request, name, stall=name in self.stall)
        if self.wrong_range and "Range" in request.headers:
            data = self._file(name).read_bytes()
            headers = {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}
            return web.Response(status=206, body=data, headers=headers)
        if self.ignore_range:
            request = request.clone(headers={k: v for k, v in request.headers.items() if k != "Range"})
        return await handler(request)

    def _file(self, name: str) -> Path:
        (root,) = self.datasets.values()
        return root / name

    async def _partial_response(self, request: web.Request, name: str, stall: bool) -> web.StreamResponse:
        data = self._file(name).read_bytes()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:CUT])
        if stall:
            await self.release.wait()
        assert request.transport is not None
        request.transport.close()  # flushes what was written, then drops the connection
        return response


@asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    app = web.Application(middlewares=[server.middleware])
    app.add_routes(dataset_routes(server.datasets))
    async with serving(app, "127.0.0.1", 0) as url:
        server.url = url
        try:
            yield server
        finally:
            server.release.set()


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Manifest]:
    root = tmp_path / "toy"
    return root, make_dataset(root)


async def test_fetches_only_the_requested_shards_and_verifies_them(tmp_path, dataset):
    root, manifest = dataset
    cache = ShardCache(tmp_path / "cache")
    wanted = [manifest.shards[1], manifest.shards[3]]
    async with running(Server(open_datasets([root]))) as server:
        fetched_manifest = await fetch_manifest(server.url, manifest.version, fast(tmp_path))
        paths = await fetch_shards(server.url, fetched_manifest, wanted, cache, fast(tmp_path))
    assert fetched_manifest == manifest
    assert sorted(paths) == [s.file for s in wanted]
    for shard in wanted:
        assert paths[shard.file] == cache.dir / shard.sha256
        assert file_sha256(paths[shard.file]) == shard.sha256
        assert cache.path(shard) == paths[shard.file] and cache.verify(shard)
    assert sorted(path for path, _ in server.requests) == sorted(
        [f"/datasets/{manifest.version}/manifest.json"]
        + [f"/datasets/{manifest.version}/{s.file}" for s in wanted]
    )
    assert cache_files(cache) == {s.sha256 for s in wanted}
    assert not any((cache.dir / "partial").iterdir())


async def test_a_second_fetch_is_served_from_the_cache_without_the_network(tmp_path, dataset):
    root, manifest = dataset
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([root]))) as server:
        url = server.url
        first = await fetch_shards(
            url, await fetch_manifest(url, manifest.version, fast(tmp_path), cache), manifest.shards, cache
        )
    # The server is gone: only the cache can answer now.
    again = await fetch_manifest(url, manifest.version, fast(tmp_path), cache)
    assert again == manifest
    assert await fetch_shards(url, again, manifest.shards, cache, fast(tmp_path)) == first


async def test_datasets_sharing_a_shard_share_its_cached_file(tmp_path):
    a, b = make_dataset(tmp_path / "a", "a"), make_dataset(tmp_path / "b", "b", records=500)
    assert a.version != b.version and a.shards[0] == b.shards[0]
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([tmp_path / "a", tmp_path / "b"]))) as server:
        await fetch_shards(server.url, a, a.shards[:1], cache, fast(tmp_path))
        paths = await fetch_shards(server.url, b, b.shards[:1], cache, fast(tmp_path))
    assert paths == {b.shards[0].file: cache.dir / b.shards[0].sha256}
    assert [path for path, _ in server.requests] == [f"/datasets/{a.version}/{a.shards[0].file}"]


async def test_concurrent_fetches_of_one_shard_download_it_once(tmp_path, dataset):
    root, manifest = dataset
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([root]))) as server:
        results = await asyncio.gather(
            *(
                fetch_shards(server.url, manifest, manifest.shards[:2], cache, fast(tmp_path))
                for _ in range(3)
            )
        )
    assert results[0] == results[1] == results[2]
    assert len(server.requests) == 2


async def test_one_flipped_byte_is_refused_after_the_retries_and_never_cached(tmp_path, dataset):
    root, manifest = dataset
    shard = manifest.shards[2]
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([root]))) as server:
        data = bytearray((root / shard.file).read_bytes())
        data[len(data) // 2] ^= 0x01
        (root / shard.file).write_bytes(bytes(data))
        with pytest.raises(DatasetError, match=rf"shard {shard.file} .*gave up after 3 attempts.*SHA-256"):
            await fetch_shards(server.url, manifest, [shard], cache, fast(tmp_path))
    assert server.shard_requests(shard.file) == [None, None, None]  # each retry starts from scratch
    assert cache.path(shard) is None and not cache_files(cache)
    assert not any((cache.dir / "partial").iterdir())


async def test_a_download_cut_mid_shard_resumes_with_a_range_request(tmp_path, dataset):
    root, manifest = dataset
    shard = manifest.shards[0]
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([root]), cut={shard.file})) as server:
        paths = await fetch_shards(server.url, manifest, [shard], cache, fast(tmp_path))
    assert server.shard_requests(shard.file) == [None, f"bytes={CUT}-"]
    assert file_sha256(paths[shard.file]) == shard.sha256


async def test_a_stalled_download_times_out_and_resumes(tmp_path, dataset):
    root, manifest = dataset
    shard = manifest.shards[0]
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([root]), stall={shard.file})) as server:
        paths = await fetch_shards(server.url, manifest, [shard], cache, fast(tmp_path, fetch_timeout=0.3))
    assert server.shard_requests(shard.file) == [None, f"bytes={CUT}-"]
    assert file_sha256(paths[shard.file]) == shard.sha256


@pytest.mark.parametrize("misbehaviour", ["ignore_range", "wrong_range"])
async def test_a_resume_the_server_answers_wrongly_still_ends_correct(
    tmp_path, dataset, misbehaviour, caplog
):
    caplog.set_level(logging.WARNING, logger="peer.data.fetch")
    root, manifest = dataset
    shard = manifest.shards[0]
    cache = ShardCache(tmp_path / "cache")
    server = Server(open_datasets([root]), cut={shard.file}, **{misbehaviour: True})
    async with running(server):
        paths = await fetch_shards(server.url, manifest, [shard], cache, fast(tmp_path))
    expected = {
        "ignore_range": [None, f"bytes={CUT}-"],  # the 200 replaces the partial file
        "wrong_range": [None, f"bytes={CUT}-", None],  # a 206 from the wrong byte: start over
    }[misbehaviour]
    assert server.shard_requests(shard.file) == expected
    assert file_sha256(paths[shard.file]) == shard.sha256
    if misbehaviour == "wrong_range":
        assert f"asked for bytes from {CUT}, the server sent them from 0" in caplog.text


async def test_server_errors_are_retried(tmp_path, dataset):
    root, manifest = dataset
    shard = manifest.shards[0]
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([root]), unavailable={shard.file})) as server:
        paths = await fetch_shards(server.url, manifest, [shard], cache, fast(tmp_path))
    assert len(server.shard_requests(shard.file)) == 2
    assert file_sha256(paths[shard.file]) == shard.sha256


async def test_an_unreachable_server_is_a_clear_error_after_the_retries(tmp_path, dataset):
    _, manifest = dataset
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connections are refused
        with pytest.raises(DatasetError, match=r"manifest\.json: gave up after 3 attempts"):
            await fetch_manifest(url, manifest.version, fast(tmp_path))


@pytest.mark.parametrize("delta", [1, -1])
async def test_a_manifest_that_lies_about_a_size_is_a_clear_error(tmp_path, dataset, delta):
    root, manifest = dataset
    lie = dataclasses.replace(manifest.shards[1], size=manifest.shards[1].size + delta)
    liar = dataclasses.replace(manifest, shards=(manifest.shards[0], lie, *manifest.shards[2:]))
    write_manifest(root, liar)
    cache = ShardCache(tmp_path / "cache")
    async with running(Server({liar.version: root})) as server:
        with pytest.raises(
            DatasetError, match=rf"shard {lie.file} .*has {lie.size - delta} bytes, the manifest says"
        ):
            await fetch_shards(server.url, liar, [lie], cache, fast(tmp_path))
    assert not cache_files(cache)
    with pytest.raises(DatasetError, match=rf"shard {lie.file} has {lie.size - delta} bytes"):
        open_datasets([root])  # the server refuses to start on it, too


async def test_a_missing_shard_is_a_clear_error_at_once(tmp_path, dataset):
    root, manifest = dataset
    shard = manifest.shards[4]
    cache = ShardCache(tmp_path / "cache")
    async with running(Server(open_datasets([root]))) as server:
        (root / shard.file).unlink()
        with pytest.raises(DatasetError, match=rf"missing shard {shard.file}"):
            await fetch_shards(server.url, manifest, manifest.shards, cache, fast(tmp_path))
    assert len(server.shard_requests(shard.file)) == 1
    assert cache.path(shard) is None


async def test_unknown_and_mismatched_versions_are_clear_errors(tmp_path, dataset):
    root, manifest = dataset
    unknown = "0" * 64
    async with running(Server(open_datasets([root]))) as server:
        with pytest.raises(DatasetError, match="unknown version"):
            await fetch_manifest(server.url, unknown, fast(tmp_path))
        with pytest.raises(DatasetError, match="unknown version"):
            await fetch_manifest(server.url, "latest", fast(tmp_path))
    with pytest.raises(DatasetError, match="unknown version"):
        await fetch_manifest(str(root), unknown)

    async def other_bytes(_request: web.Request) -> web.Response:
        return web.Response(body=manifest.to_bytes() + b" ")

    liar = web.Application()
    liar.router.add_get("/datasets/{version}/manifest.json", other_bytes)
    async with serving(liar, "127.0.0.1", 0) as url:
        with pytest.raises(DatasetError, match=f"does not match version {manifest.version}"):
            await fetch_manifest(url, manifest.version, fast(tmp_path))


async def test_a_local_folder_is_a_location_and_is_checked_too(tmp_path, dataset):
    root, manifest = dataset
    cache = ShardCache(tmp_path / "cache")
    assert await fetch_manifest(str(root), manifest.version) == manifest
    paths = await fetch_shards(str(root), manifest, manifest.shards[:2], cache, fast(tmp_path))
    assert [file_sha256(p) for p in paths.values()] == [s.sha256 for s in manifest.shards[:2]]
    bad = manifest.shards[2]
    data = bytearray((root / bad.file).read_bytes())
    data[0] ^= 0xFF
    (root / bad.file).write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"shard {bad.file} has SHA-256"):
        await fetch_shards(str(root), manifest, [bad], cache, fast(tmp_path))
    (root / manifest.shards[3].file).unlink()
    with pytest.raises(DatasetError, match=f"missing shard {manifest.shards[3].file}"):
        await fetch_shards(str(root), manifest, [manifest.shards[3]], cache, fast(tmp_path))
    assert cache_files(cache) == {s.sha256 for s in manifest.shards[:2]}


async def test_a_shard_outside_the_manifest_is_refused(tmp_path, dataset):
    _, manifest = dataset
    stranger = dataclasses.replace(manifest.shards[0], sha256="f" * 64)
    with pytest.raises(DatasetError, match="is not one of dataset"):
        await fetch_shards("http://127.0.0.1:9", manifest, [stranger], ShardCache(tmp_path / "c"))


async def _raw_get(url: str, path: str) -> tuple[int, bytes]:
    """A request whose path goes out exactly as written (clients normalize ``..`` away)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_server_never_serves_a_file_outside_the_manifest(tmp_path, dataset):
    root, manifest = dataset
    (tmp_path / "secret.txt").write_text("SECRET")
    (root / "notes.txt").write_text("SECRET")
    v = manifest.version
    attempts = [
        f"/datasets/{v}/../{v}/manifest.json",
        f"/datasets/{v}/../manifest.json",
        f"/datasets/{v}/%2e%2e/{v}/manifest.json",
        f"/datasets/{v}/%2e%2e/%2e%2e/secret.txt",
        f"/datasets/{v}/..%2f..%2fsecret.txt",
        f"/datasets/{v}/%2e%2e%2f%2e%2e%2fsecret.txt",
        f"/datasets/{v}/..",
        f"/datasets/{v}/%2e%2e",
        f"/datasets/{v}/notes.txt",
        f"/datasets/{v}//etc/passwd",
        f"/datasets/{v}/%2fetc%2fpasswd",
        "/datasets/../secret.txt",
        "/datasets/%2e%2e/secret.txt",
    ]
    async with running(Server(open_datasets([root]))) as server:
        for path in attempts:
            status, body = await _raw_get(server.url, path)
            assert status == 404, path
            assert json.loads(body)["error"]["code"] in ("not_found", "unknown_version"), path
        listing = json.loads((await _raw_get(server.url, "/datasets"))[1])
        unknown = await _raw_get(server.url, f"/datasets/{'0' * 64}/manifest.json")
    assert listing == {"datasets": [{"version": v, "name": "toy", "shards": 5, "samples": 1000}]}
    assert unknown[0] == 404
    assert json.loads(unknown[1])["error"] == {
        "code": "unknown_version",
        "message": f"no dataset with version {'0' * 64!r} here",
        "field": "version",
    }


def test_routes_refuse_a_folder_keyed_by_another_version(dataset):
    root, _ = dataset
    with pytest.raises(DatasetError, match="does not hold version"):
        dataset_app({"0" * 64: root})


def test_settings_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HIVEMARKET_HOME", str(tmp_path))
    monkeypatch.setenv("HIVEMARKET_FETCH_RETRIES", "9")
    monkeypatch.setenv("HIVEMARKET_FETCH_TIMEOUT", "1.5")
    settings = FetchSettings()
    assert (settings.fetch_retries, settings.fetch_timeout, settings.cache_root) == (
        9,
        1.5,
        tmp_path / "cache",
    )
    monkeypatch.setenv("HIVEMARKET_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert FetchSettings().cache_root == tmp_path / "elsewhere"


def test_serve_refuses_a_folder_that_is_not_a_dataset_and_a_port_in_use(tmp_path, dataset):
    root, _ = dataset
    result = CliRunner().invoke(serve_command, [str(root), str(tmp_path)])
    assert result.exit_code == 2
    assert f"Error: {tmp_path} is not a dataset: manifest.json is missing" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(serve_command, [str(root), "--port", str(port)])
    assert result.exit_code == 2
    assert f"Error: --port {port} on 127.0.0.1 is already in use" in result.output


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _next_line(lines: queue.Queue, deadline: float) -> str:
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise AssertionError("timed out waiting for the server's output") from None


def test_serve_command_prints_its_url_answers_a_range_request_and_stops_on_sigint(tmp_path, dataset):
    root, manifest = dataset
    shard = manifest.shards[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer", "data", "serve", str(root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        first = _next_line(lines, deadline)
        assert first.startswith("serving 1 dataset on http://127.0.0.1:"), first
        url = first.split()[-1]
        assert manifest.version in _next_line(lines, deadline)
        request = urllib.request.Request(
            f"{url}/datasets/{manifest.version}/{shard.file}", headers={"Range": "bytes=10-19"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 10-19/{shard.size}"
            assert response.read() == (root / shard.file).read_bytes()[10:20]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=10)
        reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert not group_members(proc.pid)


async def test_the_coordinator_serves_datasets_for_its_runs(tmp_path, dataset):
    root, manifest = dataset
    coordinator = start_coordinator(
        tmp_path / "coordinator", Identity.generate(), args=["--dataset", str(root)]
    )
    try:
        fetched = await fetch_manifest(coordinator.url, manifest.version, fast(tmp_path))
        paths = await fetch_shards(coordinator.url, fetched, [manifest.shards[2]], ShardCache(tmp_path / "c"))
        assert file_sha256(paths[manifest.shards[2].file]) == manifest.shards[2].sha256
        with pytest.raises(DatasetError, match="unknown version"):
            await fetch_manifest(coordinator.url, "0" * 64, fast(tmp_path))
    finally:
        assert coordinator.stop() == 0
