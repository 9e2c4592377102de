"""Job arrays: Slurm's ``--array`` grammar, index sets, task variables, CSV sweeps.

An array is one submission that runs the same spec once per index.  Its
indexes are an :class:`IndexSet`, kept as sorted runs (``0-9999`` is one run,
not ten thousand numbers) so that a 100,000-task array is cheap to store,
count, split and show.  ``--params FILE.csv`` makes a sweep: one task per data
row, each column an environment variable of its task (:func:`parse_params`).

Pure: no I/O, shared by the CLI, the server's policy and every backend.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from kbatch.errors import SpecError
from kbatch.models import JobState, SweepParams

__all__ = [
    "ArrayRequest",
    "IndexSet",
    "aggregate_state",
    "check_params",
    "params_environment",
    "parse_array",
    "parse_params",
    "substitute_columns",
    "task_environment",
]

# What no one sweeps past: the schema's own bound (admins lower it with max_array_tasks).
MAX_INDEX = 10_000_000
_ITEM = re.compile(r"([0-9]{1,9})(?:-([0-9]{1,9})(?::([0-9]{1,9}))?)?")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Names a column may not take: what kbatch sets in every task, and credentials.
_RESERVED_PREFIXES = ("SLURM_", "KBATCH_")


@dataclass(frozen=True)
class Run:
    """``start``, ``start+step``, ... ``stop`` (inclusive)."""

    start: int
    stop: int
    step: int = 1

    def __len__(self) -> int:
        return (self.stop - self.start) // self.step + 1

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop + 1, self.step))

    def __contains__(self, index: object) -> bool:
        return (
            isinstance(index, int)
            and self.start <= index <= self.stop
            and (index - self.start) % self.step == 0
        )

    def __str__(self) -> str:
        if self.start == self.stop:
            return str(self.start)
        if self.step == 1:
            return f"{self.start}-{self.stop}"
        if len(self) == 2:
            return f"{self.start},{self.stop}"
        return f"{self.start}-{self.stop}:{self.step}"


class IndexSet:
    """A set of array indexes as ascending, disjoint runs; immutable.

    ``str()`` is Slurm's compact form (``1,3-5,10-20:2``), which :func:`parse_array`
    reads back, so it is also how index sets are stored.
    """

    __slots__ = ("_count", "runs")

    def __init__(self, runs: Sequence[Run] = ()) -> None:
        self.runs: tuple[Run, ...] = tuple(runs)
        self._count = sum(len(run) for run in self.runs)

    @classmethod
    def of(cls, indexes: Iterable[int]) -> IndexSet:
        """The set of ``indexes`` (any order, repeats allowed), in as few runs as greedily fit."""
        values = sorted(set(indexes))
        runs: list[Run] = []
        i = 0
        while i < len(values):
            start = values[i]
            if i + 1 == len(values):
                runs.append(Run(start, start))
                break
            step = values[i + 1] - start
            j = i + 1
            while j + 1 < len(values) and values[j + 1] - values[j] == step:
                j += 1
            if step == 1 or j - i >= 2:
                runs.append(Run(start, values[j], step))
                i = j + 1
            else:
                runs.append(Run(start, start))
                i += 1
        return cls(runs)

    @classmethod
    def parse(cls, text: str) -> IndexSet:
        """Read back what ``str()`` wrote (no throttle): the store's form."""
        return parse_array(text).indexes if text else cls()

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[int]:
        for run in self.runs:
            yield from run

    def __contains__(self, index: object) -> bool:
        return any(index in run for run in self.runs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexSet) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __str__(self) -> str:
        return ",".join(str(run) for run in self.runs)

    def __repr__(self) -> str:
        return f"IndexSet({str(self)!r})"

    @property
    def first(self) -> int:
        return self.runs[0].start

    @property
    def last(self) -> int:
        return max(run.stop for run in self.runs)

    @property
    def step(self) -> int:
        """One step between all indexes when there is one (Slurm's SLURM_ARRAY_TASK_STEP), else 1."""
        steps = {run.step for run in self.runs if len(run) > 1}
        if len(self.runs) == 1 and len(steps) == 1:
            return steps.pop()
        values = list(self) if self._count <= 100_000 else []
        gaps = {b - a for a, b in itertools.pairwise(values)}
        return gaps.pop() if len(gaps) == 1 else 1

    def take(self, count: int) -> tuple[list[int], IndexSet]:
        """The ``count`` lowest indexes, and the set without them."""
        taken: list[int] = []
        rest: list[Run] = []
        for n, run in enumerate(self.runs):
            room = count - len(taken)
            if room <= 0:
                rest.extend(self.runs[n:])
                break
            if len(run) <= room:
                taken.extend(run)
                continue
            taken.extend(range(run.start, run.start + room * run.step, run.step))
            rest.append(Run(run.start + room * run.step, run.stop, run.step))
            rest.extend(self.runs[n + 1 :])
            break
        return taken, IndexSet(rest)

    def without(self, drop: Iterable[int]) -> IndexSet:
        gone = set(drop)
        if not gone:
            return self
        return IndexSet.of(i for i in self if i not in gone)

    def intersection(self, other: IndexSet) -> IndexSet:
        mine = set(self)
        return IndexSet.of(i for i in other if i in mine)


