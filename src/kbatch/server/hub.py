"""A small client of the JupyterHub REST API: only what kbatch needs from the hub.

The server checks callers' tokens with ``GET /hub/api/user`` and makes, lists
and revokes the tokens of jobs.  Requests are built and responses parsed by
pure functions (no I/O, tested without a hub); :class:`HubClient` only moves
them over ``httpx``.  It never depends on the ``jupyterhub`` package.

Errors: an unreachable or failing hub is :class:`~kbatch.errors.ServiceUnavailable`
(503, code ``hub_unavailable``) naming the hub's URL; a request the hub refuses
is :class:`HubRefused` (an :class:`~kbatch.errors.ApiError`, 502) carrying the
hub's own message.  No token is ever put in a message, a log line or a repr.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from kbatch.errors import ApiError, ServiceUnavailable

__all__ = [
    "HubClient",
    "HubRefused",
    "HubRequest",
    "HubToken",
    "HubUser",
    "NewToken",
    "create_token",
    "delete_token",
    "identify",
    "list_tokens",
    "oauth_token",
    "parse_deleted",
    "parse_identity",
    "parse_new_token",
    "parse_oauth_token",
    "parse_tokens",
]

log = logging.getLogger("kbatch.hub")


class HubRefused(ApiError):
    """The hub answered a request of the service with an error (other than 5xx)."""


# -- the hub's models, as much of them as kbatch reads ------------------------------


class HubUser(msgspec.Struct, kw_only=True, frozen=True):
    """The owner of a token, from ``GET /hub/api/user``, with the token's own scopes."""

    name: str
    kind: str = "user"  # or "service"
    admin: bool = False
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()


class HubToken(msgspec.Struct, kw_only=True, frozen=True):
    """One entry of ``GET /hub/api/users/{name}/tokens`` (never the token itself)."""

    id: str
    note: str | None = None
    scopes: tuple[str, ...] = ()
    expires_at: str | None = None


class NewToken(msgspec.Struct, kw_only=True, frozen=True):
    """A token just made by ``POST /hub/api/users/{name}/tokens``."""

    id: str
    token: str
    scopes: tuple[str, ...] = ()
    expires_at: str | None = None

    def __repr__(self) -> str:
        return f"NewToken(id={self.id!r}, scopes={self.scopes!r}, expires_at={self.expires_at!r})"


class _TokenList(msgspec.Struct):
    api_tokens: list[HubToken]


class _HubError(msgspec.Struct):
    message: str = ""


# -- pure request building and response parsing ------------------------------------


@dataclass(frozen=True)
class HubRequest:
    """What to send, below the hub's API URL.  ``caller_token`` replaces the service's token."""

    method: str
    path: str
    what: str  # for messages: "check a token", "create a token for alice"
    body: dict[str, Any] | None = None
    caller_token: str | None = field(default=None, repr=False)
    form: dict[str, str] | None = field(default=None, repr=False)  # sent form-encoded


def _user_path(user: str, *rest: str) -> str:
    return "/users/" + "/".join(quote(part, safe="") for part in (user, *rest))


def identify(token: str) -> HubRequest:
    """Who owns ``token`` and what it may do: sent with the caller's token itself."""
    return HubRequest("GET", "/user", "check a token", caller_token=token)


def create_token(user: str, *, note: str, expires_in: int | None, scopes: list[str]) -> HubRequest:
    body: dict[str, Any] = {"note": note, "scopes": list(scopes)}
    if expires_in is not None:
        body["expires_in"] = int(expires_in)
    return HubRequest("POST", _user_path(user, "tokens"), f"create a token for {user}", body)


def list_tokens(user: str) -> HubRequest:
    return HubRequest("GET", _user_path(user, "tokens"), f"list the tokens of {user}")


def delete_token(user: str, token_id: str) -> HubRequest:
    return HubRequest(
        "DELETE", _user_path(user, "tokens", token_id), f"revoke token {token_id} of {user}"
    )


def oauth_token(code: str, *, client_id: str, client_secret: str, redirect_uri: str) -> HubRequest:
    """Exchange an OAuth code (the dashboard's login) for the user's token, as HubOAuth does."""
    form = {
        "client_id": client_id,
        "client_secret": client_secret,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
    }
    return HubRequest("POST", "/oauth2/token", "finish an OAuth login", form=form)


class _OAuthToken(msgspec.Struct):
    access_token: str


def parse_oauth_token(status: int, body: bytes, request: HubRequest, hub: str) -> str | None:
    """The access token, or None when the hub refused the code (used, expired, forged)."""
    if status in (400, 401, 403):
        return None
    _check(status, body, request, hub)
    token: _OAuthToken = _decode(body, _OAuthToken, request, hub)
    return token.access_token


def _hub_message(body: bytes) -> str:
    try:
        message = msgspec.json.decode(body, type=_HubError).message
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = ""
    return message.strip()[:300]


