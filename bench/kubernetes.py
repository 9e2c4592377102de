"""Part 4: the Kubernetes backend against a real control plane, ``kubectl create`` as the floor.

The control plane is the one the tests use (etcd, kube-apiserver, the
controller manager, the scheduler and kwok, built by tools/k8s/build.sh and
started by tests/support/k8s_cluster.py). The figures:

- ``kubectl_create``: ``kubectl create -f job.json`` of the Job the backend
  would make, a fresh process each time (discovery cache warm, as a user's),
  until the command returns: the object exists;
- ``submit``: ``kbatch submit --wrap true`` against a ``kbatch server`` on the
  Kubernetes backend, a fresh process each time, until the command returns:
  the Job, its ConfigMap and Secret exist and the Job is released;
- ``submit_rate``: submissions per second through the HTTP API, one client;
- ``dependency``: from the end of a job (kwok ends its pod after a second)
  to the start of the job submitted with ``afterok`` on it: the moment a
  watch on the namespace's pods sees the first pod Succeeded to the moment
  it sees the second's pod Running (one watch, so one clock and one delay);
- ``list_1000`` and ``list_10000``: ``kqueue`` with that many Jobs, answered
  from the server's watch cache. The Jobs are seeded straight through the
  API server (suspended, so no pods churn), labelled as the backend labels
  its own; the server sees them through its watch, as it would after a restart.

Measured only when :mod:`kbatch.backends.kubernetes` can be imported and the
control plane's binaries build; otherwise the section says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import importlib
import importlib.util
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.context import Context, wait_until
from bench.kbatch_server import KbatchServer, cli_path
from bench.measure import add_rate, run_step, sequential_rate
from bench.report import Metric, SectionResult
from bench.timing import Command

__all__ = ["TITLE", "available", "run"]

TITLE = "4. Kubernetes backend"
BACKEND_MODULE = "kbatch.backends.kubernetes"
NAMESPACE = "bench"
IMAGE = "busybox:stable"
PAIR_TIMEOUT = 60  # seconds for each awaited pod phase of the dependency pairs


def available() -> str | None:
    """None when the backend can be measured, else why not."""
    try:
        found = importlib.util.find_spec(BACKEND_MODULE) is not None
    except ImportError as exc:
        return f"backend not available ({BACKEND_MODULE} cannot be imported: {exc})"
    if not found:
        return f"backend not available ({BACKEND_MODULE} does not exist in this checkout)"
    try:
        importlib.import_module(f"{BACKEND_MODULE}.backend")
    except Exception as exc:
        return f"backend not available ({BACKEND_MODULE} cannot be imported: {exc})"
    return None


def _job_manifest(job_id: str, user: str, *, suspend: bool) -> dict[str, Any]:
    """The Job the backend makes for ``kbatch submit --wrap true`` (its pure builder)."""
    from kbatch.backends.kubernetes import names
    from kbatch.backends.kubernetes.manifests import JobContext, build_manifests
    from kbatch.models import JobSpec

    spec = JobSpec(script="#!/bin/sh\ntrue\n", name="wrap", workdir="/tmp")
    ctx = JobContext(
        job_id=job_id, user=user, namespace=NAMESPACE, default_image=IMAGE, ttl_seconds=3600
    )
    job = build_manifests(spec, ctx).job
    job["spec"]["suspend"] = suspend
    if suspend:  # seeded for listing: held, so the backend's reconciler leaves them be
        job["metadata"]["annotations"][names.ANNOTATION_DESIRED] = "hold"
    return job


async def _seed(kubeconfig: Path, count: int, start: int, user: str) -> None:
    """Create ``count`` suspended kbatch Jobs through the API server, 32 requests at a time."""
    from lightkube import AsyncClient, KubeConfig
    from lightkube.codecs import from_dict

    single = KubeConfig.from_file(str(kubeconfig)).get()
    assert single is not None
    client = AsyncClient(single, field_manager="kbatch-bench")
    semaphore = asyncio.Semaphore(32)

    async def create(index: int) -> None:
        async with semaphore:
            await client.create(from_dict(_job_manifest(f"seed{index:07d}", user, suspend=True)))

    try:
        await asyncio.gather(*(create(i) for i in range(start, start + count)))
    finally:
        await client.close()


async def _dependency_pairs(
    kubeconfig: Path, count: int, submit_pair: Callable[[], tuple[str, str]]
) -> tuple[list[float], list[float]]:
    """Seconds from a job's pod Succeeded to its dependent's pod Running (and to its
    dependent's pod created), as one watch on the namespace's pods sees them."""
    from lightkube import AsyncClient, KubeConfig
    from lightkube.resources.core_v1 import Pod

    from kbatch.backends.kubernetes import names

    single = KubeConfig.from_file(str(kubeconfig)).get()
    assert single is not None
    client = AsyncClient(single, field_manager="kbatch-bench")
    seen: dict[tuple[str, str], float] = {}  # (job id, phase or "created") -> first seen
    changed = asyncio.Condition()

    async def watch() -> None:
        async for _, pod in client.watch(Pod, namespace=NAMESPACE):
            now = time.time()
            job_id = (pod.metadata.labels or {}).get(names.LABEL_JOB_ID) if pod.metadata else None
            if not job_id:
                continue
            seen.setdefault((job_id, "created"), now)
            if pod.status is not None and pod.status.phase:
                seen.setdefault((job_id, pod.status.phase), now)
            async with changed:
                changed.notify_all()

    async def first_seen(job_id: str, what: str) -> float:
        async with asyncio.timeout(PAIR_TIMEOUT), changed:
            await changed.wait_for(lambda: (job_id, what) in seen)
        return seen[(job_id, what)]

    watcher = asyncio.create_task(watch())
    to_running: list[float] = []
    to_created: list[float] = []
    try:
        for _ in range(count):
            first, after = await asyncio.to_thread(submit_pair)
            ended = await first_seen(first, "Succeeded")
            running = await first_seen(after, "Running")
            to_running.append(running - ended)
            to_created.append(seen[(after, "created")] - ended)
            await first_seen(after, "Succeeded")
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await client.close()
    return to_running, to_created


def run(ctx: Context, result: SectionResult) -> None:
    reason = available()
    if reason is not None:
        result.not_measured(reason)
        return
    from tests.support.k8s_cluster import K8sCluster, ensure_binaries

    ctx.log(f"{result.name}: building or finding the control plane")
    try:
        bin_dir = ensure_binaries()
    except Exception as exc:
        result.not_measured(f"the control plane could not be built: {exc}")
        return
    scratch = ctx.scratch / "kubernetes"
    scratch.mkdir(parents=True, exist_ok=True)
    with K8sCluster(bin_dir, workdir=scratch / "cluster", pod_log=None) as cluster:
        version = cluster.kubectl_json("version")["serverVersion"]["gitVersion"]
        result.details["control plane"] = (
            f"etcd, kube-apiserver, kube-controller-manager, kube-scheduler ({version}) "
            "and kwok nodes, on loopback"
        )
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.wait_for_default_service_account(NAMESPACE)
        config = scratch / "kbatch.toml"
        config.write_text(
            'backend = "kubernetes"\n[kubernetes]\n'
            f'kubeconfig = "{cluster.kubeconfig}"\nnamespace_mode = "shared"\n'
            f'namespace = "{NAMESPACE}"\nimage = "{IMAGE}"\nttl_seconds = 3600\n'
        )
        server = KbatchServer(scratch / "state", args=["--config", str(config)])
        server.start()
        result.details["server"] = (
            "`kbatch server`, Kubernetes backend, shared namespace, admin kubeconfig"
        )
        try:
            _measure(ctx, result, cluster, server, scratch)
        finally:
            server.stop()


def _measure(
    ctx: Context, result: SectionResult, cluster: Any, server: KbatchServer, scratch: Path
) -> None:
    counts = ctx.counts
    env = server.env()
    kubectl = str(cluster.bin_dir / "kubectl")
    cache = scratch / "kubectl-cache"
    job_file = scratch / "job.json"
    floor = _job_manifest("x", getpass.getuser(), suspend=False)
    del floor["metadata"]["name"]
    floor["metadata"]["generateName"] = "floor-"
    floor["metadata"]["labels"] = {"bench": "kubectl-floor"}  # not one of kbatch's
    floor["spec"]["template"]["metadata"]["labels"] = {"bench": "kubectl-floor"}
    job_file.write_text(json.dumps(floor))

    def create_commands() -> None:
        commands = [
            Command(
                "kubectl_create",
                [
                    kubectl,
                    f"--kubeconfig={cluster.kubeconfig}",
                    f"--cache-dir={cache}",
                    "create",
                    "-f",
                    str(job_file),
                    "-o",
                    "name",
                ],
            ),
            Command(
                "kbatch_submit",
                [cli_path("kbatch"), "submit", "--parsable", "--wrap", "true"],
                env=env,
                cwd=scratch,
            ),
        ]
        times = ctx.timer.time(commands, runs=counts.cli_runs, warmup=2)
        result.add(
            Metric.from_samples(
                "kubectl_create",
                "`kubectl create -f job.json` (the Job alone), fresh process",
                "s",
                times["kubectl_create"],
                note="the floor: one API call from a Go binary with a warm discovery cache",
            )
        )
        result.add(
            Metric.from_samples(
                "submit",
                "`kbatch submit --wrap true` until the Job exists, fresh process",
                "s",
                times["kbatch_submit"],
                note="Job (suspended); its ConfigMap and Secret, together; release: 3 round trips",
            )
        )

    run_step(
        result,
        ctx,
        "kubectl create vs kbatch submit",
        ("kubectl_create", "submit"),
        create_commands,
    )

    client = server.client()

    def dependency() -> None:
        from kbatch.models import JobSpec

        def pair() -> tuple[str, str]:
            first = client.submit(
                JobSpec(
                    script="#!/bin/sh\nsleep 1\n",
                    name="ends",
                    workdir="/tmp",
                    args=["kbatch-test-duration=1s"],  # kwok ends the pod after a second
                )
            ).id
            after = client.submit(
                JobSpec(
                    script="#!/bin/sh\ntrue\n",
                    name="after",
                    workdir="/tmp",
                    dependency=f"afterok:{first}",
                )
            ).id
            return first, after

        to_running, to_created = asyncio.run(
            _dependency_pairs(cluster.kubeconfig, counts.dependency_pairs, pair)
        )
        result.add(
            Metric.from_samples(
                "dependency",
                "end of a job → start of the job waiting on it (`afterok`): pod Succeeded → "
                "the dependent's pod Running",
                "s",
                to_running,
                note="as one watch on the pods sees both; one pair at a time; the Job "
                "controller, the scheduler and kwok included",
            )
        )
        result.add(
            Metric.from_samples(
                "dependency_pod_created",
                "pod Succeeded → the dependent's pod created",
                "s",
                to_created,
                note="the same pairs; before the scheduler and kwok",
            )
        )

    run_step(
        result,
        ctx,
        "end of a job to start of its dependent",
        ("dependency", "dependency_pod_created"),
        dependency,
    )

    def api_rate() -> None:
        from kbatch.models import JobSpec

        spec = JobSpec(script="#!/bin/sh\ntrue\n", name="rate", workdir="/tmp")
        rate = sequential_rate(counts.rate_jobs, lambda: client.submit(spec).id)
        add_rate(
            result,
            "submit_rate",
            "submit rate, HTTP API, one client",
            rate,
            "until each Job exists",
        )

    run_step(result, ctx, "submit rate through the HTTP API", ("submit_rate",), api_rate)

    seeded = 0
    for size in counts.list_sizes:
        key = f"list_{size}"

        def listing(size: int = size, key: str = key) -> None:
            nonlocal seeded
            known = len(client.list(include_finished=True))
            wanted = size - known
            if wanted > 0:
                started = time.perf_counter()
                asyncio.run(_seed(cluster.kubeconfig, wanted, seeded, getpass.getuser()))
                seeded += wanted
                ctx.log(
                    f"{result.name}: seeded {wanted} Jobs in {time.perf_counter() - started:.1f} s"
                )
            wait_until(
                lambda: len(client.list(include_finished=True)) >= size,
                timeout=600,
                interval=0.2,
                what=f"the watch cache to hold {size} jobs",
            )
            command = Command(key, [cli_path("kqueue"), "--all", "--json"], env=env, cwd=scratch)
            times = ctx.timer.time([command], runs=counts.list_runs, warmup=1)
            result.add(
                Metric.from_samples(
                    key,
                    f"`kqueue --all` with {size:,} Jobs, from the watch cache, end to end",
                    "s",
                    times[key],
                )
            )
            rss = server.peak_rss_mib()
            if rss is not None:
                result.add(
                    Metric(
                        f"server_peak_rss_{size}",
                        f"server peak memory with {size:,} Jobs",
                        "MiB",
                        rss,
                    )
                )

        run_step(result, ctx, f"kqueue with {size} Jobs", (key,), listing)
    subprocess.run(
        [
            kubectl,
            f"--kubeconfig={cluster.kubeconfig}",
            "delete",
            "namespace",
            NAMESPACE,
            "--wait=false",
        ],
        capture_output=True,
        check=False,
    )
