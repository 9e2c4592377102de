"""The client's request builders and parsers are pure: what is sent, what is read."""

from __future__ import annotations

import pytest

from kbatch.cli.jobs import check_job_ids
from kbatch.client import requests as rq
from kbatch.errors import ApiError, SpecError
from kbatch.models import JobEvent


def test_list_pages() -> None:
    assert rq.list_jobs().path == "/api/v1/jobs"
    request = rq.list_jobs(include_finished=True, all_users=True, limit=5000, after="00000007")
    assert request.method == "GET"
    assert request.path == "/api/v1/jobs?all=true&all_users=true&limit=5000&after=00000007"
    assert rq.list_jobs(after="a b&c").path == "/api/v1/jobs?after=a+b%26c"


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (rq.cancel_job, "/api/v1/jobs/8/cancel"),
        (rq.hold_job, "/api/v1/jobs/8/hold"),
        (rq.release_job, "/api/v1/jobs/8/release"),
    ],
)
def test_job_actions_are_empty_posts(build: object, path: str) -> None:
    request = build("8")  # type: ignore[operator]
    assert (request.method, request.path, request.body) == ("POST", path, b"")
    assert request.headers == {"Content-Length": "0"}


def test_ids_are_quoted_into_one_path_segment() -> None:
    assert rq.hold_job("a/b").path == "/api/v1/jobs/a%2Fb/hold"


def test_events() -> None:
    assert rq.events().path == "/api/v1/events"
    assert rq.events(all_users=True).path == "/api/v1/events?all_users=true"
    assert rq.events().headers["Accept"] == "application/x-ndjson"


def test_event_lines() -> None:
    assert rq.parse_event(b"\n") is None
    assert rq.parse_event(b'{"type":"resync","job":null}\n') == JobEvent(type="resync")
    line = (
        b'{"type":"job","job":{"id":"8","user":"u","name":"n","state":"PENDING",'
        b'"submitted":"2026-01-01T00:00:00Z"}}\n'
    )
    event = rq.parse_event(line)
    assert event is not None and event.job is not None and event.job.id == "8"
    with pytest.raises(ApiError, match="could not be read"):
        rq.parse_event(b"<html>\n")


def test_the_cli_checks_ids_before_asking() -> None:
    assert check_job_ids(["8", "8_2", "a1b2-c3"]) == ["8", "8_2", "a1b2-c3"]
    for bad in ("", "1\n", "²", "a/b", "x" * 64, "8_"):
        with pytest.raises(SpecError, match="is not a job id"):
            check_job_ids(["8", bad])
