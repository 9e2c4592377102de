"""The HTTP/JSON API: routes, authentication, authorization, one error shape.

Every route but ``health`` and ``openapi.json`` needs a valid token; every job
route checks that the caller owns the job (or is an admin) and answers 404
otherwise, so job ids of other users are not even confirmed to exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kbatch import __version__
from kbatch.backends.base import Backend
from kbatch.backends.derive import pending_job
from kbatch.errors import (
    ApiError,
    InvalidRequest,
    KbatchError,
    NotFound,
    PermissionDenied,
    SpecError,
)
from kbatch.models import (
    ACTIVE_STATES,
    API_PREFIX,
    ErrorBody,
    ErrorDetail,
    Identity,
    Job,
    JobSpec,
    JobState,
    SubmitRequest,
)
from kbatch.server.auth.base import Authenticator, token_from_header
from kbatch.server.openapi import openapi_document
from kbatch.server.policy import Policy, check

__all__ = ["create_app"]

log = logging.getLogger("kbatch.server")
access_log = logging.getLogger("kbatch.access")
_encoder = msgspec.json.Encoder()
MAX_BODY = 4 * 1024 * 1024
IDEMPOTENCY_KEY_MAX = 200


def json_response(value: object, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response:
    return json_response(
        ErrorBody(error=ErrorDetail(code=code, message=message, field=field)), status
    )


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


class Api:
    """The route handlers, bound to one backend, authenticator and policy."""

    def __init__(self, backend: Backend, authenticator: Authenticator, policy: Policy) -> None:
        self.backend = backend
        self.auth = authenticator
        self.policy = policy

    async def identity(self, request: Request) -> Identity:
        identity = await self.auth.authenticate(
            token_from_header(request.headers.get("authorization"))
        )
        request.state.user = identity.name
        return identity

    async def owned_job(self, request: Request, identity: Identity) -> Job:
        job_id = request.path_params["job_id"]
        try:
            job = await self.backend.get(job_id)
        except NotFound:
            raise NotFound(f"no job {job_id}", status=404, code="not_found") from None
        if job.user != identity.name and not identity.admin:
            raise NotFound(f"no job {job_id}", status=404, code="not_found")
        return job

    # -- routes -----------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok", "version": __version__, "backend": self.backend.name})

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi_document())

    async def whoami(self, request: Request) -> Response:
        return json_response(await self.identity(request))

    async def list_jobs(self, request: Request) -> Response:
        identity = await self.identity(request)
        all_users = _truthy(request.query_params.get("all_users"))
        if all_users and not identity.admin:
            raise PermissionDenied(
                "only admins may list every user's jobs (--all-users)", status=403, code="not_admin"
            )
        states: set[JobState] | None = None
        if raw := request.query_params.get("state"):
            try:
                states = {JobState(s.strip().upper()) for s in raw.split(",") if s.strip()}
            except ValueError as exc:
                raise InvalidRequest(
                    f"unknown state in {raw!r}; use {', '.join(s.value for s in JobState)}",
                    status=422,
                    code="invalid_state",
                ) from exc
        elif not _truthy(request.query_params.get("all")):
            states = set(ACTIVE_STATES)
        page = await self.backend.list(user=None if all_users else identity.name, states=states)
        return json_response(page)

    async def submit(self, request: Request) -> Response:
        identity = await self.identity(request)
        body = await _read_body(request)
        submission = msgspec.json.decode(body, type=SubmitRequest)
        spec = check(submission.spec, self.policy)
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= IDEMPOTENCY_KEY_MAX):
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters",
                status=400,
                code="bad_key",
            )
        if _truthy(request.query_params.get("dry_run")):
            await self.backend.validate(identity.name, spec)
            return json_response(_preview(identity.name, spec, self.backend.name))
        job = await self.backend.submit(identity.name, spec, idempotency_key=key)
        log.info("user %s submitted job %s (%s)", identity.name, job.id, job.name)
        return json_response(job, 201)

    async def get_job(self, request: Request) -> Response:
        identity = await self.identity(request)
        return json_response(await self.owned_job(request, identity))

    async def cancel(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        if job.state.is_terminal:
            return json_response(job)
        log.info("user %s cancelled job %s", identity.name, job.id)
        return json_response(await self.backend.cancel(job.id, by=identity.name))

    async def logs(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        stream = request.query_params.get("stream", "output")
        if stream not in ("output", "error"):
            raise InvalidRequest("stream must be output or error", status=422, code="bad_stream")
        chunks = self.backend.logs(
            job.id, follow=_truthy(request.query_params.get("follow")), stream=stream
        )
        return StreamingResponse(await _primed(chunks), media_type="application/octet-stream")


async def _primed(chunks: AsyncIterator[bytes], wait: float = 5.0) -> AsyncIterator[bytes]:
    """``chunks`` with its first step taken before the response starts, so that an error
    there (the backend cannot reach what holds the log, the log is gone) is an error
    status, not a 200 and a dropped connection.  A first chunk that takes longer than
    ``wait`` (following a job that prints nothing yet) does not hold the headers back."""
    first = asyncio.ensure_future(anext(chunks))
    try:
        await asyncio.wait_for(asyncio.shield(first), wait)
    except TimeoutError:
        pass
    except StopAsyncIteration:
        return _empty()
    return _after(first, chunks)


async def _empty() -> AsyncIterator[bytes]:
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


async def _after(first: asyncio.Future[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        chunk = await first
    except StopAsyncIteration:
        return
    if chunk:
        yield chunk
    async for chunk in rest:
        yield chunk


def _preview(user: str, spec: JobSpec, backend: str) -> Job:
    """What ``--test-only`` shows: the job as it would be submitted."""
    return pending_job(spec, job_id="0", user=user, backend=backend, reason="DryRun")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise InvalidRequest(
            f"the request is {declared} bytes, over the {MAX_BODY}-byte limit",
            status=413,
            code="too_large",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise InvalidRequest(
                f"the request is over the {MAX_BODY}-byte limit", status=413, code="too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _handle_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, SpecError):
        return error_response(422, "invalid_spec", exc.message, exc.field)
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.field)
    if isinstance(exc, msgspec.ValidationError):
        return error_response(422, "invalid_request", f"the request was refused: {exc}")
    if isinstance(exc, msgspec.DecodeError):
        return error_response(400, "malformed_json", f"the request body is not valid JSON: {exc}")
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail))
    if isinstance(exc, KbatchError):
        return error_response(500, "server_error", exc.message)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; the server log has the details")


class AccessLog:
    """One line per request: method, path (never the query string), status, user, time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            access_log.info(
                "%s %s %d %s %.1fms",
                scope["method"],
                scope["path"],
                status,
                scope.get("state", {}).get("user", "-"),
                (time.perf_counter() - start) * 1000,
            )


