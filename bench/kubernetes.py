"""Part 4: the Kubernetes backend against a real control plane, ``kubectl create`` as the floor.

The figures this section owns (referred to by :mod:`bench.targets`):

- ``kubectl_create``: ``kubectl create -f job.yaml`` of the Job the backend
  would make, fresh process, until the command returns (the object exists);
- ``submit``: ``kbatch submit`` against a server on the Kubernetes backend,
  until the Job object exists;
- ``submit_rate``: submissions per second through the HTTP API;
- ``list_1000`` and ``list_10000``: ``kqueue`` with that many Jobs, served
  from the backend's watch cache.

They are measured only when :mod:`kbatch.backends.kubernetes` can be imported
and the control plane of tools/k8s/build.sh is there; otherwise the section
reports why it measured nothing and every comparison and target that needs
it says "not measured".
"""

from __future__ import annotations

import importlib
import importlib.util

from bench.context import Context
from bench.report import SectionResult

__all__ = ["TITLE", "available", "run"]

TITLE = "4. Kubernetes backend"
BACKEND_MODULE = "kbatch.backends.kubernetes"


def available() -> str | None:
    """None when the backend can be measured, else why not."""
    try:
        found = importlib.util.find_spec(BACKEND_MODULE) is not None
    except ImportError as exc:
        return f"backend not available ({BACKEND_MODULE} cannot be imported: {exc})"
    if not found:
        return f"backend not available ({BACKEND_MODULE} does not exist in this checkout)"
    try:
        importlib.import_module(BACKEND_MODULE)
    except Exception as exc:
        return f"backend not available ({BACKEND_MODULE} cannot be imported: {exc})"
    return None


def run(ctx: Context, result: SectionResult) -> None:
    reason = available()
    if reason is not None:
        result.not_measured(reason)
        return
    result.not_measured(
        f"{BACKEND_MODULE} imports, but this harness has no Kubernetes measurements yet "
        "(the figures this section owns are listed in bench/kubernetes.py)"
    )
