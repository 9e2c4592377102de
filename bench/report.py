"""Results of a benchmark run: metrics, ratios against baselines, targets, Markdown and JSON.

Pure: everything here takes values and returns values, so it is tested
without running a benchmark (tests/unit/test_bench_report.py).

A metric is referred to as ``"section.metric"`` or ``"section.metric:stat"``
(``stat`` one of :data:`bench.stats.STATS`; without it, the metric's headline
value, which is the median for sampled metrics).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.stats import Summary, summarize

__all__ = [
    "Comparison",
    "ComparisonResult",
    "Metric",
    "RunResult",
    "SectionResult",
    "Target",
    "TargetResult",
    "compare",
    "evaluate",
    "format_value",
    "render_markdown",
    "resolve",
]

Better = Literal["lower", "higher"]
Op = Literal["<", "<=", ">", ">="]
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
NOT_RUN = "not measured: section not run"


@dataclass
class Metric:
    """One measured figure; ``value`` is the headline (the median when there are samples)."""

    key: str
    label: str
    unit: str  # "s", "jobs/s", "MiB", "jobs"
    value: float
    better: Better = "lower"
    summary: Summary | None = None
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @classmethod
    def from_samples(
        cls,
        key: str,
        label: str,
        unit: str,
        samples: Sequence[float],
        *,
        better: Better = "lower",
        note: str = "",
    ) -> Metric:
        summary = summarize(samples)
        return cls(
            key=key,
            label=label,
            unit=unit,
            value=summary.median,
            better=better,
            summary=summary,
            samples=list(samples),
            note=note,
        )

    def stat(self, name: str | None) -> float:
        if name is None or name == "value":
            return self.value
        if self.summary is None:
            raise KeyError(f"{self.key} is a single figure; it has no {name}")
        return self.summary.get(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "value": self.value,
            "better": self.better,
            "summary": self.summary.as_dict() if self.summary else None,
            "samples": self.samples,
            "note": self.note,
        }


@dataclass
class SectionResult:
    """What one section (cli, local, slurm, kubernetes) measured, or why it could not."""

    name: str
    title: str
    status: Literal["measured", "partial", "not measured"] = "measured"
    reason: str | None = None
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # metric key -> why it is missing
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    seconds: float = 0.0

    def add(self, metric: Metric) -> Metric:
        self.metrics[metric.key] = metric
        return metric

    def not_measured(self, reason: str) -> SectionResult:
        self.status = "not measured"
        self.reason = reason if reason.startswith("not measured") else f"not measured: {reason}"
        return self

    def failed_step(self, step: str, error: BaseException | str, *keys: str) -> None:
        """A step failed (its metrics ``keys`` are missing); the other steps still count."""
        self.status = "partial"
        reason = f"not measured: {step} failed: {error}"
        self.notes.append(reason)
        for key in keys:
            self.missing[key] = reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "load_before": self.load_before,
            "load_after": self.load_after,
            "seconds": round(self.seconds, 1),
            "details": self.details,
            "notes": self.notes,
            "missing": self.missing,
            "metrics": {key: m.as_dict() for key, m in self.metrics.items()},
        }


def resolve(sections: Mapping[str, SectionResult], ref: str) -> tuple[Metric, float] | str:
    """The metric and figure ``ref`` names, or why it is missing."""
    path, _, stat = ref.partition(":")
    section_name, _, key = path.partition(".")
    section = sections.get(section_name)
    if section is None:
        return NOT_RUN
    metric = section.metrics.get(key)
    if metric is None:
        return section.reason or section.missing.get(key) or f"not measured: no figure {ref}"
    try:
        return metric, metric.stat(stat or None)
    except KeyError as exc:
        return f"not measured: {exc.args[0]}"


# -- comparisons: ratios against a baseline measured in the same run ----------


@dataclass(frozen=True)
class Comparison:
    label: str
    subject: str  # a metric reference, e.g. "cli.kbatch_help"
    baseline: str


@dataclass(frozen=True)
class ComparisonResult:
    label: str
    subject: str
    baseline: str
    subject_value: float | None = None
    baseline_value: float | None = None
    unit: str = ""
    ratio: float | None = None  # subject / baseline
    reading: str = ""
    missing: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_WORDS = {"s": ("faster", "slower"), "MiB": ("less", "more"), "jobs/s": ("higher", "lower")}


def reading(ratio: float, unit: str, better: Better) -> str:
    """``ratio`` (subject / baseline) in words: ``3.1x faster``, ``1.4x slower``."""
    good, bad = _WORDS.get(unit, ("better", "worse"))
    if ratio <= 0:
        return "n/a"
    subject_better = ratio < 1 if better == "lower" else ratio > 1
    factor = ratio if ratio >= 1 else 1 / ratio
    if abs(factor - 1) < 0.005:
        return "the same"
    return f"{factor:.2f}x {good if subject_better else bad}"


def compare(sections: Mapping[str, SectionResult], comparison: Comparison) -> ComparisonResult:
    subject = resolve(sections, comparison.subject)
    baseline = resolve(sections, comparison.baseline)
    base = ComparisonResult(comparison.label, comparison.subject, comparison.baseline)
    if isinstance(subject, str) or isinstance(baseline, str):
        missing = subject if isinstance(subject, str) else baseline
        assert isinstance(missing, str)
        return ComparisonResult(**{**base.__dict__, "missing": missing})
    (s_metric, s_value), (_, b_value) = subject, baseline
    ratio = s_value / b_value if b_value else None
    return ComparisonResult(
        label=comparison.label,
        subject=comparison.subject,
        baseline=comparison.baseline,
        subject_value=s_value,
        baseline_value=b_value,
        unit=s_metric.unit,
        ratio=ratio,
        reading="n/a" if ratio is None else reading(ratio, s_metric.unit, s_metric.better),
    )


# -- targets ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``figure OP threshold``.

    ``kind`` says how the figure is made: ``ratio`` is a / b, ``difference``
    is a - b, ``value`` is a alone.
    """

    label: str
    kind: Literal["ratio", "difference", "value"]
    a: str
    op: Op
    threshold: float
    b: str | None = None
    figure: str = ""  # how the figure reads, e.g. "PyPI ÷ kbatch"

    def unit_of(self, metric: Metric) -> str:
        return "x" if self.kind == "ratio" else metric.unit


