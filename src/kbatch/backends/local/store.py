"""The local backend's record of jobs: one SQLite table in WAL mode.

SQL text is built only from constant column names (S608 is off for this
module); every value is a bound parameter.

SQLite is in the standard library, needs no server, survives ``kill -9`` of
the process using it (every change is a committed transaction; for power loss
see :class:`JobStore`'s ``synchronous``), and a query
over ten thousand rows takes milliseconds, so calls are made directly from the
event loop rather than through a thread pool.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from kbatch.arrays import IndexSet, parse_array
from kbatch.backends.local.scheduler import Demand
from kbatch.errors import ApiError, Conflict, PermissionDenied
from kbatch.lifecycle import Desired
from kbatch.models import Job, JobSpec, JobState

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SYNCHRONOUS",
    "Insert",
    "JobRecord",
    "JobStore",
    "PendingRow",
    "TaskSummary",
]

# The schema as the first release made it (version 1); later versions are migrations.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    user            TEXT NOT NULL,
    name            TEXT NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT,
    exit_code       INTEGER,
    submitted       REAL NOT NULL,
    started         REAL,
    finished        REAL,
    output          TEXT NOT NULL,
    error           TEXT,
    cpus            INTEGER NOT NULL,
    memory          INTEGER,
    gpus            INTEGER NOT NULL,
    time_limit      INTEGER,
    workdir         TEXT,
    comment         TEXT,
    spec            BLOB NOT NULL,
    idempotency_key TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (user, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (state) WHERE state IN ('PENDING', 'RUNNING');
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (user, id);
"""
# Migrations, by the version they lead to: each a script run in one transaction.
MIGRATIONS: dict[int, str] = {
    # 2: the desired state (run, hold, cancel) apart from the observed one; whether the
    # end-of-job hook has run (it had, for every job that ended under version 1); who cancelled.
    2: """
ALTER TABLE jobs ADD COLUMN desired TEXT NOT NULL DEFAULT 'run';
ALTER TABLE jobs ADD COLUMN finalized INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancelled_by TEXT;
UPDATE jobs SET finalized = 1 WHERE state NOT IN ('PENDING', 'RUNNING');
CREATE INDEX jobs_unfinalized ON jobs (id) WHERE finalized = 0;
""",
    # 3: what a pending job waits for besides resources (issue 13): its dependency
    # (normalised text), whether to cancel it when that can never be met, its --begin.
    3: """
ALTER TABLE jobs ADD COLUMN dependency TEXT;
ALTER TABLE jobs ADD COLUMN kill_on_invalid_dep INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN begin REAL;
CREATE INDEX jobs_gated ON jobs (id)
    WHERE state = 'PENDING' AND (dependency IS NOT NULL OR begin IS NOT NULL);
""",
    # 4: arrays (issue 12).  An array is one row (its "head", array_pending not NULL)
    # until its tasks start: array_pending holds the indexes not started yet, in Slurm's
    # form ('' once all have).  Each task that starts becomes a row of its own, with
    # array_job_id (the head's id) and array_task_id (its index), and an empty spec: it
    # runs its head's.
    4: """
ALTER TABLE jobs ADD COLUMN array_job_id INTEGER;
ALTER TABLE jobs ADD COLUMN array_task_id INTEGER;
ALTER TABLE jobs ADD COLUMN array_pending TEXT;
ALTER TABLE jobs ADD COLUMN array_throttle INTEGER;
CREATE INDEX jobs_array ON jobs (array_job_id, array_task_id) WHERE array_task_id IS NOT NULL;
""",
}
SCHEMA_VERSION = max(MIGRATIONS)
# What a listing shows: everything but the spec, which only a job's start needs.
_JOB_COLUMNS = (
    "id, user, name, state, reason, exit_code, submitted, started, finished, output, error, "
    "cpus, memory, gpus, time_limit, workdir, comment, cancelled_by, dependency, begin, "
    "array_job_id, array_task_id, array_pending, array_throttle"
)
# Rows a listing shows: every job and task, and an array's head while some of its tasks
# have not started (it stands for them).
_SHOWN_ROWS = "(array_pending IS NULL OR array_pending != '')"
_COLUMNS = f"{_JOB_COLUMNS}, spec, desired, finalized"
_STATES = {state.value: state for state in JobState}


