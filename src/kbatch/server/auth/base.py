"""The authenticator interface: what a request carries in, an :class:`Identity` out."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kbatch.models import Identity

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["Authenticator", "Credentials", "token_from_header"]


@dataclass(frozen=True)
class Credentials:
    """What a request carries that may say who sent it: its headers and cookies.

    Authenticators see this rather than a bare token, so that one can accept a
    cookie session (the dashboard) as well as an ``Authorization`` header.
    Header names are lower case.  Never logged: ``repr`` shows no values.
    """

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    cookies: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_request(cls, request: Request) -> Credentials:
        return cls(
            headers={k.lower(): v for k, v in request.headers.items()},
            cookies=dict(request.cookies),
        )

    @classmethod
    def bearer(cls, token: str | None) -> Credentials:
        """Credentials of a request with ``Authorization: Bearer <token>`` (or none)."""
        return cls(headers={} if token is None else {"authorization": f"Bearer {token}"})

    @property
    def token(self) -> str | None:
        """The token of the ``Authorization`` header, if it has one."""
        return token_from_header(self.headers.get("authorization"))


class Authenticator(abc.ABC):
    """Says who sent a request.  Raises AuthenticationError (401), PermissionDenied (403)
    or ServiceUnavailable (503) from :mod:`kbatch.errors`; never logs a credential."""

    async def start(self) -> None:
        """Open connections (e.g. to the hub)."""

    async def stop(self) -> None:
        """Close them."""

    @abc.abstractmethod
    async def authenticate(self, credentials: Credentials) -> Identity: ...


def token_from_header(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <t>`` or JupyterHub's ``token <t>``."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return None
