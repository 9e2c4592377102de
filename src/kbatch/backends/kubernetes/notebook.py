"""The user's notebook as the default environment of their jobs.

KubeSpawner's singleuser pods carry ``component=singleuser-server`` and
``hub.jupyter.org/username=<slug>``.  From such a pod a job takes the image,
the volumes and their mounts (the user's home), the non-secret environment,
node selector, tolerations and the pod's and the container's security
contexts (so a job runs as the notebook's user), so that a job sees what
the notebook sees.  Pure functions over the pod as a dict.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NOTEBOOK_LABELS", "NotebookDefaults", "notebook_defaults"]

NOTEBOOK_LABELS: dict[str, Any] = {"component": "singleuser-server"}
USERNAME_LABEL = "hub.jupyter.org/username"
USERNAME_ANNOTATION = "hub.jupyter.org/username"
# Never carried from the notebook into a job: its credentials.
SECRET_NAMES = frozenset(
    {
        "JUPYTERHUB_API_TOKEN",
        "JPY_API_TOKEN",
        "JUPYTERHUB_OAUTH_ACCESS_SCOPES",
        "JUPYTERHUB_OAUTH_SCOPES",
    }
)
NOTEBOOK_CONTAINER = "notebook"


@dataclass(frozen=True)
class NotebookDefaults:
    image: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    security_context: dict[str, Any] = field(default_factory=dict)  # the pod's
    # the notebook container's (KubeSpawner puts runAsUser, allowPrivilegeEscalation here)
    container_security_context: dict[str, Any] = field(default_factory=dict)
    namespace: str | None = None


def _main_container(pod: dict[str, Any]) -> dict[str, Any] | None:
    containers = pod.get("spec", {}).get("containers") or []
    for container in containers:
        if container.get("name") == NOTEBOOK_CONTAINER:
            return dict(container)
    return dict(containers[0]) if containers else None


def notebook_defaults(pod: dict[str, Any], *, same_namespace: bool) -> NotebookDefaults:
    """What a job takes from the user's running notebook pod.

    Volumes backed by a PersistentVolumeClaim can only be mounted in the
    claim's namespace: they are carried over only when jobs run in the
    notebook's namespace.  Secret-backed volumes and service account tokens
    are never carried over.
    """
    spec = pod.get("spec", {})
    container = _main_container(pod) or {}
    environment = {
        item["name"]: item["value"]
        for item in container.get("env") or []
        if "value" in item and item["name"] not in SECRET_NAMES
    }
    allowed: dict[str, dict[str, Any]] = {}
    for volume in spec.get("volumes") or []:
        if "persistentVolumeClaim" in volume and not same_namespace:
            continue
        if any(key in volume for key in ("secret", "projected", "hostPath")):
            continue
        allowed[volume["name"]] = copy.deepcopy(volume)
    mounts = [
        copy.deepcopy(mount)
        for mount in container.get("volumeMounts") or []
        if mount.get("name") in allowed
    ]
    used = {mount["name"] for mount in mounts}
    return NotebookDefaults(
        image=container.get("image"),
        environment=environment,
        volumes=[v for name, v in allowed.items() if name in used],
        volume_mounts=mounts,
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=copy.deepcopy(spec.get("tolerations") or []),
        security_context=copy.deepcopy(spec.get("securityContext") or {}),
        container_security_context=copy.deepcopy(container.get("securityContext") or {}),
        namespace=pod.get("metadata", {}).get("namespace"),
    )