_UPDATABLE = frozenset(
    {
        "state",
        "reason",
        "exit_code",
        "started",
        "finished",
        "output",
        "error",
        "desired",
        "finalized",
        "cancelled_by",
        "array_pending",
        "array_throttle",
    }
)


def _assignments(fields: dict[str, object]) -> tuple[str, list[object]]:
    """``a = ?, b = ?`` and the values; column names come from code, never from users."""
    unknown = set(fields) - _UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    values = [str(v) if isinstance(v, JobState | Desired) else v for v in fields.values()]
    return ", ".join(f"{name} = ?" for name in fields), values


@contextmanager
def _storage_errors() -> Iterator[None]:
    """A full or failing disk is the server's trouble, said as such: 507, never a bare 500."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "full" in text or "disk I/O" in text or "readonly" in text:
            raise ApiError(
                f"the kbatch server cannot record the change: its disk is full or failing "
                f"({text}); an admin must free space, then try again",
                status=507,
                code="insufficient_storage",
            ) from exc
        raise


@dataclass(frozen=True)
class Insert:
    """One submission for :meth:`JobStore.insert_many` (the arguments of ``insert``)."""

    user: str
    spec: JobSpec
    paths: Callable[[int], tuple[str, str | None]]
    idempotency_key: str | None
    now: float
    max_active: int | None = None
    priority: bool = False


@dataclass(frozen=True)
class TaskSummary:
    index: int
    state: JobState
    exit_code: int | None
    started: float | None
    finished: float | None


@dataclass(frozen=True)
class PendingRow:
    """A pending job the scheduler may start; for an array's head, the tasks waiting."""

    demand: Demand
    reason: str | None
    array_pending: str | None = None
    array_throttle: int | None = None


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass
class JobRecord:
    """A row of the jobs table."""

    id: int
    user: str
    name: str
    state: JobState
    reason: str | None
    exit_code: int | None
    submitted: float
    started: float | None
    finished: float | None
    output: str
    error: str | None
    cpus: int
    memory: int | None
    gpus: int
    time_limit: int | None
    workdir: str | None
    comment: str | None
    cancelled_by: str | None
    dependency: str | None
    begin: float | None
    array_job_id: int | None
    array_task_id: int | None
    array_pending: str | None
    array_throttle: int | None
    spec_json: bytes
    desired: Desired
    finalized: int

    @property
    def spec(self) -> JobSpec:
        """The spec (a task's is its array's: ask the backend, which reads the head)."""
        if self.is_task:
            raise ValueError(f"row {self.id} is a task; its spec is its array's")
        return msgspec.json.decode(self.spec_json, type=JobSpec)

    @property
    def is_head(self) -> bool:
        """Whether this row is an array (the tasks not started yet stand in it)."""
        return self.array_pending is not None

    @property
    def is_task(self) -> bool:
        return self.array_task_id is not None

    def to_job(self) -> Job:
        return _job(
            (
                self.id,
                self.user,
                self.name,
                self.state.value,
                self.reason,
                self.exit_code,
                self.submitted,
                self.started,
                self.finished,
                self.output,
                self.error,
                self.cpus,
                self.memory,
                self.gpus,
                self.time_limit,
                self.workdir,
                self.comment,
                self.cancelled_by,
                self.dependency,
                self.begin,
                self.array_job_id,
                self.array_task_id,
                self.array_pending,
                self.array_throttle,
            )
        )


def _record(row: tuple[object, ...]) -> JobRecord:
    values = list(row)
    values[3] = _STATES[str(values[3])]
    values[25] = Desired(str(values[25]))
    return JobRecord(*values)  # type: ignore[arg-type]


