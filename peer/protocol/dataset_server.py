"""Serving datasets over HTTP, so that the coordinator or any peer can be a run's data location.

    GET /datasets                              {"datasets": [{"version", "name", "shards", "samples"}]}
    GET /datasets/{version}/manifest.json      the manifest's exact bytes (their SHA-256 is the version)
    GET /datasets/{version}/{file}             a shard named in that manifest; Range requests get 206

Only files the manifest names are ever served, looked up by name in the manifest rather than joined onto
a path from the URL, so no URL (``..``, ``%2e%2e``, absolute paths) reaches another file. Everything else
under ``/datasets`` is a 404 with the documented error body ``{"error": {"code", "message", "field"}}``.
The routes are plain route definitions so that the coordinator's app (``coordinator serve --dataset``) and a
peer's (``hivemarket data serve``) mount the same code: what a fetcher may expect of a data location is
part of the protocol, whoever serves it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from peer.protocol.dataset import MANIFEST, DatasetError, Manifest, read_manifest_bytes


@dataclass(frozen=True)
class _Served:
    root: Path
    raw: bytes
    manifest: Manifest
    files: frozenset[str]


def _error(status: int, code: str, message: str, field: str | None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "field": field}}, status=status)


def open_datasets(paths: Iterable[Path]) -> dict[str, Path]:
    """Key dataset folders by version, checking that each is a dataset whose shards are all present.

    Only sizes are checked (a stat per shard), so that start-up stays instant on large datasets; clients
    verify every hash themselves and never trust the server.
    """
    datasets: dict[str, Path] = {}
    for path in paths:
        root = Path(path)
        raw = read_manifest_bytes(root)
        manifest = Manifest.from_bytes(raw, str(root / MANIFEST))
        for shard in manifest.shards:
            try:
                size = (root / shard.file).stat().st_size
            except FileNotFoundError:
                raise DatasetError(f"{root}: shard {shard.file} is missing") from None
            if size != shard.size:
                raise DatasetError(
                    f"{root}: shard {shard.file} has {size} bytes, the manifest says {shard.size}"
                )
        datasets[hashlib.sha256(raw).hexdigest()] = root
    return datasets


def dataset_routes(datasets: Mapping[str, Path]) -> list[web.RouteDef]:
    """Routes serving each dataset folder under its version; the manifests are read once, here.

    Raises DatasetError when a folder's manifest is not the version it is keyed by, so a mistaken
    mapping fails at start-up instead of serving bytes whose hash clients would reject.
    """
    served: dict[str, _Served] = {}
    for version, path in datasets.items():
        root = Path(path)
        raw = read_manifest_bytes(root)
        if hashlib.sha256(raw).hexdigest() != version:
            raise DatasetError(f"{root} does not hold version {version}")
        manifest = Manifest.from_bytes(raw, str(root / MANIFEST))
        served[version] = _Served(root, raw, manifest, frozenset(s.file for s in manifest.shards))

    async def list_datasets(_request: web.Request) -> web.Response:
        items = [
            {
                "version": v,
                "name": s.manifest.name,
                "shards": len(s.manifest.shards),
                "samples": s.manifest.samples,
            }
            for v, s in sorted(served.items())
        ]
        return web.json_response({"datasets": items})

    async def get_manifest(request: web.Request) -> web.StreamResponse:
        dataset = served.get(request.match_info["version"])
        if dataset is None:
            return _unknown_version(request)
        return web.Response(body=dataset.raw, content_type="application/json")

    async def get_shard(request: web.Request) -> web.StreamResponse:
        dataset = served.get(request.match_info["version"])
        if dataset is None:
            return _unknown_version(request)
        name = request.match_info["file"]
        if name not in dataset.files:
            return _error(
                404, "not_found", f"{name!r} is not a file of dataset {dataset.manifest.name}", "file"
            )
        path = dataset.root / name
        # Manifest names hold no "/"; the format admits "." and "..", but they are folders: refused here.
        if not path.is_file():
            return _error(404, "missing_shard", f"shard {name} is missing on this server", "file")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def not_found(request: web.Request) -> web.Response:
        return _error(404, "not_found", f"no dataset resource at {request.path}", None)

    return [
        web.get("/datasets", list_datasets),
        web.get(f"/datasets/{{version}}/{MANIFEST}", get_manifest),
        web.get("/datasets/{version}/{file}", get_shard),
        web.route("*", "/datasets/{tail:.*}", not_found),
    ]


def _unknown_version(request: web.Request) -> web.Response:
    version = request.match_info["version"]
    return _error(404, "unknown_version", f"no dataset with version {version!r} here", "version")


def dataset_app(datasets: Mapping[str, Path]) -> web.Application:
    app = web.Application()
    app.add_routes(dataset_routes(datasets))
    return app
