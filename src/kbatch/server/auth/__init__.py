"""Who is calling: pluggable authenticators chosen by the server's config."""

from kbatch.server.auth.base import Authenticator
from kbatch.server.auth.tokens import TokenFileAuthenticator

__all__ = ["Authenticator", "TokenFileAuthenticator"]
