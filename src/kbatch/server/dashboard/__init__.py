"""The web dashboard: a page of the user's jobs, served by the server itself.

Everything the page shows comes from the API (``/api/v1``) through the same
handlers, authenticator and owner checks as the CLI's requests; the page adds
only a browser session (a cookie), live updates as server-sent events fed by
the backend's event broker, a job's spec (script, resubmit), and the logins:

- behind a hub, JupyterHub's OAuth for services (``oauth_login`` sends the
  browser to the hub, ``oauth_callback`` exchanges the code for the user's
  token with the service's own HTTP client, checks it as the API checks every
  token, and keeps it server-side: the cookie holds a random session id);
- standalone, a single-use code that ``kbatch dashboard`` asks for with its
  token and opens as ``login?code=...``; the page then redirects to a clean URL.

Actions (every method but GET/HEAD) sent with the session cookie need the
session's CSRF token in ``X-Kbatch-CSRF`` and an ``Origin`` of the server
itself.  Every response carries a strict Content-Security-Policy (no inline
script, nothing from elsewhere, no framing).  The page builds its DOM with
``textContent`` only: a job's name is data, never markup.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from kbatch.backends.base import Backend
from kbatch.errors import AuthenticationError, KbatchError, NotFound, PermissionDenied
from kbatch.lifecycle import parse_job_ref
from kbatch.models import Identity, JobEvent
from kbatch.server.auth.base import Authenticator, Credentials
from kbatch.server.dashboard.sessions import Session, Sessions

if TYPE_CHECKING:
    from kbatch.server.hub import HubClient

__all__ = [
    "CSP",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Dashboard",
    "DashboardAuthenticator",
    "HubOAuthSettings",
    "SecurityHeaders",
    "hub_oauth_settings",
]

log = logging.getLogger("kbatch.dashboard")
SESSION_COOKIE = "kbatch-session"
STATE_COOKIE = "kbatch-oauth-state"
CSRF_HEADER = "x-kbatch-csrf"
HEARTBEAT_SECONDS = 20.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_encoder = msgspec.json.Encoder()
STATIC = Path(str(resources.files("kbatch.server.dashboard") / "static"))


@dataclass(frozen=True)
class HubOAuthSettings:
    """The service's OAuth client at the hub (see docs/jupyterhub.md)."""

    client_id: str
    redirect_uri: str  # as registered at the hub; may be a path (through the hub's proxy)
    authorize_url: str  # where the browser goes; a path when the hub shares the proxy
    service_name: str
    admin_groups: tuple[str, ...] = ()
    contact: str = ""  # who users without access should ask; empty: the hub's admins

    @property
    def who_to_ask(self) -> str:
        return self.contact or "the administrators of this JupyterHub"


def hub_oauth_settings(
    env: Mapping[str, str],
    *,
    service_name: str,
    prefix: str,
    admin_groups: tuple[str, ...],
    contact: str = "",
) -> HubOAuthSettings:
    """From the variables a hub gives its managed services, with JupyterHub's defaults."""
    host = env.get("JUPYTERHUB_HOST", "")
    base = env.get("JUPYTERHUB_BASE_URL", "/") or "/"
    base = base if base.endswith("/") else base + "/"
    return HubOAuthSettings(
        client_id=env.get("JUPYTERHUB_CLIENT_ID") or f"service-{service_name}",
        redirect_uri=env.get("JUPYTERHUB_OAUTH_CALLBACK_URL")
        or f"{prefix or f'{base}services/{service_name}'}/oauth_callback",
        authorize_url=f"{host}{base}hub/api/oauth2/authorize",
        service_name=service_name,
        admin_groups=admin_groups,
        contact=contact,
    )


class DashboardAuthenticator(Authenticator):
    """The API's authenticator, plus the dashboard's session cookie.

    A request with an ``Authorization`` header is the inner authenticator's
    alone.  One with a session cookie is authenticated by the inner
    authenticator with the credential the session was opened with.
    """

    def __init__(self, inner: Authenticator, sessions: Sessions) -> None:
        self.inner = inner
        self.sessions = sessions

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    def session(self, credentials: Credentials) -> Session | None:
        if "authorization" in credentials.headers:
            return None
        return self.sessions.get(credentials.cookies.get(SESSION_COOKIE))

    async def authenticate(self, credentials: Credentials) -> Identity:
        session = self.session(credentials)
        if session is not None:
            return await self.inner.authenticate(Credentials.bearer(session.token))
        return await self.inner.authenticate(credentials)


def _origin(scope: Scope, headers: Mapping[str, str]) -> str:
    scheme = headers.get("x-forwarded-proto", scope.get("scheme", "http")).split(",")[0].strip()
    host = headers.get("x-forwarded-host", headers.get("host", "")).split(",")[0].strip()
    return f"{scheme}://{host}"