@dataclass(frozen=True)
class ArrayRequest:
    """What ``--array`` asked for: the indexes and the ``%N`` throttle (None: no throttle)."""

    indexes: IndexSet
    throttle: int | None = None

    def __str__(self) -> str:
        return f"{self.indexes}%{self.throttle}" if self.throttle else str(self.indexes)


def parse_array(
    text: str, *, max_tasks: int | None = None, max_index: int | None = None
) -> ArrayRequest:
    """Slurm's ``--array``: ``0-31``, ``1,3,5,7``, ``1-7:2``, mixtures, and a ``%N`` throttle.

    ``max_tasks`` and ``max_index`` are the admin's limits (policy ``max_array_tasks``
    and ``max_array_index``); a request over either is refused naming it.
    """
    shown = f"--array={text}"
    body, percent, throttle_text = text.strip().partition("%")
    throttle: int | None = None
    if percent:
        if not throttle_text.isdigit() or int(throttle_text) < 1 or len(throttle_text) > 9:
            raise SpecError(
                f"{shown}: the throttle after % must be a whole number of at least 1 "
                "(e.g. 0-99%10: at most 10 tasks at once)",
                field="array",
            )
        throttle = int(throttle_text)
    if not body:
        raise SpecError(f"{shown}: give indexes such as 0-31, 1,3,5 or 1-7:2", field="array")
    limit = MAX_INDEX if max_index is None else max_index
    runs: list[Run] = []
    total = 0
    for item in body.split(","):
        match = _ITEM.fullmatch(item.strip())
        if match is None:
            raise SpecError(
                f"{shown}: {item.strip()!r} is not an index, a range N-M or a stepped range "
                "N-M:S (indexes are whole numbers from 0)",
                field="array",
            )
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        step = int(match.group(3)) if match.group(3) is not None else 1
        if stop < start:
            raise SpecError(f"{shown}: the range {item.strip()} goes backwards", field="array")
        if step < 1:
            raise SpecError(
                f"{shown}: the step in {item.strip()} must be at least 1", field="array"
            )
        stop -= (stop - start) % step  # 1-8:2 is 1,3,5,7
        if stop > limit:
            name = "max_array_index" if max_index is not None else "the highest index"
            raise SpecError(
                f"{shown}: index {stop} is over the highest index allowed ({limit}, policy "
                f"{name}); use smaller indexes",
                field="array",
            )
        run = Run(start, stop, step)
        total += len(run)
        if max_tasks is not None and total > max_tasks:
            raise SpecError(
                f"{shown}: that is more than {max_tasks} tasks (policy max_array_tasks); "
                "split the array, or ask an admin",
                field="array",
            )
        runs.append(run)
    ordered = sorted(runs, key=lambda r: r.start)
    disjoint = all(a.stop < b.start for a, b in itertools.pairwise(ordered))
    indexes = IndexSet(ordered) if disjoint else IndexSet.of(i for run in runs for i in run)
    return ArrayRequest(indexes, throttle)


def task_environment(array_id: str, index: int, indexes: IndexSet) -> dict[str, str]:
    """The variables of task ``index`` of array ``array_id``, Slurm's and kbatch's."""
    values = {
        "ARRAY_JOB_ID": array_id,
        "ARRAY_TASK_ID": str(index),
        "ARRAY_TASK_COUNT": str(len(indexes)),
        "ARRAY_TASK_MIN": str(indexes.first),
        "ARRAY_TASK_MAX": str(indexes.last),
        "ARRAY_TASK_STEP": str(indexes.step),
    }
    env = {f"SLURM_{k}": v for k, v in values.items()}
    env.update({f"KBATCH_{k}": v for k, v in values.items()})
    return env


