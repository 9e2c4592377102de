"""A property-based fuzz of the HTTP API from its own OpenAPI document (issue 10).

schemathesis reads the document the server serves (``openapi_document()``),
generates requests for every operation, valid and invalid, and checks each
answer: no 5xx, a status code the document lists, a body that matches the
documented schema, invalid input refused with a 4xx.  A second, plain
hypothesis test sends valid submissions that really launch on the local
backend, and every one of them must run to its end.

The server runs as an unprivileged account of its own (the jobs the fuzz
submits are random text run by ``sh``, in whatever working directory they
name), in a temporary state directory, and must be alive at the end.

The number of examples is bounded (:data:`EXAMPLES` per operation) so that
``make test`` stays fast.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from kbatch.models import JobState
from kbatch.server.openapi import openapi_document
from tests.support.accounts import account_python, reachable_dir, unix_account
from tests.support.polling import wait_for
from tests.support.servers import KbatchServer

EXAMPLES = 50
LAUNCHES = 25


class FuzzTarget:
    def __init__(self, server: KbatchServer, workdir: Path) -> None:
        self.server = server
        self.url = server.url
        self.token = server.token
        self.workdir = workdir
        self.launched: list[str] = []

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def target() -> Iterator[FuzzTarget]:
    with reachable_dir("kbatch-fuzz-") as world, unix_account("kbf") as account:
        python = account_python(account, world)
        state = world / "s"
        state.mkdir()
        workdir = world / "work"
        workdir.mkdir()
        for path in (state, workdir):
            shutil.chown(path, account, account)
        config = world / "kbatch.toml"
        config.write_text("[local]\ncpus = 2\nkill_grace = 1\ntick = 0.5\n")
        server = KbatchServer(
            state,
            args=["--config", str(config)],
            python=str(python),
            user=account,
            log_level=None,
        )
        server.start()
        try:
            yield FuzzTarget(server, workdir)
            # Alive after all that, and nothing unhandled in its log.
            assert server.proc is not None and server.proc.poll() is None
            assert httpx.get(f"{server.url}/api/v1/health", timeout=10).status_code == 200
            assert "Traceback" not in server.log(), server.log()[-3000:]
        finally:
            server.stop()


@pytest.fixture
def api(target: FuzzTarget) -> FuzzTarget:
    return target


schema = schemathesis.openapi.from_dict(openapi_document()).exclude(
    # An endless stream by design: a request never ends, so there is no answer to check.
    path="/api/v1/events"
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run of make test
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(
    case: schemathesis.Case[Any], api: FuzzTarget
) -> None:
    if case.query and str(case.query.get("follow", "")).lower() in ("true", "1"):
        case.query["follow"] = "false"  # following a running job's log waits for its end
    # Set on the case (not passed to the call), so that schemathesis sees the headers
    # changed and judges a case that was invalid only for lacking them as valid.
    for name, value in api.headers.items():
        case.headers[name] = value
    case.call_and_validate(
        base_url=api.url,
        timeout=30,
        # A request the schema allows may still be refused for what no schema can say:
        # a cursor no page gave, a working directory that does not exist, a policy
        # limit.  The server answers those 422 with a message (checked to be in the
        # documented error shape); only a 5xx or an undocumented answer is a failure.
        excluded_checks=[positive_data_acceptance],
    )


names = st.text(
    st.characters(exclude_categories=["Cc", "Cs"], exclude_characters="\u2028\u2029"),
    min_size=1,
    max_size=40,
).filter(lambda s: not any(0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069 for c in s))
values = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=40)


@given(
    name=names,
    args=st.lists(values, max_size=4),
    environment=st.dictionaries(st.from_regex(r"\A[A-Z][A-Z0-9_]{0,10}\Z"), values, max_size=4),
    cpus=st.integers(1, 2),
    hold=st.booleans(),
)
@settings(max_examples=LAUNCHES, deadline=None, suppress_health_check=list(HealthCheck))
def test_valid_submissions_launch_and_run(
    api: FuzzTarget,
    name: str,
    args: list[str],
    environment: dict[str, str],
    cpus: int,
    hold: bool,
) -> None:
    spec = {
        "script": '#!/bin/sh\nprintf "%s\\n" "$@"\n',
        "name": name,
        "args": args,
        "environment": environment,
        "cpus": cpus,
        "hold": hold,
        "workdir": str(api.workdir),
        "time_limit": 60,
    }
    response = httpx.post(
        f"{api.url}/api/v1/jobs", json={"spec": spec}, headers=api.headers, timeout=30
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["name"] == name
    if hold:
        released = httpx.post(
            f"{api.url}/api/v1/jobs/{job['id']}/release", headers=api.headers, timeout=30
        )
        assert released.status_code == 200, released.text
    api.launched.append(job["id"])


def test_every_launched_job_ran(api: FuzzTarget) -> None:
    assert api.launched, "the launch test ran first (file order)"
    with api.server.client() as client:
        for job_id in api.launched:

            def ended(job_id: str = job_id) -> str | None:
                job = client.get(job_id)
                return job.state.value if job.state.is_terminal else None

            state = wait_for(ended, timeout=60, what=f"job {job_id} to end")
            assert state == JobState.COMPLETED.value, json.dumps({"job": job_id, "state": state})


def test_an_unknown_query_parameter_is_refused_after_authentication(api: FuzzTarget) -> None:
    # Found by the fuzz: ?=null (or a typo such as all_user=true) was silently ignored.
    typo = httpx.get(f"{api.url}/api/v1/jobs?all_user=true", headers=api.headers, timeout=10)
    assert typo.status_code == 422, typo.text
    assert "all_user" in typo.json()["error"]["message"]
    assert "all_users" in typo.json()["error"]["message"]
    anonymous = httpx.get(f"{api.url}/api/v1/jobs?all_user=true", timeout=10)
    assert anonymous.status_code == 401
    assert httpx.get(f"{api.url}/api/v1/health?x=1", timeout=10).status_code == 422