@dataclass(frozen=True)
class TargetResult:
    label: str
    figure: str
    value: float | None
    unit: str
    op: str
    threshold: float
    met: bool | None  # None: not measured
    missing: str | None = None

    @property
    def status(self) -> str:
        if self.met is None:
            return "not measured"
        return "met" if self.met else "missed"

    def standing(self) -> str:
        if self.value is None:
            return self.missing or "not measured"
        value = format_value(self.value, self.unit)
        needs = format_value(self.threshold, self.unit)
        return f"{self.figure} = {value} (target {self.op} {needs})"

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "status": self.status}


def evaluate(sections: Mapping[str, SectionResult], target: Target) -> TargetResult:
    a = resolve(sections, target.a)
    b = resolve(sections, target.b) if target.b is not None else None
    missing = a if isinstance(a, str) else (b if isinstance(b, str) else None)
    if missing is not None or isinstance(a, str):
        return TargetResult(
            target.label,
            target.figure,
            None,
            "",
            target.op,
            target.threshold,
            None,
            missing=missing,
        )
    metric, a_value = a
    b_value = b[1] if b is not None and not isinstance(b, str) else None
    if target.kind == "value":
        value = a_value
    elif b_value is None or (target.kind == "ratio" and b_value == 0):
        return TargetResult(
            target.label,
            target.figure,
            None,
            "",
            target.op,
            target.threshold,
            None,
            missing=f"not measured: the baseline {target.b} is missing or zero",
        )
    elif target.kind == "ratio":
        value = a_value / b_value
    else:
        value = a_value - b_value
    unit = target.unit_of(metric)
    met = _OPS[target.op](value, target.threshold)
    return TargetResult(target.label, target.figure, value, unit, target.op, target.threshold, met)