def _error(status: int, code: str, message: str) -> Response:
    body = {"error": {"code": code, "message": message, "field": None}}
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


class SecurityHeaders:
    """CSP and friends on every response; CSRF checks on actions sent with a session cookie."""

    def __init__(self, app: ASGIApp, sessions: Sessions) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))  # type: ignore[call-overload]
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        refusal = self._csrf(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)  # type: ignore[arg-type]
            return
        await self.app(scope, receive, send_with_headers)  # type: ignore[arg-type]

    def _csrf(self, scope: Scope) -> Response | None:
        if scope["method"] in SAFE_METHODS:
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if "authorization" in headers:
            return None  # a token, not a cookie: no browser sends it by itself
        request = Request(scope)
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None  # no session: the API answers 401 as for any request without a token
        origin = headers.get("origin")
        if origin != _origin(scope, headers):
            return _error(403, "bad_origin", "the request did not come from this dashboard")
        sent = headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            return _error(403, "bad_csrf", "missing or wrong CSRF token; reload the page")
        return None


def _secure(request: Request) -> bool:
    proto = request.headers.get("x-forwarded-proto", request.url.scheme)
    return proto.split(",")[0].strip() == "https"


def _page(title: str, message: str, status: int) -> HTMLResponse:
    """A small static page; both strings are escaped."""
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="static/style.css">'
        f'</head><body><main class="notice"><h1>{html.escape(title)}</h1>'
        f"<p>{html.escape(message)}</p></main></body></html>"
    )
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