def create_app(
    backend: Backend, authenticator: Authenticator, policy: Policy, *, prefix: str = ""
) -> Starlette:
    api = Api(backend, authenticator, policy)
    routes: list[BaseRoute] = [
        Route(f"{API_PREFIX}/health", api.health),
        Route(f"{API_PREFIX}/openapi.json", api.openapi),
        Route(f"{API_PREFIX}/whoami", api.whoami),
        Route(f"{API_PREFIX}/jobs", api.list_jobs, methods=["GET"]),
        Route(f"{API_PREFIX}/jobs", api.submit, methods=["POST"]),
        Route(f"{API_PREFIX}/jobs/{{job_id}}", api.get_job, methods=["GET"]),
        Route(f"{API_PREFIX}/jobs/{{job_id}}/cancel", api.cancel, methods=["POST"]),
        Route(f"{API_PREFIX}/jobs/{{job_id}}/logs", api.logs, methods=["GET"]),
    ]
    if prefix:
        routes = [Mount(prefix, routes=routes)]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await authenticator.start()
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()
            await authenticator.stop()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        KbatchError: _handle_error,
        msgspec.DecodeError: _handle_error,
        HTTPException: _handle_error,
        Exception: _handle_error,  # a 500 in the one error shape; the traceback goes to the log
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(AccessLog)
    return app
