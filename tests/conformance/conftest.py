"""The conformance suite runs every test once per backend: the fake, local, and Kubernetes."""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import FakeHarness, Harness, LocalAsUserHarness, LocalHarness
from tests.support.accounts import unix_account


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["fake", "local", "local-as-user"])
def harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    if request.param == "fake":
        yield FakeHarness()
        return
    state = tmp_path_factory.mktemp("cf") / "s"  # short: the notify socket path is limited
    if request.param == "local":
        yield LocalHarness(state, Path(tmp_path_factory.mktemp("work")))
        return
    with unix_account("kbcf") as account:  # skips without root
        yield LocalAsUserHarness(state, Path(pwd.getpwnam(account).pw_dir), account)