class Dashboard:
    def __init__(
        self,
        backend: Backend,
        auth: DashboardAuthenticator,
        *,
        prefix: str = "",
        oauth: HubOAuthSettings | None = None,
        hub: HubClient | None = None,
    ) -> None:
        self.backend = backend
        self.auth = auth
        self.sessions = auth.sessions
        self.prefix = prefix.rstrip("/")
        self.oauth = oauth
        self.hub = hub

    @property
    def cookie_path(self) -> str:
        return self.prefix + "/"

    # -- pages ----------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        session = self.auth.session(Credentials.from_request(request))
        if session is None:
            if self.oauth is not None:
                return RedirectResponse(f"{self.prefix}/oauth_login", status_code=302)
            return _page(
                "kbatch: log in",
                "Run 'kbatch dashboard' in a terminal: it prints a link that logs you in.",
                401,
            )
        page = (STATIC / "index.html").read_text()
        base = html.escape(self.cookie_path, quote=True)
        page = page.replace("<head>", f'<head><base href="{base}">', 1)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def session_info(self, request: Request) -> Response:
        """Who is logged in and the CSRF token: read by the page, same origin only."""
        credentials = Credentials.from_request(request)
        session = self.auth.session(credentials)
        if session is None:
            raise AuthenticationError("not logged in", status=401, code="no_session")
        identity = await self.auth.authenticate(credentials)
        request.state.user = identity.name
        body = {"user": identity.name, "admin": identity.admin, "csrf": session.csrf}
        return Response(
            _encoder.encode(body),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def events(self, request: Request) -> Response:
        """The API's event stream as server-sent events, for ``EventSource``."""
        identity = await self.auth.authenticate(Credentials.from_request(request))
        request.state.user = identity.name
        all_users = request.query_params.get("all_users") == "true"
        if all_users and not identity.admin:
            raise PermissionDenied(
                "only admins may see every user's jobs", status=403, code="not_admin"
            )
        user = None if all_users else identity.name
        return StreamingResponse(
            _sse(self.backend, user),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def spec(self, request: Request) -> Response:
        """The spec of one of the caller's jobs, for its script and resubmit (an admin: anyone's
        script, without its environment)."""
        identity = await self.auth.authenticate(Credentials.from_request(request))
        request.state.user = identity.name
        job_id = request.path_params["job_id"]
        try:
            ref = str(parse_job_ref(job_id))
            job = await self.backend.get(ref)
            if job.user != identity.name and not identity.admin:
                raise NotFound("no job", status=404, code="not_found")
            spec = await self.backend.spec(ref)
        except NotFound:
            raise NotFound(f"no job {job_id!r}", status=404, code="not_found") from None
        if spec is None:
            raise NotFound(
                f"the {self.backend.name} backend does not keep job specs",
                status=404,
                code="no_spec",
            )
        if job.user != identity.name:
            # An admin reads another user's script, never the environment they submitted
            # with (it may hold their secrets); resubmitting is the owner's to do.
            spec = msgspec.structs.replace(spec, environment={})
        return Response(_encoder.encode(spec), media_type="application/json")

    # -- logins ---------------------------------------------------------------------

    def _start_session(self, request: Request, token: str) -> Response:
        session_id, _ = self.sessions.create(token)
        response = RedirectResponse(self.cookie_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            path=self.cookie_path,
            httponly=True,
            secure=_secure(request),
            samesite="lax",
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    async def login_code(self, request: Request) -> Response:
        """``kbatch dashboard``: a single-use login code for the caller's own token."""
        credentials = Credentials.from_request(request)
        token = credentials.token
        if token is None:
            raise AuthenticationError(
                "send your token to get a login code", status=401, code="no_token"
            )
        identity = await self.auth.inner.authenticate(credentials)
        request.state.user = identity.name
        code = self.sessions.login_code(token)
        body = {"path": "login?" + urlencode({"code": code}), "expires_in": 120}
        return Response(_encoder.encode(body), media_type="application/json")

    async def login(self, request: Request) -> Response:
        token = self.sessions.redeem(request.query_params.get("code", ""))
        if token is None:
            return _page(
                "kbatch: login link expired",
                "This login link was already used or has expired. "
                "Run 'kbatch dashboard' again for a new one.",
                403,
            )
        try:
            identity = await self.auth.inner.authenticate(Credentials.bearer(token))
        except KbatchError as exc:
            return _page("kbatch: cannot log in", str(exc), 403)
        request.state.user = identity.name
        return self._start_session(request, token)

    async def logout(self, request: Request) -> Response:
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            self.sessions.end(session_id)
        response = _page("kbatch: logged out", "You are logged out of the kbatch dashboard.", 200)
        response.delete_cookie(SESSION_COOKIE, path=self.cookie_path)
        return response

    async def oauth_login(self, request: Request) -> Response:
        assert self.oauth is not None
        state = self.sessions.oauth_state()
        query = urlencode(
            {
                "client_id": self.oauth.client_id,
                "redirect_uri": self.oauth.redirect_uri,
                "response_type": "code",
                "state": state,
            }
        )
        response = RedirectResponse(f"{self.oauth.authorize_url}?{query}", status_code=302)
        response.set_cookie(
            STATE_COOKIE,
            state,
            max_age=600,
            path=self.cookie_path,
            httponly=True,
            secure=_secure(request),
            samesite="lax",
        )
        return response

    async def oauth_callback(self, request: Request) -> Response:
        assert self.oauth is not None and self.hub is not None
        state = request.query_params.get("state", "")
        cookie_state = request.cookies.get(STATE_COOKIE, "")
        if not (
            state
            and hmac.compare_digest(state.encode(), cookie_state.encode())
            and self.sessions.check_state(state)
        ):
            return _page(
                "kbatch: login failed",
                "The login did not start here or took too long. Open the dashboard again.",
                400,
            )
        code = request.query_params.get("code", "")
        token = await self.hub.token_for_code(
            code, client_id=self.oauth.client_id, redirect_uri=self.oauth.redirect_uri
        )
        if token is None:
            return _page("kbatch: login failed", "The hub refused the login. Try again.", 403)
        try:
            identity = await self.auth.inner.authenticate(Credentials.bearer(token))
        except PermissionDenied as exc:
            return _page(
                "kbatch: no access",
                f"You may not use the {self.oauth.service_name} service yet: ask "
                f"{self.oauth.who_to_ask} to give you access to it. ({exc.message}.)",
                403,
            )
        request.state.user = identity.name
        log.info("user %s logged in to the dashboard", identity.name)
        response = self._start_session(request, token)
        response.delete_cookie(STATE_COOKIE, path=self.cookie_path)
        return response

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/", self.index, methods=["GET"]),
            Route("/jobs/{job_id}", self.index, methods=["GET"]),
            Route("/dashboard/session", self.session_info, methods=["GET"]),
            Route("/dashboard/events", self.events, methods=["GET"]),
            Route("/dashboard/jobs/{job_id}/spec", self.spec, methods=["GET"]),
            Route("/dashboard/login-code", self.login_code, methods=["POST"]),
            Route("/login", self.login, methods=["GET"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        if self.oauth is not None:
            routes += [
                Route("/oauth_login", self.oauth_login, methods=["GET"]),
                Route("/oauth_callback", self.oauth_callback, methods=["GET"]),
            ]
        return routes


async def _sse(backend: Backend, user: str | None) -> AsyncGenerator[bytes]:
    """Server-sent events: a ``resync`` first (list now), then one event per change."""
    events = backend.watch(user)
    try:
        yield b"data: " + _encoder.encode(JobEvent(type="resync")) + b"\n\n"
        while True:
            try:
                event = await asyncio.wait_for(anext(events), HEARTBEAT_SECONDS)
            except TimeoutError:
                # A comment line: keeps proxies from closing an idle stream, and finds
                # a browser that left (the write fails, the subscription ends).
                yield b": keep-alive\n\n"
                continue
            yield b"data: " + _encoder.encode(event) + b"\n\n"
    finally:
        await events.aclose()
