"""The conformance suite runs every test once per backend: the fake, local, and Kubernetes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.harness import FakeHarness, Harness, LocalHarness


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["fake", "local"])
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Harness:
    if request.param == "fake":
        return FakeHarness()
    state = tmp_path_factory.mktemp("cf") / "s"  # short: the notify socket path is limited
    work = tmp_path_factory.mktemp("work")
    return LocalHarness(state, Path(work))
