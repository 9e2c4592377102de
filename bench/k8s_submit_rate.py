"""Submissions per second through the HTTP API to a ``kbatch server`` on the Kubernetes
backend (a real control plane with kwok nodes), from several clients at once.

    .venv/bin/python -m bench.k8s_submit_rate [--clients 8] [--jobs 800] [--hold]

Without ``--hold`` the jobs run (kwok ends them at once), so the server's reconciler
(release, end hook) works while the submissions arrive, as on a real hub; with it,
submission alone is measured.  Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

from tests.k8s.conftest import SHARED_NS, _install
from tests.support.k8s_cluster import k8s_cluster
from tests.support.servers import KbatchServer
from tests.support.tools import installed

from kbatch.models import JobSpec


async def _floor(kubeconfig: Path, jobs: int, clients: int) -> str:
    """What the API server allows on this machine: a Job, a ConfigMap and a Secret per
    job (the objects of a submission, by kbatch's own builder), ``clients`` at once."""
    from datetime import UTC, datetime

    from lightkube import AsyncClient, KubeConfig
    from lightkube.codecs import from_dict

    from kbatch.backends.kubernetes.manifests import JobContext, build_manifests

    client = AsyncClient(KubeConfig.from_file(str(kubeconfig)).get(), field_manager="floor")
    spec = JobSpec(script="#!/bin/sh\ntrue\n", name="floor", workdir="/tmp", hold=True)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(jobs):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            ctx = JobContext(
                job_id=f"floor{i:06d}",
                user="floor",
                namespace=SHARED_NS,
                default_image="busybox:stable",
                instance="floor",
                submitted=datetime.now(UTC),
            )
            m = build_manifests(spec, ctx)
            await client.create(from_dict(m.job))
            await asyncio.gather(
                client.create(from_dict(m.config_map)), client.create(from_dict(m.secret))
            )

    begun = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    took = time.perf_counter() - begun
    await client.close()
    return (
        f"floor: {jobs} x (Job, then ConfigMap and Secret), {clients} at once: {jobs / took:.1f}/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=800)
    parser.add_argument("--hold", action="store_true", help="submit held jobs")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="first, the floor: the same objects made straight with lightkube, no kbatch",
    )
    args = parser.parse_args()
    helm = installed("helm/build.sh")
    with k8s_cluster(nodes=2) as cluster, tempfile.TemporaryDirectory() as tmp:
        shared = _install(cluster, helm, "kbatch", "--set", f"kubernetes.namespace={SHARED_NS}")
        root = Path(tmp)
        config = root / "kbatch.toml"
        config.write_text(
            'backend = "kubernetes"\n[kubernetes]\n'
            f'kubeconfig = "{shared.kubeconfig}"\nnamespace_mode = "shared"\n'
            f'namespace = "{SHARED_NS}"\nimage = "busybox:stable"\n'
        )
        if args.floor:
            print(asyncio.run(_floor(shared.kubeconfig, args.jobs, args.clients)))
        server = KbatchServer(root / "s", args=["--config", str(config)], log_level="warning")
        server.start()
        try:
            spec = JobSpec(script="#!/bin/sh\ntrue\n", name="rate", workdir="/tmp", hold=args.hold)
            with server.client() as warm:
                for _ in range(10):
                    warm.submit(spec)
            per_client = args.jobs // args.clients
            errors: list[BaseException] = []

            def submit_many() -> None:
                try:
                    with server.client() as client:
                        for _ in range(per_client):
                            client.submit(spec)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=submit_many) for _ in range(args.clients)]
            begun = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            took = time.perf_counter() - begun
            total = per_client * args.clients
            print(
                f"{total} submissions from {args.clients} clients in {took:.1f} s: "
                f"{total / took:.1f}/s ({len(errors)} errors{': ' + repr(errors[0]) if errors else ''})"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
