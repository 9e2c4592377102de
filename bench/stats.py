"""Summaries of timing samples.  Pure, no I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["STATS", "Summary", "median", "percentile", "summarize"]

STATS = ("median", "p95", "mean", "min", "max", "stdev")


def median(samples: Sequence[float]) -> float:
    if not samples:
        raise ValueError("no samples")
    return float(statistics.median(samples))


def percentile(samples: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile by linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("no samples")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} is not between 0 and 100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p95: float
    mean: float
    min: float
    max: float
    stdev: float

    def get(self, stat: str) -> float:
        if stat not in STATS:
            raise KeyError(f"unknown statistic {stat!r}; use one of {', '.join(STATS)}")
        return float(getattr(self, stat))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples: Sequence[float]) -> Summary:
    return Summary(
        n=len(samples),
        median=median(samples),
        p95=percentile(samples, 95),
        mean=statistics.fmean(samples),
        min=min(samples),
        max=max(samples),
        stdev=statistics.stdev(samples) if len(samples) > 1 else 0.0,
    )
