"""What a client sends cannot forge lines in the server's log, and refusals say what to change.

Issue 10, item 2: the access log printed the percent-decoded path, so
``GET /api/v1/jobs/1%0AFORGED`` wrote a second line of the attacker's choosing,
with or without a token.  The validation items: a name or value refused by a
pattern is explained in words, not with the regular expression.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from kbatch.server.logtext import escaped
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

FORGED = "FORGED 127.0.0.1 admin cancelled everything"


def get(server: KbatchServer, path: str, token: str | None = None) -> int:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    status = conn.getresponse().status
    conn.close()
    return status


def post(server: KbatchServer, path: str, body: object) -> tuple[int, dict[str, str]]:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    conn.request(
        "POST",
        path,
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data["error"]


def test_a_path_cannot_write_a_forged_line_into_the_server_log(server: KbatchServer) -> None:
    paths = [
        "/api/v1/jobs/1%0A" + FORGED.replace(" ", "%20"),
        "/api/v1/jobs/1%0D%0A" + FORGED.replace(" ", "%20"),
        "/api/v1/nope%0A" + FORGED.replace(" ", "%20") + "%1B%5D0%3Bpwned%07",
    ]
    for path in paths:
        assert get(server, path) in (401, 404)  # no token
        assert get(server, path, server.token) == 404
    wait_for(lambda: server.log().count("FORGED") >= 2 * len(paths), what="the access log lines")
    lines = server.log().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")]
    assert not [line for line in lines if "\x1b" in line or "\x07" in line]
    forged = [line for line in lines if "FORGED" in line]
    assert all("kbatch.access" in line for line in forged), forged
    assert any("/api/v1/jobs/1\\n" + FORGED in line for line in forged), forged


def test_escaped_keeps_one_line_and_tells_escapes_from_text() -> None:
    assert escaped("a\nb\r\x1b]0;x\x07\u202e") == "a\\nb\\r\\x1b]0;x\\x07\\u202e"
    assert escaped("a\\nb") == "a\\\\nb"  # typed text stays distinguishable
    assert "\n" not in escaped("\u2028\u0085\n")


def test_a_refused_name_or_value_is_explained_in_words(server: KbatchServer) -> None:
    cases = [
        ({"script": "x", "name": "a\nb"}, "spec.name", "control characters"),
        ({"script": "x", "comment": "\x1b[2J"}, "spec.comment", "control characters"),
        ({"script": "x", "args": ["a\x00"]}, "spec.args[0]", "NUL bytes"),
        ({"script": "x", "environment": {"A": "\x00"}}, "spec.environment[...]", "NUL bytes"),
    ]
    for spec, field, words in cases:
        status, error = post(server, "/api/v1/jobs", {"spec": spec})
        assert status == 422
        assert error["field"] == field
        assert words in error["message"], error
        assert "regex" not in error["message"], error
