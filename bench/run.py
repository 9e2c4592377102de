"""Running the sections and writing the results (``python -m bench``).

Writes ``<UTC timestamp>.json`` and ``<UTC timestamp>.md`` to the output
directory (``bench/results/`` by default) and copies them to
``latest.json`` and ``latest.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, ModuleType

from bench import cli, kubernetes, local, slurm, upload
from bench.context import FULL, QUICK, Context, log
from bench.machine import REPO, load, machine_details
from bench.pypi import cache_dir
from bench.report import (
    RunResult,
    SectionResult,
    compare,
    evaluate,
    render_markdown,
    targets_table,
)
from bench.targets import COMPARISONS, TARGETS
from bench.timing import CommandTimer, find_hyperfine

__all__ = ["SECTIONS", "main", "write_results"]

SECTIONS: dict[str, ModuleType] = {
    "cli": cli,
    "local": local,
    "slurm": slurm,
    "kubernetes": kubernetes,
    "upload": upload,
}
RESULTS = REPO / "bench" / "results"


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}"
        )
    return [n for n in SECTIONS if n in names]  # always in the order


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="kbatch side by side with PyPI's kbatch, bare Python and Slurm.",
    )
    parser.add_argument(
        "--only",
        type=_sections,
        default=list(SECTIONS),
        metavar="SECTION[,SECTION]",
        help=f"run only these sections ({', '.join(SECTIONS)}; default all)",
    )
    parser.add_argument(
        "--metrics",
        type=lambda text: frozenset(n.strip() for n in text.split(",") if n.strip()),
        default=None,
        metavar="FIGURE[,FIGURE]",
        help="in the sections run, only the steps that measure these figures "
        "(e.g. --only local,slurm,kubernetes --metrics dependency); default all",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts: a smoke run, not figures to quote"
    )
    parser.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="do not apt-get install hyperfine/Slurm or pip install PyPI's kbatch",
    )
    parser.add_argument(
        "--no-hyperfine", action="store_true", help="time commands with time.perf_counter"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=RESULTS, help=f"where results go (default {RESULTS})"
    )
    return parser.parse_args(argv)


def _utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def run_section(name: str, ctx: Context) -> SectionResult:
    module = SECTIONS[name]
    result = SectionResult(name=name, title=module.TITLE)
    body: Callable[[Context, SectionResult], None] = module.run
    ctx.log(f"section {name}: start (load {load()})")
    result.load_before = load()
    start = time.monotonic()
    try:
        body(ctx, result)
    except Exception as exc:
        ctx.log(f"section {name} failed:\n{traceback.format_exc()}")
        if result.metrics:
            result.status = "partial"
            result.notes.append(f"stopped early: {type(exc).__name__}: {exc}")
        else:
            result.not_measured(f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - start
    result.load_after = load()
    ctx.log(f"section {name}: {result.reason or result.status} in {result.seconds:.0f} s")
    return result


def _relevant(ref: str, selected: Sequence[str]) -> bool:
    return ref.partition(".")[0] in selected


def build_run(
    sections: dict[str, SectionResult],
    *,
    started: datetime,
    mode: str,
    machine: dict[str, object],
    options: dict[str, object],
) -> RunResult:
    selected = list(sections)
    comparisons = [
        compare(sections, c)
        for c in COMPARISONS
        if _relevant(c.subject, selected) or _relevant(c.baseline, selected)
    ]
    targets = [
        evaluate(sections, t)
        for t in TARGETS
        if _relevant(t.a, selected) or (t.b is not None and _relevant(t.b, selected))
    ]
    return RunResult(
        started=started.isoformat().replace("+00:00", "Z"),
        finished=_utc().isoformat().replace("+00:00", "Z"),
        mode=mode,
        machine=machine,
        sections=sections,
        comparisons=comparisons,
        targets=targets,
        options=options,
    )


def write_results(run: RunResult, directory: Path, stamp: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stamp}.json"
    md_path = directory / f"{stamp}.md"
    for path, text in (
        (json_path, json.dumps(run.as_dict(), indent=2) + "\n"),
        (md_path, render_markdown(run)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    shutil.copyfile(json_path, directory / "latest.json")
    shutil.copyfile(md_path, directory / "latest.md")
    return json_path, md_path


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every cleanup


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = _utc()
    machine = machine_details()
    machine["load_before"] = load()
    hyperfine, hyperfine_note = (
        (None, "--no-hyperfine") if args.no_hyperfine else find_hyperfine(args.install, log)
    )
    scratch = Path(tempfile.mkdtemp(prefix="kbatch-bench-"))
    ctx = Context(
        counts=QUICK if args.quick else FULL,
        quick=args.quick,
        install=args.install,
        timer=CommandTimer(hyperfine),
        scratch=scratch,
        cache=cache_dir(),
        metrics=args.metrics,
    )
    ctx.tools["timing"] = hyperfine_note if hyperfine else f"time.perf_counter ({hyperfine_note})"
    log(
        f"sections {', '.join(args.only)}; {'quick' if args.quick else 'full'} mode; "
        f"scratch {scratch}; load {machine['load_before']}"
    )
    sections: dict[str, SectionResult] = {}
    try:
        for name in args.only:
            sections[name] = run_section(name, ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    machine["load_after"] = load()
    machine["tools"] = dict(ctx.tools)
    run = build_run(
        sections,
        started=started,
        mode="quick" if args.quick else "full",
        machine=machine,
        options={
            "sections": args.only,
            "metrics": sorted(args.metrics) if args.metrics is not None else None,
            "counts": ctx.counts.__dict__,
            "install": args.install,
        },
    )
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path, md_path = write_results(run, args.output_dir, stamp)
    print("\n".join(targets_table(run.targets)))
    log(f"wrote {md_path} and {json_path} (and latest.md, latest.json)")
    return 0