def _job(row: tuple[Any, ...]) -> Job:
    """A row of ``_JOB_COLUMNS`` as the wire model: a job, a task (``ID_INDEX``), or an
    array's tasks that have not started (the head: ``array_tasks`` says which)."""
    array_job_id, task, pending, throttle = row[20], row[21], row[22], row[23]
    return Job(
        id=str(row[0]) if task is None else f"{array_job_id}_{task}",
        user=row[1],
        name=row[2],
        state=_STATES[row[3]],
        reason=row[4],
        exit_code=row[5],
        submitted=datetime.fromtimestamp(row[6], UTC),
        started=_ts(row[7]),
        finished=_ts(row[8]),
        workdir=row[15],
        output=row[9],
        error=row[10],
        cpus=row[11],
        memory=row[12],
        gpus=row[13],
        time_limit=row[14],
        comment=row[16],
        cancelled_by=row[17],
        dependency=row[18],
        begin=_ts(row[19]),
        backend="local",
        array_job_id=None if array_job_id is None else str(array_job_id),
        array_task_id=task,
        array_tasks=pending,
        array_throttle=throttle,
    )


def _where(
    user: str | None, states: Collection[JobState] | None, after: int | None = None
) -> tuple[str, list[object]]:
    clauses: list[str] = [_SHOWN_ROWS]
    params: list[object] = []
    if after is not None:
        clauses.append("id > ?")
        params.append(after)
    if user is not None:
        clauses.append("user = ?")
        params.append(user)
    if states is not None:
        clauses.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(str(s) for s in states)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


SYNCHRONOUS = ("normal", "full")


