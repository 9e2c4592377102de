"""The pure parts of the benchmark harness: statistics, ratios, targets, the report."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bench.report import (
    Comparison,
    Metric,
    RunResult,
    SectionResult,
    Target,
    compare,
    evaluate,
    format_value,
    reading,
    render_markdown,
    resolve,
)
from bench.run import SECTIONS, build_run, write_results
from bench.slurm_cluster import Layout, cgroup_conf, parse_hardware, slurm_conf
from bench.stats import median, percentile, summarize
from bench.targets import COMPARISONS, TARGETS


def test_median_and_percentiles() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 95) == pytest.approx(95.05)
    assert percentile([7.0], 95) == 7.0
    summary = summarize([0.1, 0.2, 0.3, 0.4])
    assert (summary.n, summary.min, summary.max) == (4, 0.1, 0.4)
    assert summary.get("median") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(KeyError):
        summary.get("p99")


def _sections() -> dict[str, SectionResult]:
    cli = SectionResult("cli", "1. CLI")
    cli.add(Metric.from_samples("python_pass", "python", "s", [0.018, 0.020, 0.019]))
    cli.add(Metric.from_samples("kbatch_help", "kbatch --help", "s", [0.030, 0.032, 0.031]))
    cli.add(Metric.from_samples("pypi_help", "pypi --help", "s", [0.9, 1.0, 0.95]))
    local = SectionResult("local", "2. Local")
    local.add(Metric("submit_rate_api", "rate", "jobs/s", 300.0, better="higher"))
    local.add(Metric.from_samples("dispatch_cli", "latency", "s", [0.1] * 19 + [0.5]))
    local.failed_step("queue listing", "boom", "kqueue_10000")
    slurm = SectionResult("slurm", "3. Slurm").not_measured("Slurm is not available: no apt")
    return {"cli": cli, "local": local, "slurm": slurm}


def test_resolve_names_a_figure_or_says_why_not() -> None:
    sections = _sections()
    found = resolve(sections, "cli.kbatch_help")
    assert not isinstance(found, str) and found[1] == pytest.approx(0.031)
    p95 = resolve(sections, "local.dispatch_cli:p95")
    assert not isinstance(p95, str) and p95[1] == pytest.approx(0.12)
    assert resolve(sections, "slurm.dispatch") == "not measured: Slurm is not available: no apt"
    assert resolve(sections, "kubernetes.submit") == "not measured: section not run"
    assert "queue listing failed: boom" in str(resolve(sections, "local.kqueue_10000"))
    assert "has no p95" in str(resolve(sections, "local.submit_rate_api:p95"))


def test_ratios_read_the_right_way_round() -> None:
    assert reading(0.5, "s", "lower") == "2.00x faster"
    assert reading(3.0, "s", "lower") == "3.00x slower"
    assert reading(2.0, "jobs/s", "higher") == "2.00x higher"
    assert reading(0.25, "MiB", "lower") == "4.00x less"
    assert reading(1.001, "s", "lower") == "the same"
    sections = _sections()
    result = compare(sections, Comparison("help", "cli.kbatch_help", "cli.pypi_help"))
    assert result.ratio == pytest.approx(0.031 / 0.95)
    assert result.reading == "30.65x faster"
    missing = compare(sections, Comparison("x", "local.submit_rate_api", "slurm.submit_rate"))
    assert missing.ratio is None and missing.missing is not None
    assert missing.missing.startswith("not measured: Slurm")


def test_targets_are_met_missed_or_not_measured() -> None:
    sections = _sections()
    by_label = {t.label: evaluate(sections, t) for t in TARGETS}
    faster = by_label["`kbatch --help` at least 6x faster than the PyPI kbatch CLI"]
    assert faster.met is True and faster.value == pytest.approx(0.95 / 0.031)
    near = by_label["`kbatch --help` within 0.1 s of bare Python"]
    assert near.met is True and near.value == pytest.approx(0.012) and near.unit == "s"
    slurm = by_label[
        "local submit rate better than Slurm's (HTTP API vs `sbatch`, one after another)"
    ]
    assert slurm.met is None and slurm.status == "not measured"
    kqueue = by_label["`kqueue` with 10,000 jobs under 0.3 s end to end"]
    assert kqueue.met is None and "queue listing failed" in kqueue.standing()
    slow = evaluate(sections, Target("help fast", "value", "cli.pypi_help", "<", 0.5))
    assert slow.met is False and slow.status == "missed"
    assert slow.standing() == " = 950.0 ms (target < 500.0 ms)"


def test_every_reference_names_a_section_that_exists() -> None:
    refs = [r for c in COMPARISONS for r in (c.subject, c.baseline)]
    refs += [r for t in TARGETS for r in (t.a, t.b) if r is not None]
    assert {r.partition(".")[0] for r in refs} <= set(SECTIONS)


def test_format_value() -> None:
    assert format_value(0.0312, "s") == "31.2 ms"
    assert format_value(1.5, "s") == "1.50 s"
    assert format_value(19.4, "x") == "19.40x"
    assert format_value(120.0, "jobs/s") == "120.0 jobs/s"


def test_report_markdown_and_json(tmp_path: Path) -> None:
    sections = _sections()
    run: RunResult = build_run(
        sections,
        started=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        mode="quick",
        machine={"cpu_model": "Test CPU", "cores": 2, "load_before": (0.5, 0.4, 0.3)},
        options={},
    )
    text = render_markdown(run)
    assert "## Targets: where we stand" in text
    assert "| `kbatch --help` within 0.1 s of bare Python | kbatch - python = 12.0 ms" in text
    assert "Test CPU" in text and "0.50 0.40 0.30" in text
    assert "not measured: Slurm is not available: no apt" in text
    json_path, md_path = write_results(run, tmp_path, "20260102T030405Z")
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["sections"]["cli"]["metrics"]["kbatch_help"]["summary"]["n"] == 3
    assert data["sections"]["slurm"]["status"] == "not measured"
    assert {t["status"] for t in data["targets"]} >= {"met", "not measured"}
    assert md_path.read_text() == (tmp_path / "latest.md").read_text()
    assert json_path.name == "20260102T030405Z.json"


def test_slurm_config_is_single_node_and_ours(tmp_path: Path) -> None:
    hardware = parse_hardware(
        "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 "
        "RealMemory=24000\nUpTime=0-00:36:00\n"
    )
    assert (hardware.cpus, hardware.real_memory_mb) == (2, 24000)
    conf = slurm_conf(Layout(tmp_path), hardware, ports=(7001, 7002), cgroup=True, user="root")
    for line in (
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "DefMemPerCPU=1000",
        "ProctrackType=proctrack/cgroup",
        "TaskPlugin=task/cgroup",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        "MaxJobCount=100000",
        "SchedulerParameters=batch_sched_delay=0",
        f"StateSaveLocation={tmp_path}/state",
    ):
        assert line in conf.splitlines()
    assert "RealMemory=21600" in conf
    assert "CgroupPlugin=cgroup/v1" in cgroup_conf(True)
    assert "proctrack/linuxproc" in slurm_conf(
        Layout(tmp_path), hardware, ports=(1, 2), cgroup=False, user="root"
    )
