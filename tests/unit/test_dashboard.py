"""The dashboard's server side without a browser: sessions, login codes, CSRF, headers,
the spec route's owner check, the hub OAuth requests and settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from kbatch.backends.fake import FakeBackend
from kbatch.errors import AuthenticationError, ServiceUnavailable
from kbatch.models import Identity
from kbatch.server.app import create_app
from kbatch.server.auth.base import Authenticator, Credentials
from kbatch.server.dashboard import (
    CSP,
    Dashboard,
    DashboardAuthenticator,
    SecurityHeaders,
    hub_oauth_settings,
)
from kbatch.server.dashboard.sessions import LOGIN_CODE_SECONDS, Sessions
from kbatch.server.hub import oauth_token, parse_oauth_token
from kbatch.server.policy import Policy

TOKENS = {"alice-token": Identity(name="alice"), "bob-token": Identity(name="bob")}
ORIGIN = "http://testserver"


class Tokens(Authenticator):
    async def authenticate(self, credentials: Credentials) -> Identity:
        identity = TOKENS.get(credentials.token or "")
        if identity is None:
            raise AuthenticationError("no", status=401, code="invalid_token")
        return identity


@pytest.fixture
def client() -> Iterator[TestClient]:
    backend = FakeBackend()
    auth = DashboardAuthenticator(Tokens(), Sessions())
    dashboard = Dashboard(backend, auth)
    app = create_app(backend, auth, Policy(), extra_routes=dashboard.routes())
    app.add_middleware(SecurityHeaders, sessions=auth.sessions)
    with TestClient(app, follow_redirects=False) as test_client:
        yield test_client


def login(client: TestClient, token: str) -> str:
    """Log the client in as the owner of ``token``; the session's CSRF token."""
    code = client.post("/dashboard/login-code", headers={"Authorization": f"Bearer {token}"})
    assert code.status_code == 200, code.text
    path = code.json()["path"]
    answer = client.get("/" + path)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and token not in cookie
    again = client.get("/" + path)  # single use
    assert again.status_code == 403
    session = client.get("/dashboard/session").json()
    csrf: str = session["csrf"]
    return csrf


def submit(client: TestClient, csrf: str, name: str = "j") -> str:
    spec = {
        "spec": {
            "script": "#!/bin/sh\necho hi\n",
            "name": name,
            "workdir": "/tmp",
            "environment": {"SECRET": "x"},
        }
    }
    answer = client.post(
        "/api/v1/jobs", json=spec, headers={"X-Kbatch-CSRF": csrf, "Origin": ORIGIN}
    )
    assert answer.status_code == 201, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def test_pages_carry_a_strict_policy(client: TestClient) -> None:
    answer = client.get("/")
    assert answer.status_code == 401  # no session: asks for `kbatch dashboard`
    assert answer.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP
    assert answer.headers["x-frame-options"] == "DENY"
    assert client.get("/api/v1/health").headers["content-security-policy"] == CSP
    csrf = login(client, "alice-token")
    page = client.get("/")
    assert page.status_code == 200 and '<base href="/">' in page.text
    assert "<script>" not in page.text and csrf not in page.text and "alice-token" not in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "innerHTML" not in script.text


