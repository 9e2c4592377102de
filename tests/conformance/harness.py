"""How the conformance suite drives each backend: start one, and make a spec for an outcome.

A harness knows the one thing the suite cannot say in a backend-neutral way:
how to write a job that succeeds, fails with exit code 3, or runs until it is
cancelled, and that prints a given line.
"""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from kbatch.arrays import IndexSet
from kbatch.backends.base import Backend
from kbatch.backends.fake import FakeBackend, FakeConfig
from kbatch.backends.local.backend import LocalBackend, LocalConfig
from kbatch.models import JobSpec

__all__ = ["FakeHarness", "Harness", "LocalAsUserHarness", "LocalHarness"]

OUTCOMES = ("succeed", "fail", "run")
# An array's tasks may also run "brief"ly: long enough to be seen running, then succeed.
TASK_OUTCOMES = (*OUTCOMES, "brief")
_VARIABLE_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def by_outcome(default: str, tasks: Mapping[int, str]) -> dict[str, IndexSet]:
    """The tasks of each outcome other than ``default``."""
    for outcome in (default, *tasks.values()):
        if outcome not in TASK_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(TASK_OUTCOMES)}")
    groups: dict[str, list[int]] = {}
    for index, outcome in tasks.items():
        if outcome != default:
            groups.setdefault(outcome, []).append(index)
    return {outcome: IndexSet.of(indexes) for outcome, indexes in groups.items()}


def variables(output: bytes) -> dict[str, str]:
    """The ``NAME=value`` lines that ``env`` printed, as a dict."""
    found: dict[str, str] = {}
    for line in output.decode(errors="replace").splitlines():
        match = _VARIABLE_LINE.match(line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


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

    def array_spec(
        self,
        array: str,
        default: str = "succeed",
        *,
        tasks: Mapping[int, str] | None = None,
        text: str = "hello",
        **fields: Any,
    ) -> JobSpec:
        """An array whose task ``i`` ends as ``tasks.get(i, default)`` (an outcome of
        :data:`TASK_OUTCOMES`), after printing ``text`` and its environment."""
        raise NotImplementedError(
            f"the {self.name} harness cannot give an array's tasks outcomes of their own yet"
        )

    async def task_environment(self, backend: Backend, task_id: str) -> dict[str, str]:
        """The variables task ``task_id`` of an :meth:`array_spec` ran with: its script
        printed them (``env``) to its output."""
        output = b"".join([chunk async for chunk in backend.logs(task_id, follow=False)])
        return variables(output)


class FakeHarness(Harness):
    name = "fake"
    start_within = 5.0

    def backend(self) -> contextlib.AbstractAsyncContextManager[Backend]:
        return started(FakeBackend(FakeConfig(slots=2)))

    def spec(self, outcome: str, *, text: str = "hello", **fields: Any) -> JobSpec:
        marker = {"succeed": "run=0.05", "fail": "run=0.05 exit=3", "run": "run=forever"}
        script = f"#!/bin/sh\n# fake: {marker[outcome]}\necho {text}\n"
        return JobSpec(script=script, workdir="/tmp", **fields)

    _TASK = {
        "succeed": "run{0}=0.05 exit{0}=0",
        "fail": "run{0}=0.05 exit{0}=3",
        "run": "run{0}=forever",
        "brief": "run{0}=0.5 exit{0}=0",
    }

    def array_spec(
        self,
        array: str,
        default: str = "succeed",
        *,
        tasks: Mapping[int, str] | None = None,
        text: str = "hello",
        **fields: Any,
    ) -> JobSpec:
        words = [self._TASK[default].format("")]
        for outcome, indexes in by_outcome(default, tasks or {}).items():
            words.append(self._TASK[outcome].format(f"[{indexes}]"))
        script = f"#!/bin/sh\n# fake: {' '.join(words)}\necho {text}\nenv\n"
        return JobSpec(script=script, workdir="/tmp", array=array, **fields)


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

    _TASK = {"succeed": "true", "fail": "exit 3", "run": "exec sleep 300", "brief": "sleep 1"}

    def array_spec(
        self,
        array: str,
        default: str = "succeed",
        *,
        tasks: Mapping[int, str] | None = None,
        text: str = "hello",
        **fields: Any,
    ) -> JobSpec:
        cases = "".join(
            f"  {'|'.join(str(i) for i in indexes)}) {self._TASK[outcome]} ;;\n"
            for outcome, indexes in by_outcome(default, tasks or {}).items()
        )
        script = (
            f"#!/bin/sh\necho {text}\nenv\n"
            f'case "$SLURM_ARRAY_TASK_ID" in\n{cases}  *) {self._TASK[default]} ;;\nesac\n'
        )
        return JobSpec(script=script, workdir=str(self.workdir), array=array, **fields)


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
