"""Authenticators see what the request carries (headers, cookies), never log it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kbatch.errors import AuthenticationError
from kbatch.server.auth.base import Credentials
from kbatch.server.auth.tokens import TokenFileAuthenticator, add_token


def test_credentials_find_the_token_and_hide_values() -> None:
    assert Credentials.bearer("abc").token == "abc"
    assert Credentials(headers={"authorization": "token abc"}).token == "abc"
    assert Credentials(headers={"authorization": "Basic abc"}).token is None
    assert Credentials.bearer(None).token is None
    creds = Credentials(headers={"authorization": "Bearer s3cret"}, cookies={"session": "c00kie"})
    assert "s3cret" not in repr(creds) and "c00kie" not in repr(creds)


def test_credentials_from_a_starlette_request() -> None:
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"authorization", b"Bearer t0k"), (b"cookie", b"kbatch-session=abc")],
    }
    creds = Credentials.from_request(Request(scope))
    assert creds.token == "t0k"
    assert creds.cookies == {"kbatch-session": "abc"}


def test_the_token_file_authenticator_reads_the_header_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = add_token(path, "alice")
    auth = TokenFileAuthenticator(path)
    assert asyncio.run(auth.authenticate(Credentials.bearer(token))).name == "alice"
    with pytest.raises(AuthenticationError) as caught:
        asyncio.run(auth.authenticate(Credentials(cookies={"token": token})))
    assert caught.value.code == "no_token"
    with pytest.raises(AuthenticationError):
        asyncio.run(auth.authenticate(Credentials.bearer("wrong")))
