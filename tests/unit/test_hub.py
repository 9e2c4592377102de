"""The hub client, the JupyterHub authenticator and job tokens, without a hub.

The real hub is in tests/jupyterhub; here the pure parts and the failure paths
that are hard to provoke in a real hub (timeouts, garbage answers, caching).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import pytest

from kbatch.errors import AuthenticationError, PermissionDenied, ServiceUnavailable
from kbatch.models import Identity, Job, JobState
from kbatch.server.auth.base import Credentials
from kbatch.server.auth.jupyterhub import JupyterHubAuthenticator, access_scope, decide
from kbatch.server.hub import (
    HubClient,
    HubRefused,
    HubToken,
    HubUser,
    NewToken,
    create_token,
    delete_token,
    identify,
    list_tokens,
    parse_identity,
)
from kbatch.server.job_tokens import JobTokens, token_expiry, token_note

T = TypeVar("T")
HUB = "http://hub.test:8081/hub/api"
SECRET = "s3cret-token-value"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _user(**kw: Any) -> HubUser:
    return HubUser(**{"name": "alice", "scopes": (access_scope("kbatch"),), **kw})


# -- pure requests and responses ------------------------------------------------------


def test_requests() -> None:
    request = identify(SECRET)
    assert (request.method, request.path, request.caller_token) == ("GET", "/user", SECRET)
    assert SECRET not in repr(request)
    made = create_token("a/b@c", note="n", expires_in=60, scopes=["x"])
    assert made.path == "/users/a%2Fb%40c/tokens"
    assert made.body == {"note": "n", "scopes": ["x"], "expires_in": 60}
    assert create_token("a", note="n", expires_in=None, scopes=[]).body == {
        "note": "n",
        "scopes": [],
    }
    assert list_tokens("a").path == "/users/a/tokens"
    assert delete_token("a", "a12").method == "DELETE"


def test_parse_identity() -> None:
    request = identify(SECRET)
    body = json.dumps(
        {"name": "a", "kind": "user", "admin": True, "groups": ["g"], "scopes": ["s"], "x": 1}
    ).encode()
    assert parse_identity(200, body, request, HUB) == HubUser(
        name="a", admin=True, groups=("g",), scopes=("s",)
    )
    assert parse_identity(403, b'{"status": 403, "message": null}', request, HUB) is None
    assert parse_identity(401, b"", request, HUB) is None
    with pytest.raises(ServiceUnavailable) as down:
        parse_identity(502, b"<html>bad gateway</html>", request, HUB)
    assert HUB in down.value.message and down.value.code == "hub_unavailable"
    with pytest.raises(ServiceUnavailable, match="unreadable"):
        parse_identity(200, b"<html>not the hub</html>", request, HUB)


def test_new_tokens_never_show_the_token() -> None:
    token = NewToken(id="a1", token=SECRET, scopes=("x",))
    assert SECRET not in repr(token)


# -- deciding who may call ------------------------------------------------------------


def test_decide() -> None:
    assert decide(_user(), service_name="kbatch", admin_groups=()) == Identity(name="alice")
    with pytest.raises(AuthenticationError) as unknown:
        decide(None, service_name="kbatch", admin_groups=())
    assert unknown.value.status == 401 and "did not accept" in unknown.value.message
    with pytest.raises(PermissionDenied) as scope:
        decide(
            _user(scopes=("access:services!service=other",)), service_name="kbatch", admin_groups=()
        )
    assert scope.value.status == 403 and "access:services!service=kbatch" in scope.value.message
    admin = decide(
        _user(scopes=("access:services",), admin=True), service_name="kbatch", admin_groups=()
    )
    assert admin.admin
    grouped = decide(_user(groups=("ops", "x")), service_name="kbatch", admin_groups=("ops",))
    assert grouped == Identity(name="alice", admin=True, groups=("ops", "x"))
    assert not decide(_user(groups=("x",)), service_name="kbatch", admin_groups=("ops",)).admin
    with pytest.raises(PermissionDenied, match="not a hub user"):
        decide(_user(kind="service"), service_name="kbatch", admin_groups=())


class FakeHub(HubClient):
    def __init__(self) -> None:
        super().__init__(HUB, "service-token")
        self.users: dict[str, HubUser] = {}
        self.calls = 0
        self.down = False
        self.created: list[dict[str, Any]] = []
        self.tokens: dict[str, list[HubToken]] = {}
        self.deleted: list[str] = []

    async def identify(self, token: str) -> HubUser | None:
        self.calls += 1
        if self.down:
            raise ServiceUnavailable("down", status=503, code="hub_unavailable")
        return self.users.get(token)

    async def create_token(
        self, user: str, *, note: str, expires_in: int | None, scopes: list[str]
    ) -> NewToken:
        if self.down:
            raise ServiceUnavailable("down", status=503, code="hub_unavailable")
        token_id = f"a{len(self.created)}"
        self.created.append(
            {"user": user, "note": note, "expires_in": expires_in, "scopes": scopes}
        )
        self.tokens.setdefault(user, []).append(HubToken(id=token_id, note=note))
        return NewToken(id=token_id, token=f"job-token-{token_id}", scopes=tuple(scopes))

    async def list_tokens(self, user: str) -> list[HubToken]:
        if self.down:
            raise ServiceUnavailable("down", status=503, code="hub_unavailable")
        if user == "gone":
            raise HubRefused("no such user", status=502, code="hub_refused")
        return list(self.tokens.get(user, []))

    async def delete_token(self, user: str, token_id: str) -> None:
        self.tokens[user] = [t for t in self.tokens[user] if t.id != token_id]
        self.deleted.append(token_id)


def test_the_cache_is_keyed_by_a_hash_and_expires() -> None:
    hub = FakeHub()
    hub.users[SECRET] = _user()
    now = [100.0]
    auth = JupyterHubAuthenticator(
        hub, service_name="kbatch", cache_seconds=30, clock=lambda: now[0]
    )
    assert run(auth.authenticate(Credentials.bearer(SECRET))).name == "alice"
    assert run(auth.authenticate(Credentials.bearer(SECRET))).name == "alice"
    assert hub.calls == 1
    assert list(auth._cache) == [hashlib.sha256(SECRET.encode()).hexdigest()]
    assert SECRET not in repr(auth._cache)
    now[0] += 31
    del hub.users[SECRET]  # revoked at the hub: noticed once the cache has expired
    with pytest.raises(AuthenticationError):
        run(auth.authenticate(Credentials.bearer(SECRET)))
    assert hub.calls == 2
    with pytest.raises(AuthenticationError):
        run(auth.authenticate(Credentials.bearer(SECRET)))  # refusals are cached too
    assert hub.calls == 2


def test_an_unreachable_hub_is_not_cached() -> None:
    hub = FakeHub()
    hub.users[SECRET] = _user()
    hub.down = True
    auth = JupyterHubAuthenticator(hub, service_name="kbatch")
    for _ in range(2):
        with pytest.raises(ServiceUnavailable):
            run(auth.authenticate(Credentials.bearer(SECRET)))
    hub.down = False
    assert run(auth.authenticate(Credentials.bearer(SECRET))).name == "alice"
    assert hub.calls == 3


def test_no_token_is_401() -> None:
    auth = JupyterHubAuthenticator(FakeHub(), service_name="kbatch")
    for token in (None, ""):
        with pytest.raises(AuthenticationError) as error:
            run(auth.authenticate(Credentials.bearer(token)))
        assert error.value.code == "no_token"


def test_implausible_tokens_are_401_without_asking_the_hub() -> None:
    hub = FakeHub()
    auth = JupyterHubAuthenticator(hub, service_name="kbatch")
    for token in ("caf\u00e9", "a b", "x" * 2000, "tab\there"):
        with pytest.raises(AuthenticationError) as error:
            run(auth.authenticate(Credentials.bearer(token)))
        assert error.value.code == "invalid_token"
    assert hub.calls == 0


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import kbatch.server.auth.jupyterhub as module

    monkeypatch.setattr(module, "MAX_CACHED", 3)
    hub = FakeHub()
    auth = JupyterHubAuthenticator(hub, service_name="kbatch")
    for i in range(10):
        with pytest.raises(AuthenticationError):
            run(auth.authenticate(Credentials.bearer(f"t{i}")))
    assert len(auth._cache) == 3


# -- the client's I/O -----------------------------------------------------------------


def _client(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> HubClient:
    return HubClient(HUB, "service-token", transport=httpx.MockTransport(handler), **kw)


def test_the_client_sends_the_right_token() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers["authorization"]))
        if request.url.path.endswith("/user"):
            return httpx.Response(200, json={"name": "alice", "kind": "user", "scopes": []})
        return httpx.Response(201, json={"id": "a7", "token": "new", "scopes": ["x"]})

    async def go() -> None:
        client = _client(handler)
        await client.start()
        assert (await client.identify(SECRET)) == HubUser(name="alice")
        token = await client.create_token("alice", note="n", expires_in=1, scopes=["x"])
        assert (token.id, token.token) == ("a7", "new")
        await client.aclose()

    run(go())
    assert seen == [
        ("/hub/api/user", f"token {SECRET}"),
        ("/hub/api/users/alice/tokens", "token service-token"),
    ]


def test_an_unreachable_hub_is_503_naming_it_and_fails_fast() -> None:
    calls = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        raise httpx.ConnectError("All connection attempts failed", request=request)

    async def go() -> None:
        client = _client(handler, retry_after=60)
        for _ in range(3):
            with pytest.raises(ServiceUnavailable) as error:
                await client.identify(SECRET)
            assert error.value.status == 503 and error.value.code == "hub_unavailable"
            assert f"JupyterHub is not reachable at {HUB}" in error.value.message
            assert SECRET not in error.value.message
        await client.aclose()

    run(go())
    assert calls[0] == 1  # within retry_after the hub is not asked again


def test_the_client_recovers_after_retry_after() -> None:
    up = [False]

    def handler(request: httpx.Request) -> httpx.Response:
        if not up[0]:
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json={"name": "alice"})

    async def go() -> None:
        client = _client(handler, retry_after=0)
        with pytest.raises(ServiceUnavailable, match="timed out"):
            await client.identify(SECRET)
        up[0] = True
        assert (await client.identify(SECRET)) == HubUser(name="alice")
        await client.aclose()

    run(go())


def test_refusals_carry_the_hubs_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(404, json={"status": 404, "message": "no such token"})
        return httpx.Response(
            400, json={"status": 400, "message": "Not assigning requested scopes x"}
        )

    async def go() -> None:
        client = _client(handler)
        with pytest.raises(HubRefused) as error:
            await client.create_token("bob", note="n", expires_in=None, scopes=["x"])
        assert error.value.status == 502
        assert error.value.message == (
            f"JupyterHub at {HUB} refused to create a token for bob "
            "(HTTP 400: Not assigning requested scopes x)"
        )
        await client.delete_token("bob", "a1")  # already gone is fine
        await client.aclose()

    run(go())


# -- job tokens -----------------------------------------------------------------------


def _job(job_id: str = "7", time_limit: int | None = None, user: str = "alice") -> Job:
    return Job(
        id=job_id,
        user=user,
        name="j",
        state=JobState.RUNNING,
        submitted=datetime.now(UTC),
        time_limit=time_limit,
    )


def test_token_expiry_and_note() -> None:
    assert token_expiry(_job(time_limit=600), default=86400, margin=300) == 900
    assert token_expiry(_job(), default=86400, margin=300) == 86400
    assert token_note("kbatch", "7") == "kbatch job 7 (service kbatch)"


def test_a_job_gets_a_token_and_loses_it() -> None:
    hub = FakeHub()
    hooks = JobTokens(hub, service_name="kbatch", scopes=["s"], default_expiry=100, margin=5)

    async def go() -> None:
        env = await hooks.environment(_job(time_limit=60))
        assert env == {
            "JUPYTERHUB_API_TOKEN": "job-token-a0",
            "JUPYTERHUB_API_URL": HUB,
            "JUPYTERHUB_USER": "alice",
        }
        assert hub.created == [
            {"user": "alice", "note": token_note("kbatch", "7"), "expires_in": 65, "scopes": ["s"]}
        ]
        hub.tokens["alice"].append(HubToken(id="mine", note="the user's own"))
        await hooks.finished(_job())
        assert [t.id for t in hub.tokens["alice"]] == ["mine"]

    run(go())


def test_revocation_waits_for_the_hub() -> None:
    hub = FakeHub()
    hooks = JobTokens(hub, service_name="kbatch", scopes=["s"], default_expiry=100)

    async def go() -> None:
        await hooks.environment(_job("1"))
        hub.down = True
        await hooks.finished(_job("1"))  # logged, kept for later
        await hooks.finished(_job("2", user="gone"))
        with pytest.raises(ServiceUnavailable):
            await hooks.environment(_job("3"))
        hub.down = False
        await hooks.environment(_job("3"))  # the next job start revokes what is due
        assert [t.note for t in hub.tokens["alice"]] == [token_note("kbatch", "3")]
        assert not hooks._unrevoked  # a user the hub no longer knows is given up on

    run(go())


def test_the_server_never_imports_jupyterhub() -> None:
    code = (
        "import kbatch.server.main, kbatch.server.auth.jupyterhub, kbatch.server.hub, "
        "kbatch.server.job_tokens, sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jupyterhub', 'tornado')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_server_extra_needs_no_jupyterhub() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert not [d for d in extras["server"] if d.lower().startswith("jupyterhub")]
    assert [d for d in extras["server"] if d.startswith("httpx")]
