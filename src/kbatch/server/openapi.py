"""The OpenAPI document, generated from the wire schema in :mod:`kbatch.models`."""

from __future__ import annotations

from typing import Any

import msgspec

from kbatch import __version__
from kbatch.models import API_PREFIX, ErrorBody, Identity, Job, JobList, SubmitRequest

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> dict[str, Any]:
    (_, _, _, _, _), components = msgspec.json.schema_components(
        [SubmitRequest, Job, JobList, Identity, ErrorBody],
        ref_template="#/components/schemas/{name}",
    )
    error = {
        str(code): _json(_ref("ErrorBody"), text)
        for code, text in (
            (401, "no or invalid token"),
            (403, "not allowed"),
            (404, "no such job"),
            (422, "the job was refused; the message says what to change"),
            (503, "a service the server depends on is unavailable"),
        )
    }
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    security: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {
        f"{API_PREFIX}/health": {
            "get": {
                "summary": "Liveness (no job data)",
                "security": [],
                "responses": {"200": _json({"type": "object"})},
            }
        },
        f"{API_PREFIX}/whoami": {
            "get": {
                "summary": "The caller's identity",
                "security": security,
                "responses": {"200": _json(_ref("Identity")), **error},
            }
        },
        f"{API_PREFIX}/jobs": {
            "get": {
                "summary": "List jobs (pending and running unless all=true)",
                "security": security,
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "comma-separated states",
                    },
                    {
                        "name": "all",
                        "in": "query",
                        "schema": {"type": "boolean"},
                        "description": "include finished jobs",
                    },
                    {
                        "name": "all_users",
                        "in": "query",
                        "schema": {"type": "boolean"},
                        "description": "every user's jobs (admins only)",
                    },
                ],
                "responses": {"200": _json(_ref("JobList")), **error},
            },
            "post": {
                "summary": "Submit a job",
                "security": security,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "a retried request with the same key returns the same job",
                    },
                    {
                        "name": "dry_run",
                        "in": "query",
                        "schema": {"type": "boolean"},
                        "description": "validate only",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SubmitRequest")}},
                },
                "responses": {
                    "201": _json(_ref("Job"), "Created"),
                    "200": _json(
                        _ref("Job"), "Validated (dry run) or already submitted with this key"
                    ),
                    **error,
                },
            },
        },
        f"{API_PREFIX}/jobs/{{job_id}}": {
            "get": {
                "summary": "One job",
                "security": security,
                "parameters": [job_id],
                "responses": {"200": _json(_ref("Job")), **error},
            }
        },
        f"{API_PREFIX}/jobs/{{job_id}}/cancel": {
            "post": {
                "summary": "Cancel a job",
                "security": security,
                "parameters": [job_id],
                "responses": {"200": _json(_ref("Job")), **error},
            }
        },
        f"{API_PREFIX}/jobs/{{job_id}}/logs": {
            "get": {
                "summary": "The job's output (streamed while following)",
                "security": security,
                "parameters": [
                    job_id,
                    {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                    {
                        "name": "stream",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["output", "error"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "output bytes",
                        "content": {"application/octet-stream": {}},
                    },
                    **error,
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "kbatch", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
