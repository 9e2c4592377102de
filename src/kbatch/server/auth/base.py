"""The authenticator interface: a bearer token in, an :class:`Identity` out."""

from __future__ import annotations

import abc

from kbatch.models import Identity

__all__ = ["Authenticator", "token_from_header"]


class Authenticator(abc.ABC):
    """Checks a token.  Raises AuthenticationError (401), PermissionDenied (403) or
    ServiceUnavailable (503) from :mod:`kbatch.errors`; never logs the token."""

    async def start(self) -> None:
        """Open connections (e.g. to the hub)."""

    async def stop(self) -> None:
        """Close them."""

    @abc.abstractmethod
    async def authenticate(self, token: str | None) -> Identity: ...


def token_from_header(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <t>`` or JupyterHub's ``token <t>``."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return None
