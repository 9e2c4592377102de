"""Pure request building and response parsing, shared by every client.

No I/O here: a :class:`Request` says what to send, :func:`parse` turns a status
and body into a model or the matching :mod:`kbatch.errors` exception.  The sync
client (and any async one) only moves bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import quote, urlencode

import msgspec

from kbatch.errors import ApiError, api_error_for_status
from kbatch.models import API_PREFIX, ErrorBody, JobEvent, JobSpec, SubmitRequest, UpdateRequest

__all__ = [
    "LoginCode",
    "Request",
    "cancel_job",
    "dashboard_login_code",
    "error_from",
    "events",
    "get_job",
    "hold_job",
    "is_error_body",
    "job_code",
    "job_code_file",
    "job_logs",
    "job_result_file",
    "job_results",
    "job_spec",
    "list_jobs",
    "parse",
    "parse_event",
    "post_results",
    "put_blob",
    "put_blobs",
    "put_result",
    "release_job",
    "submit_job",
    "update_job",
    "upload_manifest",
    "whoami",
]

T = TypeVar("T")
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # below the server's base URL, with the query string
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _path(*parts: str, query: dict[str, str] | None = None) -> str:
    path = API_PREFIX + "".join("/" + quote(part, safe="") for part in parts)
    return f"{path}?{urlencode(query)}" if query else path


class LoginCode(msgspec.Struct, kw_only=True):
    """A single-use login link of the dashboard: ``path`` below the server's URL."""

    path: str
    expires_in: int


def dashboard_login_code() -> Request:
    """A one-time login code for the web dashboard (``kbatch dashboard``)."""
    return Request("POST", "/dashboard/login-code")


def submit_job(spec: JobSpec, *, idempotency_key: str, dry_run: bool = False) -> Request:
    """POST a job.  The idempotency key makes a retried submission return the same job."""
    return Request(
        "POST",
        _path("jobs", query={"dry_run": "true"} if dry_run else None),
        _encoder.encode(SubmitRequest(spec=spec)),
        {"Content-Type": "application/json", "Idempotency-Key": idempotency_key},
    )


def get_job(job_id: str) -> Request:
    return Request("GET", _path("jobs", job_id))


def list_jobs(
    *,
    states: Sequence[str] = (),
    include_finished: bool = False,
    all_users: bool = False,
    limit: int | None = None,
    after: str | None = None,
) -> Request:
    """A page of jobs: ``limit`` of them after the cursor ``after`` (a page's ``next``)."""
    query: dict[str, str] = {}
    if states:
        query["state"] = ",".join(states)
    if include_finished:
        query["all"] = "true"
    if all_users:
        query["all_users"] = "true"
    if limit is not None:
        query["limit"] = str(limit)
    if after is not None:
        query["after"] = after
    return Request("GET", _path("jobs", query=query))


def job_spec(job_id: str) -> Request:
    """The spec a job (an array: its whole spec) was submitted with."""
    return Request("GET", _path("jobs", job_id, "spec"))


def update_job(job_id: str, *, throttle: int | None) -> Request:
    """Change an array's throttle (None: no throttle, sent as 0)."""
    body = _encoder.encode(UpdateRequest(throttle=throttle or 0))
    return Request(
        "POST", _path("jobs", job_id, "update"), body, {"Content-Type": "application/json"}
    )


def _post(*parts: str) -> Request:
    return Request("POST", _path(*parts), b"", {"Content-Length": "0"})


def cancel_job(job_id: str) -> Request:
    return _post("jobs", job_id, "cancel")


def hold_job(job_id: str) -> Request:
    return _post("jobs", job_id, "hold")


def release_job(job_id: str) -> Request:
    return _post("jobs", job_id, "release")


def events(*, all_users: bool = False) -> Request:
    """The stream of job changes, one JSON :class:`JobEvent` a line."""
    query = {"all_users": "true"} if all_users else None
    return Request("GET", _path("events", query=query), headers={"Accept": "application/x-ndjson"})


def job_logs(job_id: str, *, follow: bool = False, stream: str = "output") -> Request:
    query = {"stream": stream}
    if follow:
        query["follow"] = "true"
    return Request("GET", _path("jobs", job_id, "logs", query=query))


def upload_manifest(body: bytes) -> Request:
    """POST an upload's manifest (JSON): stored if complete, else the answer says what to send."""
    return Request("POST", _path("uploads"), body, {"Content-Type": "application/json"})


def put_blob(digest: str, size: int) -> Request:
    """PUT one file's bytes (the body is streamed by the client from the file)."""
    return Request(
        "PUT",
        _path("blobs", digest),
        None,
        {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )


def put_blobs(size: int) -> Request:
    """POST many small files at once (a body of frames the client streams, ``size`` bytes)."""
    return Request(
        "POST",
        _path("blobs"),
        None,
        {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )


def job_code(job_id: str) -> Request:
    return Request("GET", _path("jobs", job_id, "code"))


def job_code_file(job_id: str, digest: str) -> Request:
    return Request("GET", _path("jobs", job_id, "code", digest))


def put_result(job_id: str, digest: str, size: int) -> Request:
    """PUT one result file from a job's pod (streamed, like :func:`put_blob`)."""
    return Request(
        "PUT",
        _path("jobs", job_id, "results", digest),
        None,
        {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )


def post_results(job_id: str, body: bytes) -> Request:
    return Request(
        "POST", _path("jobs", job_id, "results"), body, {"Content-Type": "application/json"}
    )


def job_results(job_id: str) -> Request:
    return Request("GET", _path("jobs", job_id, "results"))


def job_result_file(job_id: str, digest: str) -> Request:
    return Request("GET", _path("jobs", job_id, "results", digest))


def whoami() -> Request:
    return Request("GET", _path("whoami"))


def is_error_body(body: bytes) -> bool:
    """True if ``body`` is kbatch's error shape (the server itself answered)."""
    try:
        msgspec.json.decode(body, type=ErrorBody)
    except msgspec.DecodeError:
        return False
    return True


def error_from(status: int, body: bytes) -> ApiError:
    """The exception for an error response; the server's message when it sent one."""
    cls = api_error_for_status(status)
    try:
        detail = msgspec.json.decode(body, type=ErrorBody).error
    except msgspec.DecodeError:
        text = body.decode(errors="replace").strip()[:200]
        return cls(f"server answered HTTP {status}" + (f": {text}" if text else ""), status=status)
    return cls(detail.message, status=status, code=detail.code, field=detail.field)


def parse_event(line: bytes) -> JobEvent | None:
    """One line of the event stream; None for a blank line."""
    if not line.strip():
        return None
    try:
        return msgspec.json.decode(line, type=JobEvent)
    except msgspec.DecodeError as exc:
        raise ApiError(
            f"the server sent an event that could not be read ({exc})",
            status=200,
            code="bad_response",
        ) from exc


def parse(status: int, body: bytes, type: type[T]) -> T:
    if status >= 400:
        raise error_from(status, body)
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.DecodeError as exc:
        raise ApiError(
            f"the server's answer could not be read ({exc}); is the URL a kbatch server?",
            status=status,
            code="bad_response",
        ) from exc
