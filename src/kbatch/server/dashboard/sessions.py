"""Browser sessions of the dashboard, kept in the server's memory.

The cookie holds only a random session id; the server keys its sessions by the
id's SHA-256, so not even a dump of this table gives a usable cookie.  A
session keeps the credential the user logged in with (the hub's OAuth token,
or the standalone token that asked for a login code) and every request is
authenticated again with it by the API's own authenticator, so a revoked
token or a removed scope ends the session at once.  Login codes (standalone)
and OAuth states are single-use and expire within minutes.

Sessions do not survive a restart of the server, nor are they shared between
replicas: a user then logs in again (behind a hub, without typing anything).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LOGIN_CODE_SECONDS", "SESSION_SECONDS", "Session", "Sessions"]

SESSION_SECONDS = 12 * 3600
LOGIN_CODE_SECONDS = 120
OAUTH_STATE_SECONDS = 600
MAX_ENTRIES = 10_000


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    token: str = field(repr=False)  # the credential the API's authenticator checks
    csrf: str = field(repr=False)  # sent back by the page in X-Kbatch-CSRF on every action
    expires: float = 0.0


class _Expiring:
    """A bounded map of digest -> (expiry, value); the oldest entries go first when full."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._items: dict[str, tuple[float, object]] = {}

    def put(self, key: str, value: object, seconds: float) -> None:
        now = self._clock()
        if len(self._items) >= MAX_ENTRIES:
            for stale in [k for k, (expiry, _) in self._items.items() if expiry <= now]:
                del self._items[stale]
            while len(self._items) >= MAX_ENTRIES:
                del self._items[next(iter(self._items))]
        self._items[_digest(key)] = (now + seconds, value)

    def get(self, key: str, *, pop: bool = False) -> object | None:
        digest = _digest(key)
        entry = self._items.pop(digest, None) if pop else self._items.get(digest)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._items.pop(digest, None)
            return None
        return entry[1]

    def delete(self, key: str) -> None:
        self._items.pop(_digest(key), None)


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sessions = _Expiring(clock)
        self._codes = _Expiring(clock)
        self._states = _Expiring(clock)

    def create(self, token: str) -> tuple[str, Session]:
        """A new session for ``token``: the id for the cookie, and the session."""
        session_id = secrets.token_urlsafe(32)
        session = Session(
            token=token, csrf=secrets.token_urlsafe(32), expires=self._clock() + SESSION_SECONDS
        )
        self._sessions.put(session_id, session, SESSION_SECONDS)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 200:
            return None
        session = self._sessions.get(session_id)
        return session if isinstance(session, Session) else None

    def end(self, session_id: str) -> None:
        self._sessions.delete(session_id)

    def login_code(self, token: str) -> str:
        """A single-use code, valid for two minutes, that becomes a session for ``token``."""
        code = secrets.token_urlsafe(24)
        self._codes.put(code, token, LOGIN_CODE_SECONDS)
        return code

    def redeem(self, code: str) -> str | None:
        """The token a login code was made for, once; None if unknown, used or expired."""
        if not code or len(code) > 200:
            return None
        token = self._codes.get(code, pop=True)
        return token if isinstance(token, str) else None

    def oauth_state(self) -> str:
        state = secrets.token_urlsafe(24)
        self._states.put(state, True, OAUTH_STATE_SECONDS)
        return state

    def check_state(self, state: str) -> bool:
        return bool(state) and len(state) <= 200 and self._states.get(state, pop=True) is True