def test_actions_need_the_csrf_token_and_our_origin(client: TestClient) -> None:
    csrf = login(client, "alice-token")
    job_id = submit(client, csrf)
    url = f"/api/v1/jobs/{job_id}/cancel"
    refused = [
        client.post(url, headers={"Origin": ORIGIN}),
        client.post(url, headers={"Origin": ORIGIN, "X-Kbatch-CSRF": csrf + "x"}),
        client.post(url, headers={"X-Kbatch-CSRF": csrf}),
        client.post(url, headers={"Origin": "http://evil.example", "X-Kbatch-CSRF": csrf}),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert client.get(f"/api/v1/jobs/{job_id}").json()["state"] != "CANCELLED"
    done = client.post(url, headers={"Origin": ORIGIN, "X-Kbatch-CSRF": csrf})
    assert done.status_code == 200 and done.json()["cancelled_by"] == "alice"


def test_the_spec_is_the_owners_only(client: TestClient) -> None:
    csrf = login(client, "alice-token")
    job_id = submit(client, csrf, name="<b>x</b>")
    own = client.get(f"/dashboard/jobs/{job_id}/spec").json()
    assert own["name"] == "<b>x</b>" and own["environment"] == {"SECRET": "x"}
    bob = client.get(
        f"/dashboard/jobs/{job_id}/spec", headers={"Authorization": "Bearer bob-token"}
    )
    assert bob.status_code == 404
    admin = Identity(name="root", admin=True)
    TOKENS["root-token"] = admin
    try:
        seen = client.get(
            f"/dashboard/jobs/{job_id}/spec", headers={"Authorization": "Bearer root-token"}
        ).json()
    finally:
        del TOKENS["root-token"]
    assert seen["script"].startswith("#!/bin/sh") and seen.get("environment", {}) == {}
    assert client.get("/dashboard/jobs/..%2F/spec").status_code == 404
    events = client.get(
        "/dashboard/events?all_users=true", headers={"Authorization": "Bearer bob-token"}
    )
    assert events.status_code == 403


def test_login_codes_expire_and_are_single_use() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    code = sessions.login_code("tok")
    assert sessions.redeem(code) == "tok" and sessions.redeem(code) is None
    late = sessions.login_code("tok")
    now[0] += LOGIN_CODE_SECONDS + 1
    assert sessions.redeem(late) is None
    session_id, session = sessions.create("tok")
    assert "tok" not in repr(session) and sessions.get(session_id) == session
    sessions.end(session_id)
    assert sessions.get(session_id) is None
    state = sessions.oauth_state()
    assert sessions.check_state(state) and not sessions.check_state(state)


def test_hub_oauth_settings_follow_jupyterhub() -> None:
    defaults = hub_oauth_settings(
        {}, service_name="kbatch", prefix="/services/kbatch", admin_groups=()
    )
    assert defaults.client_id == "service-kbatch"
    assert defaults.redirect_uri == "/services/kbatch/oauth_callback"
    assert defaults.authorize_url == "/hub/api/oauth2/authorize"
    managed = hub_oauth_settings(
        {
            "JUPYTERHUB_CLIENT_ID": "service-x",
            "JUPYTERHUB_OAUTH_CALLBACK_URL": "https://h/services/x/oauth_callback",
            "JUPYTERHUB_HOST": "https://h",
            "JUPYTERHUB_BASE_URL": "/jh/",
        },
        service_name="x",
        prefix="/jh/services/x",
        admin_groups=(),
    )
    assert managed.authorize_url == "https://h/jh/hub/api/oauth2/authorize"
    assert managed.redirect_uri == "https://h/services/x/oauth_callback"


def test_the_oauth_token_request_and_answer() -> None:
    request = oauth_token(
        "c0de", client_id="service-kbatch", client_secret="s3cret", redirect_uri="/cb"
    )
    assert (request.method, request.path) == ("POST", "/oauth2/token")
    assert request.form is not None and request.form["grant_type"] == "authorization_code"
    assert "s3cret" not in repr(request) and "c0de" not in repr(request)
    hub = "http://hub/hub/api"
    answer = b'{"access_token": "t", "token_type": "Bearer"}'
    assert parse_oauth_token(200, answer, request, hub) == "t"
    assert parse_oauth_token(400, b'{"error": "invalid_grant"}', request, hub) is None
    with pytest.raises(ServiceUnavailable):
        parse_oauth_token(500, b"", request, hub)


def test_the_event_stream_resyncs_first_and_keeps_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import kbatch.server.dashboard as dashboard

    monkeypatch.setattr(dashboard, "HEARTBEAT_SECONDS", 0.01)

    async def first_two() -> list[bytes]:
        backend = FakeBackend()
        stream = dashboard._sse(backend, "alice")
        lines = [await anext(stream), await anext(stream)]
        await stream.aclose()
        assert backend.events.subscribers == 0  # the subscription ended with the stream
        return lines

    resync, alive = asyncio.run(first_two())
    assert resync == b'data: {"type":"resync","job":null}\n\n'
    assert alive == b": keep-alive\n\n"