class JobStore:
    """The jobs table.  A committed change is on disk in this sense (``synchronous``):

    - ``"normal"`` (SQLite's ``synchronous=NORMAL`` in WAL mode, the default): the
      commit has written its pages to the write-ahead log with ``write()`` before it
      returns, so it survives the server's own death (SIGKILL, a crash, the OOM
      killer): the kernel holds the data.  It does not survive a power loss or a
      kernel crash: the log is fsynced only when it is checkpointed, and the last
      commits before one may be rolled back (the file stays consistent, never half
      written).
    - ``"full"``: every commit also fsyncs the log, and survives a power loss too.
      A commit then costs an fsync (2.5 ms on this machine's disk); the local
      backend's group commit shares it between the submissions of one moment.
    """

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        path.chmod(0o600)  # it holds the jobs' environments
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA busy_timeout=5000")
        self.migrate()

    def migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, one migration (transaction) at a time."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer kbatch (schema {version}); upgrade kbatch"
            )
        if version == 0:
            self._db.executescript(_SCHEMA_V1)  # new, or version 1 before it was recorded
            version = 1
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # executescript commits first; the BEGIN makes the migration all or nothing.
            try:
                self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{MIGRATIONS[target]}\n"
                    f"PRAGMA user_version={target};\nCOMMIT;"
                )
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._db.close()
                raise

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with _storage_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def insert(
        self,
        *,
        user: str,
        spec: JobSpec,
        paths: Callable[[int], tuple[str, str | None]],
        idempotency_key: str | None,
        now: float,
        max_active: int | None = None,
        priority: bool = False,
    ) -> tuple[JobRecord, bool]:
        """Insert a PENDING job, or return the one already made with this idempotency key.

        ``paths`` turns the new job's id into its output and error file names
        (``%j`` needs the id), inside the same transaction.  Returns the record
        and whether it is new.  The same key with another spec is a :class:`Conflict`.
        With ``max_active``, a user who already has that many jobs pending or running
        is refused (:class:`PermissionDenied`), counted in the same transaction.
        With ``priority``, a job inserted while an earlier one of its user is still
        pending gets the reason ``Priority`` (it cannot start before that one), in the
        same transaction: one commit per submission.
        """
        with self.transaction() as db:
            return self._insert(
                db, user, spec, paths, idempotency_key, now, max_active, priority=priority
            )

    def insert_many(self, inserts: Sequence[Insert]) -> list[tuple[JobRecord, bool] | ApiError]:
        """:meth:`insert` for each of ``inserts``, all in one transaction (one commit: a
        group commit), each in a savepoint of its own, so that one refused (a
        :class:`Conflict`, a :class:`PermissionDenied`) leaves the others alone.

        Returns, in order, each one's record and whether it is new, or its refusal.
        A failure of the transaction itself (a full disk) is raised: then none is stored.
        """
        results: list[tuple[JobRecord, bool] | ApiError] = []
        with self.transaction() as db:
            for item in inserts:
                db.execute("SAVEPOINT one_insert")
                try:
                    results.append(
                        self._insert(
                            db,
                            item.user,
                            item.spec,
                            item.paths,
                            item.idempotency_key,
                            item.now,
                            item.max_active,
                            priority=item.priority,
                        )
                    )
                except ApiError as exc:
                    db.execute("ROLLBACK TO one_insert")
                    results.append(exc)
                db.execute("RELEASE one_insert")
        return results

    def _insert(
        self,
        db: sqlite3.Connection,
        user: str,
        spec: JobSpec,
        paths: Callable[[int], tuple[str, str | None]],
        idempotency_key: str | None,
        now: float,
        max_active: int | None,
        *,
        priority: bool,
    ) -> tuple[JobRecord, bool]:
        """:meth:`insert`'s work, in the caller's transaction."""
        spec_json = msgspec.json.encode(spec)
        if idempotency_key is not None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE user = ? AND idempotency_key = ?",
                (user, idempotency_key),
            ).fetchone()
            if row is not None:
                existing = _record(row)
                if existing.spec_json != spec_json:
                    raise Conflict(
                        f"Idempotency-Key {idempotency_key!r} was used for job {existing.id} "
                        "with another spec; use a new key for a new job",
                        status=409,
                        code="idempotency_key_reused",
                    )
                return existing, False
        if max_active is not None:
            # Each task of an array counts, as in Slurm: those waiting in a head too.
            rows = db.execute(
                "SELECT array_pending FROM jobs WHERE user = ? AND state IN ('PENDING', 'RUNNING')",
                (user,),
            ).fetchall()
            active = sum(len(IndexSet.parse(p)) if p else 1 for (p,) in rows)
            adding = len(parse_array(spec.array).indexes) if spec.array else 1
            if active + adding > max_active:
                asked = f"; this submission adds {adding}" if adding > 1 else ""
                raise PermissionDenied(
                    f"you have {active} jobs pending or running{asked}; the limit (policy "
                    f"max_submitted_jobs_per_user) is {max_active}: wait for some to end "
                    "or cancel some",
                    status=403,
                    code="submit_limit",
                )
        desired = Desired.HOLD if spec.hold else Desired.RUN
        reason = "JobHeldUser" if spec.hold else "None"
        if priority and not spec.hold and self.pending_of(user, db):
            reason = "Priority"
        cursor = db.execute(
            "INSERT INTO jobs (user, name, state, reason, submitted, output, error, cpus, "
            "memory, gpus, time_limit, workdir, comment, spec, idempotency_key, desired, "
            "dependency, kill_on_invalid_dep, begin) "
            "VALUES (?, ?, 'PENDING', ?, ?, '', NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                user,
                spec.name or "job",
                reason,
                now,
                spec.cpus,
                spec.memory,
                spec.gpus,
                spec.time_limit,
                spec.workdir,
                spec.comment,
                spec_json,
                idempotency_key,
                str(desired),
                spec.dependency,
                int(bool(spec.kill_on_invalid_dep)),
                spec.begin.timestamp() if spec.begin else None,
            ),
        )
        job_id = cursor.lastrowid
        assert job_id is not None
        output, error = "", None
        array_pending: str | None = None
        array_throttle: int | None = None
        if spec.array is not None:  # the head: its tasks' files are named as they start
            request = parse_array(spec.array)
            array_pending, array_throttle = str(request.indexes), request.throttle
            db.execute(
                "UPDATE jobs SET array_job_id = id, array_pending = ?, array_throttle = ? "
                "WHERE id = ?",
                (array_pending, array_throttle, job_id),
            )
        else:
            output, error = paths(job_id)
            db.execute(
                "UPDATE jobs SET output = ?, error = ? WHERE id = ?", (output, error, job_id)
            )
        # The row as written (tests/unit/test_local_store.py checks it against a read).
        record = JobRecord(
            id=job_id,
            user=user,
            name=spec.name or "job",
            state=JobState.PENDING,
            reason=reason,
            exit_code=None,
            submitted=now,
            started=None,
            finished=None,
            output=output,
            error=error,
            cpus=spec.cpus,
            memory=spec.memory,
            gpus=spec.gpus,
            time_limit=spec.time_limit,
            workdir=spec.workdir,
            comment=spec.comment,
            cancelled_by=None,
            dependency=spec.dependency,
            begin=spec.begin.timestamp() if spec.begin else None,
            array_job_id=job_id if spec.array is not None else None,
            array_task_id=None,
            array_pending=array_pending,
            array_throttle=array_throttle,
            spec_json=spec_json,
            desired=desired,
            finalized=0,
        )
        return record, True

    def split(
        self,
        head: JobRecord,
        *,
        count: int | None = None,
        indexes: Collection[int] = (),
        paths: Callable[[int, int], tuple[str, str | None]],
        now: float,
        desired: Desired = Desired.RUN,
        cancelled_by: str | None = None,
    ) -> list[int]:
        """Turn tasks of the array ``head`` that have not started into rows of their own:
        its ``count`` lowest waiting indexes, or those of ``indexes`` still waiting.

        In one transaction: the head's waiting set shrinks by exactly the rows made
        (and the head is marked done once none wait).  ``paths(row_id, index)`` names
        a task's files.  Returns the new rows' ids, in index order.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT array_pending, state FROM jobs WHERE id = ?", (head.id,)
            ).fetchone()
            if row is None or not row[0] or row[1] != "PENDING":
                return []
            waiting = IndexSet.parse(row[0])
            if count is not None:
                taken, rest = waiting.take(count)
            else:
                chosen = set(indexes)
                taken = [i for i in waiting if i in chosen] if chosen else []
                rest = waiting.without(taken)
            ids: list[int] = []
            for index in taken:
                cursor = db.execute(
                    "INSERT INTO jobs (user, name, state, reason, submitted, output, error, "
                    "cpus, memory, gpus, time_limit, workdir, comment, spec, desired, "
                    "cancelled_by, array_job_id, array_task_id) "
                    "VALUES (?, ?, 'PENDING', ?, ?, '', NULL, ?, ?, ?, ?, ?, ?, X'', ?, ?, ?, ?)",
                    (
                        head.user,
                        head.name,
                        "None",
                        head.submitted,
                        head.cpus,
                        head.memory,
                        head.gpus,
                        head.time_limit,
                        head.workdir,
                        head.comment,
                        str(desired),
                        cancelled_by,
                        head.id,
                        index,
                    ),
                )
                task_id = cursor.lastrowid
                assert task_id is not None
                output, error = paths(task_id, index)
                db.execute(
                    "UPDATE jobs SET output = ?, error = ? WHERE id = ?", (output, error, task_id)
                )
                ids.append(task_id)
            if rest:
                db.execute("UPDATE jobs SET array_pending = ? WHERE id = ?", (str(rest), head.id))
            else:  # every task has a row: the head stands for none, and is not listed
                db.execute(
                    "UPDATE jobs SET array_pending = '', state = 'COMPLETED', reason = NULL, "
                    "finished = ?, finalized = 1 WHERE id = ?",
                    (now, head.id),
                )
            return ids

    def task(self, array_id: int, index: int) -> JobRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE array_job_id = ? AND array_task_id = ?",
            (array_id, index),
        ).fetchone()
        return None if row is None else _record(row)

    def tasks(self, array_id: int, *, active: bool = False) -> list[JobRecord]:
        """The array's tasks that have rows (started, or split off), by index."""
        extra = " AND state IN ('PENDING', 'RUNNING')" if active else ""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE array_job_id = ? AND array_task_id IS NOT NULL"
            f"{extra} ORDER BY array_task_id",
            (array_id,),
        )
        return [_record(row) for row in rows]

    def task_summary(self, array_id: int) -> list[TaskSummary]:
        """Every task row of the array, by index: what the array's own view needs."""
        rows = self._db.execute(
            "SELECT array_task_id, state, exit_code, started, finished FROM jobs "
            "WHERE array_job_id = ? AND array_task_id IS NOT NULL ORDER BY array_task_id",
            (array_id,),
        )
        return [TaskSummary(i, _STATES[state], code, s, f) for i, state, code, s, f in rows]

    def active_tasks(self) -> dict[int, int]:
        """How many tasks of each array are pending with a row, or running (the throttle)."""
        rows = self._db.execute(
            "SELECT array_job_id, COUNT(*) FROM jobs WHERE state IN ('PENDING', 'RUNNING') "
            "AND array_task_id IS NOT NULL GROUP BY array_job_id"
        )
        return dict(rows.fetchall())

    def get(self, job_id: int) -> JobRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def pending_demands(self) -> list[PendingRow]:
        """The PENDING jobs that may start, in submission order (an array's tasks at the
        array's place, by index): what each asks for, its reason, and for an array's head
        its waiting indexes and throttle."""
        rows = self._db.execute(
            "SELECT id, cpus, COALESCE(memory, 0), gpus, user, reason, array_pending, "
            "array_throttle FROM jobs "
            "WHERE state IN ('PENDING', 'RUNNING') AND state = 'PENDING' AND desired = 'run' "
            "ORDER BY COALESCE(array_job_id, id), array_task_id IS NULL, array_task_id"
        )
        return [
            PendingRow(Demand(job_id, cpus, memory, gpus, user), reason, pending, throttle)
            for job_id, cpus, memory, gpus, user, reason, pending, throttle in rows
        ]

    def gated(self) -> list[tuple[int, str, str, str | None, bool, float | None, str | None]]:
        """Pending jobs that may run but wait for something besides resources:
        (id, user, name, dependency, kill_on_invalid_dep, begin, reason), in order."""
        rows = self._db.execute(
            "SELECT id, user, name, dependency, kill_on_invalid_dep, begin, reason FROM jobs "
            "WHERE state = 'PENDING' AND (dependency IS NOT NULL OR begin IS NOT NULL) "
            "AND desired = 'run' ORDER BY id"
        )
        return [(i, u, n, d, bool(k), b, r) for i, u, n, d, k, b, r in rows]

    def states(self, job_ids: Collection[int]) -> dict[str, JobState]:
        """The states of these jobs (those that exist), keyed by id as text."""
        if not job_ids:
            return {}
        marks = ", ".join("?" * len(job_ids))
        rows = self._db.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", [*job_ids])
        return {str(job_id): _STATES[state] for job_id, state in rows}

    def active_earlier(self, user: str, name: str, job_id: int) -> bool:
        """Whether a job of this user and name submitted before ``job_id`` is still active."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE state IN ('PENDING', 'RUNNING') AND user = ? AND name = ? "
            "AND id < ? LIMIT 1",
            (user, name, job_id),
        ).fetchone()
        return row is not None

    def running_demands(self) -> list[Demand]:
        rows = self._db.execute(
            "SELECT id, cpus, COALESCE(memory, 0), gpus, user FROM jobs "
            "WHERE state IN ('PENDING', 'RUNNING') AND state = 'RUNNING' ORDER BY id"
        )
        return [Demand(*row) for row in rows]

    def last_started(self) -> dict[str, float]:
        """When each user's latest job started (the fair-share tie-break, after a restart)."""
        rows = self._db.execute(
            "SELECT user, MAX(started) FROM jobs WHERE started IS NOT NULL GROUP BY user"
        )
        return {user: started for user, started in rows}

    def needing_attention(self) -> list[int]:
        """Jobs a reconciler must look at after a restart or on a periodic resync: running
        ones, pending ones not plainly waiting to run, and ended ones whose hook has not run."""
        rows = self._db.execute(
            "SELECT id FROM jobs WHERE state IN ('PENDING', 'RUNNING') "
            "AND (state = 'RUNNING' OR desired != 'run') "
            "UNION SELECT id FROM jobs WHERE finalized = 0 AND state NOT IN ('PENDING', 'RUNNING') "
            "ORDER BY id"
        )
        return [row[0] for row in rows]

    def pending_of(self, user: str, db: sqlite3.Connection | None = None) -> bool:
        """Whether ``user`` has a job waiting to start."""
        cursor = (db or self._db).execute(
            "SELECT 1 FROM jobs WHERE state IN ('PENDING', 'RUNNING') AND state = 'PENDING' "
            "AND user = ? LIMIT 1",
            (user,),
        )
        return cursor.fetchone() is not None

    def pending_before(self, job_id: int, user: str) -> bool:
        """Whether a job ``user`` submitted before ``job_id`` is still waiting to start."""
        # The IN term is the partial index's own condition: with it SQLite searches the
        # index of active jobs instead of every older row.
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE state IN ('PENDING', 'RUNNING') AND state = 'PENDING' "
            "AND id < ? AND user = ? LIMIT 1",
            (job_id, user),
        ).fetchone()
        return row is not None

    def list_jobs(
        self,
        *,
        user: str | None = None,
        states: Collection[JobState] | None = None,
        limit: int | None = None,
        after: int | None = None,
    ) -> list[Job]:
        """``[r.to_job() for r in list(...)]`` without reading the specs: what ``kqueue`` waits for.

        ``after``/``limit`` page through the jobs by id.
        """
        where, params = _where(user, states, after)
        tail = "" if limit is None else f" LIMIT {int(limit)}"
        rows = self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY id{tail}", params
        )
        return [_job(row) for row in rows]

    def list(
        self, *, user: str | None = None, states: Collection[JobState] | None = None
    ) -> list[JobRecord]:
        where, params = _where(user, states)
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY id", params)
        return [_record(row) for row in rows]

    def update(self, job_id: int, **fields: object) -> None:
        if not fields:
            return
        assignments, values = _assignments(fields)
        with _storage_errors():
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))

    def transition(
        self,
        job_id: int,
        expected: JobState,
        *,
        when_desired: Sequence[Desired] | None = None,
        **fields: object,
    ) -> bool:
        """Update only if the job is still in ``expected`` state (and, if given, its desired
        state is one of ``when_desired``); True if it was."""
        return self.transition_fields(job_id, expected, fields, when_desired=when_desired)

    def transition_fields(
        self,
        job_id: int,
        expected: JobState,
        fields: dict[str, object],
        *,
        when_desired: Sequence[Desired] | None = None,
    ) -> bool:
        """:meth:`transition` with the changes as a dict."""
        assignments, values = _assignments(fields)
        condition = "id = ? AND state = ?"
        params: list[object] = [job_id, str(expected)]
        if when_desired is not None:
            condition += f" AND desired IN ({', '.join('?' * len(when_desired))})"
            params.extend(str(d) for d in when_desired)
        with _storage_errors():
            cursor = self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE {condition}", (*values, *params)
            )
        return cursor.rowcount == 1
