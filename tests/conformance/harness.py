"""How the conformance suite drives each backend: start one, and make a spec for an outcome.

A harness knows the one thing the suite cannot say in a backend-neutral way:
how to write a job that succeeds, fails with exit code 3, or runs until it is
cancelled, and that prints a given line.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kbatch.backends.base import Backend
from kbatch.backends.fake import FakeBackend, FakeConfig
from kbatch.backends.local.backend import LocalBackend, LocalConfig
from kbatch.models import JobSpec

__all__ = ["FakeHarness", "Harness", "LocalAsUserHarness", "LocalHarness"]

OUTCOMES = ("succeed", "fail", "run")


@contextlib.asynccontextmanager
async def started(backend: Backend) -> AsyncIterator[Backend]:
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


class Harness(abc.ABC):
    name: str
    #: seconds within which a job that may start is running (the control plane is slower)
    start_within: float = 20.0

    @abc.abstractmethod
    def backend(self) -> contextlib.AbstractAsyncContextManager[Backend]:
        """A started backend, stopped afterwards."""

    @abc.abstractmethod
    def spec(self, outcome: str, *, text: str = "hello", **fields: Any) -> JobSpec:
        """A job that prints ``text`` and then succeeds, fails (exit code 3) or runs on."""


class FakeHarness(Harness):
    name = "fake"
    start_within = 5.0

    def backend(self) -> contextlib.AbstractAsyncContextManager[Backend]:
        return started(FakeBackend(FakeConfig(slots=2)))

    def spec(self, outcome: str, *, text: str = "hello", **fields: Any) -> JobSpec:
        marker = {"succeed": "run=0.05", "fail": "run=0.05 exit=3", "run": "run=forever"}
        script = f"#!/bin/sh\n# fake: {marker[outcome]}\necho {text}\n"
        return JobSpec(script=script, workdir="/tmp", **fields)


class LocalHarness(Harness):
    """Real supervisors and job processes, in a state directory of the test's own."""

    name = "local"

    def __init__(self, state_dir: Path, workdir: Path) -> None:
        self.state_dir = state_dir
        self.workdir = workdir

    def backend(self) -> contextlib.AbstractAsyncContextManager[Backend]:
        config = LocalConfig(state_dir=self.state_dir, cpus=2, tick=0.2, kill_grace=1)
        return started(LocalBackend(config))

    def spec(self, outcome: str, *, text: str = "hello", **fields: Any) -> JobSpec:
        body = {"succeed": "true", "fail": "exit 3", "run": "exec sleep 300"}
        script = f"#!/bin/sh\necho {text}\n{body[outcome]}\n"
        return JobSpec(script=script, workdir=str(self.workdir), **fields)


class LocalAsUserHarness(LocalHarness):
    """The local backend as root with ``run_as_user``: every user's job runs as ``account``.

    ``user_template`` names no user, so alice's, bob's... jobs all run as the one test
    account; the working directory is that account's.
    """

    name = "local-as-user"

    def __init__(self, state_dir: Path, workdir: Path, account: str) -> None:
        super().__init__(state_dir, workdir)
        self.account = account

    def backend(self) -> contextlib.AbstractAsyncContextManager[Backend]:
        config = LocalConfig(
            state_dir=self.state_dir,
            cpus=2,
            tick=0.2,
            kill_grace=1,
            run_as_user=True,
            user_template=self.account,
        )
        assert config.runs_as_users
        return started(LocalBackend(config))
