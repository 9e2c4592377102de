"""The OpenAPI document, generated from the wire schema in :mod:`kbatch.models`.

Its paths and methods are tested against the app's real routes
(``tests/unit/test_openapi.py``): a route added without a document fails there.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kbatch import __version__
from kbatch.models import (
    API_PREFIX,
    ErrorBody,
    Identity,
    Job,
    JobEvent,
    JobList,
    JobSpec,
    JobState,
    SubmitRequest,
    UpdateRequest,
)
from kbatch.uploads.manifest import DIGEST_PATTERN, Manifest, UploadAnswer

__all__ = ["STATES_PATTERN", "openapi_document"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _states_pattern() -> str:
    """``PENDING`` or ``pending,Running``...: what the ``state`` filter takes, exactly.

    The server checks the filter with this same pattern, so that what the
    document says and what the server accepts cannot drift apart.
    """
    names = ["".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in s) for s in JobState]
    one = "(" + "|".join(names) + ")"
    return f"^{one}(,{one})*$"


STATES_PATTERN = _states_pattern()


def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [
            SubmitRequest,
            Job,
            JobList,
            JobEvent,
            Identity,
            ErrorBody,
            JobSpec,
            UpdateRequest,
            Manifest,
            UploadAnswer,
        ],
        ref_template="#/components/schemas/{name}",
    )
    texts = {
        400: "the request is malformed (not JSON, a bad header)",
        401: "no or invalid token",
        403: "not allowed",
        404: "no such job (or not one of yours)",
        409: "the job's state does not allow this",
        413: "the request body is too large",
        422: "the input was refused; the message says what to change",
        503: "a service the server depends on is unavailable",
    }

    def errors(*codes: int) -> dict[str, Any]:
        return {str(c): _json(_ref("ErrorBody"), texts[c]) for c in (401, 403, 503, *codes)}

    def flag(name: str, description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "schema": {"type": "boolean"},
            "description": description + " (true/false/1/0)",
        }

    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {
            "type": "string",
            "pattern": r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}(_([0-9]{1,9}|\[[0-9,:-]{1,4096}\]))?$",
        },
        "description": "a job, an array (ID), a task (ID_INDEX) or tasks (ID_[1-5,9]); "
        "any other id is answered 404",
    }
    all_users = flag("all_users", "every user's jobs (admins only, else 403)")
    security: list[dict[str, list[str]]] = [{"bearer": []}]

    def job_action(summary: str, *codes: int) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": security,
                "parameters": [job_id],
                "responses": {"200": _json(_ref("Job")), **errors(404, *codes)},
            }
        }

    health = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "version": {"type": "string"},
            "backend": {"type": "string"},
            "detail": {"type": "string"},
            "stale_seconds": {"type": ["number", "null"]},
        },
    }
    digest = {
        "name": "digest",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": DIGEST_PATTERN},
        "description": "a file's sha256, 64 lowercase hex digits",
    }
    stored = {
        "type": "object",
        "properties": {
            "sha256": {"type": "string", "pattern": DIGEST_PATTERN},
            "size": {"type": "integer", "minimum": 0},
        },
    }
    paths: dict[str, Any] = {
        f"{API_PREFIX}/uploads": {
            "post": {
                "summary": "Upload a folder's manifest (kbatch submit --code)",
                "description": "The manifest lists every file's path, sha256, size and "
                "executable bit.  Paths that escape the folder and totals over the "
                "policy's max_upload_bytes and max_upload_files are refused (422).  If "
                "the caller has sent every file (PUT /blobs/{digest}), the upload is "
                "stored (201, complete) and a job may name its id as its code; else "
                "nothing is stored and missing lists what to send first (200).  Only "
                "files the caller sent themselves count: nobody learns what others "
                "uploaded.",
                "security": security,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Manifest")}},
                },
                "responses": {
                    "201": _json(_ref("UploadAnswer"), "Stored: complete"),
                    "200": _json(_ref("UploadAnswer"), "Not stored: send the missing files"),
                    **errors(400, 404, 413, 422),
                },
            }
        },
        f"{API_PREFIX}/blobs": {
            "post": {
                "summary": "Send many small files in one request",
                "description": "The body is frames, each '<sha256> <size as 16 hex "
                "digits>\\n' and then that many bytes.  Each file is stored as PUT "
                "/blobs/{digest} stores one (hashed as it streams; 422 on a mismatch, "
                "413 over max_upload_bytes); files before a refused one stay stored.",
                "security": security,
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {}},
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "properties": {"stored": {"type": "array", "items": stored}},
                        },
                        "Stored",
                    ),
                    **errors(400, 404, 413, 422),
                },
            }
        },
        f"{API_PREFIX}/blobs/{{digest}}": {
            "put": {
                "summary": "Send one file's bytes, named by their sha256",
                "description": "Streamed to disk and hashed as it arrives; kept only if "
                "the bytes hash to digest (else 422) and are within max_upload_bytes "
                "(else 413).  A cut upload leaves nothing; send it again.",
                "security": security,
                "parameters": [digest],
                "requestBody": {
                    "required": False,  # an empty file's body is empty
                    "content": {"application/octet-stream": {}},
                },
                "responses": {"201": _json(stored, "Stored"), **errors(400, 404, 413, 422)},
            }
        },
        f"{API_PREFIX}/health": {
            "get": {
                "summary": "Liveness and the backend's health (no job data)",
                "security": [],
                "responses": {
                    "200": _json(health, "the server and its backend answer"),
                    "503": _json(health, "the backend cannot answer with current data"),
                },
            }
        },
        f"{API_PREFIX}/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"})},
            }
        },
        f"{API_PREFIX}/events": {
            "get": {
                "summary": "Changes of your jobs as they happen, one JSON JobEvent a line",
                "description": "Endless.  The first line is a resync event, sent once the "
                "stream is live: list the jobs then, and no change is missed.  A later "
                "resync means some changes were dropped: list the jobs again.",
                "security": security,
                "parameters": [all_users],
                "responses": {
                    "200": {
                        "description": "a stream of JobEvent, one a line",
                        "content": {"application/x-ndjson": {"schema": _ref("JobEvent")}},
                    },
                    **errors(422),
                },
            }
        },
        f"{API_PREFIX}/whoami": {
            "get": {
                "summary": "The caller's identity",
                "security": security,
                "responses": {"200": _json(_ref("Identity")), **errors()},
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
                        "schema": {"type": "string", "pattern": STATES_PATTERN},
                        "description": "comma-separated states",
                    },
                    flag("all", "include finished jobs"),
                    all_users,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                        "description": "at most this many jobs; the answer's next is the "
                        "cursor of the following page (none: every job)",
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 1024},
                        "description": "the next cursor of the previous page",
                    },
                ],
                "responses": {"200": _json(_ref("JobList")), **errors(422)},
            },
            "post": {
                "summary": "Submit a job",
                "security": security,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        "description": "a retried request with the same key returns the same job",
                    },
                    flag("dry_run", "validate only"),
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
                    **errors(400, 409, 413, 422),
                },
            },
        },
        f"{API_PREFIX}/jobs/{{job_id}}": {
            "get": {
                "summary": "One job",
                "security": security,
                "parameters": [job_id],
                "responses": {"200": _json(_ref("Job")), **errors(404)},
            }
        },
        f"{API_PREFIX}/jobs/{{job_id}}/cancel": job_action(
            "Cancel a job (an ended job is returned unchanged)"
        ),
        f"{API_PREFIX}/jobs/{{job_id}}/hold": job_action(
            "Keep a pending job from starting (409 once it has started)", 409
        ),
        f"{API_PREFIX}/jobs/{{job_id}}/release": job_action(
            "Let a held job start (a job not held is returned unchanged)", 409
        ),
        f"{API_PREFIX}/jobs/{{job_id}}/spec": {
            "get": {
                "summary": "The spec the job (or array) was submitted with: what resubmit sends",
                "security": security,
                "parameters": [job_id],
                "responses": {"200": _json(_ref("JobSpec")), **errors(404, 409)},
            }
        },
        f"{API_PREFIX}/jobs/{{job_id}}/update": {
            "post": {
                "summary": "Change a pending or running array's throttle (scontrol update)",
                "security": security,
                "parameters": [job_id],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("UpdateRequest")}},
                },
                "responses": {"200": _json(_ref("Job")), **errors(404, 409, 422)},
            }
        },
        f"{API_PREFIX}/jobs/{{job_id}}/logs": {
            "get": {
                "summary": "The job's output (streamed while following)",
                "security": security,
                "parameters": [
                    job_id,
                    flag("follow", "stream until the job has ended"),
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
                    **errors(404, 422),
                },
            }
        },
        f"{API_PREFIX}/jobs/{{job_id}}/results": {
            "get": {
                "summary": "What an ended job left in its code directory, new or changed",
                "description": "A manifest of the job's results: every file of its code "
                "directory (KBATCH_CODE_DIR) that was not uploaded with it, or that it "
                "changed.  409 while the job runs, or if it had no uploaded files.",
                "security": security,
                "parameters": [job_id],
                "responses": {"200": _json(_ref("Manifest")), **errors(404, 409)},
            },
            "post": {
                "summary": "The job's pod hands back its results (transfer token only)",
                "description": "Kept once every file in it was sent (PUT "
                "/jobs/{job_id}/results/{digest}); else missing lists what to send.",
                "security": security,
                "parameters": [job_id],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Manifest")}},
                },
                "responses": {
                    "201": _json(_ref("UploadAnswer"), "Kept"),
                    "200": _json(_ref("UploadAnswer"), "Not kept: send the missing files"),
                    **errors(400, 404, 409, 413, 422),
                },
            },
        },
        f"{API_PREFIX}/jobs/{{job_id}}/results/{{digest}}": {
            "get": {
                "summary": "The bytes of one of the job's results, by sha256",
                "security": security,
                "parameters": [job_id, digest],
                "responses": {
                    "200": {
                        "description": "the file's bytes",
                        "content": {"application/octet-stream": {}},
                    },
                    **errors(404, 409),
                },
            },
            "put": {
                "summary": "The job's pod sends one result file (transfer token only)",
                "security": security,
                "parameters": [job_id, digest],
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {}},
                },
                "responses": {"201": _json(stored, "Stored"), **errors(400, 404, 413, 422)},
            },
        },
        f"{API_PREFIX}/jobs/{{job_id}}/code": {
            "get": {
                "summary": "The manifest of the files the job was submitted with",
                "description": "For the job's pod (its transfer token) or its owner.",
                "security": security,
                "parameters": [job_id],
                "responses": {"200": _json(_ref("Manifest")), **errors(404, 409)},
            }
        },
        f"{API_PREFIX}/jobs/{{job_id}}/code/{{digest}}": {
            "get": {
                "summary": "One of the files the job was submitted with, by sha256",
                "security": security,
                "parameters": [job_id, digest],
                "responses": {
                    "200": {
                        "description": "the file's bytes",
                        "content": {"application/octet-stream": {}},
                    },
                    **errors(404, 409),
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