# The end of an array whose tasks ended differently: the worst one.
_WORST_FIRST = (
    JobState.FAILED,
    JobState.OUT_OF_MEMORY,
    JobState.TIMEOUT,
    JobState.NODE_FAIL,
    JobState.CANCELLED,
    JobState.COMPLETED,
)


def aggregate_state(counts: Mapping[JobState, int]) -> JobState:
    """The state of a whole array from its tasks' (docs/core.md, "Arrays in the contract"):
    RUNNING while any task runs, PENDING while any other waits, then the worst end."""
    present = {state for state, n in counts.items() if n > 0}
    if JobState.RUNNING in present:
        return JobState.RUNNING
    if JobState.PENDING in present:
        return JobState.PENDING
    for state in _WORST_FIRST:
        if state in present:
            return state
    return JobState.PENDING


# -- sweeps: one task per row of a CSV file -------------------------------------------


def check_column(name: str, where: str) -> None:
    """A column becomes an environment variable: it must be a usable, free name."""
    if not _COLUMN.match(name):
        raise SpecError(
            f"{where}: column {name!r} is not a valid environment variable name; use letters, "
            "digits and _ (not starting with a digit)",
            field="params",
        )
    if name.upper().startswith(_RESERVED_PREFIXES) or name in ("PATH", "HOME", "USER"):
        raise SpecError(
            f"{where}: column {name!r} would replace a variable kbatch sets in every job; "
            "rename the column",
            field="params",
        )


def parse_params(data: bytes, *, origin: str, max_bytes: int) -> SweepParams:
    """A sweep's CSV file: a header row of column names, then one data row per task.

    Refused, before anything is created: over ``max_bytes``, not UTF-8, no header or
    no data row, a column name that is not a variable name, a row of another length.
    """
    if len(data) > max_bytes:
        raise SpecError(
            f"{origin} is {len(data)} bytes, over the {max_bytes}-byte limit (policy "
            "max_params_bytes); split the sweep into several arrays",
            field="params",
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{origin} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV", field="params"
        ) from None
    if "\x00" in text:
        raise SpecError(f"{origin} holds NUL bytes; it is not a CSV file", field="params")
    try:
        table = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        raise SpecError(f"{origin} is not valid CSV: {exc}", field="params") from None
    table = [row for row in table if row]  # blank lines
    if not table:
        raise SpecError(
            f"{origin} is empty; give a header row and one row per task", field="params"
        )
    header = tuple(name.strip() for name in table[0])
    for name in header:
        check_column(name, f"{origin}, row 1 (the header)")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise SpecError(f"{origin}, row 1: column {name!r} appears twice", field="params")
        seen.add(name)
    rows = table[1:]
    if not rows:
        raise SpecError(
            f"{origin} has a header but no data rows; add one row per task", field="params"
        )
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise SpecError(
                f"{origin}, row {number}: {len(row)} values for {len(header)} columns; "
                "every row needs one value per column",
                field="params",
            )
    return SweepParams(columns=list(header), rows=[list(row) for row in rows])


def check_params(params: SweepParams, indexes: IndexSet, *, origin: str = "--params") -> None:
    """Every task needs a row: the highest index must be a row of the table."""
    for name in params.columns:
        check_column(name, origin)
    widths = {len(row) for row in params.rows}
    if widths - {len(params.columns)}:
        raise SpecError(f"{origin}: every row needs one value per column", field="params")
    if indexes and indexes.last >= len(params.rows):
        raise SpecError(
            f"{origin} has {len(params.rows)} data rows (tasks 0-{len(params.rows) - 1}); "
            f"the array asks for task {indexes.last}; drop --array or use indexes below "
            f"{len(params.rows)}",
            field="array",
        )


def substitute_columns(command: str, columns: Iterable[str]) -> str:
    """``{column}`` and ``{index}`` in a ``--wrap`` command, as the task's value quoted for
    the shell: they become ``"${column}"`` (the task's variable), so no value is ever
    read as shell syntax.  Other braces (``${HOME}``, ``{a,b}``) are left alone."""
    known = set(columns)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "index":
            return '"${KBATCH_ARRAY_TASK_ID}"'
        if name in known:
            return f'"${{{name}}}"'
        return match.group(0)

    return _PLACEHOLDER.sub(replace, command)


def params_environment(params: SweepParams | None, index: int) -> Mapping[str, str]:
    """The variables a sweep's row gives task ``index`` (none outside a sweep)."""
    if params is None or index >= len(params.rows):
        return {}
    return dict(zip(params.columns, params.rows[index], strict=True))