def _check(status: int, body: bytes, request: HubRequest, hub: str) -> None:
    if status < 400:
        return
    message = _hub_message(body)
    detail = f"HTTP {status}" + (f": {message}" if message else "")
    if status >= 500:
        raise ServiceUnavailable(
            f"JupyterHub at {hub} failed to {request.what} ({detail}); try again shortly",
            status=503,
            code="hub_unavailable",
        )
    raise HubRefused(
        f"JupyterHub at {hub} refused to {request.what} ({detail})", status=502, code="hub_refused"
    )


def _decode(body: bytes, type_: type[Any], request: HubRequest, hub: str) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ServiceUnavailable(
            f"JupyterHub at {hub} sent an unreadable answer to {request.what} ({exc}); "
            "is the API URL right?",
            status=503,
            code="hub_unavailable",
        ) from exc


def parse_identity(status: int, body: bytes, request: HubRequest, hub: str) -> HubUser | None:
    """The token's owner, or None when the hub does not accept the token."""
    if status in (401, 403):  # JupyterHub answers 403 to GET /user with an unknown token
        return None
    _check(status, body, request, hub)
    user: HubUser = _decode(body, HubUser, request, hub)
    return user


def parse_new_token(status: int, body: bytes, request: HubRequest, hub: str) -> NewToken:
    _check(status, body, request, hub)
    token: NewToken = _decode(body, NewToken, request, hub)
    return token


def parse_tokens(status: int, body: bytes, request: HubRequest, hub: str) -> list[HubToken]:
    _check(status, body, request, hub)
    tokens: _TokenList = _decode(body, _TokenList, request, hub)
    return tokens.api_tokens


def parse_deleted(status: int, body: bytes, request: HubRequest, hub: str) -> None:
    if status == 404:  # already gone (expired or revoked): what we wanted
        return
    _check(status, body, request, hub)


# -- I/O --------------------------------------------------------------------------


class HubClient:
    """Talks to the hub's REST API as the kbatch service.

    Fails fast: a short timeout, and for ``retry_after`` seconds after the hub
    could not be reached every call fails at once with the same 503 instead of
    waiting again; after that the next call tries the hub, so service resumes by
    itself when the hub is back.
    """

    def __init__(
        self,
        api_url: str,
        api_token: str,
        *,
        timeout: float = 5.0,
        retry_after: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_token = api_token
        self._timeout = timeout
        self._retry_after = retry_after
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._down_until = 0.0
        self._down_message: str | None = None

    def __repr__(self) -> str:
        return f"HubClient({self.api_url!r})"

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                transport=self._transport,
                follow_redirects=False,
                headers={"User-Agent": "kbatch-server", "Accept": "application/json"},
            )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, request: HubRequest) -> tuple[int, bytes]:
        """Send ``request``; its status and body, or :class:`ServiceUnavailable`."""
        if self._down_message is not None and time.monotonic() < self._down_until:
            raise _unavailable(self._down_message)
        if self._client is None:
            await self.start()
        assert self._client is not None
        token = request.caller_token if request.caller_token is not None else self._api_token
        try:
            response = await self._client.request(
                request.method,
                self.api_url + request.path,
                json=request.body,
                data=request.form,
                headers={"Authorization": f"token {token}"},
            )
        except httpx.TransportError as exc:
            message = (
                f"JupyterHub is not reachable at {self.api_url} ({_reason(exc)}); "
                "try again when the hub is back"
            )
            self._down_message = message
            self._down_until = time.monotonic() + self._retry_after
            log.warning("cannot %s: %s", request.what, message)
            raise _unavailable(message) from exc
        self._down_message = None
        return response.status_code, response.content

    async def identify(self, token: str) -> HubUser | None:
        request = identify(token)
        return parse_identity(*await self.send(request), request, self.api_url)

    async def token_for_code(self, code: str, *, client_id: str, redirect_uri: str) -> str | None:
        """The user's token for an OAuth code; the client secret is the service's token."""
        request = oauth_token(
            code, client_id=client_id, client_secret=self._api_token, redirect_uri=redirect_uri
        )
        return parse_oauth_token(*await self.send(request), request, self.api_url)

    async def create_token(
        self, user: str, *, note: str, expires_in: int | None, scopes: list[str]
    ) -> NewToken:
        request = create_token(user, note=note, expires_in=expires_in, scopes=scopes)
        return parse_new_token(*await self.send(request), request, self.api_url)

    async def list_tokens(self, user: str) -> list[HubToken]:
        request = list_tokens(user)
        return parse_tokens(*await self.send(request), request, self.api_url)

    async def delete_token(self, user: str, token_id: str) -> None:
        request = delete_token(user, token_id)
        parse_deleted(*await self.send(request), request, self.api_url)


def _unavailable(message: str) -> ServiceUnavailable:
    return ServiceUnavailable(message, status=503, code="hub_unavailable")


def _reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else "cannot connect"
    return type(exc).__name__
