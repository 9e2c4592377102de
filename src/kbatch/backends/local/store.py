"""The local backend's record of jobs: one SQLite table in WAL mode.

SQL text is built only from constant column names (S608 is off for this
module); every value is a bound parameter.

SQLite is in the standard library, needs no server, survives ``kill -9`` of
the process using it (every change is a committed transaction), and a query
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

from kbatch.backends.local.scheduler import Demand
from kbatch.errors import ApiError, Conflict, PermissionDenied
from kbatch.lifecycle import Desired
from kbatch.models import Job, JobSpec, JobState

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "JobRecord", "JobStore"]

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
}
SCHEMA_VERSION = max(MIGRATIONS)
# What a listing shows: everything but the spec, which only a job's start needs.
_JOB_COLUMNS = (
    "id, user, name, state, reason, exit_code, submitted, started, finished, output, error, "
    "cpus, memory, gpus, time_limit, workdir, comment, cancelled_by, dependency, begin"
)
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
    spec_json: bytes
    desired: Desired
    finalized: int

    @property
    def spec(self) -> JobSpec:
        return msgspec.json.decode(self.spec_json, type=JobSpec)

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
            )
        )


def _record(row: tuple[object, ...]) -> JobRecord:
    values = list(row)
    values[3] = _STATES[str(values[3])]
    values[21] = Desired(str(values[21]))
    return JobRecord(*values)  # type: ignore[arg-type]


def _job(row: tuple[Any, ...]) -> Job:
    """A row of ``_JOB_COLUMNS`` as the wire model."""
    return Job(
        id=str(row[0]),
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
    )


def _where(
    user: str | None, states: Collection[JobState] | None, after: int | None = None
) -> tuple[str, list[object]]:
    clauses: list[str] = []
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


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        path.chmod(0o600)  # it holds the jobs' environments
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
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
    ) -> tuple[JobRecord, bool]:
        """Insert a PENDING job, or return the one already made with this idempotency key.

        ``paths`` turns the new job's id into its output and error file names
        (``%j`` needs the id), inside the same transaction.  Returns the record
        and whether it is new.  The same key with another spec is a :class:`Conflict`.
        With ``max_active``, a user who already has that many jobs pending or running
        is refused (:class:`PermissionDenied`), counted in the same transaction.
        """
        spec_json = msgspec.json.encode(spec)
        with self.transaction() as db:
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
                (active,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE user = ? AND state IN ('PENDING', 'RUNNING')",
                    (user,),
                ).fetchone()
                if active >= max_active:
                    raise PermissionDenied(
                        f"you have {active} jobs pending or running; the limit (policy "
                        f"max_submitted_jobs_per_user) is {max_active}: wait for some to end "
                        "or cancel some",
                        status=403,
                        code="submit_limit",
                    )
            desired = Desired.HOLD if spec.hold else Desired.RUN
            cursor = db.execute(
                "INSERT INTO jobs (user, name, state, reason, submitted, output, error, cpus, "
                "memory, gpus, time_limit, workdir, comment, spec, idempotency_key, desired, "
                "dependency, kill_on_invalid_dep, begin) "
                "VALUES (?, ?, 'PENDING', ?, ?, '', NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user,
                    spec.name or "job",
                    "JobHeldUser" if spec.hold else "None",
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
            output, error = paths(job_id)
            db.execute(
                "UPDATE jobs SET output = ?, error = ? WHERE id = ?", (output, error, job_id)
            )
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _record(row), True

    def get(self, job_id: int) -> JobRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def pending_demands(self) -> list[tuple[Demand, str | None]]:
        """The PENDING jobs that may start, in submission order: what each asks for, its reason."""
        rows = self._db.execute(
            "SELECT id, cpus, COALESCE(memory, 0), gpus, user, reason FROM jobs "
            "WHERE state IN ('PENDING', 'RUNNING') AND state = 'PENDING' AND desired = 'run' "
            "ORDER BY id"
        )
        return [
            (Demand(job_id, cpus, memory, gpus, user), reason)
            for job_id, cpus, memory, gpus, user, reason in rows
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
