"""The API's routes on a real server process, over in-memory backends.

Most tests run twice: over the shared fake backend (``--backend fake``, with
``[fake] slots = 0`` so jobs stay pending) and over a small test backend
loaded by import path (``tests.support.memory_backend:MemoryBackend``) with
its own ``[memory]`` section, which also proves that the server loads a
backend it does not know and hands it its section untouched.  The memory
backend can also report an unhealthy state and its number of event streams.
These tests need no process supervision, so they do not wait on the local
backend.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from kbatch.client import Client
from kbatch.errors import Conflict, NotFound, PermissionDenied, WaitTimeout
from kbatch.models import JobEvent, JobSpec, JobState
from tests.support.polling import wait_for
from tests.support.servers import REPO, KbatchServer

MEMORY = "tests.support.memory_backend:MemoryBackend"
SPEC = JobSpec(script="#!/bin/sh\ntrue\n", name="t")


@pytest.fixture
def make_backend_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., KbatchServer]]:
    started: list[KbatchServer] = []

    def make(backend: str, section: str, **settings: object) -> KbatchServer:
        state = tmp_path_factory.mktemp("kb", numbered=True) / "s"
        config = state.parent / "kbatch.toml"
        lines = [f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
        config.write_text("\n".join(lines) + "\n")
        srv = KbatchServer(
            state,
            args=["--backend", backend, "--config", str(config)],
            extra_env={"PYTHONPATH": str(REPO)},
        )
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def make_memory_server(
    make_backend_server: Callable[..., KbatchServer],
) -> Callable[..., KbatchServer]:
    return lambda **memory: make_backend_server(MEMORY, "memory", **memory)


@pytest.fixture(params=["fake", "memory"])
def mem(
    request: pytest.FixtureRequest, make_backend_server: Callable[..., KbatchServer]
) -> KbatchServer:
    """A server whose jobs stay pending, over either in-memory backend."""
    if request.param == "fake":
        return make_backend_server("fake", "fake", slots=0)
    return make_backend_server(MEMORY, "memory", detail="subscribers")


@pytest.fixture
def memonly(make_memory_server: Callable[..., KbatchServer]) -> KbatchServer:
    """Over the memory backend, whose health reports its number of event streams."""
    return make_memory_server(detail="subscribers")


def raw(
    server: KbatchServer, method: str, path: str, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if method == "POST":
        headers["Content-Length"] = "0"
    conn.request(method, path, None, headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def error(body: bytes) -> dict[str, str]:
    data = json.loads(body)
    assert set(data) == {"error"}
    return data["error"]


def test_every_route_but_health_and_openapi_needs_a_token(mem: KbatchServer) -> None:
    from kbatch.server.app import ROUTES

    with mem.client() as client:
        client.submit(SPEC)
    public = {"/api/v1/health", "/api/v1/openapi.json"}
    for template, methods in ROUTES.items():
        path = template.replace("{job_id:kbatch_job_id}", "1")
        for method in methods:
            for token in (None, "wrong"):
                status, _, body = raw(mem, method, path, token)
                if template in public:
                    assert status == 200, (method, path)
                else:
                    assert status == 401, (method, path, status)
                    assert error(body)["code"] in ("no_token", "invalid_token")
    with mem.client() as client:
        assert client.get("1").state is JobState.PENDING  # no hold, no cancel happened


# -- job ids ---------------------------------------------------------------------------

ODD_IDS = ["²", "1\n", "1" * 25, "9" * 64, "", "1_", "_1", "-1", "1 2", "\u0661", "1%2"]


def test_odd_job_ids_are_the_same_404_as_unknown_ones(mem: KbatchServer) -> None:
    """No id reaches the backend unless a backend could have made it; none is a 500."""
    with mem.client() as client:
        client.submit(SPEC)
    for action, method in (("", "GET"), ("/cancel", "POST"), ("/hold", "POST"),
                           ("/release", "POST"), ("/logs", "GET")):  # fmt: skip
        for job_id in [*ODD_IDS, "999"]:
            path = f"/api/v1/jobs/{quote(job_id, safe='')}{action}"
            status, _, body = raw(mem, method, path, mem.token)
            assert status == 404, (path, status, body)
            shown = job_id if job_id == "999" or job_id == "1" * 25 else repr(job_id)
            assert error(body) == {"code": "not_found", "message": f"no job {shown}"} | (
                {"field": None} if "field" in error(body) else {}
            ), path
    assert "Traceback" not in mem.log()


def test_the_client_refuses_odd_ids_without_a_request(mem: KbatchServer) -> None:
    with mem.client() as client:
        for job_id in ("", "1\n", "²"):
            with pytest.raises(NotFound):
                client.get(job_id)
            with pytest.raises(NotFound):
                client.hold(job_id)


# -- listing ---------------------------------------------------------------------------


def test_list_pages_with_limit_and_after(mem: KbatchServer) -> None:
    with mem.client() as client:
        ids = [client.submit(SPEC).id for _ in range(7)]
        seen: list[str] = []
        after = ""
        pages = 0
        while True:
            query = "limit=3" + (f"&after={quote(after)}" if after else "")
            status, _, body = raw(mem, "GET", f"/api/v1/jobs?{query}", mem.token)
            assert status == 200, body
            page = json.loads(body)
            assert len(page["jobs"]) <= 3
            seen += [j["id"] for j in page["jobs"]]
            pages += 1
            if page.get("next") is None:  # absent on the last page
                break
            after = page["next"]
        assert (seen, pages) == (ids, 3)
        # The client follows the pages and returns every job.
        assert [j.id for j in client.list(page_size=2)] == ids
        assert [j.id for j in client.list()] == ids


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "limit=-1", "limit=x",
                                   "limit=1.5", "limit=", "limit=%C2%B2", "after="])  # fmt: skip
def test_bad_page_parameters_are_422(mem: KbatchServer, query: str) -> None:
    status, _, body = raw(mem, "GET", f"/api/v1/jobs?{query}", mem.token)
    assert status == 422, body
    assert error(body)["code"] == "invalid_query"


@pytest.mark.parametrize("value", ["null", "junk", "", "yes", "2"])
def test_all_users_must_be_a_boolean(mem: KbatchServer, value: str) -> None:
    for route in ("jobs", "events"):
        status, _, body = raw(mem, "GET", f"/api/v1/{route}?all_users={value}", mem.token)
        assert status == 422, (route, body)
        assert "all_users must be true or false" in error(body)["message"]


def test_all_users_accepts_true_false_1_0(mem: KbatchServer) -> None:
    alice = mem.add_token("alice")
    with mem.client(alice) as client:
        client.submit(SPEC)
    for value, count in (("true", 1), ("1", 1), ("TRUE", 1), ("false", 0), ("0", 0)):
        status, _, body = raw(mem, "GET", f"/api/v1/jobs?all_users={value}", mem.token)
        assert status == 200, body
        assert len(json.loads(body)["jobs"]) == count, value
    status, _, body = raw(mem, "GET", "/api/v1/jobs?all_users=1", alice)
    assert (status, error(body)["code"]) == (403, "not_admin")


# -- hold, release, cancel -------------------------------------------------------------


def test_hold_and_release_by_owner_and_admin_only(mem: KbatchServer) -> None:
    alice, bob = mem.add_token("alice"), mem.add_token("bob")
    with mem.client(alice) as a, mem.client(bob) as b, mem.client() as admin:
        job = a.submit(SPEC)
        assert a.hold(job.id).reason == "JobHeldUser"
        assert a.release(job.id).reason != "JobHeldUser"
        assert a.release(job.id).state is JobState.PENDING  # not held: unchanged, no error
        for act in (b.hold, b.release, b.cancel, b.get):
            with pytest.raises(NotFound):
                act(job.id)
        assert admin.hold(job.id).reason == "JobHeldUser"
        assert admin.release(job.id).reason != "JobHeldUser"
        cancelled = admin.cancel(job.id)
        assert (cancelled.state, cancelled.cancelled_by) == (
            JobState.CANCELLED,
            admin.whoami().name,
        )
        with pytest.raises(Conflict) as caught:
            a.hold(job.id)
        assert caught.value.status == 409 and caught.value.code == "not_pending"
        own = a.submit(SPEC)
        assert a.cancel(own.id).cancelled_by == "alice"


def test_a_running_job_cannot_be_held(make_memory_server: Callable[..., KbatchServer]) -> None:
    srv = make_memory_server(autostart=True)
    with srv.client() as client:
        job = client.submit(SPEC)
        assert job.state is JobState.RUNNING
        with pytest.raises(Conflict):
            client.hold(job.id)
        held = client.submit(JobSpec(script=SPEC.script, hold=True))
        assert (held.state, held.reason) == (JobState.PENDING, "JobHeldUser")
        assert client.release(held.id).state is JobState.RUNNING


def test_wait_raises_wait_timeout(mem: KbatchServer) -> None:
    with mem.client() as client:
        job = client.submit(SPEC)
        with pytest.raises(WaitTimeout) as caught:
            client.wait(job.id, poll=0.01, timeout=0.05)
    assert isinstance(caught.value, TimeoutError)


# -- the CLI ---------------------------------------------------------------------------


def test_cli_hold_release_and_submit_hold(mem: KbatchServer, tmp_path: Path) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        result = mem.cli(*args, env={"KBATCH_URL": mem.url, "KBATCH_TOKEN": mem.token})
        return result.returncode, result.stdout, result.stderr

    code, out, err = cli("submit", "--parsable", "--hold", "--wrap", "true")
    assert code == 0, err
    first = out.strip()
    script = tmp_path / "held.sh"
    script.write_text("#!/bin/sh\n#SBATCH -H\n#SBATCH --job-name=held\ntrue\n")
    code, out, err = cli("submit", "--parsable", str(script))
    assert code == 0, err
    second = out.strip()
    with mem.client() as client:
        assert {client.get(i).reason for i in (first, second)} == {"JobHeldUser"}
    assert cli("release", first, second) == (
        0,
        f"job {first} released\njob {second} released\n",
        "",
    )
    assert cli("hold", first) == (0, f"job {first} held\n", "")
    code, out, err = cli("hold", first, "999")
    assert (code, out) == (1, f"job {first} held\n") and "job 999: no job 999" in err
    code, out, err = cli("cancel", first)
    assert code == 0
    code, out, err = cli("hold", first)
    assert code == 1 and "only pending jobs can be held" in err
    code, out, err = cli("show", first)
    assert code == 0 and "CancelledBy: " in out


@pytest.mark.parametrize("command", ["hold", "release", "cancel", "show", "logs"])
def test_cli_refuses_malformed_ids_before_any_request(mem: KbatchServer, command: str) -> None:
    # No server URL: a request would fail differently.  The id check comes first.
    for bad in ("", "1\n", "a/b"):
        result = mem.cli(
            command, bad, env={"KBATCH_URL": "http://127.0.0.1:9", "KBATCH_TOKEN": "x"}
        )
        assert result.returncode == 1
        assert "is not a job id" in result.stderr, result.stderr


# -- events ----------------------------------------------------------------------------


class Reader:
    """Reads an event stream in a thread."""

    def __init__(self, client: Client, **kwargs: bool) -> None:
        self.client = client
        self.events: list[JobEvent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, kwargs=kwargs, daemon=True)
        self.thread.start()
        wait_for(lambda: self.events, timeout=10, what="the stream's first event")
        assert self.events[0].type == "resync" and self.events[0].job is None

    def _run(self, **kwargs: bool) -> None:
        try:
            for event in self.client.events(**kwargs):
                self.events.append(event)
        except BaseException as exc:
            self.error = exc

    def jobs(self) -> list[tuple[str, str, str]]:
        return [(e.job.user, e.job.id, e.job.state.value) for e in self.events if e.job]


def _subscribers(server: KbatchServer) -> int:
    _, _, body = raw(server, "GET", "/api/v1/health")
    return int(json.loads(body)["detail"].split()[0])


def test_events_are_the_callers_jobs_only(mem: KbatchServer) -> None:
    alice, bob = mem.add_token("alice"), mem.add_token("bob")
    with mem.client(alice) as a, mem.client(bob) as b, mem.client() as admin:
        mine, everyone = Reader(mem.client(alice)), Reader(mem.client(), all_users=True)
        theirs = b.submit(SPEC)
        job = a.submit(SPEC)
        a.hold(job.id)
        admin.cancel(job.id)

        def ended() -> bool:
            return ("alice", job.id, "CANCELLED") in mine.jobs()

        wait_for(ended, timeout=10, what="alice's events")
        assert {user for user, _, _ in mine.jobs()} == {"alice"}
        held = [e.job for e in mine.events if e.job and e.job.reason == "JobHeldUser"]
        assert held and held[0].state is JobState.PENDING
        last = mine.events[-1].job
        assert last is not None and last.cancelled_by == admin.whoami().name
        wait_for(lambda: ("alice", job.id, "CANCELLED") in everyone.jobs(), timeout=10, what="all")
        assert ("bob", theirs.id, "PENDING") in everyone.jobs()
        with pytest.raises(PermissionDenied):
            next(iter(a.events(all_users=True)))
        for reader in (mine, everyone):
            reader.client.close()  # from another thread: ends the reader's iteration
            reader.thread.join(timeout=10)
            assert not reader.thread.is_alive()
    assert "Traceback" not in mem.log()


def test_streams_end_when_clients_leave(memonly: KbatchServer) -> None:
    mem = memonly
    readers = [Reader(mem.client()), Reader(mem.client(), all_users=True)]
    assert _subscribers(mem) == 2
    for reader in readers:
        reader.client.close()
        reader.thread.join(timeout=10)
    # No event has happened since: the server noticed the clients leave by itself.
    wait_for(lambda: _subscribers(mem) == 0, timeout=10, what="the streams to end")
    assert "Traceback" not in mem.log()


def test_a_disconnect_ends_the_stream_without_any_event(memonly: KbatchServer) -> None:
    mem = memonly
    parts = urlsplit(mem.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    conn.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {mem.token}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("application/x-ndjson")
    assert json.loads(response.readline()) == {"type": "resync", "job": None}
    assert _subscribers(mem) == 1
    conn.sock.close() if conn.sock else None
    response.close()
    conn.close()
    wait_for(lambda: _subscribers(mem) == 0, timeout=10, what="the stream to end")


# -- health, 405 -----------------------------------------------------------------------


def test_health_is_503_with_the_backends_detail(
    make_memory_server: Callable[..., KbatchServer],
) -> None:
    sick = make_memory_server(healthy=False, detail="the watch cache is stale", stale_seconds=42.5)
    status, _, body = raw(sick, "GET", "/api/v1/health")
    data = json.loads(body)
    assert status == 503
    assert data["status"] == "unavailable" and data["backend"] == "memory"
    assert (data["detail"], data["stale_seconds"]) == ("the watch cache is stale", 42.5)
    well = make_memory_server(stale_seconds=1.5)
    status, _, body = raw(well, "GET", "/api/v1/health")
    assert status == 200 and json.loads(body)["stale_seconds"] == 1.5


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/v1/jobs", {"GET", "HEAD", "POST"}),
        ("DELETE", "/api/v1/jobs/1", {"GET", "HEAD"}),
        ("GET", "/api/v1/jobs/1/hold", {"POST"}),
        ("GET", "/api/v1/jobs/1/cancel", {"POST"}),
        ("POST", "/api/v1/events", {"GET", "HEAD"}),
    ],
)
def test_405_names_the_allowed_methods(
    mem: KbatchServer, method: str, path: str, allowed: set[str]
) -> None:
    status, headers, body = raw(mem, method, path, mem.token)
    assert status == 405
    assert {m.strip() for m in headers["allow"].split(",")} == allowed
    assert error(body)["code"] == "http_error"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs?state=NOPE",
        "/api/v1/jobs?all=maybe",
        "/api/v1/jobs/1/logs?follow=null",
        "/api/v1/jobs/1/logs?stream=both",
    ],
)
def test_bad_query_values_are_422(mem: KbatchServer, path: str) -> None:
    with mem.client() as client:
        client.submit(SPEC)
    status, _, body = raw(mem, "GET", path, mem.token)
    assert status == 422, body
    assert error(body)["code"] in ("invalid_query", "invalid_state", "bad_stream")
