"""Standalone authentication: tokens kept (hashed) in a file on the server.

On first start the server makes a token for the account it runs as and
writes it, readable only by its owner, where the client finds it.  An admin
adds users with ``kbatch server add-token USER``.  Only SHA-256 hashes of
tokens are kept in ``tokens.json``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from kbatch.errors import AuthenticationError, ConfigError
from kbatch.models import Identity
from kbatch.paths import write_private
from kbatch.server.auth.base import Authenticator, Credentials

__all__ = ["TokenFileAuthenticator", "add_token", "hash_token"]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _load(path: Path) -> dict[str, dict[str, object]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def add_token(path: Path, user: str, *, admin: bool = False) -> str:
    """Make a new token for ``user``; returns it (the file keeps its hash only)."""
    if not user or any(c.isspace() for c in user) or "/" in user:
        raise ConfigError(f"user name {user!r} must be non-empty, without spaces or '/'")
    token = secrets.token_urlsafe(32)
    tokens = _load(path)
    tokens[hash_token(token)] = {"user": user, "admin": admin}
    write_private(path, json.dumps(tokens, indent=2) + "\n")
    return token


class TokenFileAuthenticator(Authenticator):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1.0
        self._tokens: dict[str, Identity] = {}

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = 0.0
        if mtime == self._mtime:
            return
        self._tokens = {
            digest: Identity(name=str(entry["user"]), admin=bool(entry.get("admin", False)))
            for digest, entry in _load(self.path).items()
        }
        self._mtime = mtime

    async def authenticate(self, credentials: Credentials) -> Identity:
        token = credentials.token
        if token is None:
            raise AuthenticationError(
                "no token: send 'Authorization: Bearer <token>'", status=401, code="no_token"
            )
        self._reload()
        identity = self._tokens.get(hash_token(token))  # a digest lookup leaks nothing of the token
        if identity is not None:
            return identity
        raise AuthenticationError(
            "the token was not accepted; check KBATCH_TOKEN or run 'kbatch configure'",
            status=401,
            code="invalid_token",
        )
