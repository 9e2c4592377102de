"""An in-memory backend for fast tests of the server and of the backend contract.

Nothing runs: a job's "script" is read for a few marker lines that say what
its run looks like, and time passes on the event loop::

    #!/bin/sh
    # fake: run=0.2 exit=3
    # fake: exit[1,3-5]=2 run[7]=forever oom[9]
    echo hello          (each ``echo`` line is a line of its output)
    env                 (the job's environment, one NAME=value line each)

``run`` is how long it runs in seconds (``forever`` until cancelled; default
0.05), ``exit`` its exit code (default 0), ``oom`` that it goes over its
memory.  In an array, ``key[INDEXES]=value`` applies to those tasks only
(``INDEXES`` in ``--array``'s grammar), so a test can make chosen tasks fail.
``$NAME`` and ``${NAME}`` in ``echo`` lines are the job's variables.

It follows the same lifecycle as the real backends: desired state apart from
observed state, one reconciler per job from a work queue, hooks at start and
on every terminal path, events for every change.  An array is one record
until its tasks start, as on the local backend: each start turns the lowest
waiting index into a task of its own (``ID_INDEX``).  It passes the
conformance suite (``tests/conformance``), which is what keeps it honest.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import itertools
import logging
import re
import shlex
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from kbatch.arrays import IndexSet, params_environment, parse_array, task_environment
from kbatch.backends.base import Backend, decode_section, not_pending, paginate
from kbatch.backends.derive import job_environment, output_paths, pending_job
from kbatch.backends.workqueue import WorkQueue, stop_workers
from kbatch.dependencies import DependencyStatus, describe, evaluate, parse_dependency
from kbatch.errors import (
    Conflict,
    InvalidRequest,
    KbatchError,
    NotFound,
    ServiceUnavailable,
    SpecError,
    TransportError,
)
from kbatch.lifecycle import Desired, JobRef, check_transition, parse_job_ref
from kbatch.models import Job, JobList, JobSpec, JobState

__all__ = ["FakeBackend", "FakeConfig", "aggregate_state"]

log = logging.getLogger("kbatch.fake")
_MARKER = re.compile(r"^#\s*fake:(.*)$", re.MULTILINE)
_LINE = re.compile(r"^(?:echo (.*)|(env))$", re.MULTILINE)
_WORD = re.compile(r"^([a-z_]+)(?:\[([0-9,:-]+)\])?(?:=(.*))?$")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# An array's ends, worst first: its state once every task has ended and not all completed.
_WORST = (
    JobState.FAILED,
    JobState.OUT_OF_MEMORY,
    JobState.TIMEOUT,
    JobState.NODE_FAIL,
    JobState.CANCELLED,
)


def aggregate_state(counts: Mapping[str, int]) -> JobState:
    """An array's state from its tasks per state: active while any task is, then
    COMPLETED if all completed, else the worst end (FAILED first, CANCELLED last)."""
    if counts.get(JobState.RUNNING.value):
        return JobState.RUNNING
    if counts.get(JobState.PENDING.value):
        return JobState.PENDING
    for state in _WORST:
        if counts.get(state.value):
            return state
    return JobState.COMPLETED


@dataclass
class FakeConfig:
    slots: int = 4  # jobs running at once
    default_run: float = 0.05  # seconds a job runs without a run= marker


@dataclass
class _Run:
    seconds: float | None  # None: until cancelled
    exit_code: int = 0
    oom: bool = False
    lines: list[str | None] = field(default_factory=list)  # echo text; None: env


def _plan(script: str, default_run: float, index: int | None = None) -> _Run:
    run = _Run(seconds=default_run)
    for marker in _MARKER.findall(script):
        for word in marker.split():
            match = _WORD.match(word)
            if match is None:
                continue
            key, only, value = match.group(1), match.group(2), match.group(3) or ""
            if only is not None:
                try:
                    chosen = parse_array(only).indexes
                except SpecError:
                    continue
                if index is None or index not in chosen:
                    continue
            if key == "run":
                run.seconds = None if value == "forever" else float(value)
            elif key == "exit":
                run.exit_code = int(value)
            elif key == "oom":
                run.oom = True
    run.lines = [echo if env is None or not env else None for echo, env in _LINE.findall(script)]
    return run


def _output(run: _Run, environment: Mapping[str, str]) -> bytes:
    def value(match: re.Match[str]) -> str:
        return environment.get(match.group(1) or match.group(2), "")

    out: list[str] = []
    for line in run.lines:
        if line is None:
            out.extend(f"{k}={v}" for k, v in sorted(environment.items()))
            continue
        try:  # as a shell would: quotes removed, words joined by one space
            words = shlex.split(line)
        except ValueError:
            words = [line]
        out.append(" ".join(_VARIABLE.sub(value, word) for word in words))
    return "".join(f"{line}\n" for line in out).encode()


@dataclass
class _Entry:
    job: Job
    spec: JobSpec
    desired: Desired
    plan: _Run
    key: str | None
    ends_at: float | None = None  # when its run ends by itself
    deadline: float | None = None  # when its time limit is reached
    finalized: bool = False
    output: bytearray = field(default_factory=bytearray)
    array: _Array | None = None  # the array of a task
    index: int | None = None


@dataclass
class _Array:
    """An array: one record, with its tasks not yet started as sets of indexes."""

    job: Job  # as submitted: id, user, name, paths, ...
    spec: JobSpec
    indexes: IndexSet
    throttle: int | None
    key: str | None
    waiting: set[int]  # desired run, not started
    heap: list[int]  # the waiting indexes (and some gone since), lowest first
    held: set[int] = field(default_factory=set)  # desired hold, not started
    cancelled: set[int] = field(default_factory=set)  # cancelled before they started
    tasks: dict[int, _Entry] = field(default_factory=dict)  # started (or being started)
    active: set[int] = field(default_factory=set)  # tasks whose entry has not ended
    reason: str = "None"  # why the waiting tasks wait
    cancelled_by: str | None = None

    def pending(self) -> int:
        return len(self.waiting) + len(self.held)

    def pop_lowest(self) -> int | None:
        while self.heap:
            index = heapq.heappop(self.heap)
            if index in self.waiting:
                self.waiting.discard(index)
                return index
        return None


def _sort_key(job: Job) -> str:
    """Oldest first: an array's tasks by index, then its groups of tasks not started."""
    base = job.array_job_id or job.id
    head = f"{int(base):012d}" if base.isdigit() else base
    if job.array_task_id is not None:
        return f"{head}_{job.array_task_id:010d}"
    if job.array_tasks is not None:
        kind = 2 if job.state is JobState.CANCELLED else int(job.reason == "JobHeldUser")
        return f"{head}~{kind}"
    return head


