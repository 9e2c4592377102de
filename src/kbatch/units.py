"""Parsing and formatting of the sizes and durations users type.

Memory follows Slurm: a bare number is MiB, ``K M G T`` are binary multiples
(``2G`` is 2 GiB), and Kubernetes' ``Ki Mi Gi Ti`` are accepted too.  Times
follow ``sbatch --time``: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
``D-HH:MM`` and ``D-HH:MM:SS``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from kbatch.errors import SpecError

__all__ = ["format_duration", "format_memory", "parse_begin", "parse_memory", "parse_time_limit"]

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?|B)?\s*$", re.IGNORECASE)
_POWERS = {"": 2, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_memory(text: str, *, option: str = "--mem") -> int:
    """Bytes from a Slurm or Kubernetes memory size (``500M``, ``2G``, ``1.5Gi``, ``100``)."""
    match = _MEMORY.match(text)
    if match is None:
        raise SpecError(
            f"{option}={text!r} is not a memory size; use a number with an optional unit "
            "K, M, G or T (binary, as in Slurm; a bare number means MiB), e.g. 500M, 2G, 1.5Gi",
            field="memory",
        )
    number, unit, _suffix = match.groups()
    value = float(number) * 1024 ** _POWERS[unit.upper()]
    if value != int(value) and unit == "":
        raise SpecError(f"{option}={text!r}: a size in MiB must be a whole number", field="memory")
    return int(value)


_TIME = re.compile(
    r"""^(?:
        (?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?   # D-HH[:MM[:SS]]
      | (?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?                    # MM | MM:SS | HH:MM:SS
    )$""",
    re.VERBOSE,
)
UNLIMITED = frozenset({"unlimited", "infinite"})


def parse_time_limit(text: str, *, option: str = "--time") -> int | None:
    """Seconds from an ``sbatch --time`` value; ``None`` means no limit (``0``, ``UNLIMITED``)."""
    stripped = text.strip()
    if stripped.lower() in UNLIMITED:
        return None
    match = _TIME.match(stripped)
    if match is None:
        raise SpecError(
            f"{option}={text!r} is not a time limit; use minutes (30), MM:SS, HH:MM:SS, "
            "D-HH, D-HH:MM or D-HH:MM:SS (e.g. 1-12:00:00 for a day and a half)",
            field="time_limit",
        )
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in g:
        seconds = g["days"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    elif "c" in g:
        seconds = g["a"] * 3600 + g["b"] * 60 + g["c"]
    elif "b" in g:
        seconds = g["a"] * 60 + g["b"]
    else:
        seconds = g["a"] * 60
    return seconds or None


def format_duration(seconds: float | None) -> str:
    """Slurm's ``TIME`` column: ``M:SS``, ``H:MM:SS`` or ``D-HH:MM:SS``."""
    if seconds is None:
        return "UNLIMITED"
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def format_memory(size: int | None) -> str:
    """A compact binary size: ``512M``, ``2G``, ``1.5G``."""
    if size is None:
        return "-"
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        scaled = size / 1024**power
        if scaled >= 1:
            return f"{scaled:.4g}{unit}"
    return f"{size}B"


_BEGIN_RELATIVE = re.compile(
    r"now\+(\d+)(seconds|second|secs|sec|s|minutes|minute|mins|min|hours|hour|h|days|day|d|"
    r"weeks|week|w)?",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?(am|pm)?", re.IGNORECASE)
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{1,2}):(\d{2})(?::(\d{2}))?)?")


def parse_begin(text: str, now: datetime) -> datetime:
    """The moment ``sbatch --begin`` means, in ``now``'s time zone.

    Slurm's forms: ``now+30`` (seconds), ``now+10minutes``, ``now+1hour``,
    ``now+2days``; ``16:00`` or ``4:00pm`` (today, or tomorrow once that time has
    passed); ``2026-12-01`` and ``2026-12-01T08:00[:SS]``; ``midnight``, ``noon``,
    ``teatime`` (16:00), ``today``, ``tomorrow``, ``now``.  A date already past is
    refused: it would start the job at once, which is not what was meant.
    """
    value = text.strip()
    lowered = value.lower()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"midnight": (0, 0), "noon": (12, 0), "teatime": (16, 0)}
    if lowered == "now":
        return now
    if lowered == "today":
        return day
    if lowered == "tomorrow":
        return day + timedelta(days=1)
    if (match := _BEGIN_RELATIVE.fullmatch(value)) is not None:
        count, unit = int(match.group(1)), (match.group(2) or "s").lower()[0]
        return now + timedelta(seconds=count * _UNIT_SECONDS[unit])
    clock: tuple[int, int, int] | None = None
    if lowered in named:
        clock = (*named[lowered], 0)
    elif (match := _CLOCK.fullmatch(value)) is not None:
        hour, minute, second = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
        meridiem = (match.group(4) or "").lower()
        if meridiem == "pm" and hour < 12:
            hour += 12
        elif meridiem == "am" and hour == 12:
            hour = 0
        clock = (hour, minute, second)
    if clock is not None:
        try:
            moment = day.replace(hour=clock[0], minute=clock[1], second=clock[2])
        except ValueError:
            moment = None
        if moment is not None:
            return moment if moment > now else moment + timedelta(days=1)
    elif (match := _DATE.fullmatch(value)) is not None:
        parts = [int(p) if p else 0 for p in match.groups()]
        try:
            year, month, mday, hour, minute, second = parts
            moment = datetime(year, month, mday, hour, minute, second, tzinfo=now.tzinfo)
        except ValueError:
            moment = None
        if moment is not None:
            if moment < now - timedelta(seconds=1):
                raise SpecError(
                    f"--begin={text} is in the past; give a later time, or leave --begin out "
                    "to start as soon as possible",
                    field="begin",
                )
            return moment
    raise SpecError(
        f"--begin={text!r} is not a time; use now+30 (seconds), now+10minutes, now+1hour, "
        "16:00, 2026-12-01T08:00, midnight, noon or tomorrow",
        field="begin",
    )
