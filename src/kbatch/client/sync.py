"""The blocking client, on the standard library's ``http.client``.

``http.client`` keeps the CLI's start-up small (see NOTES.md: it costs a
fraction of httpx's import time); TLS is imported only for ``https`` URLs.
"""

from __future__ import annotations

import builtins
import contextlib
import http.client
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from kbatch.client import requests as rq
from kbatch.client.config import ClientConfig, discover_config
from kbatch.errors import ConfigError, SpecError, TransportError, WaitTimeout
from kbatch.lifecycle import parse_job_ref
from kbatch.models import Identity, Job, JobEvent, JobList, JobSpec

if TYPE_CHECKING:
    from kbatch.client.transfer import Progress
    from kbatch.uploads.manifest import FileEntry, Manifest, UploadAnswer
    from kbatch.uploads.tree import LocalFile

__all__ = ["Client"]

T = TypeVar("T")
RETRY_STATUSES = frozenset({502, 503, 504})
PAGE_SIZE = 5000  # jobs per request when listing; list() follows the pages
HUB_RETRY_FOR = 2.0  # seconds of retries for a service found through JupyterHub
BLOCK = 1024 * 1024  # bytes per write of a streamed upload
SMALL_FILE = 1024 * 1024  # files up to this size travel many to a request ...
BATCH_BYTES = 16 * 1024 * 1024  # ... up to about this many bytes
BATCH_FILES = 2000


def _job_id(job_id: str) -> str:
    """The id if it could be one (else NotFound, as the server would say, without asking)."""
    return str(parse_job_ref(job_id))


