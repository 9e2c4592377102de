"""One real JupyterHub (with its proxy and the kbatch service) for the whole session."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from tests.support.jupyterhub import Hub, assert_no_secrets, running_hub

_names = itertools.count(1)
_timings: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/jupyterhub/" in item.nodeid:
            item.add_marker(pytest.mark.jupyterhub)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with running_hub(tmp_path_factory.mktemp("jh", numbered=True)) as running:
        yield running
        _timings.append(
            "hub start (to API and service answering through the proxy): "
            + ", ".join(f"{s:.1f} s" for s in running.start_seconds)
        )
        assert_no_secrets(running)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _timings:
        terminalreporter.write_line(f"jupyterhub: {line}")


@pytest.fixture
def username() -> Callable[[str], str]:
    """Fresh user names, so that tests never see each other's jobs: ``username("alice")``."""
    return lambda base: f"{base}{next(_names)}"
