from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.servers import KbatchServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def _short_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Unix socket paths are limited to ~100 bytes; keep the state dir short.
    return tmp_path_factory.mktemp("kb", numbered=True) / "s"


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbatchServer]:
    """A real local-backend server with 2 CPUs and a 1 s grace period."""
    srv = KbatchServer(_short_state_dir(tmp_path_factory), args=["--cpus", "2"])
    srv.args += ["--config", str(_write_config(srv.state_dir.parent))]
    srv.start()
    yield srv
    srv.stop()


def _write_config(directory: Path, **local: object) -> Path:
    path = directory / "kbatch.toml"
    lines = ["[local]", "kill_grace = 1", "tick = 0.5"]
    lines += [f"{k} = {v!r}" for k, v in local.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Start servers with extra [local] settings: ``make_server(cpus=1, memory_limiter="polling")``."""
    started: list[KbatchServer] = []

    def make(cpus: int = 2, **local: object) -> KbatchServer:
        state = _short_state_dir(tmp_path_factory)
        config = _write_config(state.parent, **local)
        srv = KbatchServer(state, args=["--cpus", str(cpus), "--config", str(config)])
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium (Debian's, driven by playwright) for a module's browser tests.

    Per module, not per session: playwright's sync API keeps an event loop running
    in this thread while it is started, and every asyncio test after it would fail."""
    from tests.support.browser import launched

    with launched() as running:
        yield running
