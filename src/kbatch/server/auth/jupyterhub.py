"""JupyterHub authentication: the caller's hub token, checked with the hub's API.

A token is accepted when the hub knows it (``GET /hub/api/user`` with the
token) and it carries the scope to use this service,
``access:services!service=<name>`` (or the unfiltered ``access:services`` an
admin's token has).  Answers are cached for a few seconds under the SHA-256
of the token, never the token itself.  Hub admins, and members of the
configured admin groups, are kbatch admins.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable

from kbatch.errors import AuthenticationError, PermissionDenied
from kbatch.models import Identity
from kbatch.server.auth.base import Authenticator, Credentials
from kbatch.server.hub import HubClient, HubUser

__all__ = ["JupyterHubAuthenticator", "access_scope", "decide"]

MAX_CACHED = 10_000
# Hub tokens are short runs of visible ASCII; anything else is refused without a hub request.
_PLAUSIBLE = re.compile(r"[\x21-\x7e]{1,1024}")


def access_scope(service_name: str) -> str:
    return f"access:services!service={service_name}"


def decide(user: HubUser | None, *, service_name: str, admin_groups: Iterable[str]) -> Identity:
    """The caller's identity from the hub's answer, or the 401/403 to send.  Pure."""
    if user is None:
        raise AuthenticationError(
            "the hub did not accept the token (unknown, expired or revoked)",
            status=401,
            code="invalid_token",
        )
    scope = access_scope(service_name)
    if scope not in user.scopes and "access:services" not in user.scopes:
        raise PermissionDenied(
            f"the token of {user.kind} {user.name} lacks the scope {scope}, so it may not use "
            f"the {service_name} service.  Only a hub admin can grant it: with a role for the "
            f"user or a group of theirs (c.JupyterHub.load_roles; adding the user to the "
            f"group the docs' role names is enough, no hub restart), and for the token of a "
            f"notebook server also in c.Spawner.server_token_scopes; then restart the "
            f"notebook server, whose token keeps the scopes it was made with",
            status=403,
            code="missing_scope",
        )
    if user.kind != "user":
        raise PermissionDenied(
            f"{user.kind} {user.name} is not a hub user; only users' tokens may use "
            f"the {service_name} service",
            status=403,
            code="not_a_user",
        )
    admin = user.admin or bool(set(user.groups) & set(admin_groups))
    return Identity(name=user.name, admin=admin, groups=tuple(user.groups))


class JupyterHubAuthenticator(Authenticator):
    def __init__(
        self,
        hub: HubClient,
        *,
        service_name: str,
        admin_groups: Iterable[str] = (),
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.service_name = service_name
        self.admin_groups = frozenset(admin_groups)
        self.cache_seconds = cache_seconds
        self._clock = clock
        # sha256(token) -> (expiry on self._clock, the hub's answer: None if it refused the token)
        self._cache: dict[str, tuple[float, HubUser | None]] = {}

    async def start(self) -> None:
        await self.hub.start()

    async def stop(self) -> None:
        await self.hub.aclose()

    async def authenticate(self, credentials: Credentials) -> Identity:
        token = credentials.token
        if not token:
            raise AuthenticationError(
                "no token: send 'Authorization: token <token>' with a JupyterHub API token "
                "(in a notebook, $JUPYTERHUB_API_TOKEN)",
                status=401,
                code="no_token",
            )
        if not _PLAUSIBLE.fullmatch(token):
            user = None  # no hub token looks like this: do not even ask
        else:
            user = await self._lookup(token)
        return decide(user, service_name=self.service_name, admin_groups=self.admin_groups)

    async def _lookup(self, token: str) -> HubUser | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        user = await self.hub.identify(token)  # ServiceUnavailable (503) is not cached
        if self.cache_seconds > 0:
            self._remember(key, user, now)
        return user

    def _remember(self, key: str, user: HubUser | None, now: float) -> None:
        cache = self._cache
        cache.pop(key, None)
        if len(cache) >= MAX_CACHED:
            for stale in [k for k, (expiry, _) in cache.items() if expiry <= now]:
                del cache[stale]
            while len(cache) >= MAX_CACHED:
                del cache[next(iter(cache))]  # the oldest entry
        cache[key] = (now + self.cache_seconds, user)
