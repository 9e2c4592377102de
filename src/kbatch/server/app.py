"""The HTTP/JSON API: routes, authentication, authorization, one error shape.

Every route but ``health`` and ``openapi.json`` needs a valid token; every job
route checks that the caller owns the job (or is an admin) and answers 404
otherwise, so job ids of other users are not even confirmed to exist.  A job id
no backend could have made (see :func:`kbatch.lifecycle.parse_job_ref`) is
answered the same 404 before the backend sees it.

The routes are declared once, in :data:`ROUTES`; the app and the OpenAPI
document's test both read that table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kbatch import __version__
from kbatch.backends.base import Backend
from kbatch.backends.derive import pending_job
from kbatch.dependencies import parse_dependency
from kbatch.errors import (
    ApiError,
    AuthenticationError,
    Conflict,
    InvalidRequest,
    KbatchError,
    NotFound,
    PermissionDenied,
    SpecError,
)
from kbatch.lifecycle import parse_job_ref
from kbatch.models import (
    ACTIVE_STATES,
    API_PREFIX,
    PATTERN_HINTS,
    ErrorBody,
    ErrorDetail,
    Identity,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    SubmitRequest,
    UpdateRequest,
)
from kbatch.server.auth.base import Authenticator, Credentials
from kbatch.server.blobs import TOKEN_PREFIX, BlobStore
from kbatch.server.logtext import escaped
from kbatch.server.openapi import STATES_PATTERN, openapi_document
from kbatch.server.policy import Policy, check
from kbatch.uploads.manifest import Manifest, check_manifest, is_digest

__all__ = ["ROUTES", "create_app"]

log = logging.getLogger("kbatch.server")
access_log = logging.getLogger("kbatch.access")
_encoder = msgspec.json.Encoder()
MAX_BODY = 4 * 1024 * 1024
IDEMPOTENCY_KEY_MAX = 200
MAX_LIST_LIMIT = 10_000
CURSOR_MAX = 1024
NDJSON = "application/x-ndjson"
_RESYNC = _encoder.encode(JobEvent(type="resync")) + b"\n"
MAX_MANIFEST_BODY = 64 * 1024 * 1024  # a manifest of 100,000 files is ~15 MB of JSON
SWEEP_EVERY = 3600.0  # seconds between collections of unused uploads


def json_response(value: object, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response:
    return json_response(
        ErrorBody(error=ErrorDetail(code=code, message=message, field=field)), status
    )


_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def _flag(request: Request, name: str) -> bool:
    """A boolean query parameter: ``true``/``false``/``1``/``0``, absent is false; else 422."""
    raw = request.query_params.get(name)
    if raw is None:
        return False
    value = _BOOLEANS.get(raw.lower())
    if value is None:
        raise InvalidRequest(
            f"{name} must be true or false, not {raw[:50]!r}", status=422, code="invalid_query"
        )
    return value


def _limit(request: Request) -> int | None:
    raw = request.query_params.get("limit")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6 and 1 <= int(raw) <= MAX_LIST_LIMIT):
        raise InvalidRequest(
            f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, not {raw[:50]!r}",
            status=422,
            code="invalid_query",
        )
    return int(raw)


def _cursor(request: Request) -> str | None:
    raw = request.query_params.get("after")
    if raw is not None and not (0 < len(raw) <= CURSOR_MAX and raw.isprintable()):
        raise InvalidRequest(
            "after must be the 'next' cursor of the previous page", status=422, code="invalid_query"
        )
    return raw


def _no_job(job_id: str) -> NotFound:
    """The one answer for a job the caller may not see, whatever the reason.

    The id is shown as given when it could be one, quoted (``repr``) when it
    could not, so that no odd character reaches a terminal or log unescaped.
    """
    try:
        shown = str(parse_job_ref(job_id))
    except NotFound:
        shown = repr(job_id)
    return NotFound(f"no job {shown}", status=404, code="not_found")


class _JobIdConvertor(Convertor[str]):
    """Like ``str`` but matches the empty id too, so ``/jobs//cancel`` is the usual 404."""

    regex = "[^/]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("kbatch_job_id", _JobIdConvertor())