class Client:
    """A connection to one kbatch server.

    Every request of the API is safe to repeat (GETs, cancel, and submit, which
    carries an idempotency key), so each is retried on connection errors and
    502/503/504 until ``retry_for`` seconds have passed: a restart is invisible.
    """

    def __init__(
        self, url: str, token: str | None = None, *, timeout: float = 30.0, retry_for: float = 10.0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"server URL {url!r} must start with http:// or https:// and name a host"
            )
        self.url = url.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._retry_for = retry_for
        self._conn: http.client.HTTPConnection | None = None
        self._refused_hint: str | None = None  # what to say when no one listens at the URL

    @classmethod
    def from_config(cls, config: ClientConfig | None = None, **kwargs: float) -> Client:
        config = config or discover_config()
        client = cls(config.url, config.token, **kwargs)
        if config.via_hub:
            # A hub's service that refuses connections is down with the hub (a managed
            # service stops with it): say so after a brief retry, not after 10 s, and
            # never suggest starting a server of one's own.
            client._retry_for = min(client._retry_for, HUB_RETRY_FOR)
            client._refused_hint = (
                "connection refused: the kbatch service of your JupyterHub is not running "
                "(the hub is down or restarting?).  Try again in a minute; if it lasts, "
                "tell your hub admin"
            )
        return client

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; also ends a stream (logs, events) read by another thread."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.sock is not None:
                with contextlib.suppress(OSError):  # wakes a reader blocked on the socket
                    conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    # -- the API -------------------------------------------------------------

    def submit(
        self, spec: JobSpec, *, idempotency_key: str | None = None, dry_run: bool = False
    ) -> Job:
        key = idempotency_key or os.urandom(16).hex()  # uuid would import platform: 3 ms
        return self._call(rq.submit_job(spec, idempotency_key=key, dry_run=dry_run), Job)

    def get(self, job_id: str) -> Job:
        return self._call(rq.get_job(_job_id(job_id)), Job)

    def list(
        self,
        *,
        states: Sequence[str] = (),
        include_finished: bool = False,
        all_users: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> list[Job]:
        return self.list_page(
            states=states,
            include_finished=include_finished,
            all_users=all_users,
            page_size=page_size,
        ).jobs

    def list_page(
        self,
        *,
        states: Sequence[str] = (),
        include_finished: bool = False,
        all_users: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> JobList:
        """Every matching job, oldest first, fetched ``page_size`` at a time, as one list
        with what the server says of it (``stale_seconds``: the most of any page)."""
        jobs: list[Job] = []
        after: str | None = None
        stale: float | None = None
        while True:
            request = rq.list_jobs(
                states=states,
                include_finished=include_finished,
                all_users=all_users,
                limit=page_size,
                after=after,
            )
            page = self._call(request, JobList)
            jobs.extend(page.jobs)
            if page.stale_seconds is not None:
                stale = max(stale or 0.0, page.stale_seconds)
            if page.next is None or page.next == after or not page.jobs:
                return JobList(jobs=jobs, stale_seconds=stale)
            after = page.next

    def cancel(self, job_id: str) -> Job:
        """Cancel a job, an array (``123``), a task (``123_7``) or tasks (``123_[1-5,9]``)."""
        return self._call(rq.cancel_job(_job_id(job_id)), Job)

    def spec(self, job_id: str) -> JobSpec:
        """The spec the job was submitted with; a task's is its array's (resubmit uses it)."""
        return self._call(rq.job_spec(_job_id(job_id)), JobSpec)

    def update(self, job_id: str, *, throttle: int | None) -> Job:
        """Change how many tasks of array ``job_id`` may run at once (0 or None: no limit)."""
        if throttle is not None and throttle < 0:
            raise ValueError(
                f"throttle must be a number of tasks (0 or None: no limit), not {throttle}"
            )
        return self._call(rq.update_job(_job_id(job_id), throttle=throttle), Job)

    def hold(self, job_id: str) -> Job:
        """Keep a pending job from starting (Conflict if it has started)."""
        return self._call(rq.hold_job(_job_id(job_id)), Job)

    def release(self, job_id: str) -> Job:
        """Let a held job start; a job not held is returned unchanged."""
        return self._call(rq.release_job(_job_id(job_id)), Job)

    def dashboard_link(self) -> str:
        """A single-use link that logs a browser in to the dashboard (valid two minutes)."""
        code = self._call(rq.dashboard_login_code(), rq.LoginCode)
        return f"{self.url.rstrip('/')}/{code.path}"

    def whoami(self) -> Identity:
        return self._call(rq.whoami(), Identity)

    def logs(self, job_id: str, *, follow: bool = False, stream: str = "output") -> Iterator[bytes]:
        """The job's output as it arrives; with ``follow`` until the job ends."""
        response, body = self._send(rq.job_logs(_job_id(job_id), follow=follow, stream=stream))
        if response.status >= 400:
            raise rq.error_from(response.status, response.read() if body is None else body)
        try:
            while chunk := response.read1(65536):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(
                f"lost the connection to {self.url} while reading logs: {exc}"
            ) from exc
        finally:
            response.close()
            self.close()  # the streamed connection is not reused

    def events(self, *, all_users: bool = False) -> Iterator[JobEvent]:
        """Changes of your jobs (everyone's for an admin with ``all_users``) as they happen.

        Endless: stop iterating, or :meth:`close` the client (from any thread), to end it.  The first
        event, of type ``resync``, comes once the stream is live: list the jobs
        then and no change is missed.  A later ``resync`` means some changes
        were dropped: list the jobs again.
        """
        response, body = self._send(rq.events(all_users=all_users))
        if response.status >= 400:
            raise rq.error_from(response.status, response.read() if body is None else body)
        conn = self._conn
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(None)  # a quiet stream is not a dead server
        try:
            while line := response.readline():
                event = rq.parse_event(line)
                if event is not None:
                    yield event
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(
                f"lost the connection to {self.url} while reading events: {exc}"
            ) from exc
        finally:
            response.close()
            self.close()  # the streamed connection is not reused

    # -- files: upload (submit --code) and results (fetch) --------------------

    def upload(
        self,
        path: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        on_plan: Callable[[int, int], None] | None = None,
    ) -> UploadAnswer:
        """Upload a folder (or one file) for jobs to run in; returns the upload, whose
        ``id`` a :class:`JobSpec` names as ``code``.

        ``.gitignore`` and ``.kbatchignore`` are honoured.  Only the files the server
        lacks (of those you sent before) are sent; ``on_plan(files, bytes)`` is told how
        much that is before it starts, ``progress(bytes)`` as it goes (hashing first).
        """
        from kbatch.paths import state_dir
        from kbatch.uploads.tree import HashCache, manifest_of, walk

        files = walk(path)
        manifest = manifest_of(files, cache=HashCache.for_folder(path, state_dir() / "hashes"))
        return self.upload_files(files, manifest, progress=progress, on_plan=on_plan)

    def upload_files(
        self,
        files: Sequence[LocalFile],
        manifest: Manifest,
        *,
        progress: Progress | None = None,
        on_plan: Callable[[int, int], None] | None = None,
    ) -> UploadAnswer:
        """Send what the server lacks of ``manifest`` (whose files are ``files``), then it."""
        import msgspec

        from kbatch.uploads.manifest import UploadAnswer, check_manifest

        sources = {entry.sha256: file for entry, file in zip(manifest.files, files, strict=True)}
        manifest = check_manifest(manifest, max_bytes=None, max_files=None)
        body = msgspec.json.encode(manifest)
        answer = self._call(rq.upload_manifest(body), UploadAnswer)
        if answer.complete:
            return answer
        sizes = {entry.sha256: entry.size for entry in manifest.files}
        if on_plan is not None:
            on_plan(len(answer.missing), sum(sizes[d] for d in answer.missing))
        small = [d for d in answer.missing if sizes[d] <= SMALL_FILE]
        for digest in answer.missing:
            if sizes[digest] > SMALL_FILE:
                request = rq.put_blob(digest, sizes[digest])
                self._put_file(request, sources[digest].source, progress)
        batch: list[tuple[str, Path, int]] = []
        for digest in small:
            batch.append((digest, sources[digest].source, sizes[digest]))
            if sum(size for _, _, size in batch) >= BATCH_BYTES or len(batch) >= BATCH_FILES:
                self._put_batch(batch, progress)
                batch = []
        if batch:
            self._put_batch(batch, progress)
        answer = self._call(rq.upload_manifest(body), UploadAnswer)
        if not answer.complete:
            raise TransportError(
                f"the server still lacks {len(answer.missing)} of the files just sent "
                "(collected meanwhile?); submit again"
            )
        return answer

    def _put_batch(self, files: Sequence[tuple[str, Path, int]], progress: Progress | None) -> None:
        """Many small files in one request: a frame each (``<sha256> <size>\\n`` + bytes)."""

        def frames() -> Iterator[bytes]:
            for digest, source, size in files:
                yield f"{digest} {size:016x}\n".encode()
                with open(source, "rb") as handle:
                    data = handle.read(size)
                # A file that shrank since it was hashed: its frame keeps its size (the
                # server then refuses it as changed); one that grew is cut at its size.
                yield data + bytes(size - len(data))

        total = sum(82 + size for _, _, size in files)
        self._stream(rq.put_blobs(total), frames, progress=progress)

    def _put_file(self, request: rq.Request, source: Path, progress: Progress | None) -> None:
        """PUT one file, streamed from disk; retried (from the start) on a lost connection."""

        def blocks() -> Iterator[bytes]:
            with open(source, "rb", buffering=0) as handle:
                while block := handle.read(BLOCK):
                    yield block

        try:
            self._stream(request, blocks, progress=progress)
        except (FileNotFoundError, PermissionError) as exc:
            raise TransportError(f"cannot read {source}: {exc.strerror}") from exc

    def _stream(
        self,
        request: rq.Request,
        body: Callable[[], Iterator[bytes]],
        *,
        progress: Progress | None,
    ) -> None:
        """Send ``request`` with the blocks ``body()`` yields; retried (from the start) on a
        lost connection, telling ``progress`` to take back what the failed try sent."""
        headers = {"User-Agent": "kbatch-client", "Accept": "application/json", **request.headers}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        deadline = time.monotonic() + self._retry_for
        delay = 0.05
        while True:
            sent = 0
            try:
                conn = self._connection()
                conn.putrequest(
                    request.method, self._base_path + request.path, skip_accept_encoding=True
                )
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                for block in body():
                    conn.send(block)
                    sent += len(block)
                    if progress is not None:
                        progress(len(block))
                response = conn.getresponse()
                answer = response.read()
            except (FileNotFoundError, PermissionError):
                self.close()
                raise
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if progress is not None and sent:
                    progress(-sent)
                if time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise TransportError(
                    f"cannot send files to the kbatch server at {self.url}: {_reason(exc)}"
                ) from exc
            if response.will_close:
                self.close()
            if response.status >= 400:
                raise rq.error_from(response.status, answer)
            return

    def results(self, job_id: str, *, wait: float = 60.0) -> Manifest:
        """What the ended job left in its code directory that is new or changed.

        A job that has just ended may still have its results being kept: that is
        waited for, up to ``wait`` seconds.
        """
        from kbatch.errors import Conflict
        from kbatch.uploads.manifest import Manifest

        deadline = time.monotonic() + wait
        while True:
            try:
                return self._call(rq.job_results(_job_id(job_id)), Manifest)
            except Conflict as exc:
                if exc.code != "collecting" or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def fetch(
        self,
        job_id: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        results: Sequence[str] = (),
        ignore: Sequence[str] = (),
        progress: Progress | None = None,
        on_plan: Callable[[int, int], None] | None = None,
    ) -> builtins.list[Path]:
        """Download the job's results into ``dest`` (default ``./kbatch-ID/``); an
        array's, each ended task's into ``dest/<task index>/``.

        ``results``/``ignore``: gitignore-style patterns of the files to fetch or leave
        out.  A file already there with the same content is not fetched again.  Returns
        the paths written (or already there).  A result path that would leave ``dest``
        is refused before anything is written.
        """
        from kbatch.client.transfer import already_there, choose_results, result_target

        job_id = _job_id(job_id)
        target = Path(dest) if dest is not None else Path(f"kbatch-{job_id}")
        job = self.get(job_id)
        if job.array_counts is not None:  # an array, or some of its tasks (ID_[1-5])
            return self._fetch_array(job, target, results, ignore, progress, on_plan)
        chosen = choose_results(self.results(job_id), results=results, ignore=ignore)
        for entry in chosen:
            result_target(target, entry.path)  # every path is checked before any is written
        target.mkdir(parents=True, exist_ok=True)
        todo = [e for e in chosen if not already_there(result_target(target, e.path), e)]
        if on_plan is not None:
            on_plan(len(todo), sum(e.size for e in todo))
        for entry in todo:
            self._download(rq.job_result_file(job_id, entry.sha256), target, entry, progress)
        return [result_target(target, e.path) for e in chosen]

    def _fetch_array(
        self,
        array: Job,
        target: Path,
        results: Sequence[str],
        ignore: Sequence[str],
        progress: Progress | None,
        on_plan: Callable[[int, int], None] | None,
    ) -> builtins.list[Path]:
        """Each ended task's results into its own subfolder, ``target/<index>/``."""
        tasks = [
            job
            for job in self.list(include_finished=True)
            if job.array_job_id == array.array_job_id and job.array_task_id is not None
        ]
        if array.id != array.array_job_id:  # some tasks only: ID_[1-5]
            from kbatch.arrays import IndexSet

            chosen = set(IndexSet.parse(array.array_tasks or ""))
            tasks = [t for t in tasks if t.array_task_id in chosen]
        written: builtins.list[Path] = []
        for task in sorted(tasks, key=lambda t: t.array_task_id or 0):
            if not task.state.is_terminal:
                continue  # not ended: fetch the array again later for it
            written += self.fetch(
                task.id,
                target / str(task.array_task_id),
                results=results,
                ignore=ignore,
                progress=progress,
                on_plan=on_plan,
            )
        return written

    def _download(
        self, request: rq.Request, dest: Path, entry: FileEntry, progress: Progress | None
    ) -> None:
        """GET one file into ``dest`` at ``entry.path``, checked against its sha256."""
        from kbatch.client.transfer import write_verified

        response, body = self._send(request)
        if response.status >= 400:
            raise rq.error_from(response.status, response.read() if body is None else body)
        try:
            write_verified(dest, entry, _blocks(response), progress)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            if isinstance(exc, OSError) and exc.filename is not None:
                raise SpecError(f"cannot write {exc.filename}: {exc.strerror}") from exc
            raise TransportError(f"lost the connection to {self.url}: {exc}") from exc
        finally:
            response.close()
        if response.will_close:
            self.close()

    def wait(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None) -> Job:
        """Poll until the job has ended; :class:`~kbatch.errors.WaitTimeout` after ``timeout`` s.

        An array (``123``, or some of its tasks ``123_[1-5]``) has ended when all its
        tasks have: the job returned is the aggregate, ``exit_code`` the highest."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.state.is_terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} is still {job.state} after {timeout} s")
            time.sleep(poll)

    # -- transport -----------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
        return self._conn

    def _send(
        self, request: rq.Request, *, read: bool = False
    ) -> tuple[http.client.HTTPResponse, bytes | None]:
        """The response, and its body when it had to be read already (always with ``read``).

        With ``read``, a response cut off in its body is retried like a lost
        connection: every request is safe to repeat (submit carries its
        idempotency key, so a repeat answers with the job already made).

        Connection errors and 502/503/504 from something in front of the server
        (a proxy while the server restarts) are retried; a 503 in kbatch's own
        error shape is the server's considered answer (e.g. the hub is down) and
        is returned at once, so the user hears of it without waiting.
        """
        headers = {"Accept": "application/json", "User-Agent": "kbatch-client", **request.headers}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        deadline = time.monotonic() + self._retry_for
        delay = 0.05
        while True:
            try:
                conn = self._connection()
                conn.request(request.method, self._base_path + request.path, request.body, headers)
                response = conn.getresponse()
                body = response.read() if read else None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                reason = _reason(exc)
                if isinstance(exc, ConnectionRefusedError) and self._refused_hint:
                    reason = self._refused_hint
                raise TransportError(
                    f"cannot reach the kbatch server at {self.url}: {reason}"
                ) from exc
            if response.status in RETRY_STATUSES:
                body = response.read() if body is None else body
                if rq.is_error_body(body) or time.monotonic() + delay >= deadline:
                    return response, body
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            return response, body

    def _call(self, request: rq.Request, type: type[T]) -> T:
        response, body = self._send(request, read=True)
        assert body is not None
        if response.will_close:
            self.close()
        return rq.parse(response.status, body, type)


def _blocks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while block := response.read(BLOCK):
        yield block


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return (
            "connection refused (is the server running? start it with 'kbatch server --background')"
        )
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
