"""docs/jupyterhub.md grants the service no hub scope it does not need, and its blocks load."""

from __future__ import annotations

from pathlib import Path

import pytest
from traitlets.config import Config

from kbatch.errors import ConfigError
from kbatch.server.config import load_config
from kbatch.server.main import build_backend
from tests.support.jupyterhub import docs_block

HUB_ENV = {
    "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
    "JUPYTERHUB_API_TOKEN": "service-secret",
    "JUPYTERHUB_SERVICE_NAME": "kbatch",
}


def _hub_config(*blocks: str) -> Config:
    c = Config()
    for block in blocks:
        exec(block, {"c": c})  # the docs' own jupyterhub_config.py lines
    return c


def _service_scopes(c: Config) -> list[str]:
    return [
        scope
        for role in c.JupyterHub.load_roles
        if "kbatch" in role.get("services", [])
        for scope in role["scopes"]
    ]


def test_the_documented_hub_gives_the_service_no_scope() -> None:
    c = _hub_config(docs_block("jupyterhub_config.py"))
    assert _service_scopes(c) == []
    # Users may use the service and find it; their notebook's token carries just that.
    (users,) = c.JupyterHub.load_roles
    wanted = ["access:services!service=kbatch", "read:services!service=kbatch"]
    assert users["scopes"] == wanted
    assert c.Spawner.server_token_scopes[2:] == wanted


def test_job_tokens_add_only_the_tokens_scope_for_kbatch_users() -> None:
    c = _hub_config(docs_block("jupyterhub_config.py"), docs_block("job-tokens-role"))
    assert _service_scopes(c) == ["tokens!group=kbatch-users"]


def test_the_documented_configs_load(tmp_path: Path) -> None:
    env = {**HUB_ENV, "HOME": str(tmp_path)}
    local = tmp_path / "local.toml"
    local.write_text(docs_block("kbatch.toml"))
    config = load_config(local, environ=env, auth="jupyterhub")
    assert config.backend == "local"
    assert build_backend(config).config.jobs_share_server_account  # type: ignore[attr-defined]
    assert config.jupyterhub.job_token_scopes == ()

    kube = tmp_path / "kube.toml"
    kube.write_text(docs_block("kbatch-kubernetes.toml"))
    config = load_config(kube, environ=env, auth="jupyterhub")
    assert config.backend == "kubernetes" and config.jupyterhub.job_token_scopes

    # The same job tokens with the local backend: refused, saying why.
    both = tmp_path / "both.toml"
    both.write_text(
        docs_block("kbatch-kubernetes.toml").replace('backend = "kubernetes"', "")
        + "\n[local]\njobs_share_server_account = true\n"
    )
    with pytest.raises(ConfigError, match="job_token_scopes needs the Kubernetes backend"):
        load_config(both, environ=env, auth="jupyterhub")