# -- the whole run --------------------------------------------------------------


@dataclass
class RunResult:
    started: str  # ISO 8601 UTC
    finished: str
    mode: str  # "full" or "quick"
    machine: dict[str, Any]
    sections: dict[str, SectionResult]
    comparisons: list[ComparisonResult]
    targets: list[TargetResult]
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "started": self.started,
            "finished": self.finished,
            "mode": self.mode,
            "options": self.options,
            "machine": self.machine,
            "targets": [t.as_dict() for t in self.targets],
            "comparisons": [c.as_dict() for c in self.comparisons],
            "sections": {name: s.as_dict() for name, s in self.sections.items()},
        }


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "jobs/s":
        return f"{value:.1f} jobs/s"
    if unit in ("", "jobs"):
        return f"{value:g}"
    return f"{value:.3g} {unit}"


def _load(load: Sequence[float] | None) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "?"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def targets_table(targets: Sequence[TargetResult]) -> list[str]:
    return _table(
        ["target", "where we stand", "status"],
        [[t.label, t.standing(), t.status] for t in targets],
    )


def render_markdown(run: RunResult) -> str:
    m = run.machine
    out = [
        "# kbatch benchmarks",
        "",
        f"Run {run.started} → {run.finished} ({run.mode} mode; sections: "
        f"{', '.join(run.sections) or 'none'}).",
        "Every ratio is against a baseline measured in this same run on this same machine; "
        "no figure here is a pass/fail test. Times are medians unless marked.",
        "",
        "## Machine",
        "",
        *_table(
            ["", ""],
            [
                ["CPU", m.get("cpu_model", "?")],
                ["cores", f"{m.get('cores', '?')} ({m.get('usable_cores', '?')} usable)"],
                ["memory", f"{m.get('memory_gib', '?')} GiB"],
                ["kernel", m.get("kernel", "?")],
                ["Python", m.get("python", "?")],
                [
                    "load average before / after",
                    f"{_load(m.get('load_before'))} / {_load(m.get('load_after'))}",
                ],
                ["git commit", m.get("git_commit", "?")],
                ["tools", ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items()) or "-"],
            ],
        ),
        "",
        "## Targets: where we stand",
        "",
        *targets_table(run.targets),
        "",
        "## Comparisons (ratio = kbatch ÷ baseline)",
        "",
        *_table(
            ["comparison", "kbatch", "baseline", "ratio", "reading"],
            [
                [
                    c.label,
                    format_value(c.subject_value, c.unit) if c.subject_value is not None else "-",
                    format_value(c.baseline_value, c.unit) if c.baseline_value is not None else "-",
                    f"{c.ratio:.2f}" if c.ratio is not None else "-",
                    c.reading or c.missing or "",
                ]
                for c in run.comparisons
            ],
        ),
    ]
    for section in run.sections.values():
        out += ["", f"## {section.title}", ""]
        status = section.status if not section.reason else section.reason
        out.append(
            f"Status: {status}. Load average before / after: {_load(section.load_before)} / "
            f"{_load(section.load_after)}; took {section.seconds:.0f} s."
        )
        if section.details:
            out.append("")
            out.append("; ".join(f"{k}: {v}" for k, v in section.details.items()) + ".")
        if section.metrics:
            out.append("")
            out += _metrics_table(section.metrics.values())
        if section.notes:
            out.append("")
            out += [f"- {note}" for note in section.notes]
    return "\n".join(out) + "\n"


def _metrics_table(metrics: Sequence[Metric] | Any) -> list[str]:
    rows = []
    for metric in metrics:
        s = metric.summary
        fmt = format_value
        rows.append(
            [
                metric.label,
                fmt(metric.value, metric.unit),
                fmt(s.p95, metric.unit) if s else "",
                f"{fmt(s.min, metric.unit)} - {fmt(s.max, metric.unit)}" if s else "",
                s.n if s else "",
                metric.note,
            ]
        )
    return _table(["measurement", "median / value", "p95", "range", "n", "how"], rows)
