"""The OpenAPI document and the app's real routes agree, both ways."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.routing import Mount, Route

from kbatch.server.app import ROUTES, create_app
from kbatch.server.auth.tokens import TokenFileAuthenticator
from kbatch.server.openapi import openapi_document
from kbatch.server.policy import Policy
from tests.support.memory_backend import MemoryBackend

METHODS = {"get", "post", "put", "patch", "delete"}


def _plain(path: str) -> str:
    """``/jobs/{job_id:kbatch_job_id}`` as OpenAPI writes it: ``/jobs/{job_id}``."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def _app_routes(prefix: str = "") -> set[tuple[str, str]]:
    app = create_app(
        MemoryBackend(), TokenFileAuthenticator(Path("/nonexistent")), Policy(), prefix=prefix
    )
    found: set[tuple[str, str]] = set()
    stack: list[tuple[str, Any]] = [("", route) for route in app.routes]
    while stack:
        above, route = stack.pop()
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":  # Starlette answers HEAD for every GET
                    found.add((_plain(above + route.path), method.lower()))
        elif isinstance(route, Mount):
            stack += [(above + route.path, r) for r in route.routes]
        else:
            raise AssertionError(f"a route of an unexpected kind: {route!r}")
    return found


def _documented() -> set[tuple[str, str]]:
    paths = openapi_document()["paths"]
    return {(path, method) for path, item in paths.items() for method in item if method in METHODS}


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    real = _app_routes()
    assert real == _documented()
    assert len(real) == sum(len(m) for m in ROUTES.values())


def test_path_parameters_are_documented() -> None:
    for path, item in openapi_document()["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (path, method)


def test_every_operation_answers_in_the_documented_shapes() -> None:
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    assert {"Job", "JobList", "JobEvent", "Identity", "ErrorBody", "SubmitRequest"} <= set(schemas)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (path, method)
            assert "summary" in operation
            for status in operation["responses"]:
                assert status in {"200", "201", "400", "401", "403", "404", "409", "413",
                                  "422", "503"}  # fmt: skip
    jobs = doc["paths"]["/api/v1/jobs"]
    assert {"400", "409", "413", "422"} <= set(jobs["post"]["responses"])
    assert {p["name"] for p in jobs["get"]["parameters"]} >= {"limit", "after", "all_users"}
    assert "409" in doc["paths"]["/api/v1/jobs/{job_id}/hold"]["post"]["responses"]
    events = doc["paths"]["/api/v1/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["application/x-ndjson"]


def test_a_prefix_does_not_change_the_routes() -> None:
    assert {
        (p.removeprefix("/services/kbatch"), m) for p, m in _app_routes("/services/kbatch")
    } == (_app_routes())
