"""OpenAPI 3 document generated from the route table and the pydantic schemas (never written by hand)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic.json_schema import models_json_schema

from coordinator.http import Route
from peer.protocol import __version__
from peer.protocol.envelope import HEADERS
from peer.protocol.schemas import ErrorBody

_REF = "#/components/schemas/{model}"


def build_openapi(routes: Sequence[Route]) -> dict[str, Any]:
    models = {ErrorBody}
    for route in routes:
        models.update(m for m in (route.body, route.response) if m is not None)
    keyed, schemas = models_json_schema(
        [
            (m, "validation" if any(r.body is m for r in routes) else "serialization")
            for m in sorted(models, key=str)
        ],
        ref_template=_REF,
    )
    refs = {model: keyed[(model, mode)] for model, mode in keyed}
    error = {"description": "Error", "content": {"application/json": {"schema": refs[ErrorBody]}}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__}
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_params(route.path)
        ]
        params += [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}, "description": doc}
            for name, doc in route.query
        ]
        if route.auth != "none":
            params += [
                {"name": h, "in": "header", "required": True, "schema": {"type": "string"}} for h in HEADERS
            ]
            op["description"] = "Signed request" + (" (admin key)" if route.auth == "admin" else "") + "."
        if params:
            op["parameters"] = params
        if route.body is not None:
            content = {"schema": refs[route.body]}
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": content, "application/msgpack": content},
            }
        elif route.raw_body is not None:
            binary = {"schema": {"type": "string", "format": "binary"}}
            op["requestBody"] = {"required": True, "content": {route.raw_body: binary}}
        ok: dict[str, Any] = {"description": "OK"}
        if route.response is not None:
            schema = {"schema": refs[route.response]}
            ok["content"] = {"application/json": schema, "application/msgpack": schema}
        elif route.content_type:
            ok["content"] = {route.content_type: {"schema": {"type": "string"}}}
        op["responses"] = {str(route.status): ok, "default": error}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "hivemarket coordinator", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]
