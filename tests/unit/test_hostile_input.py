"""What a hostile user sends through the API is refused by the schema, and what the CLI
prints can never drive the terminal (issue 10, items 1, 3, 4 and 5)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from kbatch.cli.output import print_job, print_table, shown
from kbatch.models import Job, JobSpec, JobState, SubmitRequest
from kbatch.server.policy import Policy, check

HOSTILE = "x\nFAKE\u001b]0;pwned\u0007"


def decode(**spec: Any) -> JobSpec:
    body = msgspec.json.encode({"spec": {"script": "#!/bin/sh\n", **spec}})
    return msgspec.json.decode(body, type=SubmitRequest).spec


@pytest.mark.parametrize(
    "fields",
    [
        {"name": HOSTILE},
        {"name": "a\u202eb"},  # a bidi override disguises what follows
        {"comment": "\u001b[2J"},
        {"output": "out\n%j"},
        {"error": "e\u0085"},  # a C1 control (NEL)
        {"workdir": "/tmp/\u001b"},
        {"image": "img\rx"},
        {"args": ["ok", "a\u0000b"]},
        {"environment": {"A": "x\u0000y"}},
        {"time_limit": 2**63},
        {"time_limit": 2**31},
        {"memory": 2**63},
        {"cpus": 0},
    ],
)
def test_refused_by_the_schema(fields: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(**fields)


def test_allowed_text() -> None:
    spec = decode(name="ok name é ✓", args=["multi\nline", "tab\there"], environment={"A": "x\ny"})
    assert spec.args == ["multi\nline", "tab\there"]


def test_memory_zero_means_no_limit_as_on_the_command_line() -> None:
    assert check(decode(memory=0), Policy()).memory is None
    assert check(decode(memory=1024), Policy()).memory == 1024


def _job(**kw: Any) -> Job:
    return Job(
        **{
            "id": "1",
            "user": "mallory",
            "name": "n",
            "state": JobState.PENDING,
            "submitted": datetime.now(UTC),
            **kw,
        }
    )


def test_the_table_and_detail_never_print_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Names from an older server or a backend's reason reach the CLI; it shows them inert."""
    job = _job(name=HOSTILE, reason="Bad\u001b[31mreason\n", comment="c\u009b2J", output="/o\n")
    print_table([job, _job(id="2")], show_user=True)
    table = capsys.readouterr().out
    assert "\u001b" not in table and "\u0007" not in table
    assert len(table.splitlines()) == 3  # the header and one row per job: no forged rows
    print_job(job)
    detail = capsys.readouterr().out
    assert "\u001b" not in detail and "\u009b" not in detail and "FAKE" in detail
    assert shown("a\u202eb\u2066") == "a?b?"
