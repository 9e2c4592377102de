"""The CLI's submission records: a rerun after a lost answer reuses its key (issue 10, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbatch.client.journal import submission_key
from kbatch.errors import InvalidRequest, ServiceUnavailable, TransportError
from kbatch.models import JobSpec

SPEC = JobSpec(script="#!/bin/sh\ntrue\n", workdir="/w")
URL = "http://127.0.0.1:1"


def test_a_rerun_after_a_lost_answer_reuses_the_key(tmp_path: Path) -> None:
    with pytest.raises(TransportError), submission_key(tmp_path, URL, SPEC) as first:
        raise TransportError("lost")
    with submission_key(tmp_path, URL, SPEC) as again:
        assert again == first
    # Answered now: the next run is a new submission, with a new key.
    with submission_key(tmp_path, URL, SPEC) as later:
        assert later != first
    assert not list(tmp_path.iterdir())


def test_a_5xx_keeps_the_key_and_a_4xx_forgets_it(tmp_path: Path) -> None:
    with (
        pytest.raises(ServiceUnavailable),
        submission_key(tmp_path, URL, SPEC) as first,
    ):
        raise ServiceUnavailable("down", status=503, code="hub_unavailable")
    with pytest.raises(InvalidRequest), submission_key(tmp_path, URL, SPEC) as again:
        assert again == first
        raise InvalidRequest("no", status=422, code="invalid_spec")
    with submission_key(tmp_path, URL, SPEC) as fresh:
        assert fresh != first


def test_another_spec_or_server_is_another_submission(tmp_path: Path) -> None:
    with pytest.raises(TransportError), submission_key(tmp_path, URL, SPEC) as first:
        raise TransportError("lost")
    other = JobSpec(script="#!/bin/sh\nfalse\n", workdir="/w")
    with submission_key(tmp_path, URL, other) as key:
        assert key != first
    with submission_key(tmp_path, "http://elsewhere:2", SPEC) as key:
        assert key != first


def test_runs_at_the_same_time_get_their_own_keys(tmp_path: Path) -> None:
    with submission_key(tmp_path, URL, SPEC) as one, submission_key(tmp_path, URL, SPEC) as two:
        assert one != two


def test_no_record_where_none_can_be_written(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with submission_key(blocked / "sub", URL, SPEC) as key:
        assert len(key) == 32