class FakeBackend(Backend):
    name = "fake"
    config_class = FakeConfig

    def __init__(self, config: FakeConfig | None = None) -> None:
        super().__init__()
        self.config = config or FakeConfig()
        self._jobs: dict[str, _Entry] = {}  # single jobs and the tasks that started
        self._arrays: dict[str, _Array] = {}
        self._active: set[str] = set()  # ids the reconciler may still have work for
        self._keys: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1)
        self._queue: WorkQueue[str] = WorkQueue(base_delay=0.02, max_delay=1.0)
        self._workers: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, state_dir: Path) -> FakeBackend:
        return cls(decode_section(section, FakeConfig, "fake"))

    async def start(self) -> None:
        self._workers = [asyncio.create_task(self._worker()) for _ in range(4)]

    async def stop(self) -> None:
        await stop_workers(self._queue, self._workers)

    # -- the contract ------------------------------------------------------------

    async def submit(self, user: str, spec: JobSpec, *, idempotency_key: str | None) -> Job:
        await self.validate(user, spec)
        if idempotency_key is not None and (user, idempotency_key) in self._keys:
            job_id = self._keys[(user, idempotency_key)]
            same = self._entry_or_array(job_id)
            if msgspec.json.encode(same.spec) != msgspec.json.encode(spec):
                raise Conflict(
                    f"Idempotency-Key {idempotency_key!r} was used for job {job_id} "
                    "with another spec; use a new key for a new job",
                    status=409,
                    code="idempotency_key_reused",
                )
            return same.job if isinstance(same, _Entry) else self._aggregate(same)
        job_id = str(next(self._ids))
        if idempotency_key is not None:
            self._keys[(user, idempotency_key)] = job_id
        if spec.array is not None:
            return self._submit_array(user, spec, job_id, idempotency_key)
        job = pending_job(
            spec,
            job_id=job_id,
            user=user,
            backend=self.name,
            reason="JobHeldUser" if spec.hold else "None",
            paths=output_paths(spec, job_id=job_id, user=user),
        )
        desired = Desired.HOLD if spec.hold else Desired.RUN
        self._jobs[job_id] = _Entry(
            job, spec, desired, _plan(spec.script, self.config.default_run), idempotency_key
        )
        self._active.add(job_id)
        self.events.publish(job)
        self._kick()
        return job

    def _submit_array(
        self, user: str, spec: JobSpec, job_id: str, idempotency_key: str | None
    ) -> Job:
        assert spec.array is not None
        request = parse_array(spec.array)
        job = pending_job(
            spec,
            job_id=job_id,
            user=user,
            backend=self.name,
            reason="JobHeldUser" if spec.hold else "None",
            paths=output_paths(spec, job_id=job_id, user=user, array_id=job_id, task=0),
        )
        job = msgspec.structs.replace(
            job, array_job_id=job_id, array_throttle=request.throttle, output=None, error=None
        )
        indexes = request.indexes
        everything = set(indexes)
        array = _Array(
            job,
            spec,
            indexes,
            request.throttle,
            idempotency_key,
            waiting=set() if spec.hold else everything,
            heap=[] if spec.hold else sorted(everything),
            held=everything if spec.hold else set(),
            reason=job.reason or "None",
        )
        self._arrays[job_id] = array
        self._active.add(job_id)
        shown = self._aggregate(array)
        self.events.publish(shown)
        self._kick()
        return shown

    async def get(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        array = self._arrays.get(ref.job_id)
        if array is not None:
            return self._array_job(array, ref, job_id)
        job = self._entry(job_id).job
        if job.dependency is None or job.state is not JobState.PENDING:
            return job
        shown = describe(parse_dependency(job.dependency), self._states(), singleton_clear=True)
        return msgspec.structs.replace(job, dependency=shown)

    async def spec(self, job_id: str) -> JobSpec | None:
        ref = parse_job_ref(job_id)
        array = self._arrays.get(ref.job_id)
        if array is not None:
            return array.spec
        return self._entry(job_id).spec

    async def list(
        self,
        *,
        user: str | None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> JobList:
        jobs = [
            e.job
            for e in self._jobs.values()
            if (user is None or e.job.user == user) and (states is None or e.job.state in states)
        ]
        for array in self._arrays.values():
            if user is None or array.job.user == user:
                jobs.extend(g for g in self._groups(array) if states is None or g.state in states)
        jobs.sort(key=_sort_key)
        return paginate(jobs, limit=limit, after=after, key=_sort_key)

    async def cancel(self, job_id: str, *, by: str) -> Job:
        ref = parse_job_ref(job_id)
        array = self._arrays.get(ref.job_id)
        if array is not None:
            chosen = self._chosen(array, ref, job_id)
            gone = [i for i in chosen if i in array.waiting or i in array.held]
            if gone:
                array.waiting.difference_update(gone)
                array.held.difference_update(gone)
                array.cancelled.update(gone)
                array.cancelled_by = by
                self.events.publish(self._aggregate(array))
            ending = [array.tasks[i] for i in chosen if i in array.active]
            for entry in ending:
                self._want_cancel(entry, by)
            await asyncio.gather(*(self._queue.sync(e.job.id) for e in ending))
            await self._queue.sync(array.job.id)
            return self._array_job(array, ref, job_id)
        entry = self._entry(job_id)
        if entry.job.state.is_terminal:
            return entry.job
        self._want_cancel(entry, by)
        await self._queue.sync(entry.job.id)
        return entry.job

    def _want_cancel(self, entry: _Entry, by: str) -> None:
        if entry.desired is not Desired.CANCEL and not entry.job.state.is_terminal:
            entry.desired = Desired.CANCEL
            entry.job = msgspec.structs.replace(entry.job, cancelled_by=by)

    async def hold(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        array = self._arrays.get(ref.job_id)
        if array is not None:
            chosen = self._chosen(array, ref, job_id)
            if ref.index is not None and ref.index in array.tasks:
                entry = array.tasks[ref.index]
                if entry.job.state is not JobState.PENDING:
                    raise not_pending(entry.job, "held")
            moving = [i for i in chosen if i in array.waiting]
            if not moving and not any(i in array.held for i in chosen):
                raise not_pending(self._array_job(array, ref, job_id), "held")
            array.waiting.difference_update(moving)
            array.held.update(moving)
            await self._queue.sync(array.job.id)
            return self._array_job(array, ref, job_id)
        entry = self._entry(job_id)
        if entry.job.state is not JobState.PENDING:
            raise not_pending(entry.job, "held")
        if entry.desired is Desired.RUN:
            entry.desired = Desired.HOLD
        await self._queue.sync(job_id)
        return entry.job

    async def release(self, job_id: str) -> Job:
        ref = parse_job_ref(job_id)
        array = self._arrays.get(ref.job_id)
        if array is not None:
            chosen = self._chosen(array, ref, job_id)
            moving = [i for i in chosen if i in array.held]
            if moving:
                array.held.difference_update(moving)
                array.waiting.update(moving)
                for index in moving:
                    heapq.heappush(array.heap, index)
                self._kick()
                await self._queue.sync(array.job.id)
            return self._array_job(array, ref, job_id)
        entry = self._entry(job_id)
        if entry.desired is Desired.HOLD and entry.job.state is JobState.PENDING:
            entry.desired = Desired.RUN
            self._change(entry, reason="None")
            self._kick()
            await self._queue.sync(job_id)
        return entry.job

    async def set_throttle(self, job_id: str, throttle: int | None) -> Job:
        ref = parse_job_ref(job_id)
        array = self._arrays.get(ref.job_id)
        if array is None or ref.tasks is not None:
            self._entry_or_array(job_id)  # NotFound first, for an id that is nothing
            raise Conflict(
                f"job {job_id} is not an array; the throttle is an array's (give its id, "
                "such as 123 for 123_7)",
                status=409,
                code="not_an_array",
            )
        array.throttle = throttle
        self._kick()
        await self._queue.sync(array.job.id)
        return self._aggregate(array)

    async def logs(
        self, job_id: str, *, follow: bool, stream: str = "output"
    ) -> AsyncIterator[bytes]:
        ref = parse_job_ref(job_id)
        array = self._arrays.get(ref.job_id)
        if array is not None and ref.index is None:
            raise InvalidRequest(
                f"job {job_id} is an array: give one task, such as {ref.job_id}_"
                f"{array.indexes.first}",
                status=422,
                code="array_logs",
            )
        if array is not None:
            self._chosen(array, ref, job_id)
        else:
            self._entry(job_id)
        offset = 0
        while True:
            entry = self._jobs.get(str(ref))
            output = entry.output if entry is not None else bytearray()
            if offset < len(output):
                chunk = bytes(output[offset:])
                offset += len(chunk)
                yield chunk
                continue
            if not follow or self._task_ended(array, ref, entry):
                return
            await asyncio.sleep(0.02)

    # -- arrays -----------------------------------------------------------------------

    def _task_ended(self, array: _Array | None, ref: JobRef, entry: _Entry | None) -> bool:
        if entry is not None:
            return entry.job.state.is_terminal
        return array is None or ref.index in array.cancelled

    def _chosen(self, array: _Array, ref: JobRef, job_id: str) -> builtins.list[int]:
        """The indexes of ``array`` that ``ref`` names (NotFound if it names none)."""
        tasks = ref.tasks
        if tasks is None:
            return list(array.indexes)
        chosen = [i for i in tasks if i in array.indexes]
        if not chosen:
            raise NotFound(f"no job {job_id!r}", status=404, code="not_found")
        return chosen

    def _array_job(self, array: _Array, ref: JobRef, job_id: str) -> Job:
        """What ``get`` answers for an array (``ID``), a task (``ID_7``) or tasks (``ID_[..]``)."""
        chosen = self._chosen(array, ref, job_id)
        if ref.index is None:
            subset = None if ref.indexes is None else IndexSet.of(chosen)
            return self._aggregate(array, subset)
        index = ref.index
        entry = array.tasks.get(index)
        if entry is not None:
            return entry.job
        task = self._task_job(array, index)
        if index in array.cancelled:
            return msgspec.structs.replace(
                task,
                state=JobState.CANCELLED,
                reason="CancelledByUser",
                cancelled_by=array.cancelled_by,
            )
        reason = "JobHeldUser" if index in array.held else array.reason
        return msgspec.structs.replace(task, reason=reason)

    def _task_job(self, array: _Array, index: int) -> Job:
        task_id = f"{array.job.id}_{index}"
        paths = output_paths(
            array.spec, job_id=task_id, user=array.job.user, array_id=array.job.id, task=index
        )
        return msgspec.structs.replace(
            array.job,
            id=task_id,
            array_task_id=index,
            array_throttle=None,
            reason=array.reason,
            output=paths.output,
            error=paths.error,
        )

    def _counts(self, array: _Array, subset: IndexSet | None = None) -> dict[str, int]:
        def inside(indexes: set[int]) -> int:
            if subset is None:
                return len(indexes)
            return sum(1 for i in indexes if i in subset)

        counts: dict[str, int] = {}
        pending = inside(array.waiting) + inside(array.held)
        if pending:
            counts[JobState.PENDING.value] = pending
        if cancelled := inside(array.cancelled):
            counts[JobState.CANCELLED.value] = cancelled
        for index, entry in array.tasks.items():
            if subset is None or index in subset:
                state = entry.job.state.value
                counts[state] = counts.get(state, 0) + 1
        return counts

    def _aggregate(self, array: _Array, subset: IndexSet | None = None) -> Job:
        """The whole array (or the tasks in ``subset``) as one job."""
        counts = self._counts(array, subset)
        state = aggregate_state(counts)
        tasks = [e for i, e in array.tasks.items() if subset is None or i in subset]
        codes = [e.job.exit_code for e in tasks if e.job.exit_code is not None]
        starts = [e.job.started for e in tasks if e.job.started is not None]
        ends = [e.job.finished for e in tasks if e.job.finished is not None]
        reason: str | None = None
        if state is JobState.PENDING:
            pending_held = not any(subset is None or i in subset for i in array.waiting)
            reason = "JobHeldUser" if pending_held else array.reason
        elif state.is_terminal and state is not JobState.COMPLETED:
            worst = [e.job.reason for e in tasks if e.job.state is state and e.job.reason]
            reason = worst[0] if worst else "CancelledByUser"
        return msgspec.structs.replace(
            array.job,
            id=array.job.id if subset is None else f"{array.job.id}_[{subset}]",
            state=state,
            reason=reason,
            exit_code=max(codes) if codes else None,
            started=min(starts) if starts else None,
            finished=max(ends) if ends and state.is_terminal else None,
            array_tasks=str(array.indexes if subset is None else subset),
            array_throttle=array.throttle,
            array_counts=counts,
            cancelled_by=array.cancelled_by,
        )

    def _groups(self, array: _Array) -> builtins.list[Job]:
        """The rows of the tasks not started: waiting, held, cancelled before they started."""
        rows: builtins.list[Job] = []
        for indexes, state, reason in (
            (array.waiting, JobState.PENDING, array.reason),
            (array.held, JobState.PENDING, "JobHeldUser"),
            (array.cancelled, JobState.CANCELLED, "CancelledByUser"),
        ):
            if indexes:
                rows.append(
                    msgspec.structs.replace(
                        array.job,
                        state=state,
                        reason=reason,
                        array_tasks=str(IndexSet.of(indexes)),
                        array_throttle=array.throttle,
                        cancelled_by=array.cancelled_by if state is JobState.CANCELLED else None,
                    )
                )
        return rows

    async def _reconcile_array(self, array: _Array) -> None:
        """Start the lowest waiting tasks while there is room (and the throttle allows)."""
        if not array.waiting:
            if not array.active and not array.held:
                self._active.discard(array.job.id)
            return
        reason = await self._waits(array.job, array.spec)
        if reason is not None:
            if reason == "DependencyNeverSatisfied" and array.spec.kill_on_invalid_dep:
                array.cancelled.update(array.waiting | array.held)
                array.waiting.clear()
                array.held.clear()
            self._set_reason(array, reason)
            return
        while array.waiting:
            if array.throttle is not None and len(array.active) >= array.throttle:
                self._set_reason(array, "JobArrayTaskLimit")
                return
            if self._running() >= self.config.slots:
                self._set_reason(array, "Resources")
                return
            index = array.pop_lowest()
            if index is None:
                break
            await self._start_task(array, index)
        self._set_reason(array, "None")

    def _set_reason(self, array: _Array, reason: str) -> None:
        if array.reason != reason:
            array.reason = reason
            self.events.publish(self._aggregate(array))

    async def _start_task(self, array: _Array, index: int) -> None:
        task = msgspec.structs.replace(
            self._task_job(array, index), reason="None", array_tasks=None
        )
        plan = _plan(array.spec.script, self.config.default_run, index)
        entry = _Entry(task, array.spec, Desired.RUN, plan, None, array=array, index=index)
        array.tasks[index] = entry
        array.active.add(index)
        self._jobs[task.id] = entry
        self._active.add(task.id)
        await self._start(entry)

    def _environment(self, entry: _Entry, extra: Mapping[str, str]) -> dict[str, str]:
        """What the job's process would see (the fake prints it for an ``env`` line)."""
        env = dict(entry.spec.environment)
        env.update(extra)
        env.update(job_environment(entry.spec, job_id=entry.job.id, name=entry.job.name))
        array = entry.array
        if array is not None and entry.index is not None:
            env.update(task_environment(array.job.id, entry.index, array.indexes))
            env.update(params_environment(array.spec.params, entry.index))
        return env

    # -- the reconciler -------------------------------------------------------------

    def _entry_or_array(self, job_id: str) -> _Entry | _Array:
        array = self._arrays.get(job_id)
        return array if array is not None else self._entry(job_id)

    def _entry(self, job_id: str) -> _Entry:
        ref = parse_job_ref(job_id)
        entry = self._jobs.get(str(ref)) if ref.indexes is None else None
        if entry is None:
            raise NotFound(f"no job {job_id!r}", status=404, code="not_found")
        return entry

    def _states(self) -> dict[str, JobState]:
        """Every job's state by id, an array's the aggregate (what dependencies read)."""
        states = {i: e.job.state for i, e in self._jobs.items() if e.array is None}
        for array_id, array in self._arrays.items():
            states[array_id] = aggregate_state(self._counts(array))
        return states

    def _kick(self) -> None:
        """Queue every job that may have something to do (the fake's whole 'scheduler')."""
        for job_id in sorted(self._active, key=lambda i: (len(i), i)):
            self._queue.put(job_id)

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                array = self._arrays.get(job_id)
                if array is not None:
                    await self._reconcile_array(array)
                else:
                    await self._reconcile(self._jobs[job_id])
                self._queue.forget(job_id)
            except (ServiceUnavailable, TransportError) as exc:
                log.warning("job %s: will retry: %s", job_id, exc)
                self._queue.put_backoff(job_id)
            finally:
                self._queue.done(job_id)

    def _change(self, entry: _Entry, **fields: Any) -> None:
        old = entry.job.state
        new = fields.get("state", old)
        if new is not old:
            check_transition(old, new, fields.get("reason"))
        entry.job = msgspec.structs.replace(entry.job, **fields)
        self.events.publish(entry.job)

    def _running(self) -> int:
        return sum(
            1
            for job_id in self._active
            if (e := self._jobs.get(job_id)) is not None and e.job.state is JobState.RUNNING
        )

    async def _end(
        self, entry: _Entry, state: JobState, reason: str | None, code: int | None
    ) -> None:
        self._change(entry, state=state, reason=reason, exit_code=code, finished=datetime.now(UTC))
        entry.finalized = True
        self._active.discard(entry.job.id)
        if entry.array is not None and entry.index is not None:
            entry.array.active.discard(entry.index)
            self.events.publish(self._aggregate(entry.array))
        await self.run_finished_hook(entry.job)
        self._kick()

    async def _reconcile(self, entry: _Entry) -> None:
        job = entry.job
        if job.state.is_terminal:
            if not entry.finalized:
                entry.finalized = True
                self._active.discard(job.id)
                await self.run_finished_hook(job)
            return
        if job.state is JobState.PENDING:
            if entry.desired is Desired.CANCEL:
                await self._end(entry, JobState.CANCELLED, "CancelledByUser", None)
            elif entry.desired is Desired.HOLD:
                if job.reason != "JobHeldUser":
                    self._change(entry, reason="JobHeldUser")
            elif (wait := await self._waits(entry.job, entry.spec, entry)) is not None:
                if not entry.job.state.is_terminal and job.reason != wait:
                    self._change(entry, reason=wait)
            elif self._running() < self.config.slots:
                await self._start(entry)
            elif job.reason != "Resources":
                self._change(entry, reason="Resources")
            return
        now = time.monotonic()
        if entry.desired is Desired.CANCEL:
            await self._end(entry, JobState.CANCELLED, "CancelledByUser", 143)
        elif (
            entry.deadline is not None
            and now >= entry.deadline
            and (entry.ends_at is None or entry.ends_at > entry.deadline)
        ):
            await self._end(entry, JobState.TIMEOUT, "TimeLimit", 143)
        elif entry.ends_at is not None and now >= entry.ends_at:
            plan = entry.plan
            if plan.oom:
                await self._end(
                    entry, JobState.OUT_OF_MEMORY, "OutOfMemory: over its --mem limit", 137
                )
            elif plan.exit_code:
                await self._end(entry, JobState.FAILED, "NonZeroExitCode", plan.exit_code)
            else:
                await self._end(entry, JobState.COMPLETED, None, 0)
        else:
            wake = [t for t in (entry.ends_at, entry.deadline) if t is not None]
            if wake:
                self._queue.put_after(entry.job.id, max(min(wake) - now, 0.0))

    async def _waits(self, job: Job, spec: JobSpec, entry: _Entry | None = None) -> str | None:
        """Why a job (or an array's waiting tasks) that may run must wait yet (its --begin,
        its dependency), or None.  A single job whose dependency can never be met is
        cancelled here when it asked to be (``--kill-on-invalid-dep``)."""
        if spec.begin is not None:
            delay = (spec.begin - datetime.now(UTC)).total_seconds()
            if delay > 0:
                self._queue.put_after(job.id, delay)
                return "BeginTime"
        if spec.dependency is None:
            return None
        earlier_active = any(
            e.job.user == job.user
            and e.job.name == job.name
            and e.array is None
            and int(i) < int(job.id)
            and not e.job.state.is_terminal
            for i, e in self._jobs.items()
        )
        status, _, _ = evaluate(
            parse_dependency(spec.dependency), self._states(), singleton_clear=not earlier_active
        )
        if status is DependencyStatus.MET:
            return None
        if status is DependencyStatus.NEVER and spec.kill_on_invalid_dep and entry is not None:
            entry.desired = Desired.CANCEL
            await self._end(entry, JobState.CANCELLED, "DependencyNeverSatisfied", None)
            return "DependencyNeverSatisfied"
        return str(status.value)

    async def _start(self, entry: _Entry) -> None:
        try:
            extra = await self.hooks.environment(entry.job)
        except (ServiceUnavailable, TransportError):
            if entry.job.reason != "JobSetupPending":
                self._change(entry, reason="JobSetupPending")
            if entry.array is not None:  # its own reconciler retries its start
                self._queue.put_backoff(entry.job.id)
                return
            raise
        except KbatchError as exc:
            await self._end(entry, JobState.FAILED, f"JobSetupFailed: {exc}", None)
            return
        if entry.desired is Desired.CANCEL:  # cancelled while the hook ran
            await self._end(entry, JobState.CANCELLED, "CancelledByUser", None)
            return
        self._change(entry, state=JobState.RUNNING, reason=None, started=datetime.now(UTC))
        entry.output += _output(entry.plan, self._environment(entry, extra))
        now = time.monotonic()
        if entry.plan.seconds is not None:
            entry.ends_at = now + entry.plan.seconds
        if entry.spec.time_limit is not None:
            entry.deadline = now + entry.spec.time_limit
        self._queue.put(entry.job.id)  # dirty: reconciled again at once, and wakes itself