class Api:
    """The route handlers, bound to one backend, authenticator and policy."""

    def __init__(
        self,
        backend: Backend,
        authenticator: Authenticator,
        policy: Policy,
        uploads: BlobStore | None = None,
    ) -> None:
        self.backend = backend
        self.auth = authenticator
        self.policy = policy
        self.uploads = uploads

    async def identity(self, request: Request) -> Identity:
        identity = await self.auth.authenticate(Credentials.from_request(request))
        request.state.user = identity.name
        return identity

    async def owned_job(self, request: Request, identity: Identity) -> Job:
        """The job (an array, a task, some tasks) the path names, if the caller may see it.

        The returned job's ``id`` is the reference as the backend reads it: the one
        to hand back to the backend for an action on it."""
        job_id: str = request.path_params["job_id"]
        try:
            ref = parse_job_ref(job_id)
            job = await self.backend.get(str(ref))
        except NotFound:
            raise _no_job(job_id) from None
        if job.user != identity.name and not identity.admin:
            raise _no_job(job_id)
        if ref.indexes is not None:  # some tasks: the action is on those tasks
            job = msgspec.structs.replace(job, id=str(ref))
        return job

    def all_users(self, request: Request, identity: Identity) -> bool:
        all_users = _flag(request, "all_users")
        if all_users and not identity.admin:
            raise PermissionDenied(
                "only admins may see every user's jobs (--all-users)", status=403, code="not_admin"
            )
        return all_users

    # -- routes -----------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        health = self.backend.health()
        body = {
            "status": "ok" if health.ok else "unavailable",
            "version": __version__,
            "backend": self.backend.name,
            "detail": health.detail,
            "stale_seconds": health.stale_seconds,
        }
        return json_response(body, 200 if health.ok else 503)

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi_document())

    async def whoami(self, request: Request) -> Response:
        return json_response(await self.identity(request))

    async def list_jobs(self, request: Request) -> Response:
        identity = await self.identity(request)
        all_users = self.all_users(request, identity)
        limit, after = _limit(request), _cursor(request)
        states: set[JobState] | None = None
        if (raw := request.query_params.get("state")) is not None:
            if not re.fullmatch(STATES_PATTERN, raw):
                raise InvalidRequest(
                    f"state must be a comma-separated list of {', '.join(s.value for s in JobState)}"
                    f", not {raw[:100]!r}",
                    status=422,
                    code="invalid_state",
                )
            states = {JobState(s.upper()) for s in raw.split(",")}
        elif not _flag(request, "all"):
            states = set(ACTIVE_STATES)
        page = await self.backend.list(
            user=None if all_users else identity.name, states=states, limit=limit, after=after
        )
        return json_response(page)

    async def submit(self, request: Request) -> Response:
        identity = await self.identity(request)
        body = await _read_body(request)
        submission = msgspec.json.decode(body, type=SubmitRequest)
        spec = check(submission.spec, self.policy)
        await self._check_dependencies(identity, spec)
        self._check_code(identity, spec)
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= IDEMPOTENCY_KEY_MAX):
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters",
                status=400,
                code="bad_key",
            )
        if _flag(request, "dry_run"):
            await self.backend.validate(identity.name, spec)
            return json_response(_preview(identity.name, spec, self.backend.name))
        job = await self.backend.submit(identity.name, spec, idempotency_key=key)
        if spec.code is not None and self.uploads is not None:
            self.uploads.attach(job.id, job.user, spec.code)
        log.info("user %s submitted job %s (%s)", escaped(identity.name), job.id, escaped(job.name))
        return json_response(job, 201)

    async def _check_dependencies(self, identity: Identity, spec: JobSpec) -> None:
        """A dependency may name only jobs the caller may see: the same 404 as any other
        look at a job that is not theirs, so ids of others are not even confirmed."""
        if spec.dependency is None:
            return
        for job_id in parse_dependency(spec.dependency).job_ids:
            try:
                job = await self.backend.get(job_id)
            except NotFound:
                job = None
            if job is None or (job.user != identity.name and not identity.admin):
                raise NotFound(
                    f"--dependency names job {job_id}, and there is no job {job_id}",
                    status=404,
                    code="not_found",
                )

    def _check_code(self, identity: Identity, spec: JobSpec) -> None:
        """A job's ``code`` must be a complete upload of the caller's, on a backend that takes it."""
        if spec.code is None:
            return
        if self.uploads is None or not self.backend.supports_code:
            raise SpecError(
                f"this server's {self.backend.name} backend does not take uploaded files yet; "
                "submit without --code",
                field="code",
            )
        if self.uploads.manifest(identity.name, spec.code) is None:
            raise SpecError(
                f"no complete upload {spec.code} of yours (it may have been collected after a "
                "day unused); submit with --code again",
                field="code",
            )

    def _store(self) -> BlobStore:
        if self.uploads is None:
            raise NotFound("this server keeps no uploads", status=404, code="not_found")
        return self.uploads

    async def upload(self, request: Request) -> Response:
        """A manifest: stored if the caller has sent every file it names, else what is missing."""
        identity = await self.identity(request)
        store = self._store()
        body = await _read_body(request, limit=MAX_MANIFEST_BODY)
        manifest = check_manifest(
            msgspec.json.decode(body, type=Manifest),
            max_bytes=self.policy.max_upload_bytes,
            max_files=self.policy.max_upload_files,
        )
        answer = store.commit(identity.name, manifest)
        if answer.complete:
            log.info(
                "user %s uploaded %s (%d files, %d bytes)",
                escaped(identity.name),
                answer.id,
                answer.files,
                answer.bytes,
            )
        return json_response(answer, 201 if answer.complete else 200)

    async def put_blob(self, request: Request) -> Response:
        """One file's bytes, streamed to disk and checked against their sha256 as they come."""
        identity = await self.identity(request)
        return await self._receive(request, identity.name)

    async def _receive(self, request: Request, owner: str) -> Response:
        store = self._store()
        digest: str = request.path_params["digest"]
        if not is_digest(digest):
            raise InvalidRequest(
                f"{digest[:80]!r} is not a sha256 digest (64 lowercase hex digits)",
                status=422,
                code="bad_digest",
            )
        limit = self.policy.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InvalidRequest(
                f"the file is {declared} bytes, over the limit of {limit} bytes (policy "
                "max_upload_bytes); leave it out with .kbatchignore",
                status=413,
                code="too_large",
            )
        try:
            size = await store.receive(owner, digest, request.stream(), max_bytes=limit)
        except ClientDisconnect:
            return error_response(400, "disconnected", "the upload was cut off; send it again")
        return json_response({"sha256": digest, "size": size}, 201)

    async def put_blobs(self, request: Request) -> Response:
        """Many small files in one request: frames of ``<sha256> <size, 16 hex digits>\\n``
        and that many bytes, each streamed, checked and stored as any single upload."""
        identity = await self.identity(request)
        store = self._store()
        limit = self.policy.max_upload_bytes
        stored: list[dict[str, object]] = []
        try:
            async for digest, size, body in _frames(request.stream(), limit):
                await store.receive(identity.name, digest, body, max_bytes=size)
                stored.append({"sha256": digest, "size": size})
        except ClientDisconnect:
            return error_response(400, "disconnected", "the upload was cut off; send it again")
        if not stored:
            raise InvalidRequest("the batch holds no files", status=400, code="bad_batch")
        return json_response({"stored": stored}, 201)

    async def _results_of(self, request: Request) -> tuple[Job, BlobStore, Manifest]:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        store = self._store()
        if not store.has_job(job.id):
            raise Conflict(
                f"job {job.id} was not submitted with --code: it has no results to fetch",
                status=409,
                code="no_code",
            )
        if not job.state.is_terminal:
            raise Conflict(
                f"job {job.id} is {job.state}; its results are collected when it ends",
                status=409,
                code="not_ended",
            )
        results = store.results(job.id)
        if results is None:
            raise Conflict(
                f"job {job.id}'s results are being collected; try again in a moment",
                status=409,
                code="collecting",
            )
        return job, store, results

    async def results(self, request: Request) -> Response:
        """What the ended job left in its code directory that is new or changed."""
        _, _, results = await self._results_of(request)
        return json_response(results)

    async def result_file(self, request: Request) -> Response:
        """The bytes of one of the job's results, by its sha256 (as the results list it)."""
        job, store, results = await self._results_of(request)
        digest: str = request.path_params["digest"]
        if not is_digest(digest) or digest not in results.digests():
            raise NotFound(
                f"job {job.id} left no file with sha256 {digest[:80]!r}",
                status=404,
                code="not_found",
            )
        return FileResponse(store.path(digest), media_type="application/octet-stream")

    # -- a job's pod: its files in, its results out (transfer tokens) -------------

    def _transfer_job(self, request: Request) -> str | None:
        """The job of a transfer token (for this very job), or None for any other token."""
        token = Credentials.from_request(request).token
        if token is None or not token.startswith(TOKEN_PREFIX) or self.uploads is None:
            return None
        job_id = self.uploads.transfer_job(token)
        if job_id is None:
            raise AuthenticationError(
                "the job's transfer token is not valid (expired?)", status=401, code="bad_token"
            )
        if job_id != request.path_params["job_id"]:
            raise _no_job(request.path_params["job_id"])
        request.state.user = f"job:{job_id}"
        return job_id

    async def _transfer_or_owner(self, request: Request) -> str:
        job_id = self._transfer_job(request)
        if job_id is not None:
            return job_id
        return (await self.owned_job(request, await self.identity(request))).id

    async def _pod_only(self, request: Request) -> str:
        job_id = self._transfer_job(request)
        if job_id is None:
            await self.identity(request)  # no token, or a bad one: 401 first
            raise PermissionDenied(
                "only the job's own pod (with its transfer token) hands back its results",
                status=403,
                code="not_the_job",
            )
        return job_id

    def _code_of(self, job_id: str) -> Manifest:
        manifest = self._store().job_manifest(job_id)
        if manifest is None:
            raise Conflict(
                f"job {job_id} was not submitted with --code", status=409, code="no_code"
            )
        return manifest

    async def code(self, request: Request) -> Response:
        """The manifest of the files the job was submitted with."""
        return json_response(self._code_of(await self._transfer_or_owner(request)))

    async def code_file(self, request: Request) -> Response:
        """One file the job was submitted with, by its sha256."""
        job_id = await self._transfer_or_owner(request)
        digest: str = request.path_params["digest"]
        if not is_digest(digest) or digest not in self._code_of(job_id).digests():
            raise NotFound(
                f"job {job_id} has no file with sha256 {digest[:80]!r}",
                status=404,
                code="not_found",
            )
        return FileResponse(self._store().path(digest), media_type="application/octet-stream")

    async def put_result(self, request: Request) -> Response:
        """One file of the job's results, from its pod, checked as any upload is."""
        job_id = await self._pod_only(request)
        return await self._receive(request, _pod_owner(job_id))

    async def post_results(self, request: Request) -> Response:
        """The job's results, from its pod: kept once every file in them has been sent."""
        job_id = await self._pod_only(request)
        store = self._store()
        self._code_of(job_id)
        body = await _read_body(request, limit=MAX_MANIFEST_BODY)
        manifest = check_manifest(
            msgspec.json.decode(body, type=Manifest),
            max_bytes=self.policy.max_upload_bytes,
            max_files=self.policy.max_upload_files,
            what="job's results",
        )
        answer = store.commit(_pod_owner(job_id), manifest)
        if answer.complete:
            store.store_results(job_id, manifest)
        return json_response(answer, 201 if answer.complete else 200)

    async def get_job(self, request: Request) -> Response:
        identity = await self.identity(request)
        return json_response(await self.owned_job(request, identity))

    async def cancel(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        if job.state.is_terminal:
            return json_response(job)
        log.info("user %s cancelled job %s", escaped(identity.name), job.id)
        return json_response(await self.backend.cancel(job.id, by=identity.name))

    async def hold(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        log.info("user %s held job %s", escaped(identity.name), job.id)
        return json_response(await self.backend.hold(job.id))

    async def release(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        log.info("user %s released job %s", escaped(identity.name), job.id)
        return json_response(await self.backend.release(job.id))

    async def spec(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        spec = await self.backend.spec(job.array_job_id or job.id)
        if spec is None:
            raise Conflict(
                f"the {self.backend.name} backend does not keep the spec of job {job.id}",
                status=409,
                code="no_spec",
            )
        return json_response(spec)

    async def update(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        update = msgspec.json.decode(await _read_body(request), type=UpdateRequest)
        log.info(
            "user %s set the throttle of array %s to %d",
            escaped(identity.name),
            job.id,
            update.throttle,
        )
        return json_response(await self.backend.set_throttle(job.id, update.throttle or None))

    async def events(self, request: Request) -> Response:
        """Changes of the caller's jobs (everyone's for an admin with all_users) as NDJSON."""
        identity = await self.identity(request)
        user = None if self.all_users(request, identity) else identity.name
        return StreamingResponse(_ndjson(self.backend, user), media_type=NDJSON)

    async def logs(self, request: Request) -> Response:
        identity = await self.identity(request)
        job = await self.owned_job(request, identity)
        stream = request.query_params.get("stream", "output")
        if stream not in ("output", "error"):
            raise InvalidRequest("stream must be output or error", status=422, code="bad_stream")
        chunks = self.backend.logs(job.id, follow=_flag(request, "follow"), stream=stream)
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


async def _ndjson(backend: Backend, user: str | None) -> AsyncIterator[bytes]:
    """Changes of ``user``'s jobs, one JSON event a line, after a first ``resync``.

    The subscription is made before the first line is sent, so that line tells a
    client that it may list the jobs now without missing a change.  It is made
    here, not in the handler, so that a client gone before the body starts
    leaves no subscription behind; when the client leaves later, Starlette
    cancels the response and ``finally`` unsubscribes.
    """
    events = backend.watch(user)
    try:
        yield _RESYNC
        async for event in events:
            yield _encoder.encode(event) + b"\n"
    finally:
        await events.aclose()


FRAME_HEADER = 64 + 1 + 16 + 1  # "<sha256 hex> <size: 16 hex digits>\n"


async def _frames(
    chunks: AsyncIterator[bytes], max_size: int
) -> AsyncIterator[tuple[str, int, AsyncIterator[bytes]]]:
    """The blobs of a batch body, one at a time: ``(digest, size, its bytes)``.

    Each blob's bytes must be read to the end before the next is asked for.
    """
    source = chunks.__aiter__()
    buffer = bytearray()

    async def more() -> bool:
        try:
            buffer.extend(await anext(source))
        except StopAsyncIteration:
            return False
        return True

    while True:
        while len(buffer) < FRAME_HEADER:
            if not await more():
                if buffer:
                    raise InvalidRequest(
                        "the batch ends inside a frame header", status=400, code="bad_batch"
                    )
                return
        header = bytes(buffer[:FRAME_HEADER])
        del buffer[:FRAME_HEADER]
        digest, size_hex = header[:64].decode("ascii", "replace"), header[65:81]
        if not (is_digest(digest) and header[64:65] == b" " and header[81:] == b"\n"):
            raise InvalidRequest(
                "a batch frame must start with '<sha256> <size as 16 hex digits>\\n'",
                status=400,
                code="bad_batch",
            )
        try:
            size = int(size_hex, 16)
        except ValueError:
            raise InvalidRequest(
                "a frame's size is not hex", status=400, code="bad_batch"
            ) from None
        if size > max_size:
            raise InvalidRequest(
                f"a file of {size} bytes is over the limit of {max_size} bytes (policy "
                "max_upload_bytes); leave it out with .kbatchignore",
                status=413,
                code="too_large",
            )
        left = size

        async def body() -> AsyncIterator[bytes]:
            nonlocal left
            while left:
                if not buffer and not await more():
                    raise InvalidRequest(
                        "the batch ends inside a file; send it again", status=400, code="bad_batch"
                    )
                take = min(left, len(buffer))
                chunk = bytes(buffer[:take])
                del buffer[:take]
                left -= take
                yield chunk

        blob = body()
        yield digest, size, blob
        async for _ in blob:  # what the consumer left unread
            pass


def _pod_owner(job_id: str) -> str:
    """Whom a job's pod counts as in the blob store: no user can have this name (NUL), so
    no user learns from "missing" what a job's pod has sent, nor the other way round."""
    return f"\x00job:{job_id}"


async def _sweep_uploads(store: BlobStore, backend: Backend, every: float = SWEEP_EVERY) -> None:
    """Collect unused uploads, and the files of jobs whose records are gone, every hour."""

    async def alive(job_ids: list[str]) -> set[str]:
        living = set()
        for job_id in job_ids:
            try:
                await backend.get(job_id)
            except NotFound:
                continue
            living.add(job_id)
        return living

    while True:
        await asyncio.sleep(every)
        try:
            removed = await store.sweep(alive)
            if removed:
                log.info("collected %d unused uploaded files", removed)
        except Exception:
            log.exception("collecting unused uploads failed; trying again later")


def _preview(user: str, spec: JobSpec, backend: str) -> Job:
    """What ``--test-only`` shows: the job as it would be submitted."""
    return pending_job(spec, job_id="0", user=user, backend=backend, reason="DryRun")


async def _read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(
            f"the request is {declared} bytes, over the {limit}-byte limit",
            status=413,
            code="too_large",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequest(
                f"the request is over the {limit}-byte limit", status=413, code="too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


_PATTERN_ERROR = re.compile(
    r"^Expected `str` matching regex '(?P<regex>.*)' - at `\$\.(?P<field>.*)`$"
)


def _validation_message(text: str) -> tuple[str, str | None]:
    """msgspec's message, with a refused pattern said in words (which field, what to change).

    ``Expected `str` matching regex '^[^\\x00]*$' - at `$.spec.args[0]``` says nothing a
    user can act on; ``spec.args[0] must not contain NUL bytes`` does.
    """
    match = _PATTERN_ERROR.match(text)
    if match:
        # msgspec shows the pattern as a repr: its backslashes are doubled.
        hint = PATTERN_HINTS.get(match["regex"].replace("\\\\", "\\"))
        if hint is not None:
            field = match["field"]
            what = field.replace("[...]", " values")  # msgspec's name for a dict's values
            return f"the request was refused: {what} {hint}", field
    return f"the request was refused: {text}", None


async def _handle_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, SpecError):
        return error_response(422, "invalid_spec", exc.message, exc.field)
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.field)
    if isinstance(exc, msgspec.ValidationError):
        message, field = _validation_message(str(exc))
        return error_response(422, "invalid_request", message, field)
    if isinstance(exc, msgspec.DecodeError):
        return error_response(400, "malformed_json", f"the request body is not valid JSON: {exc}")
    if isinstance(exc, HTTPException):
        response = error_response(exc.status_code, "http_error", str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow with a 405
        return response
    if isinstance(exc, KbatchError):
        return error_response(500, "server_error", exc.message)
    log.exception("unhandled error on %s %s", escaped(request.method), escaped(request.url.path))
    return error_response(500, "internal_error", "internal error; the server log has the details")


class AccessLog:
    """One line per request: method, path (never the query string), status, user, time.

    The path and user are escaped (:func:`kbatch.server.logtext.escaped`): a
    ``%0A`` in a path must not write a second, forged line.
    """

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
                escaped(scope["method"]),
                escaped(scope["path"]),
                status,
                escaped(scope.get("state", {}).get("user", "-")),
                (time.perf_counter() - start) * 1000,
            )


_JOB = "{job_id:kbatch_job_id}"
# path -> {method: name of the Api handler}.  One Route per path, so that a 405
# names every method the path has in its Allow header.
ROUTES: dict[str, dict[str, str]] = {
    f"{API_PREFIX}/health": {"GET": "health"},
    f"{API_PREFIX}/openapi.json": {"GET": "openapi"},
    f"{API_PREFIX}/whoami": {"GET": "whoami"},
    f"{API_PREFIX}/events": {"GET": "events"},
    f"{API_PREFIX}/jobs": {"GET": "list_jobs", "POST": "submit"},
    f"{API_PREFIX}/jobs/{_JOB}": {"GET": "get_job"},
    f"{API_PREFIX}/jobs/{_JOB}/cancel": {"POST": "cancel"},
    f"{API_PREFIX}/jobs/{_JOB}/hold": {"POST": "hold"},
    f"{API_PREFIX}/jobs/{_JOB}/release": {"POST": "release"},
    f"{API_PREFIX}/jobs/{_JOB}/logs": {"GET": "logs"},
    f"{API_PREFIX}/jobs/{_JOB}/results": {"GET": "results", "POST": "post_results"},
    f"{API_PREFIX}/jobs/{_JOB}/results/{{digest}}": {"GET": "result_file", "PUT": "put_result"},
    f"{API_PREFIX}/jobs/{_JOB}/code": {"GET": "code"},
    f"{API_PREFIX}/jobs/{_JOB}/code/{{digest}}": {"GET": "code_file"},
    f"{API_PREFIX}/uploads": {"POST": "upload"},
    f"{API_PREFIX}/blobs": {"POST": "put_blobs"},
    f"{API_PREFIX}/blobs/{{digest}}": {"PUT": "put_blob"},
    f"{API_PREFIX}/jobs/{_JOB}/spec": {"GET": "spec"},
    f"{API_PREFIX}/jobs/{_JOB}/update": {"POST": "update"},
}


def _documented(path: str) -> dict[str, tuple[frozenset[str], bool]]:
    """Per method: the query parameters the OpenAPI document gives the route ``path``,
    and whether it needs a token."""
    documented = openapi_document()["paths"][re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)]
    return {
        method.upper(): (
            frozenset(p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"),
            operation.get("security") != [],
        )
        for method, operation in documented.items()
    }


def _route(api: Api, path: str, methods: dict[str, str]) -> Route:
    handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {
        method: getattr(api, name) for method, name in methods.items()
    }
    documented = _documented(path)
    if "GET" in handlers:
        handlers["HEAD"] = handlers["GET"]
        documented["HEAD"] = documented["GET"]

    async def endpoint(request: Request) -> Response:
        # An unknown parameter is refused, not ignored: ?all_user=true (a typo) would
        # otherwise quietly answer with something else than what was asked.  Only to a
        # caller with a token, where the route needs one: anyone else hears 401 first.
        allowed, needs_token = documented[request.method]
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            if needs_token:
                await api.identity(request)
            takes = ", ".join(sorted(allowed)) or "none"
            raise InvalidRequest(
                f"unknown query parameter {unknown[0][:50]!r}; this request takes: {takes}",
                status=422,
                code="invalid_query",
            )
        return await handlers[request.method](request)

    return Route(path, endpoint, methods=list(methods), name=",".join(methods.values()))


def create_app(
    backend: Backend,
    authenticator: Authenticator,
    policy: Policy,
    *,
    prefix: str = "",
    extra_routes: Sequence[BaseRoute] = (),
    uploads: BlobStore | None = None,
) -> Starlette:
    """The app; ``extra_routes`` (the dashboard's) are mounted beside the API's, at ``prefix``.

    ``uploads``: the store of uploaded files (``kbatch submit --code``); without it the
    upload routes answer 404 and jobs may not name uploaded files.
    """
    api = Api(backend, authenticator, policy, uploads)
    backend.limits = policy.user_limits()  # the policy's per-user limits, enforced by the backend
    backend.uploads = uploads
    if uploads is not None:
        uploads.max_result_bytes = policy.max_upload_bytes
        uploads.max_result_files = policy.max_upload_files
    routes: list[BaseRoute] = [_route(api, path, methods) for path, methods in ROUTES.items()]
    routes += extra_routes
    if prefix:
        routes = [Mount(prefix, routes=routes)]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if uploads is not None:
            uploads.open()
        await authenticator.start()
        await backend.start()
        sweeper = None
        if uploads is not None:
            sweeper = asyncio.create_task(_sweep_uploads(uploads, backend), name="kbatch-sweep")
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            await backend.stop()
            await authenticator.stop()
            if uploads is not None:
                uploads.close()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        KbatchError: _handle_error,
        msgspec.DecodeError: _handle_error,
        HTTPException: _handle_error,
        Exception: _handle_error,  # a 500 in the one error shape; the traceback goes to the log
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(AccessLog)
    return app
